"""What a labeling job reads: the inputs a user names, resolved into units (a tar shard or an image file),
and the Ray Data datasource that turns units into rows of raw bytes, one row per input image.

``--input`` may be
- a prepared or adopted data set (a folder or prefix with manifest.json): its shards, one split or all;
- WebDataset shards made by other tools: a folder or prefix of ``.tar`` files, or a brace pattern such as
  ``s3://b/p/shard-{000000..000127}.tar``;
- a folder or prefix of image files (jpg, jpeg, png, webp), recursively;
- a list of image URIs: a Parquet or CSV file (a ``path`` or ``uri`` column, else the first column) or a
  text file (one per line).

Every row carries ``path``, the input's identity (``reader.sample_id``, the same in every stage): the
image's URI, or the shard's URI + ``#`` + the sample key, or the shard's URI alone for a row about the whole
shard (one that cannot be read, or breaks off). It is unique per input, so it is also the id by which a
resumed job knows what is done. What is wrong with a row is its ``problem`` (``reader``'s kinds), in words
its ``error``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand  # webdataset's own dependency, for its brace patterns
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipelines import storage
from pipelines.data.dataset import DataSet, DatasetError
from pipelines.data.reader import IMAGE_SUFFIXES, MISSING, TRUNCATED, UNREADABLE, open_shard, read_tar, sample_id

LIST_SUFFIXES = (".parquet", ".csv", ".txt")
IMAGES_PER_TASK = 256  # image files read by one task (a shard is always one task)
FETCH_THREADS = 8  # image files a read task fetches at once
ARRIVED_BLOCK = 16  # image files handed to the decode together, as they arrive

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("path", pa.string()), ("image", pa.binary()), ("label", pa.int64()), ("problem", pa.string()),
                    ("error", pa.string())])  # fmt: skip


# An input that is gone or that we may not read (storage's FileNotFoundError, PermissionError: S3's 404 and
# 403) is that input's error row, as is one that storage fails to deliver after its retries. Storage that
# cannot be reached or read at all (no bucket, no endpoint, credentials refused) is one error before any
# work starts (the job checks the buckets first).
UNREADABLE_ERRORS = OSError  # storage.StorageError is one


class InputError(ValueError):
    """The input names nothing that can be labeled; the message says what was looked for."""


@dataclass(frozen=True)
class Unit:
    """One thing to read: a tar shard (``expected`` samples, if a manifest says) or an image file."""

    uri: str
    kind: str  # "tar" | "image"
    expected: int | None = None


def resolve(spec: str, split: str | None = None) -> list[Unit]:
    """The units ``spec`` names (see the module's docstring), in a stable order."""
    if "{" in spec and "}" in spec:
        units = [Unit(u, "tar") for u in braceexpand(spec)]
        sizes = storage.sizes([u.uri for u in units])  # one LIST where they share a folder, else HEADs at once
        missing = [u.uri for u in units if sizes[u.uri] is None]
        if missing:
            raise InputError(f"{len(missing)} of the {len(units)} shards of {spec} do not exist, e.g. {missing[0]}")
        return units
    if storage.exists(storage.join(spec, "manifest.json")):
        try:
            data = DataSet.load(spec)
            splits = [split] if split else data.splits
            return [Unit(s.uri, "tar", s.samples) for name in splits for s in data.shards(name)]
        except (DatasetError, ValueError, KeyError) as e:  # a manifest that is not ours, or damaged
            raise InputError(f"{spec}/manifest.json: {e}") from None
    if spec.lower().endswith(LIST_SUFFIXES) and storage.exists(spec):
        return [Unit(u, "image") for u in read_list(spec)]
    if split:
        raise InputError(f"--split {split}: {spec} is no prepared data set (no manifest.json)")
    one_file = storage.parse(spec).key and not spec.endswith("/") and storage.head(spec) is not None
    files = [spec] if one_file else storage.list_files(spec)  # one file, or a folder / prefix
    tars = [f for f in files if f.lower().endswith(".tar")]
    images = [f for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES]
    if tars and images:
        raise InputError(f"{spec} holds both .tar shards and image files: name one kind (a subfolder, or a list)")
    if len(tars) + len(images) < len(files):
        log.warning("%s: %d file(s) neither .tar nor an image (%s) are left out", spec,
                    len(files) - len(tars) - len(images), ", ".join(IMAGE_SUFFIXES))  # fmt: skip
    if tars:
        return [Unit(f, "tar") for f in tars]
    if not images:
        raise InputError(
            f"{spec} holds no manifest.json, no .tar shards and no images ({', '.join(IMAGE_SUFFIXES)}); "
            "a list of image URIs must end in .parquet, .csv or .txt"
        )
    return [Unit(f, "image") for f in images]


def read_list(uri: str) -> list[str]:
    """Image URIs from a Parquet, CSV or text file."""
    data = storage.read_bytes(uri)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        column = next((c for c in ("path", "uri") if c in table.column_names), table.column_names[0])
        values = table.column(column).to_pylist()
    elif lower.endswith(".csv"):
        rows = list(csv.reader(io.StringIO(data.decode())))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        index = next((header.index(c) for c in ("path", "uri") if c in header), None)
        values = [r[index or 0] for r in rows[1 if index is not None else 0 :] if r]
    else:
        values = data.decode().splitlines()
    uris = [v.strip() for v in values if v and v.strip()]
    if not uris:
        raise InputError(f"{uri} lists no image URIs")
    return uris


def _error_table(path: str, problem: str, error: str) -> pa.Table:
    row = {"path": path, "image": None, "label": None, "problem": problem, "error": error}
    return pa.Table.from_pylist([row], schema=SCHEMA)


def _tar_rows(unit: Unit) -> Iterator[pa.Table]:
    """A shard's samples, streamed (a block of BLOCK_ROWS samples in memory at a time). A shard that cannot
    be read, or breaks off: its samples before that, then one row for the shard itself that says what
    happened and, when the manifest knows the count, how many samples are missing."""
    broken, samples = None, 0
    with open_shard(unit.uri) as stream:  # one that cannot be opened: read_tar makes its error the rows
        for block in read_tar(stream, unit.uri, unit.expected):
            rows = []
            columns = (block.column(c).to_pylist() for c in ("key", "image", "label", "problem", "error"))
            for key, image, label, problem, error in zip(*columns):
                if problem in (TRUNCATED, MISSING, UNREADABLE):
                    broken = broken or (problem, error)  # the first says where the tar broke
                    continue
                if image is not None:  # a label problem: labeling needs no label
                    problem = error = None
                rows.append({"path": sample_id(unit.uri, key), "image": image, "label": None if label < 0 else label,
                             "problem": problem, "error": error})  # fmt: skip
                samples += 1
            if rows:
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
    if broken:
        problem, error = broken
        if unit.expected is not None:
            missing = f"{unit.expected - samples} of its {unit.expected} samples are missing"
        else:
            missing = "no manifest says how many samples it held"
        yield _error_table(sample_id(unit.uri), problem, f"{error}; {missing}")


def _image_row(unit: Unit) -> dict:
    try:
        return {"path": sample_id(unit.uri), "image": storage.read_bytes(unit.uri), "label": None, "problem": None,
                "error": None}  # fmt: skip
    except UNREADABLE_ERRORS as e:
        return {"path": sample_id(unit.uri), "image": None, "label": None, "problem": UNREADABLE,
                "error": f"cannot read: {e}"}  # fmt: skip


def _image_rows(units: list[Unit]) -> Iterator[pa.Table]:
    """Image files, fetched by a few threads at once (one request after another would leave the task waiting
    on storage's latency) and handed on ARRIVED_BLOCK at a time as they arrive, so that a consumer can work
    on the first while the threads fetch the rest (Ray Data merges them into one block before its decode:
    see job._run). In order, and never more than two blocks ahead."""
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        pending = iter(units)
        ahead = [pool.submit(_image_row, u) for u in islice(pending, 2 * ARRIVED_BLOCK)]
        while ahead:
            arrived, ahead = ahead[:ARRIVED_BLOCK], ahead[ARRIVED_BLOCK:]
            rows = [f.result() for f in arrived]
            ahead += [pool.submit(_image_row, u) for u in islice(pending, ARRIVED_BLOCK)]
            yield pa.Table.from_pylist(rows, schema=SCHEMA)


class InputDatasource(Datasource):
    """Units -> rows (path, image bytes, label or null, problem and error or null): one read task per shard
    or per IMAGES_PER_TASK image files. Never fails a read for bad data, nor for an input that storage
    cannot deliver (UNREADABLE_ERRORS)."""

    def __init__(self, units: list[Unit]):
        super().__init__()
        self.units = units

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    @property
    def num_tasks(self) -> int:
        """Read tasks: one per shard, one per IMAGES_PER_TASK image files (``override_num_blocks`` takes
        this, so that Ray neither splits the reads nor keeps them from fusing with the decode)."""
        images = sum(u.kind == "image" for u in self.units)
        return max(1, len(self.units) - images + math.ceil(images / IMAGES_PER_TASK))

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        images = [u for u in self.units if u.kind == "image"]
        for unit in (u for u in self.units if u.kind == "tar"):
            meta = BlockMetadata(num_rows=unit.expected, size_bytes=None, input_files=[unit.uri], exec_stats=None)
            tasks.append(ReadTask(lambda u=unit: _tar_rows(u), meta, SCHEMA))
        for i in range(0, len(images), IMAGES_PER_TASK):
            group = images[i : i + IMAGES_PER_TASK]
            meta = BlockMetadata(num_rows=len(group), size_bytes=None, input_files=None, exec_stats=None)
            tasks.append(ReadTask(lambda g=group: _image_rows(g), meta, SCHEMA))
        return tasks

    def get_name(self) -> str:
        return "LabelInputs"
