"""Ray Data streaming of WebDataset shards: decode + augment on CPUs, uint8 batches out.

    ds = read_split("s3://bucket/datasets/sample", "train", image_size=240, train=True)
    for batch in ds.iter_torch_batches(batch_size=128, local_shuffle_buffer_size=1024):
        x, y = to_model_input(batch["image"].to(device), batch["label"].to(device), ...)

Images travel through the object store as uint8 HWC at the model's input size (4x less than float32);
normalisation, random erasing and Mixup/CutMix run on the training device (``to_model_input``).

Speed comes from doing little per row: a shard is read as one stream into Arrow blocks of raw bytes, the
decode task works a batch at a time, JPEGs are decoded at a reduced DCT scale whenever the crop still has at
least the output resolution after it (so no detail the output could hold is lost), and crop + resize is one
Pillow call.

Bad data never becomes a wrong label: a corrupt image, a truncated tar, a missing or out-of-range label is
skipped and counted with its key in the log; past ``max_bad_fraction`` the job stops with BadDataError.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image
from ray.data.datasource import FileBasedDatasource, FileShuffleConfig
from torchvision import transforms as T

from crossvit.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size
from pipelines import storage
from pipelines.bad_samples import BadDataError, bad_sample_counter
from pipelines.shards import load_manifest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
BLOCK_ROWS = 64  # samples per block, and so per decode call


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
    random_erasing: float = 0.25  # applied on the device, after normalisation (see to_model_input)


# --------------------------------------------------------------------------------------------------------
# Reading shards: one tar stream into Arrow blocks of raw samples
# --------------------------------------------------------------------------------------------------------


INT64_MAX = 2**63 - 1


def _parse_label(sample: dict[str, bytes]) -> int | None:
    """The integer label from ``cls``, or ``label``/``cls``/``class`` in ``json``; ValueError if malformed."""
    if "cls" in sample:
        label = int(sample["cls"].decode().strip())
    elif "json" in sample:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict):
            raise ValueError("json member is not an object")
        label = next((meta[k] for k in ("label", "cls", "class") if k in meta), None)
        if label is None:
            return None
        if type(label) is not int:  # bool is an int subclass; "3" or 3.0 are not labels either
            raise ValueError(f"json label {label!r} is not an integer")
    else:
        return None
    if not -INT64_MAX <= label <= INT64_MAX:
        raise ValueError(f"label {label} is out of range")
    return label


def _row(key: str, sample: dict[str, bytes]) -> dict:
    """A raw sample as a row: the image bytes, the label (-1 if missing) and what is wrong with it, if anything."""
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    try:
        label = _parse_label(sample)
        error = None if image is not None else "no image member (jpg/jpeg/png/webp)"
    except (ValueError, UnicodeDecodeError) as e:
        label, error = None, f"unreadable label: {e}"
    if label is None and error is None:
        error = "no label (cls member or json label)"
    return {"key": key, "image": image, "label": -1 if label is None else label, "error": error}


def _error_row(key: str, error: str) -> dict:
    return {"key": key, "image": None, "label": -1, "error": error}


def read_tar(stream, path: str, expected_samples: int | None = None) -> Iterator[pa.Table]:
    """Samples of one tar as Arrow blocks of BLOCK_ROWS rows (key, image bytes, label, error).

    A broken stream keeps the samples before the break and adds an error row for the one it cut. Python's
    tarfile takes a cut between two members for a clean end, so when the manifest says how many samples a
    shard holds, every missing one becomes an error row too: nothing disappears uncounted.
    """
    rows: list[dict] = []
    key, sample, read = None, {}, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                # WebDataset's key: the path up to the first dot of the file name (folders included).
                folder, _, filename = member.name.rpartition("/")
                stem, _, suffix = filename.partition(".")
                base = f"{folder}/{stem}" if folder else stem
                if base != key:
                    if key is not None:
                        rows.append(_row(key, sample))
                        read += 1
                    key, sample = base, {}
                sample[suffix.lower()] = tar.extractfile(member).read()
                if len(rows) >= BLOCK_ROWS:
                    yield pa.Table.from_pylist(rows)
                    rows = []
        if key is not None:
            rows.append(_row(key, sample))
            read += 1
    except (tarfile.TarError, EOFError) as e:  # storage I/O errors propagate: Ray Data retries the read
        where = f"after {key}" if key else "at the start"
        rows.append(_error_row(f"{path}#truncated-{where}", f"truncated or corrupt tar {where}: {e}"))
        read += 1
    for i in range(read, expected_samples or 0):
        rows.append(_error_row(f"{path}#missing-{i}", f"tar ends after {read} of {expected_samples} samples"))
    if rows:
        yield pa.Table.from_pylist(rows)


class ShardDatasource(FileBasedDatasource):
    """WebDataset tars -> rows (key, image bytes, label, error); never fails a read for bad data."""

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["tar"]

    def __init__(self, paths: list[str], expected_samples: dict[str, int] | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self._expected = expected_samples or {}  # "split/shard-000000.tar" -> samples, from the manifest

    def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
        expected = self._expected.get("/".join(path.rsplit("/", 2)[-2:]))
        yield from read_tar(stream, path, expected)


# --------------------------------------------------------------------------------------------------------
# Decoding and augmenting, a batch at a time
# --------------------------------------------------------------------------------------------------------


def _open_reduced(data: bytes, need_w: float, need_h: float) -> tuple[Image.Image, float]:
    """Open an image, decoding a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it at least
    need_w x need_h in original pixels' terms; returns the image and its scale relative to the original."""
    img = Image.open(io.BytesIO(data))
    width = img.width
    if img.format == "JPEG":
        img.draft("RGB", (math.ceil(need_w), math.ceil(need_h)))
    img = img.convert("RGB")
    return img, img.width / width


def train_transform(data: bytes, size: int, aug: AugmentConfig, rng: random.Random) -> np.ndarray:
    """RandomResizedCrop (bicubic) + flip + RandAugment (+ colour jitter) -> uint8 HWC."""
    with Image.open(io.BytesIO(data)) as probe:
        W, H = probe.size
    # Draw the crop on the full-size geometry, exactly as torchvision does.
    geometry = torch.empty(1).expand(1, H, W)  # a zero-memory stand-in with the image's size
    top, left, h, w = T.RandomResizedCrop.get_params(geometry, list(aug.scale), list(aug.ratio))
    # Decode just large enough that the crop keeps >= size pixels on both sides.
    s = max(size / w, size / h, 0.0)
    img, scale = _open_reduced(data, W * min(1.0, s), H * min(1.0, s))
    box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if aug.hflip and rng.random() < aug.hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
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
    img, scale = _open_reduced(data, W * min(1.0, factor), H * min(1.0, factor))
    new_w, new_h = round(W * factor), round(H * factor)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)  # as torchvision's CenterCrop
    # One resample from the (reduced) decode to the crop: the box is the crop in decoded pixels.
    k = scale / factor
    box = (left * k, top * k, (left + size) * k, (top + size) * k)
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=box))


class DecodeBatch:
    """The map_batches function: raw rows -> {"image": uint8 (B, S, S, 3), "label": int64 (B,)}.

    With ``on_device=True`` images are only checked (headers parsed) and shipped encoded, as
    {"encoded": binary, "label": int64}, for ``decode_on_device`` on the training GPU.
    """

    def __init__(self, size: int, train: bool, aug: AugmentConfig, num_classes: int, counter, on_device: bool = False):
        self.size, self.train, self.aug, self.num_classes, self.counter = size, train, aug, num_classes, counter
        self.on_device = on_device

    def _transform(self, data: bytes, rng: random.Random):
        if self.on_device:
            Image.open(io.BytesIO(data)).verify()  # headers and structure only; pixels are decoded on the GPU
            return data
        return train_transform(data, self.size, self.aug, rng) if self.train else eval_transform(data, self.size)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray] | pa.Table:
        # Every Ray worker starts torch's generator from the same default seed: reseed from the OS.
        torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
        rng = random.Random()
        images, labels, bad = [], [], []
        for key, data, label, error in zip(*(batch.column(c).to_pylist() for c in ("key", "image", "label", "error"))):
            if error is None and not 0 <= label < self.num_classes:
                error = f"label {label} outside [0, {self.num_classes})"
            if error is None:
                try:
                    image = self._transform(data, rng)
                except Exception as e:  # Pillow raises many types for corrupt data
                    error = f"cannot decode image: {type(e).__name__}: {e}"
            if error is not None:
                log.warning("skipping sample %s: %s", key, error)
                bad.append(key)
                continue
            images.append(image)
            labels.append(label)
        problem = ray.get(self.counter.report.remote(batch.num_rows, bad))
        if problem:
            raise BadDataError(problem)
        if self.on_device:
            return pa.table({"encoded": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})
        if not images:
            return {"image": np.zeros((0, self.size, self.size, 3), np.uint8), "label": np.zeros(0, np.int64)}
        return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.int64)}


def read_split(
    data_uri: str,
    split: str,
    *,
    image_size: int,
    train: bool,
    augment: AugmentConfig = AugmentConfig(),
    seed: int | None = None,
    counter=None,
    decode_on_device: bool = False,
) -> ray.data.Dataset:
    """A Ray Dataset of one split: shard order reshuffled every epoch (train), decoded and augmented.

    ``counter`` (from ``bad_sample_counter``) sets the bad-sample limit and reports what was skipped; by
    default at most 1 % of samples may be bad. The bounded local shuffle belongs to the consumer:
    ``iter_torch_batches(local_shuffle_buffer_size=...)``.

    ``decode_on_device=True`` ships the encoded images instead (for GPU nodes whose CPUs cannot keep up):
    consume with ``iter_batches(batch_format="pyarrow")`` and ``decode_on_device``.
    """
    manifest = load_manifest(data_uri)
    if split not in manifest["splits"]:
        raise ValueError(f"{data_uri} has no split {split!r}; it has {sorted(manifest['splits'])}")
    fs, root = storage.filesystem(data_uri)
    paths = [f"{root}/{s['name']}" for s in manifest["splits"][split]["shards"]]
    # A new shard order on every execution (epoch), reproducible when a seed is given.
    shuffle = FileShuffleConfig(seed=seed if seed is not None else random.randrange(2**31)) if train else None
    expected = {s["name"]: s["samples"] for s in manifest["splits"][split]["shards"] if "samples" in s}
    source = ShardDatasource(paths, expected, filesystem=fs, shuffle=shuffle)
    decode = DecodeBatch(
        image_size, train, augment, len(manifest["classes"]), counter or bad_sample_counter(), decode_on_device
    )
    # batch_size=None: decode each block as the read yields it (BLOCK_ROWS samples).
    # One read task per shard (no block splitting), so that Ray can fuse read and decode.
    ds = ray.data.read_datasource(source, override_num_blocks=len(paths))
    ds = ds.map_batches(decode, batch_size=None, batch_format="pyarrow")
    # The pipeline is a single fused operator: Ray Data's per-operator resource reservation would only hold
    # back part of the CPUs from it (measured: 346 -> 411 img/s on 2 cores, benchmarks/RESULTS.md).
    ds.context.op_resource_reservation_enabled = False
    return ds


# --------------------------------------------------------------------------------------------------------
# On the training device
# --------------------------------------------------------------------------------------------------------


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

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    x = (images.permute(0, 3, 1, 2).float() - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if not train:
        return x, labels
    if random_erasing:
        erase = v2.RandomErasing(p=random_erasing, value="random")
        x = torch.stack([erase(img) for img in x])
    mixers = [m for m, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha]
    if mixers:
        alphas = [a for a in (mixup_alpha, cutmix_alpha) if a]
        mixer = v2.RandomChoice([m(alpha=a, num_classes=num_classes) for m, a in zip(mixers, alphas)])
        x, labels = mixer(x, labels)
    return x, labels


def decode_on_device(
    encoded: pa.Table | dict,
    *,
    size: int,
    train: bool,
    device: torch.device | str,
    augment: AugmentConfig = AugmentConfig(),
    counter=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch from ``read_split(..., decode_on_device=True)`` -> uint8 (B, S, S, 3) and labels on ``device``.

    JPEGs are decoded by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA), other formats on the
    CPU; then the same augmentation as the CPU path runs there with torchvision's tensor transforms. A JPEG
    that only fails at decode time is logged, dropped and reported to ``counter`` (the dataset's
    bad_sample_counter), which raises BadDataError past its limit as on the CPU path.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    data = encoded.column("encoded").to_pylist() if isinstance(encoded, pa.Table) else list(encoded["encoded"])
    labels = encoded.column("label").to_pylist() if isinstance(encoded, pa.Table) else list(encoded["label"])
    images, kept, failed = [], [], []
    for i, raw in enumerate(data):
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        try:
            if raw[:2] == b"\xff\xd8":
                images.append(decode_jpeg(buf, mode=ImageReadMode.RGB, device=device))
            else:
                images.append(decode_image(buf, mode=ImageReadMode.RGB).to(device))
            kept.append(labels[i])
        except RuntimeError as e:
            log.warning("dropping an image that failed to decode on %s: %s", device, e)
            failed.append(f"batch-item-{i}")
    if counter is not None and failed:  # the rows were counted as seen on the CPU side already
        problem = ray.get(counter.report.remote(0, failed))
        if problem:
            raise BadDataError(problem)
    bicubic = T.InterpolationMode.BICUBIC
    out = []
    for img in images:
        if train:
            top, left, h, w = T.RandomResizedCrop.get_params(img, list(augment.scale), list(augment.ratio))
            img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=bicubic, antialias=True)
            if random.random() < augment.hflip:
                img = TF.horizontal_flip(img)
            if augment.rand_augment_ops:
                m = round(min(30.0, max(0.0, random.gauss(augment.rand_augment_magnitude, augment.rand_augment_std))))
                img = v2.RandAugment(augment.rand_augment_ops, m, interpolation=T.InterpolationMode.BILINEAR)(img)
        else:
            img = TF.center_crop(
                TF.resize(img, [eval_resize_size(size)], interpolation=bicubic, antialias=True), [size]
            )
        out.append(img)
    if not out:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device), torch.zeros(0, dtype=torch.long)
    return torch.stack(out).permute(0, 2, 3, 1), torch.tensor(kept, device=device)
