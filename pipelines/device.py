"""What runs on the training device: normalisation (pipelines/preprocess.py), random erasing and
Mixup/CutMix, and the GPU-decode path.

Images arrive as uint8 HWC (4x less to move than float32); everything that turns them into the model's
input happens here, on the device that runs the model. No Ray at import time: the GPU checks import this
module on machines without Ray.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import torch

from crossvit.transforms import IMAGENET_MEAN
from pipelines.data.augment import AugmentConfig, crop_box, rand_augment_settings, sample_rng
from pipelines.preprocess import eval_transform_tensor, normalize

log = logging.getLogger(__name__)

# torchvision is imported in the functions that use it: its import costs about 1.6 s of CPU (it pulls in
# torch._dynamo), paid by every Ray process that unpickles a function of a module that imports it at the top
# (Train's controller, Ray Data's coordinators), most of which never touch an image.


def to_model_input(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    train: bool,
    random_erasing: float = 0.0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, H, W, 3) on the device -> normalised float (B, 3, H, W) and targets.

    Training adds random erasing (per-pixel normal noise, in normalised space as in timm/DeiT) and, when an
    alpha is set, Mixup or CutMix (one of the two per batch, p 0.5 each), which make the targets soft
    (B, num_classes); otherwise targets stay class indices.
    """
    from torchvision.transforms import v2

    x = normalize(images, channels_last=False)
    if train and random_erasing:
        erase = v2.RandomErasing(p=random_erasing, value="random")
        x = torch.stack([erase(img) for img in x])
    if train and (mixup_alpha or cutmix_alpha):
        mixers = [
            m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if a
        ]
        x, labels = v2.RandomChoice(mixers)(x, labels)
    # Last, so that nothing above (torch.stack makes a new contiguous tensor) undoes the layout.
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels


def _column(batch: pa.Table | dict, name: str) -> list:
    return batch.column(name).to_pylist() if isinstance(batch, pa.Table) else list(batch[name])


def decode_on_device(
    encoded: pa.Table | dict,
    *,
    size: int,
    train: bool,
    device: torch.device | str,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    counter=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch from ``read_split(..., decode_on_device=True)`` (columns key, encoded, label, epoch) -> uint8
    (B, S, S, 3) and labels on ``device``.

    JPEGs are decoded by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA), other formats on the
    CPU; then the same augmentation as the CPU path runs there with torchvision's tensor transforms, each
    sample's draws from (seed, epoch, key) as on the CPU path. A JPEG that only fails at decode time is
    logged, dropped and reported by its key to ``counter`` (the dataset's bad_sample_counter), which raises
    BadDataError past its limit as on the CPU path.
    """
    keys, data, labels = _column(encoded, "key"), _column(encoded, "encoded"), _column(encoded, "label")
    epochs = _column(encoded, "epoch")
    images, kept, failed = [], [], []
    decoded = decode_all(data, keys, device)
    for img, key, label, epoch in zip(decoded, keys, labels, epochs):
        if img is None:
            failed.append((epoch, key))
            continue
        images.append(
            _augment(img, size, augment or AugmentConfig(), sample_rng(seed, epoch, key))
            if train
            else eval_transform_tensor(img, size)
        )
        kept.append(label)
    if counter is not None and failed:  # the rows were counted as seen on the CPU side already
        from pipelines.data.bad_samples import (
            report_bad_keys,  # imports Ray: only where it runs (the GPU checks run without)
        )

        report_bad_keys(counter, failed)
    if not images:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device), torch.zeros(
            0, dtype=torch.long, device=device
        )
    return torch.stack(images).permute(0, 2, 3, 1), torch.tensor(kept, device=device)


def decode_all(data: list[bytes], keys: list[str], device) -> list[torch.Tensor | None]:
    """Decode a batch: every JPEG in one ``decode_jpeg`` call (nvJPEG decodes a list as a batch on CUDA),
    other formats on the CPU. One bad JPEG fails the whole call; then each is decoded alone, so that only
    the bad one is dropped (None), with a warning naming its key."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    buffers = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in data]
    jpegs = [i for i, raw in enumerate(data) if raw[:2] == b"\xff\xd8"]
    out: list[torch.Tensor | None] = [None] * len(data)
    try:
        for i, img in zip(jpegs, decode_jpeg([buffers[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)):
            out[i] = img
    except RuntimeError:  # one of them is bad: find it below
        pass
    jpeg = set(jpegs)
    for i, buf in enumerate(buffers):
        if out[i] is not None:
            continue
        try:
            if i in jpeg:
                out[i] = decode_jpeg(buf, mode=ImageReadMode.RGB, device=device)
            else:
                out[i] = decode_image(buf, mode=ImageReadMode.RGB).to(device)
        except RuntimeError as e:
            log.warning("dropping sample %s: it failed to decode on %s: %s", keys[i], device, e)
    return out


def _augment(img: torch.Tensor, size: int, aug: AugmentConfig, rng) -> torch.Tensor:
    """The CPU path's augmentation on a decoded tensor. timm's RandAugment works on PIL images only, so this
    uses torchvision's tensor RandAugment at the same magnitude (9 of timm's 10 = 27 of torchvision's 30
    steps: 0.9 of each operation's range) and number of operations; it applies every drawn operation (timm
    each with p 0.5), draws one magnitude per image and has no "increasing" variants. Its geometric operations
    resample bilinearly: torchvision's tensor affine ops have no bicubic (the crop stays bicubic)."""
    from torchvision.transforms import InterpolationMode, v2
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = crop_box(img.shape[-1], img.shape[-2], aug.scale, aug.ratio, rng)
    resample = InterpolationMode.BICUBIC if aug.interpolation == "bicubic" else InterpolationMode.BILINEAR
    img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=resample, antialias=True)
    if aug.hflip and rng.random() < aug.hflip:
        img = TF.horizontal_flip(img)
    if aug.auto_augment:
        ops, magnitude, std = rand_augment_settings(aug.auto_augment)
        # RandAugment draws its ops from torch's CPU generator: seeded for this sample, and the training
        # process's own stream (drop-path, Mixup/CutMix) left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(rng.getrandbits(63))
            m = round(3 * min(10.0, max(0.0, rng.gauss(magnitude, std))))
            fill = [round(255 * c) for c in IMAGENET_MEAN]  # as timm's, the data set mean
            img = v2.RandAugment(ops, m, num_magnitude_bins=31, interpolation=InterpolationMode.BILINEAR, fill=fill)(
                img
            )
    return img
