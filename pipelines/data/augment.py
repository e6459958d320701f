"""The training augmentation of the CrossViT/DeiT recipe, as DeiT builds it with timm's ``create_transform``:

    RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment "rand-m9-mstd0.5-inc1"
    (-> normalise -> random erasing 0.25, and Mixup 0.8 / CutMix 1.0 per batch, on the training device)

RandAugment is timm's own (``rand_augment_transform``) with DeiT's arguments: magnitude 9 on timm's scale of
10, a magnitude drawn per operation from N(9, 0.5), each of 2 operations applied with probability 0.5, the
"increasing" operation set, bicubic resampling and the data set mean as the fill of geometric operations.
Colour jitter is off, as timm switches it off when RandAugment is on (DeiT passes 0.3).

The crop is drawn first and the JPEG decoded just large enough for it (DCT scaling), then cropped and
resized in one Pillow call: timm's RandomResizedCropAndInterpolation decodes the whole image first; the
draws and the result are the same up to the decoder's rounding.

Randomness is per sample: ``sample_rng(seed, epoch, key)`` gives each sample its own generator, and timm's
draws (Python's and NumPy's global generators) are seeded from it, so a sample gets the same crop, flip and
operations in the same epoch whichever worker and task decode it, and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from crossvit.transforms import IMAGENET_MEAN
from pipelines.preprocess import MAX_PIXELS, open_image, open_reduced

DEIT_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


@dataclass(frozen=True)
class AugmentConfig:
    """The whole training augmentation: what the decode tasks do on CPUs and what the training device does.
    Every part can be switched off (0, or an empty ``auto_augment``)."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect-ratio range
    hflip: float = 0.5
    auto_augment: str = DEIT_RAND_AUGMENT  # timm's RandAugment spec; "" for none
    interpolation: str = "bicubic"  # of the crop and of RandAugment's geometric operations
    color_jitter: float = 0.0  # timm ignores colour jitter when RandAugment is on; so do we unless set
    random_erasing: float = 0.25  # on the device, per-pixel noise in normalised space (timm's "pixel" mode)
    mixup: float = 0.8  # Mixup's alpha (0: off); Mixup or CutMix per batch, p 0.5 each
    cutmix: float = 1.0  # CutMix's alpha (0: off)

    def __post_init__(self):
        # Checked here, with a clear error: a wrong value would otherwise fail inside every decode task, where
        # it looks like bad data. YAML 1.1 reads 5e-1 as a string; numbers are converted.
        def number(name: str, value) -> float:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(f"augment.{name} must be a number, not {value!r}") from None

        for name in ("hflip", "color_jitter", "random_erasing", "mixup", "cutmix"):
            object.__setattr__(self, name, number(name, getattr(self, name)))
        for name in ("scale", "ratio"):
            pair = tuple(number(name, v) for v in getattr(self, name))  # YAML and JSON give lists
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ValueError(f"augment.{name} must be two increasing positive numbers, not {pair}")
            object.__setattr__(self, name, pair)
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"augment.interpolation must be bicubic or bilinear, not {self.interpolation!r}")
        if self.auto_augment:
            try:
                rand_augment(self.auto_augment, 32, self.interpolation)
            except Exception as e:  # timm asserts or raises KeyError on a malformed spec
                raise ValueError(
                    f"augment.auto_augment {self.auto_augment!r} is no timm RandAugment spec: {e!r}"
                ) from None


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed from (run seed, epoch, sample key), the same in every process and on every machine
    (Python's ``hash`` of a string is salted per process, so it cannot be used here). A sample's id
    (``reader.sample_id``: its shard's URI, ``#``, its key) counts without the shard's folders, so that a data
    set copied to another bucket or prefix trains alike."""
    shard, sep, within = key.partition("#")  # a sample's key may hold "/" (its folders in the tar)
    key = shard.rpartition("/")[2] + sep + within
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The generator of one sample's augmentation."""
    return random.Random(sample_seed(seed, epoch, key))


def crop_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, height, width), drawn from ``rng``: torchvision's and timm's
    algorithm (10 tries at a random area and log-uniform aspect ratio, then a central crop)."""
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


_RAND_AUGMENT_CACHE: dict[tuple[str, int, str], object] = {}


def rand_augment(spec: str, size: int, interpolation: str):
    """timm's RandAugment for ``spec`` with the arguments DeiT's create_transform passes: translations up to
    45 % of the image, the data set mean as fill, the recipe's interpolation (built once per process)."""
    key = (spec, size, interpolation)
    if key not in _RAND_AUGMENT_CACHE:
        # timm (and torch and torchvision, which it imports) only here: see pipelines/preprocess.py.
        from timm.data import rand_augment_transform

        hparams = {
            "translate_const": int(size * 0.45),
            "img_mean": tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
            "interpolation": Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR,
        }
        _RAND_AUGMENT_CACHE[key] = with_safe_posterize(rand_augment_transform(spec, hparams))
    return _RAND_AUGMENT_CACHE[key]


def with_safe_posterize(transform):
    """A timm transform (a RandAugment, or a Compose holding one) with its posterize operations made safe
    for Pillow 13 (see ``_posterize``); returned for chaining."""
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, for every number of bits its operations ask for. At the top of the magnitude range
    (10, which the magnitude noise reaches: about 1 sample in 700) PosterizeIncreasing keeps 0 bits; Pillow
    13 refuses that (ValueError) where earlier versions, those DeiT was trained with, returned black. Black
    it is: otherwise those samples would fail to decode and be skipped as bad."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def rand_augment_settings(spec: str) -> tuple[int, float, float]:
    """(operations, magnitude on timm's scale of 10, magnitude std) of a timm RandAugment spec, for the
    tensor implementation of the GPU-decode path: "rand-m9-mstd0.5-inc1" -> (2, 9.0, 0.5)."""
    values = dict(re.findall(r"-(mstd|m|n)([\d.]+)", spec))
    return int(values.get("n", 2)), float(values.get("m", 10)), float(values.get("mstd", 0))


def train_transform(data: bytes, size: int, aug: AugmentConfig, rng: random.Random, max_pixels: int = MAX_PIXELS):
    """RandomResizedCrop + flip + timm's RandAugment (+ colour jitter) -> uint8 HWC; every draw comes from
    ``rng`` (``sample_rng``), so the result is a function of the sample and its seed."""
    with open_image(data, max_pixels) as probe:
        W, H = probe.size
    top, left, h, w = crop_box(W, H, aug.scale, aug.ratio, rng)
    s = max(size / w, size / h, 0.0)  # decode just large enough that the crop keeps >= size pixels
    img, scale = open_reduced(data, W * min(1.0, s), H * min(1.0, s), max_pixels)
    box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
    resample = Image.BICUBIC if aug.interpolation == "bicubic" else Image.BILINEAR
    img = img.resize((size, size), resample, box=box)
    if aug.hflip and rng.random() < aug.hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if aug.auto_augment:
        # timm draws from Python's and NumPy's global generators: seeded for this sample (decode tasks run
        # one sample at a time, so nothing else draws from them in between).
        draw = rng.getrandbits(63)
        random.seed(draw)
        np.random.seed(draw % 2**32)
        img = rand_augment(aug.auto_augment, size, aug.interpolation)(img)
    if aug.color_jitter:
        import torch  # torch and torchvision here only: see pipelines/preprocess.py
        from torchvision.transforms import ColorJitter

        torch.default_generator.manual_seed(rng.getrandbits(63))  # torchvision's ColorJitter draws from torch
        img = ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter)(img)
    return np.asarray(img)
