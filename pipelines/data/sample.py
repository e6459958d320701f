"""A built-in, procedural image data set: learnable, deterministic by seed, nothing downloaded.

Each class is a (shape, colour) pair drawn at a random place, size and rotation on a noisy background, so a
model must look at the object to tell classes apart. It is written as an ordinary ImageNet-layout folder
(``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``, ``LOC_synset_mapping.txt``) and then goes through the same
``prepare_data`` path as real data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


@dataclass(frozen=True)
class SampleSpec:
    num_classes: int = 10
    train_per_class: int = 200
    val_per_class: int = 40
    width: int = 96
    height: int = 72
    seed: int = 0


def _shape_and_colour(label: int) -> tuple[str, str]:
    """Class i = (shape i mod 5, colour i mod 4): 20 distinct pairs (5 and 4 are coprime); the first four
    classes differ in colour and shape, so a small data set is learnt in a few epochs, and telling more
    classes apart takes the shape too."""
    return SHAPES[label % len(SHAPES)], list(COLOURS)[label % len(COLOURS)]


def max_classes() -> int:
    return len(SHAPES) * len(COLOURS)


def class_names(num_classes: int) -> list[str]:
    """Human-readable names: "red circle", "green square", ..."""
    if num_classes > max_classes():
        raise ValueError(f"the sample data set has at most {max_classes()} classes")
    return [" ".join(reversed(_shape_and_colour(i))) for i in range(num_classes)]


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def draw_sample(label: int, num_classes: int, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``label``."""
    shape, colour_name = _shape_and_colour(label)
    colour = np.array(COLOURS[colour_name])
    background = rng.integers(60, 200, size=3)
    pixels = np.clip(background + rng.normal(0, 18, size=(height, width, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.32) * min(width, height)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    fill = tuple(int(v) for v in np.clip(colour + rng.normal(0, 20, size=3), 0, 255))
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r / 3)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, angle), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=fill)
    else:  # cross: two rotated bars
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a) * r, math.sin(a) * r
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill, width=max(2, int(r / 2.5)))
    return img


def write_sample_dataset(root: str | Path, spec: SampleSpec = SampleSpec()) -> Path:
    """Write the data set under ``root`` in ImageNet layout; the same spec always gives the same bytes."""
    root = Path(root)
    names = class_names(spec.num_classes)
    wnids = [f"s{i:04d}" for i in range(spec.num_classes)]
    for split, per_class, offset in (("train", spec.train_per_class, 0), ("val", spec.val_per_class, 1)):
        for label, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([spec.seed, offset, label])
            for i in range(per_class):
                img = draw_sample(label, spec.num_classes, spec.width, spec.height, rng)
                img.save(folder / f"{wnid}_{split}_{i:05d}.JPEG", quality=90)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)))
    return root
