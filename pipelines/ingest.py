"""Ray Data streaming of WebDataset shards: decode + augment on CPUs, uint8 batches out.

    counter = bad_sample_counter()
    ds = read_split("s3://bucket/datasets/sample", "train", image_size=240, train=True, seed=0, counter=counter)
    for epoch in range(epochs):
        ray.get(counter.set_epoch.remote(epoch))  # before iterating: see pipelines/bad_samples.py
        for batch in ds.iter_torch_batches(batch_size=128, local_shuffle_buffer_size=1024):
            x, y = to_model_input(batch["image"].to(device), batch["label"].to(device), ...)  # pipelines/device.py

Images travel through the object store as uint8 HWC at the model's input size (4x less than float32);
normalisation, random erasing and Mixup/CutMix run on the training device (pipelines/device.py).

Speed comes from doing little per row: a shard is read as one stream into Arrow blocks of raw bytes, the
decode task works a batch at a time, JPEGs are decoded at a reduced DCT scale whenever the crop still has at
least the output resolution after it (so no detail the output could hold is lost), and crop + resize is one
Pillow call (pipelines/augment.py).

Randomness is a function of the seed: the shard order of (seed, epoch), each sample's augmentation of
(seed, epoch, sample key), whichever task decodes it.

Bad data never becomes a wrong label: a corrupt image, a truncated tar, a missing or out-of-range label is
skipped and counted with its key in the log; past ``max_fraction`` the job stops with BadDataError.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pyarrow as pa
import ray
from PIL import Image
from ray.data.datasource import FileBasedDatasource, ReadTask

from pipelines import storage
from pipelines.augment import AugmentConfig, eval_transform, sample_rng, train_transform
from pipelines.bad_samples import BadDataError, bad_sample_counter
from pipelines.shards import load_manifest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
BLOCK_ROWS = 64  # samples per block, and so per decode call
INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------------------------
# Reading shards: one tar stream into Arrow blocks of raw samples
# --------------------------------------------------------------------------------------------------------


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


def _row(shard: str, key: str, sample: dict[str, bytes]) -> dict:
    """A raw sample as a row: the image bytes, the label (-1 if missing) and what is wrong with it, if anything."""
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    try:
        label = _parse_label(sample)
        error = None if image is not None else "no image member (jpg/jpeg/png/webp)"
    except (ValueError, UnicodeDecodeError) as e:
        label, error = None, f"unreadable label: {e}"
    if label is None and error is None:
        error = "no label (cls member or json label)"
    return {"shard": shard, "key": key, "image": image, "label": -1 if label is None else label, "error": error}


def _error_row(shard: str, key: str, error: str) -> dict:
    return {"shard": shard, "key": key, "image": None, "label": -1, "error": error}


def read_tar(stream, shard: str, expected_samples: int | None = None) -> Iterator[pa.Table]:
    """Samples of one tar as Arrow blocks of BLOCK_ROWS rows (shard, key, image bytes, label, error).

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
                        rows.append(_row(shard, key, sample))
                        read += 1
                    key, sample = base, {}
                sample[suffix.lower()] = tar.extractfile(member).read()
                if len(rows) >= BLOCK_ROWS:
                    yield pa.Table.from_pylist(rows)
                    rows = []
        if key is not None:
            rows.append(_row(shard, key, sample))
            read += 1
    except (tarfile.TarError, EOFError) as e:  # storage I/O errors propagate: Ray Data retries the read
        where = f"after {key}" if key else "at the start"
        rows.append(_error_row(shard, f"truncated-{where}", f"truncated or corrupt tar {where}: {e}"))
        read += 1
    for i in range(read, expected_samples or 0):
        rows.append(_error_row(shard, f"missing-{i}", f"tar ends after {read} of {expected_samples} samples"))
    if rows:
        yield pa.Table.from_pylist(rows)


def shard_name(path: str) -> str:
    """A shard's name in the data set, as the manifest writes it: ``train/shard-000000.tar``."""
    return "/".join(path.rsplit("/", 2)[-2:])


def _with_epoch(read_fn: Callable[[], Iterator[pa.Table]], epoch: int) -> Iterator[pa.Table]:
    for block in read_fn():
        yield block.append_column("epoch", pa.array(np.full(block.num_rows, epoch, np.int64)))


class ShardDatasource(FileBasedDatasource):
    """WebDataset tars -> rows (shard, key, image bytes, label, error, epoch); never fails a read for bad data.

    Every execution (epoch) asks the dataset's counter which epoch it is, stamps that on its rows and, for
    training, orders the shards by (seed, epoch): Ray's own FileShuffleConfig reseeds by execution index,
    which restarts at 0 when a worker group restarts, so a resumed run would repeat the first epochs' orders.
    """

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["tar"]

    def __init__(self, paths: list[str], expected_samples: dict[str, int], *, counter, seed: int, shuffle: bool, **kw):
        super().__init__(paths, **kw)
        self._expected = expected_samples  # "split/shard-000000.tar" -> samples, from the manifest
        self._counter, self._seed, self._reshuffle = counter, seed, shuffle

    def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
        name = shard_name(path)
        yield from read_tar(stream, name, self._expected.get(name))

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        # Ray Data also calls this once when the dataset is created, with no context, only to count blocks:
        # that is no execution.
        epoch = ray.get(self._counter.begin_execution.remote()) if data_context is not None else 0
        tasks = super().get_read_tasks(parallelism, per_task_row_limit, data_context)
        if self._reshuffle:
            random.Random(f"{self._seed}:{epoch}").shuffle(tasks)
        return [
            ReadTask(functools.partial(_with_epoch, t.read_fn, epoch), t.metadata, t.schema, t.per_task_row_limit)
            for t in tasks
        ]


# --------------------------------------------------------------------------------------------------------
# Decoding and augmenting, a batch at a time (the per-image work is in pipelines/augment.py)
# --------------------------------------------------------------------------------------------------------


class DecodeBatch:
    """The map_batches function: raw rows -> {"image": uint8 (B, S, S, 3), "label": int64 (B,)}.

    With ``on_device=True`` images are only checked (headers parsed) and shipped encoded, as
    {"key", "encoded", "label", "epoch"}, for ``decode_on_device`` on the training GPU.
    """

    def __init__(
        self, size: int, train: bool, aug: AugmentConfig, num_classes: int, counter, seed: int, on_device: bool
    ):
        self.size, self.train, self.aug, self.num_classes, self.counter = size, train, aug, num_classes, counter
        self.seed, self.on_device = seed, on_device

    def _transform(self, data: bytes, key: str, epoch: int):
        if self.on_device:
            Image.open(io.BytesIO(data)).verify()  # headers and structure only; pixels are decoded on the GPU
            return data
        if self.train:
            return train_transform(data, self.size, self.aug, sample_rng(self.seed, epoch, key))
        return eval_transform(data, self.size)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray] | pa.Table:
        columns = ("shard", "key", "image", "label", "error", "epoch")
        keys, images, labels, bad = [], [], [], []
        epoch = batch.column("epoch")[0].as_py()
        for shard, key, data, label, error, _ in zip(*(batch.column(c).to_pylist() for c in columns)):
            key = f"{shard}#{key}"  # unique in the data set: keys of shards made elsewhere may repeat
            if error is None and not 0 <= label < self.num_classes:
                error = f"label {label} outside [0, {self.num_classes})"
            if error is None:
                try:
                    image = self._transform(data, key, epoch)
                except Exception as e:  # Pillow raises many types for corrupt data
                    error = f"cannot decode image: {type(e).__name__}: {e}"
            if error is not None:
                log.warning("skipping sample %s: %s", key, error)
                bad.append(key)
                continue
            keys.append(key)
            images.append(image)
            labels.append(label)
        block = f"{batch.column('shard')[0]}#{batch.column('key')[0]}"  # its first sample names the block
        problem = ray.get(self.counter.report.remote(epoch, block, batch.num_rows, bad))
        if problem:
            raise BadDataError(problem)
        if self.on_device:
            return pa.table(
                {
                    "key": pa.array(keys, pa.string()),
                    "encoded": pa.array(images, pa.binary()),
                    "label": pa.array(labels, pa.int64()),
                    "epoch": pa.array([epoch] * len(keys), pa.int64()),
                }
            )
        if not images:
            return {"image": np.zeros((0, self.size, self.size, 3), np.uint8), "label": np.zeros(0, np.int64)}
        return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.int64)}


def read_split(
    data_uri: str,
    split: str,
    *,
    image_size: int,
    train: bool,
    augment: AugmentConfig | None = None,
    seed: int | None = None,
    counter=None,
    decode_on_device: bool = False,
    decode_cpus: float = 1.0,
    manifest: dict | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of one split: shard order by (seed, epoch) (train), decoded and augmented.

    ``counter`` (from ``bad_sample_counter``) sets the bad-sample limit, reports what was skipped and is
    where a training loop names the epoch (``counter.set_epoch``); by default at most 1 % of samples may be
    bad. ``seed`` None draws one, so every task of this dataset still uses the same. The bounded local
    shuffle belongs to the consumer: ``iter_torch_batches(local_shuffle_buffer_size=...)``. ``decode_cpus``
    is what each read-and-decode task reserves (see pipelines/cluster.py). ``manifest`` saves reading it
    again when the caller has it.

    ``decode_on_device=True`` ships the encoded images instead (for GPU nodes whose CPUs cannot keep up):
    consume with ``iter_batches(batch_format="pyarrow")`` and ``pipelines.device.decode_on_device``.
    """
    manifest = manifest or load_manifest(data_uri)
    if split not in manifest["splits"]:
        raise ValueError(f"{data_uri} has no split {split!r}; it has {sorted(manifest['splits'])}")
    fs, root = storage.filesystem(data_uri)
    shards = manifest["splits"][split]["shards"]
    paths = [f"{root}/{s['name']}" for s in shards]
    seed = random.randrange(2**31) if seed is None else seed
    counter = counter or bad_sample_counter()
    expected = {s["name"]: s["samples"] for s in shards if "samples" in s}
    source = ShardDatasource(paths, expected, counter=counter, seed=seed, shuffle=train, filesystem=fs)
    decode = DecodeBatch(
        image_size, train, augment or AugmentConfig(), len(manifest["classes"]), counter, seed, decode_on_device
    )
    # batch_size=None: decode each block as the read yields it (BLOCK_ROWS samples). One read task per shard
    # (no block splitting), and the same CPUs asked for by both, so that Ray fuses read and decode into one
    # task (with different requests it runs them as two operators, at half the speed).
    ds = ray.data.read_datasource(source, override_num_blocks=len(paths), num_cpus=decode_cpus)
    ds = ds.map_batches(decode, batch_size=None, batch_format="pyarrow", num_cpus=decode_cpus)
    # The pipeline is a single fused operator: Ray Data's per-operator resource reservation would only hold
    # back part of the CPUs from it (measured: 346 -> 411 img/s on 2 cores, benchmarks/RESULTS.md).
    ds.context.op_resource_reservation_enabled = False
    return ds
