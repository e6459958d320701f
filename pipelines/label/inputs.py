"""What a labeling job reads: the inputs a user names, enumerated as a stream of units (a tar shard or an
image file), the units that are still to do, and the map that turns units into rows of raw bytes, one row
per input image.

``--input`` may be
- a prepared or adopted data set (a folder or prefix with manifest.json): its shards, one split or all;
- WebDataset shards made by other tools: a folder or prefix of ``.tar`` files, or a brace pattern such as
  ``s3://b/p/shard-{000000..000127}.tar``;
- a folder or prefix of image files (jpg, jpeg, png, webp), recursively;
- a list of image URIs: a Parquet or CSV file (a ``path`` or ``uri`` column, else the first column) or a
  text file (one per line); relative paths are relative to the working directory of the job's driver.

A corpus of millions is never one list on the driver: ``resolve`` only looks at what the input is (its
first page); a Ray task lists it page by page (S3's 1,000 keys per LIST, a list file's chunks), every URI
normalised (``storage.normalise``) as it goes. ``pending_units`` is Ray Data operations over that stream:
one hash aggregation by URI, on the cluster, counts each input's occurrences (a duplicate is labeled once
and reported) and joins the ids the output already holds (a resumed job skips them before fetching a
byte: an image done, or a shard whose every sample is done, is dropped; a shard partly done is read and its
done samples skipped).

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
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import chain, islice

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from braceexpand import braceexpand  # webdataset's own dependency, for its brace patterns
from ray.data.aggregate import AsList, Max, Sum
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipelines import storage
from pipelines.data.dataset import DataSet, DatasetError
from pipelines.data.reader import (
    IMAGE_SUFFIXES,
    MISSING,
    TRUNCATED,
    UNREADABLE,
    member_type,
    open_shard,
    read_tar,
    sample_id,
)

LIST_SUFFIXES = (".parquet", ".csv", ".txt")
LIST_CHUNK = 100_000  # URIs of a list file per block of the listing
IMAGES_PER_TASK = 256  # image files read by one task (a shard is always one task)
FETCH_THREADS = 8  # image files a read task fetches at once
ARRIVED_BLOCK = 16  # image files handed to the decode together, as they arrive
SHARD_ROW = ""  # the key under which a shard's own row (``sample_id(shard)``) is known among its samples' keys

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("path", pa.string()), ("image", pa.binary()), ("label", pa.int64()), ("problem", pa.string()),
                    ("error", pa.string())])  # fmt: skip
# A unit of the listing, and an id the output holds, as the aggregation by ``uri`` takes them in.
UNIT_SCHEMA = pa.schema([("uri", pa.string()), ("expected", pa.int64()), ("n", pa.int64()), ("done", pa.int64()),
                         ("key", pa.string())])  # fmt: skip


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
    done: frozenset[str] = frozenset()  # keys of a shard's samples that the output already holds


@dataclass(frozen=True)
class Inputs:
    """What ``--input`` names, resolved without enumerating it: the kind of its units, and either the units
    themselves (a data set's shards, a brace pattern, one file: known from a manifest or a name) or how to
    list them (``listing``: "folder" or "list")."""

    spec: str  # where a listing lists (normalised: the listing runs in a Ray task, elsewhere)
    kind: str  # "tar" | "image"
    units: tuple[Unit, ...] = ()
    listing: str | None = None
    base: str = ""  # what relative paths of a list are relative to: the driver's working directory

    def pages(self) -> Iterator[list[Unit]]:
        """The units, a page at a time, normalised (see ``storage.normalise``)."""
        if self.listing is None:
            for i in range(0, len(self.units), LIST_CHUNK):
                yield [replace(u, uri=storage.normalise(u.uri, self.base)) for u in self.units[i : i + LIST_CHUNK]]
            return
        left_out = 0
        for page in storage.list_pages(self.spec) if self.listing == "folder" else list_chunks(self.spec):
            if self.listing == "folder":
                kept = [u for u in page if _kind(u) == self.kind]
                left_out += len(page) - len(kept)
                page = kept
            yield [Unit(storage.normalise(u, self.base), self.kind) for u in page]
        if left_out:
            log.warning("%s: %d file(s) that are not %s were left out", self.spec, left_out,
                        "tar shards" if self.kind == "tar" else "images")  # fmt: skip

    def first(self, n: int = 1000) -> list[Unit]:
        """The first units (at most about ``n``; for checks and tests)."""
        return list(islice((u for page in self.pages() for u in page), n))


def _kind(uri: str) -> str | None:
    suffix = member_type(uri)  # the last extension, as the shards' members are typed
    return "tar" if suffix == "tar" else "image" if suffix in IMAGE_SUFFIXES else None


def resolve(spec: str, split: str | None = None) -> Inputs:
    """What ``spec`` names (see the module's docstring); an InputError when it names nothing to label.
    Reads a manifest, a brace pattern's sizes, or the first page of a listing or list: never the whole."""
    base = os.getcwd()
    if "{" in spec and "}" in spec:
        units = [Unit(u, "tar") for u in braceexpand(spec)]
        if any(_kind(u.uri) != "tar" for u in units):
            raise InputError(f"{spec}: a brace pattern names .tar shards (WebDataset's), not {units[0].uri}")
        sizes = storage.sizes([u.uri for u in units])  # one LIST where they share a folder, else HEADs at once
        missing = [u.uri for u in units if sizes[u.uri] is None]
        if missing:
            raise InputError(f"{len(missing)} of the {len(units)} shards of {spec} do not exist, e.g. {missing[0]}")
        return Inputs(spec, "tar", tuple(units), base=base)
    if storage.exists(storage.join(spec, "manifest.json")):
        try:
            data = DataSet.load(spec)
            splits = [split] if split else data.splits
            units = [Unit(s.uri, "tar", s.samples) for name in splits for s in data.shards(name)]
        except (DatasetError, ValueError, KeyError) as e:  # a manifest that is not ours, or damaged
            raise InputError(f"{spec}/manifest.json: {e}") from None
        return Inputs(spec, "tar", tuple(units), base=base)
    if spec.lower().endswith(LIST_SUFFIXES) and storage.exists(spec):
        inputs = Inputs(storage.normalise(spec, base), "image", listing="list", base=base)
        if not inputs.first(1):
            raise InputError(f"{spec} lists no image URIs")
        return inputs
    if split:
        raise InputError(f"--split {split}: {spec} is no prepared data set (no manifest.json)")
    if storage.parse(spec).key and not spec.endswith("/") and storage.head(spec) is not None:  # one file
        kind = _kind(spec)
        if kind is None:
            raise InputError(f"{spec} is neither a .tar shard nor an image ({', '.join(IMAGE_SUFFIXES)})")
        return Inputs(spec, kind, (Unit(spec, kind),), base=base)
    kinds: set = set()
    for page in storage.list_pages(spec):  # a folder or prefix: its first page with shards or images says
        kinds = {_kind(u) for u in page} - {None}  # what it holds
        if kinds:
            break
    if kinds == {"tar", "image"}:
        raise InputError(f"{spec} holds both .tar shards and image files: name one kind (a subfolder, or a list)")
    if not kinds:
        raise InputError(
            f"{spec} holds no manifest.json, no .tar shards and no images ({', '.join(IMAGE_SUFFIXES)}); "
            "a list of image URIs must end in .parquet, .csv or .txt"
        )
    return Inputs(storage.normalise(spec, base), kinds.pop(), listing="folder", base=base)


def list_chunks(uri: str) -> Iterator[list[str]]:
    """Image URIs from a Parquet, CSV or text file, LIST_CHUNK at a time (a Parquet file's ``path`` or
    ``uri`` column, else its first; a CSV file's column of that name in its header, else its first column)."""
    lower = uri.lower()
    fs, path = storage.filesystem(uri)
    if lower.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            column = next((c for c in ("path", "uri") if c in names), names[0])
            for batch in parquet.iter_batches(batch_size=LIST_CHUNK, columns=[column]):
                yield [v.strip() for v in batch.column(0).to_pylist() if v and v.strip()]
        return
    with fs.open_input_stream(path) as raw:  # pyarrow's stream: a file object io.TextIOWrapper can wrap
        lines = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        if lower.endswith(".csv"):
            rows = csv.reader(lines)
            first = next(rows, [])
            header = [h.strip().lower() for h in first]
            index = next((header.index(c) for c in ("path", "uri") if c in header), None)
            values = (r[index or 0] for r in chain([] if index is not None else [first], rows) if r)
        else:
            values = (line.rstrip("\r\n") for line in lines)
        while chunk := [v.strip() for v in islice(values, LIST_CHUNK) if v.strip()]:
            yield chunk


class ListingDatasource(Datasource):
    """The units of ``Inputs`` as a stream of blocks (a page or chunk each), in one read task: the listing is
    sequential (S3 pages by continuation token), and it is the cheap part of a job."""

    def __init__(self, inputs: Inputs):
        super().__init__()
        self.inputs = inputs

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(lambda: map(_unit_table, self.inputs.pages()), meta, UNIT_SCHEMA)]

    def get_name(self) -> str:
        return "ListInputs"


def _unit_table(page: list[Unit]) -> pa.Table:
    return pa.table({"uri": [u.uri for u in page], "expected": pa.array([u.expected for u in page], pa.int64()),
                     "n": pa.array(np.ones(len(page), np.int64)), "done": pa.array(np.zeros(len(page), np.int64)),
                     "key": pa.nulls(len(page), pa.string())}, schema=UNIT_SCHEMA)  # fmt: skip


def _done_table(batch: pa.Table, kind: str) -> pa.Table:
    """Ids the output holds -> (uri of the image or shard, key of the sample or SHARD_ROW). A shard's URI ends
    in .tar (``resolve`` takes no other), and its samples' ids go on with ``#`` and the key."""
    ids = batch.column("path").to_pylist()
    cut = [i.lower().find(".tar#") + 4 if kind == "tar" else -1 for i in ids]
    uri = [i[:c] if c > 3 else i for i, c in zip(ids, cut)]
    key = [i[c + 1 :] if c > 3 else SHARD_ROW for i, c in zip(ids, cut)]
    n = len(ids)
    return pa.table({"uri": uri, "expected": pa.nulls(n, pa.int64()), "n": pa.array(np.zeros(n, np.int64)),
                     "done": pa.array(np.ones(n, np.int64)), "key": key}, schema=UNIT_SCHEMA)  # fmt: skip


class KeepPending:
    """After the aggregation by URI: drop what the output holds (an image done; a shard whose manifest count
    of samples is done) and ids that are no input of this job; report inputs named more than once."""

    def __init__(self, kind: str, counter):
        self.kind, self.counter = kind, counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        named = pc.greater(batch.column("n"), 0)
        dupes = batch.filter(pc.greater(batch.column("n"), 1))
        if dupes.num_rows:
            extra = pc.sum(pc.subtract(dupes.column("n"), 1)).as_py()
            examples = dupes.column("uri").slice(0, 5).to_pylist()
            ray.get(self.counter.tally.remote("duplicates", extra, examples, examples[0]))
        if self.kind == "image":
            return batch.filter(pc.and_(named, pc.equal(batch.column("done"), 0))).select(["uri"])
        uris, expected, done = [], [], []
        columns = (batch.column(c).to_pylist() for c in ("uri", "expected", "done_keys", "n"))
        for uri, count, keys, n in zip(*columns):
            samples = len(keys) - (SHARD_ROW in keys)
            if n == 0 or (count is not None and samples >= count):
                continue  # no input of this job, or every sample done: not fetched again
            uris.append(uri)
            expected.append(count)
            done.append(keys)
        return pa.table({"uri": pa.array(uris, pa.string()), "expected": pa.array(expected, pa.int64()),
                         "done_keys": pa.array(done, pa.list_(pa.string()))})  # fmt: skip


def pending_units(
    inputs: Inputs, done_files: list[str], fs: pa.fs.FileSystem, counter, partitions: int = 16
) -> ray.data.Dataset:
    """The units still to label, as a Dataset: the listing's stream and the ids of the output's files
    (``done_files``), aggregated by URI on the cluster (see the module's docstring). ``counter`` (a
    ``BadSampleCounter``) is told how many inputs were named more than once."""
    units = ray.data.read_datasource(ListingDatasource(inputs), override_num_blocks=1)
    if done_files:
        done = ray.data.read_parquet(done_files, filesystem=fs, columns=["path"])
        done = done.map_batches(_done_table, fn_kwargs={"kind": inputs.kind}, batch_format="pyarrow", batch_size=None)
        units = units.union(done)
    aggregations = [Sum("n", alias_name="n"), Max("expected", alias_name="expected"), Sum("done", alias_name="done")]
    if inputs.kind == "tar":
        aggregations.append(AsList("key", alias_name="done_keys", ignore_nulls=True))
    units = units.groupby("uri", num_partitions=partitions).aggregate(*aggregations)
    return units.map_batches(KeepPending(inputs.kind, counter), batch_format="pyarrow", batch_size=None)


class ReadUnits:
    """map_batches over pending units: their rows of raw bytes (see ``_tar_rows``, ``_image_rows``)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        if self.kind == "image":
            yield from _image_rows([Unit(u, "image") for u in batch.column("uri").to_pylist()])
            return
        columns = (batch.column(c).to_pylist() for c in ("uri", "expected", "done_keys"))
        for uri, expected, done in zip(*columns):
            yield from _tar_rows(Unit(uri, "tar", expected, frozenset(done or ())))


def _error_table(path: str, problem: str, error: str) -> pa.Table:
    row = {"path": path, "image": None, "label": None, "problem": problem, "error": error}
    return pa.Table.from_pylist([row], schema=SCHEMA)


def _tar_rows(unit: Unit) -> Iterator[pa.Table]:
    """A shard's samples, streamed (a block of BLOCK_ROWS samples in memory at a time). A shard that cannot
    be read, or breaks off: its samples before that, then one row for the shard itself that says what
    happened and, when the manifest knows the count, how many samples are missing."""
    broken, samples = None, 0
    skip = unit.done
    with open_shard(unit.uri) as stream:  # one that cannot be opened: read_tar makes its error the rows
        for block in read_tar(stream, unit.uri, unit.expected):
            rows = []
            columns = (block.column(c).to_pylist() for c in ("key", "image", "label", "problem", "error"))
            for key, image, label, problem, error in zip(*columns):
                if problem in (TRUNCATED, MISSING, UNREADABLE):
                    broken = broken or (problem, error)  # the first says where the tar broke
                    continue
                samples += 1
                if key in skip:
                    continue  # the output holds it (a resumed job)
                if image is not None:  # a label problem: labeling needs no label
                    problem = error = None
                rows.append({"path": sample_id(unit.uri, key), "image": image, "label": None if label < 0 else label,
                             "problem": problem, "error": error})  # fmt: skip
            if rows:
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
    if broken and SHARD_ROW not in skip:
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
