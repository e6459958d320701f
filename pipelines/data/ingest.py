"""Ray Data streaming of a data set's split: read + decode + augment in CPU tasks, uint8 batches out.

    data = DataSet.load("s3://bucket/datasets/sample")
    counter = bad_sample_counter()
    ds = read_split(data, "train", image_size=240, train=True, seed=0, counter=counter)
    for epoch in range(epochs):
        ray.get(counter.set_epoch.remote(epoch))  # before iterating: see pipelines/data/bad_samples.py
        for batch in ds.iter_torch_batches(batch_size=128, local_shuffle_buffer_size=1024):
            x, y = to_model_input(batch["image"].to(device), batch["label"].to(device), ...)  # pipelines/device.py

Images travel through the object store as uint8 HWC at the model's input size (4x less than float32);
normalisation, random erasing and Mixup/CutMix run on the training device (pipelines/device.py).

Speed comes from doing little per row: a shard is read as one stream into Arrow blocks of raw bytes
(pipelines/data/reader.py), read and decode are fused into one task per shard, and each image is decoded
no larger than its crop needs and cropped and resized in one Pillow call (pipelines/data/augment.py,
pipelines/preprocess.py).

Randomness is a function of the seed: the shard order of (seed, epoch), each sample's augmentation of
(seed, epoch, sample key), whichever task decodes it.

Bad data never becomes a wrong label: a corrupt image, a truncated tar, a missing or out-of-range label is
skipped and counted with its key in the log; past ``max_fraction`` the job stops with BadDataError.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines import storage
from pipelines.data.augment import AugmentConfig, sample_rng, train_transform
from pipelines.data.bad_samples import BadDataError, bad_sample_counter
from pipelines.data.dataset import DataSet, DatasetError
from pipelines.data.reader import BAD_LABEL, UNDECODABLE, ShardDatasource, sample_id
from pipelines.preprocess import eval_transform, open_image

log = logging.getLogger(__name__)


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
        self._reports: list = []  # this task's bad-sample reports not yet answered

    def _transform(self, data: bytes, key: str, epoch: int):
        if self.on_device:
            open_image(data).verify()  # headers, size and structure only; pixels are decoded on the GPU
            return data
        if self.train:
            return train_transform(data, self.size, self.aug, sample_rng(self.seed, epoch, key))
        return eval_transform(data, self.size)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray] | pa.Table:
        columns = ("shard", "key", "image", "label", "problem", "error")
        keys, images, labels, bad = [], [], [], []
        skipped: dict[tuple[str, str, str], list[str]] = {}  # (shard, problem, error) -> ids: logged once each
        epoch = batch.column("epoch")[0].as_py()
        for shard, key, data, label, problem, error in zip(*(batch.column(c).to_pylist() for c in columns)):
            key = sample_id(shard, key)
            if problem is None and not 0 <= label < self.num_classes:
                problem, error = BAD_LABEL, f"label {label} outside [0, {self.num_classes})"
            if problem is None:
                try:
                    image = self._transform(data, key, epoch)
                except Exception as e:  # Pillow raises many types for corrupt data
                    problem, error = UNDECODABLE, f"cannot decode image: {type(e).__name__}: {e}"
            if problem is not None:
                skipped.setdefault((shard, problem, error), []).append(key)
                bad.append(key)
                continue
            keys.append(key)
            images.append(image)
            labels.append(label)
        for (_, problem, error), ids in skipped.items():  # an unreadable shard: one line, not one per sample
            more = f" and {len(ids) - 1} more of its shard" if len(ids) > 1 else ""
            log.warning("skipping sample %s%s (%s): %s", ids[0], more, problem, error)
        block = sample_id(batch.column("shard")[0].as_py(), batch.column("key")[0].as_py())  # its first sample
        # Reports are not waited for block by block: on a busy node the counter's answer takes 10-40 ms, 5 % of
        # a block's decode (measured on 2 cores). The answers that have come are read now, and the task's last
        # block waits for all of them, so that a task fails when the limit is passed; the counter keeps its
        # verdict too, which the training loop asks for after every pass (``verdict``).
        self._reports.append(self.counter.report.remote(epoch, block, batch.num_rows, bad))
        if pc.any(batch.column("last")).as_py():  # any row: Ray may have merged the final block into others
            answered, self._reports = self._reports, []
        else:
            answered, self._reports = ray.wait(self._reports, num_returns=len(self._reports), timeout=0)
        problem = next((p for p in ray.get(answered) if p), None)
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
    data: DataSet | str,
    split: str,
    *,
    image_size: int,
    train: bool,
    augment: AugmentConfig | None = None,
    seed: int | None = None,
    counter=None,
    decode_on_device: bool = False,
    decode_cpus: float = 1.0,
) -> ray.data.Dataset:
    """A Ray Dataset of one split of ``data`` (a DataSet, or its URI): shard order by (seed, epoch) when
    training, decoded and augmented.

    ``counter`` (from ``bad_sample_counter``) sets the bad-sample limit, reports what was skipped and is
    where a training loop names the epoch (``counter.set_epoch``); by default at most 1 % of samples may be
    bad. ``seed`` None draws one, so every task of this dataset still uses the same. The bounded local
    shuffle belongs to the consumer: ``iter_torch_batches(local_shuffle_buffer_size=...)``. ``decode_cpus``
    is what each read-and-decode task reserves (see pipelines/cluster.py).

    ``decode_on_device=True`` ships the encoded images instead (for GPU nodes whose CPUs cannot keep up):
    consume with ``iter_batches(batch_format="pyarrow")`` and ``pipelines.device.decode_on_device``.
    """
    data = data if isinstance(data, DataSet) else DataSet.load(data)
    shards = data.shards(split)
    schemes = {storage.parse(s.uri).is_s3 for s in shards}
    if len(schemes) > 1:
        raise DatasetError(f"{data.uri} {split}: shards both in S3 and on local paths; keep them in one place")
    storage.check_buckets([s.uri for s in shards])  # a bucket we cannot read: one error now, not a bad sample each
    fs, _ = storage.filesystem(shards[0].uri)
    paths = {storage.filesystem(s.uri)[1]: s for s in shards}
    seed = random.randrange(2**31) if seed is None else seed
    counter = counter or bad_sample_counter()
    source = ShardDatasource(paths, counter=counter, seed=seed, shuffle=train, filesystem=fs)
    augment = augment or AugmentConfig()
    decode = DecodeBatch(image_size, train, augment, data.num_classes, counter, seed, decode_on_device)
    # batch_size=None: decode each block as Ray hands it over. Ray merges a read's blocks of BLOCK_ROWS samples
    # up to its target block size (128 MiB) first, so a task reads its shard whole, then decodes it: a
    # smaller target (4 MiB: each block decoded as read, while the next is fetched) hid storage's latency
    # better (S3 profile 0.90 of loopback, against 0.86) but made everything 18 % slower (smaller decoded
    # blocks; benchmarks/RESULTS.md). One read task per shard (no block splitting), and the same CPUs asked
    # for by both, so that Ray fuses read and decode into one task (with different requests it runs them as
    # two operators, at half the speed).
    ds = ray.data.read_datasource(source, override_num_blocks=len(paths), num_cpus=decode_cpus)
    ds = ds.map_batches(decode, batch_size=None, batch_format="pyarrow", num_cpus=decode_cpus)
    # The pipeline is a single fused operator: Ray Data's per-operator resource reservation would only hold
    # back part of the CPUs from it (measured: 346 -> 411 img/s on 2 cores, benchmarks/RESULTS.md).
    ds.context.op_resource_reservation_enabled = False
    return ds
