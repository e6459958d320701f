"""Reading WebDataset shards: one tar stream into Arrow blocks of raw samples, and the Ray Data datasource.

WebDataset's conventions, as other tools write them: a sample is the members that share a key (the path up
to the first dot of the file name), the image under jpg/jpeg/png/webp, the label under cls or in json
(``label``, ``cls`` or ``class``). A broken stream keeps the samples before the break; every sample it cut
off, and every malformed one, becomes a row with its error, so nothing disappears uncounted.
"""

from __future__ import annotations

import functools
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource, ReadTask

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
BLOCK_ROWS = 64  # samples per block, and so per decode call
# Keys of the error rows of a tar that breaks off: where it broke, and each sample the manifest misses.
TRUNCATED, MISSING = "truncated-", "missing-"
INT64_MAX = 2**63 - 1


def parse_label(sample: dict[str, bytes]) -> int | None:
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
        label = parse_label(sample)
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
    # Imported here: webdataset imports torch (1.5 s of CPU), which Ray Data's coordinators, that unpickle
    # this module's datasource but read no tar, would pay for nothing.
    from webdataset.tariterators import base_plus_ext

    rows: list[dict] = []
    key, sample, read = None, {}, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                # WebDataset's convention: the key is the path up to the first dot of the file name.
                base, suffix = base_plus_ext(member.name)
                if base is None:
                    continue  # a file with no extension belongs to no sample
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
        # The row's key names where the tar broke off, without spaces (keys travel in URIs and log lines).
        key = f"{TRUNCATED}{where.replace(' ', '-')}"
        rows.append(_error_row(shard, key, f"truncated or corrupt tar {where}: {e}"))
        read += 1
    for i in range(read, expected_samples or 0):
        rows.append(_error_row(shard, f"{MISSING}{i}", f"tar ends after {read} of {expected_samples} samples"))
    if rows:
        yield pa.Table.from_pylist(rows)


def _with_epoch(read_fn: Callable[[], Iterator[pa.Table]], epoch: int) -> Iterator[pa.Table]:
    """A read task's blocks with the execution's epoch and a ``last`` flag on the task's final block (one
    block is held back to know it), so that the decode can wait for its bad-sample reports only there."""

    def stamped(block: pa.Table, last: bool) -> pa.Table:
        block = block.append_column("epoch", pa.array(np.full(block.num_rows, epoch, np.int64)))
        return block.append_column("last", pa.array(np.full(block.num_rows, last)))

    held = None
    for block in read_fn():
        if held is not None:
            yield stamped(held, False)
        held = block
    if held is not None:
        yield stamped(held, True)


class ShardDatasource(FileBasedDatasource):
    """WebDataset tars -> rows (shard, key, image bytes, label, error, epoch, last); never fails a read for
    bad data.

    ``shards`` maps each path (in the filesystem's terms) to the shard's name and the number of samples the
    manifest gives it (None: unknown). Every execution (epoch) asks the dataset's counter which epoch it is,
    stamps that on its rows and, for training, orders the shards by (seed, epoch): Ray's own
    FileShuffleConfig reseeds by execution index, which restarts at 0 when a worker group restarts, so a
    resumed run would repeat the first epochs' orders.
    """

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["tar"]

    def __init__(self, shards: dict[str, tuple[str, int | None]], *, counter, seed: int, shuffle: bool, **kw):
        super().__init__(list(shards), **kw)
        self._shards, self._counter, self._seed, self._reshuffle = shards, counter, seed, shuffle

    def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
        name, expected = self._shards.get(path, (path, None))
        yield from read_tar(stream, name, expected)

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
