"""Reading WebDataset shards: one tar stream into Arrow blocks of raw samples, and the Ray Data datasource.

WebDataset's conventions, as other tools write them: a sample is the members that share a key (the path up
to the first dot of the file name), the image under jpg/jpeg/png/webp, the label under cls or in json
(``label``, ``cls`` or ``class``). A broken stream keeps the samples before the break; every sample it cut
off, and every malformed one, becomes a row with its error, so nothing disappears uncounted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import DefaultFileMetadataProvider, FileBasedDatasource, ReadTask

from pipelines import storage
from pipelines.data.dataset import Shard

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
BLOCK_ROWS = 64  # samples per block, and so per decode call
INT64_MAX = 2**63 - 1

# What is wrong with a row: its ``problem`` column (``error`` says it in words, for a person).
UNREADABLE = "unreadable"  # the shard or file could not be read: missing, forbidden, or storage failing after retries
TRUNCATED = "truncated"  # the tar breaks off (or is corrupt) at this sample
MISSING = "missing"  # a sample the manifest counts that the tar did not deliver
MALFORMED = "malformed"  # no image member, no label / an unreadable one, or members not adjacent
UNDECODABLE = "undecodable"  # an image that cannot be decoded
BAD_LABEL = "bad label"  # a label outside the data set's classes


def member_type(suffix: str) -> str:
    """What a member of a sample holds, by its last extension, as webdataset's decoders read it: the
    member ``a.b.jpg`` is sample ``a``'s image (its field ``b.jpg``). The first member of a type counts."""
    return suffix.rpartition(".")[2].lower()


class CountingReader:
    """A read-only stream that counts the bytes read through it (see ``ends_between_members``)."""

    def __init__(self, stream):
        self.stream, self.bytes = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes += len(data)
        return data


def ends_between_members(tar: tarfile.TarFile, stream: CountingReader) -> bool:
    """Whether a tar that Python's tarfile read to its end stopped right after a member, without the
    end-of-archive blocks every tar writer adds: the object was cut there (tarfile takes it for a clean end)."""
    return tar.offset > 0 and stream.bytes <= tar.offset


def sample_id(source: str, key: str | None = None) -> str:
    """The identity of an input, the same in every stage (training's bad-sample reports, labeling's rows and
    its checkpoint): the object's URI, and for a sample of a shard ``#`` and its WebDataset key. A sample the
    shard did not deliver is known by its position only: ``#@<n>`` (its n-th sample); members of a key that
    come back after other samples by key and position: ``#<key>@<n>``."""
    return source if key is None else f"{source}#{key}"


def position(n: int) -> str:
    """The key of a shard's n-th sample where its own key is unknown (see ``sample_id``)."""
    return f"@{n}"


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


def _row(shard: str, key: str, sample: dict[str, bytes], n: int, stray: bool = False) -> dict:
    """A raw sample as a row: the image bytes, the label (-1 if missing) and what is wrong with it, if anything.
    ``stray``: members of a key that came earlier in the shard, with other samples between (a WebDataset
    reader would make two samples of one key): a row of their own, known by key and position."""
    if stray:
        error = f"members {sorted(sample)} of {key} are not adjacent to its first members (other samples between)"
        return _error_row(shard, f"{key}{position(n)}", MALFORMED, error)
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    try:
        label = parse_label(sample)
        error = None if image is not None else "no image member (jpg/jpeg/png/webp)"
    except (ValueError, UnicodeDecodeError) as e:
        label, error = None, f"unreadable label: {e}"
    if label is None and error is None:
        error = "no label (cls member or json label)"
    problem = None if error is None else MALFORMED
    label = -1 if label is None else label
    return {"shard": shard, "key": key, "image": image, "label": label, "problem": problem, "error": error}


def _error_row(shard: str, key: str, problem: str, error: str) -> dict:
    return {"shard": shard, "key": key, "image": None, "label": -1, "problem": problem, "error": error}


def read_tar(stream, shard: str, expected_samples: int | None = None, mark_last: bool = False) -> Iterator[pa.Table]:
    """Samples of one tar as Arrow blocks of BLOCK_ROWS rows (shard, key, image bytes, label, problem, error;
    with ``mark_last``, ``last``: whether the block is the shard's final one).

    ``stream`` is an open stream, or the OSError that opening it raised. A broken tar keeps the samples
    before the break and adds a row for the sample it cut (``truncated``); storage that fails mid-stream
    (after the storage client's retries) adds one for the sample it was reading (``unreadable``). Python's
    tarfile takes a cut between two members for a clean end, so when the manifest says how many samples a
    shard holds, every one not delivered becomes a row too (``missing``, or ``unreadable`` if the shard could
    not be read): nothing disappears uncounted.
    """
    # Imported here: webdataset imports torch (1.5 s of CPU), which Ray Data's coordinators, that unpickle
    # this module's datasource but read no tar, would pay for nothing.
    from webdataset.tariterators import base_plus_ext

    rows: list[dict] = []
    key, sample, read, failed = None, {}, 0, None
    seen: set[str] = set()  # the shard's keys so far: members of one that come back are not adjacent
    try:
        if isinstance(stream, OSError):
            raise stream
        stream = CountingReader(stream)
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
                        rows.append(_row(shard, key, sample, read, stray=key in seen))
                        seen.add(key)
                        read += 1
                    key, sample = base, {}
                sample.setdefault(member_type(suffix), tar.extractfile(member).read())
                if len(rows) >= BLOCK_ROWS:  # never the final block: the sample under way follows it
                    yield _block(rows, mark_last, last=False)
                    rows = []
        if key is not None:
            rows.append(_row(shard, key, sample, read, stray=key in seen))
            read += 1
        if expected_samples is None and ends_between_members(tar, stream):
            rows.append(_error_row(shard, position(read), TRUNCATED, f"the tar ends after {key} without its "
                                   "end-of-archive blocks: cut off between two members? (no manifest says how "
                                   "many samples it held)"))  # fmt: skip
            read += 1
    except (tarfile.TarError, EOFError) as e:
        where = f"after {key}" if key else "at the start"
        rows.append(_error_row(shard, position(read), TRUNCATED, f"truncated or corrupt tar {where}: {e}"))
        read += 1
    except OSError as e:  # storage, after its client's retries: not the tar's fault
        failed = f"cannot read {shard}" + (f" after {read} samples" if read else "") + f": {e}"
        rows.append(_error_row(shard, position(read), UNREADABLE, failed))
        read += 1
    ended = f"tar ends after {read} of {expected_samples} samples"
    for i in range(read, expected_samples or 0):
        rows.append(_error_row(shard, position(i), UNREADABLE if failed else MISSING, failed or ended))
    if rows:
        yield _block(rows, mark_last, last=True)


def open_shard(uri: str):
    """A shard's stream; one that cannot be opened (missing, forbidden, storage failing) gives its OSError
    instead, for ``read_tar`` to make it the shard's rows. Both as a context manager."""
    try:
        return storage.open_stream(uri)
    except OSError as e:
        return contextlib.nullcontext(e)


def _block(rows: list[dict], mark_last: bool, last: bool) -> pa.Table:
    block = pa.Table.from_pylist(rows)
    return block.append_column("last", pa.array(np.full(block.num_rows, last))) if mark_last else block


def _with_epoch(read_fn: Callable[[], Iterator[pa.Table]], epoch: int) -> Iterator[pa.Table]:
    """A read task's blocks with the execution's epoch."""
    for block in read_fn():
        yield block.append_column("epoch", pa.array(np.full(block.num_rows, epoch, np.int64)))


class _FromManifest(DefaultFileMetadataProvider):
    """The shards' sizes as the manifest gives them. Ray's default asks storage for each (a HEAD per shard,
    or a listing), and fails the whole dataset when one shard cannot be read: here that shard's own rows say
    so, as for any shard that breaks."""

    def __init__(self, sizes: dict[str, int | None]):
        self.sizes = sizes

    def expand_paths(self, paths, filesystem, partitioning=None, ignore_missing_paths=False):
        yield from ((p, self.sizes[p]) for p in paths)


class ShardDatasource(FileBasedDatasource):
    """WebDataset tars -> rows (shard, key, image bytes, label, problem, error, epoch, last); never fails a
    read for bad data, nor for a shard that cannot be read (its rows say so).

    ``shards`` maps each path (in the filesystem's terms) to its shard in the manifest. Every execution
    (epoch) asks the dataset's counter which epoch it is, stamps that on its rows and, for training, orders
    the shards by (seed, epoch): Ray's own FileShuffleConfig reseeds by execution index, which restarts at 0
    when a worker group restarts, so a resumed run would repeat the first epochs' orders.
    """

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["tar"]

    def __init__(self, shards: dict[str, Shard], *, counter, seed: int, shuffle: bool, **kw):
        sizes = _FromManifest({path: shard.bytes for path, shard in shards.items()})
        super().__init__(list(shards), meta_provider=sizes, **kw)
        self._shards, self._counter, self._seed, self._reshuffle = shards, counter, seed, shuffle

    def _open_input_source(self, filesystem, path: str, **open_args):
        """storage's stream (large GETs, read ahead); a shard that cannot be opened is handed to the read as
        its error, which becomes its rows (Ray would fail the task, and with it the dataset)."""
        return open_shard(self._shards[path].uri)

    def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
        # ``last`` on the rows of the shard's (so the task's) final block, where the decode waits for its
        # bad-sample reports. Ray Data may merge a task's blocks (up to its target block size) or split them
        # before the decode sees them: the flag is on every row of the final block, and the decode looks at all.
        shard = self._shards[path]
        yield from read_tar(stream, shard.uri, shard.samples, mark_last=True)

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
