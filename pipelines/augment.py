"""Decoding and augmenting one image on a CPU: the training recipe and the evaluation transform.

Pure functions of (image bytes, size, config, RNG) with no Ray in sight, so the decode tasks of the ingest
pipeline, benchmarks and GPU-node checks all run the same code.

Randomness is per sample: ``sample_rng(seed, epoch, key)`` gives each sample its own generator, so a sample
gets the same crop, flip and RandAugment ops in the same epoch whichever worker and task decode it (Ray Data
hands blocks to tasks dynamically), and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from crossvit.transforms import eval_resize_size


@dataclass(frozen=True)
class AugmentConfig:
    """The CrossViT/DeiT training recipe; every part can be switched off."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop, bicubic
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment_ops: int = 2  # RandAugment "rand-m9-mstd0.5": 2 ops, magnitude ~ N(9, 0.5) per image
    rand_augment_magnitude: float = 9.0  # 0 ops switches it off
    rand_augment_std: float = 0.5
    # DeiT passes 0.3, but timm ignores colour jitter when RandAugment is on; so do we unless it is set here.
    color_jitter: float = 0.0


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed from (run seed, epoch, sample key), the same in every process and on every machine
    (Python's ``hash`` of a string is salted per process, so it cannot be used here)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The generator of one sample's augmentation. torchvision's RandAugment draws from torch's global
    generator, which is seeded from the same value (see ``train_transform``)."""
    return random.Random(sample_seed(seed, epoch, key))


def crop_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, height, width), drawn from ``rng``: torchvision's algorithm (10 tries
    at a random area and log-uniform aspect ratio, then a central crop), which only draws from torch's global
    generator (``T.RandomResizedCrop.get_params``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def open_reduced(data: bytes, need_w: float, need_h: float) -> tuple[Image.Image, float]:
    """Open an image, decoding a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it at least
    need_w x need_h in original pixels' terms; returns the image and its scale relative to the original."""
    img = Image.open(io.BytesIO(data))
    width = img.width
    if img.format == "JPEG":
        img.draft("RGB", (math.ceil(need_w), math.ceil(need_h)))
    img = img.convert("RGB")
    return img, img.width / width


def train_transform(data: bytes, size: int, aug: AugmentConfig, rng: random.Random) -> np.ndarray:
    """RandomResizedCrop (bicubic) + flip + RandAugment (+ colour jitter) -> uint8 HWC; every draw comes
    from ``rng`` (``sample_rng``), so the result is a function of the sample and its seed."""
    with Image.open(io.BytesIO(data)) as probe:
        W, H = probe.size
    top, left, h, w = crop_box(W, H, aug.scale, aug.ratio, rng)
    # Decode just large enough that the crop keeps >= size pixels on both sides.
    s = max(size / w, size / h, 0.0)
    img, scale = open_reduced(data, W * min(1.0, s), H * min(1.0, s))
    box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if aug.hflip and rng.random() < aug.hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if aug.rand_augment_ops or aug.color_jitter:
        # torchvision's RandAugment and ColorJitter draw from torch's CPU generator. Only that one is seeded:
        # torch.manual_seed also visits every accelerator backend, 170 us a call against 1 us.
        torch.default_generator.manual_seed(rng.getrandbits(63))
    if aug.rand_augment_ops:
        magnitude = round(min(30.0, max(0.0, rng.gauss(aug.rand_augment_magnitude, aug.rand_augment_std))))
        img = T.RandAugment(aug.rand_augment_ops, magnitude, interpolation=T.InterpolationMode.BILINEAR)(img)
    if aug.color_jitter:
        img = T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter)(img)
    return np.asarray(img)


def eval_transform(data: bytes, size: int) -> np.ndarray:
    """Resize the short side to size / crop_pct (bicubic), centre-crop size x size -> uint8 HWC."""
    with Image.open(io.BytesIO(data)) as probe:
        W, H = probe.size
    short = eval_resize_size(size)
    factor = short / min(W, H)
    img, scale = open_reduced(data, W * min(1.0, factor), H * min(1.0, factor))
    new_w, new_h = round(W * factor), round(H * factor)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)  # as torchvision's CenterCrop
    # One resample from the (reduced) decode to the crop: the box is the crop in decoded pixels.
    k = scale / factor
    box = (left * k, top * k, (left + size) * k, (top + size) * k)
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=box))
