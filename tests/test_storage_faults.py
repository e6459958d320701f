"""Object storage as it behaves in production, through the session's storage proxy (``store``): what each
read path costs in requests, and what latency, resets, throttling and refusals do to what it reads.

The read paths are called as Ray's tasks call them (training's datasource, labeling's readers, adopt's
survey, storage's whole-object reads), in this process: the faults are the proxy's, whoever reads. The
tests that run them through Ray are in test_data.py and test_label.py."""

import io
import math
import random
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines import storage
from pipelines.data.adopt import survey_shard
from pipelines.data.dataset import Shard
from pipelines.data.reader import UNREADABLE, ShardDatasource, sample_id
from pipelines.label.inputs import Unit, _image_rows, _tar_rows
from pipelines.storage_proxy import CHUNK, S3

BUCKET = "s3://faults"


@pytest.fixture(autouse=True)
def _bucket(s3_endpoint) -> None:
    storage.ensure_bucket(BUCKET)


def tar_bytes(samples: int, image_bytes: int, seed: int = 0) -> bytes:
    """A WebDataset shard of ``samples`` samples: incompressible "images" of ``image_bytes`` and a label."""
    rng, buf = random.Random(seed), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(samples):
            for suffix, data in ((".jpg", rng.randbytes(image_bytes)), (".cls", str(i % 4).encode())):
                info = tarfile.TarInfo(f"s{i:05d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard(ray_cluster) -> dict:
    """An 18 MB shard of 90 samples (budget: ceil(18 / 8) + 2 = 5 GETs). (Ray Data's datasource, which
    training's reads go through, needs a Ray to be made: the session's cluster.)"""
    storage.ensure_bucket(BUCKET)
    data = tar_bytes(90, 200_000)
    uri = f"{BUCKET}/shards/shard-000000.tar"
    storage.write_bytes(uri, data)
    return {"uri": uri, "data": data, "samples": 90, "budget": math.ceil(len(data) / 2**20 / 8) + 2}


def training_rows(uri: str, expected: int | None) -> list[dict]:
    """A shard as a training read task reads it: Ray Data opens it through the datasource, which reads it."""
    fs, path = storage.filesystem(uri)
    shards = {path: Shard(uri, uri, expected)}
    source = ShardDatasource(shards, counter=None, seed=0, shuffle=False, filesystem=fs)
    with source._open_input_source(fs, path) as stream:
        return [row for block in source._read_stream(stream, path) for row in block.to_pylist()]


def labeling_rows(uri: str, expected: int | None) -> list[dict]:
    return [row for block in _tar_rows(Unit(uri, "tar", expected)) for row in block.to_pylist()]


def whole(uri: str) -> bytes | Exception:
    try:
        return storage.read_bytes(uri)
    except (OSError, storage.StorageError) as e:
        return e


# What every stage makes of one shard: training's and labeling's rows, adopt's survey, the object whole (as
# prepare's verification and the registry read objects).
STAGES = {
    "training": training_rows,
    "labeling": labeling_rows,
    "adopt": lambda uri, expected: survey_shard(uri),
    "whole": lambda uri, expected: whole(uri),
}


def readings(uri: str, expected: int | None) -> dict:
    return {stage: read(uri, expected) for stage, read in STAGES.items()}


def test_a_stream_fetches_ahead_of_its_reader(store):
    """Opening a stream sends its first two GETs at once (no HEAD: the first tells the size); while the
    reader holds the first chunk, READ_AHEAD GETs are under way or done, and no more until it takes one."""
    data = random.Random(1).randbytes(5 * storage.READ_BUFFER - 1000)
    uri = f"{BUCKET}/streams/five-chunks.bin"
    storage.write_bytes(uri, data)
    store.profile = S3
    store.reset_counts()
    with storage.open_stream(uri) as stream:
        head = stream.read(10)
        time.sleep(0.5)  # time enough for any GET sent to be answered
        assert store.gets() == 1 + storage.READ_AHEAD and "HEAD" not in store.counts
        rest = stream.read()
    assert head + rest == data and store.gets() == 5


def test_reading_a_shard_costs_a_get_per_8_mb_in_every_stage(store, shard):
    """Training's read task, labeling's, adopt's survey and a whole-object read (prepare's verification, the
    registry) of an 18 MB shard: at most ceil(18 / 8) + 2 GETs each. (tarfile reads 10 KiB at a time; each
    read was a GET of its own in labeling and adopt: 493 GETs for 4.8 MiB.) All stages name a sample alike."""
    uri, n = shard["uri"], shard["samples"]
    got = {}
    for stage, read in STAGES.items():
        store.reset_counts()
        got[stage] = read(uri, n)
        assert 1 <= store.gets() <= shard["budget"], (stage, dict(store.counts))
    ids = {sample_id(uri, f"s{i:05d}") for i in range(n)}
    assert {sample_id(r["shard"], r["key"]) for r in got["training"]} == ids
    assert {r["path"] for r in got["labeling"]} == ids
    assert got["adopt"]["samples"] == n and got["whole"] == shard["data"]


def test_listing_and_resolving_cost_few_requests(store):
    """K objects are listed in ceil(K / 1000) LISTs; a brace pattern over one folder is resolved by one LIST,
    and objects of many folders by HEADs sent at once."""
    from pipelines.label.inputs import resolve

    s3 = storage.s3_client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket="faults", Key=f"many/{i:05d}.tar", Body=b"x"), range(1001)))
    store.reset_counts()
    assert len(storage.list_files(f"{BUCKET}/many")) == 1001
    assert dict(store.counts) == {"LIST": 2}

    store.reset_counts()
    inputs = resolve(f"{BUCKET}/many/{{00100..00139}}.tar")
    assert len(inputs.units) == 40 and dict(store.counts) == {"LIST": 1}

    uris = [f"{BUCKET}/many/{i:05d}.tar".replace("many/", f"folder{i}/") for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: storage.write_bytes(u, b"y"), uris))
    store.profile = S3
    store.reset_counts()
    assert set(storage.sizes(uris).values()) == {1}
    assert dict(store.counts) == {"HEAD": 24} and store.max_in_flight >= 8  # not one after the other


def test_image_files_are_fetched_at_once_and_handed_on_as_they_arrive(store):
    uris = [f"{BUCKET}/images/{i:03d}.jpg" for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: storage.write_bytes(u, u.encode()), uris))
    store.profile = S3
    store.reset_counts()
    blocks = _image_rows([Unit(u, "image") for u in uris])
    first = next(blocks)
    assert first.num_rows < 64 and store.gets() < 64  # handed on before the last file arrived
    rows = first.to_pylist() + [r for b in blocks for r in b.to_pylist()]
    assert [r["path"] for r in rows] == uris and all(r["image"] == r["path"].encode() for r in rows)
    assert store.gets() == 64 and store.max_in_flight >= 4


@pytest.mark.parametrize("rst", [False, True], ids=["early-end", "tcp-reset"])
def test_a_connection_reset_mid_stream_is_resumed_and_changes_nothing(store, shard, rst):
    """Every object's first GET breaks off in the middle of its body: each stage reads the same as without the
    fault, with no bad sample, and re-reads from where the broken GET began (a whole object: from the byte
    it had reached), never from the shard's start."""
    uri, n = shard["uri"], shard["samples"]
    clean = readings(uri, n)
    assert not any(r["problem"] for r in clean["training"] + clean["labeling"])
    for stage, read in STAGES.items():
        store.reset()
        store.faults.reset_after, store.faults.rst = 3_000_000, rst  # in the middle of a GET's body, once
        assert read(uri, n) == clean[stage], stage
        assert store.counts["body cut"] >= 1
        assert store.gets() <= shard["budget"] + 1, (stage, dict(store.counts))
        if stage == "whole" and not rst:  # after a RST, what the client had received is timing's
            resumed_from = store.bytes_sent - len(shard["data"])
            assert store.counts["ranged GET"] == 1 and resumed_from <= storage.STREAM_PIECE + CHUNK


def test_a_storm_of_slow_downs_slows_reads_but_changes_nothing(store, shard):
    uri, n = shard["uri"], shard["samples"]
    clean = readings(uri, n)
    store.faults.slow_down = 0.3
    assert readings(uri, n) == clean
    assert store.counts["503 injected"] >= 1


def test_storage_that_stays_broken_is_reported_as_unreadable_not_truncated(store, shard, monkeypatch):
    """Every GET breaks off before its first byte, until the retries are spent: each stage names the shard
    and the error."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage.s3_client.cache_clear()  # a client made before retries as configured then
    uri, n = shard["uri"], shard["samples"]
    store.faults.reset_after, store.faults.reset_times = 0, -1  # no GET brings a byte
    try:
        got = readings(uri, n)
    finally:
        storage.s3_client.cache_clear()  # the next test's client retries as configured
    assert len(got["training"]) == n and {r["problem"] for r in got["training"]} == {UNREADABLE}
    assert all(f"cannot read {uri}" in r["error"] for r in got["training"])
    (row,) = got["labeling"]
    assert row["path"] == uri and row["problem"] == UNREADABLE and "truncated" not in row["error"]
    assert "cannot read" in got["adopt"]["unreadable"] and got["adopt"]["samples"] == 0
    assert isinstance(got["whole"], storage.StorageError) and "broke off" in str(got["whole"])


@pytest.mark.parametrize("status", [403, 404])
def test_a_forbidden_or_missing_object_is_its_own_rows(store, shard, status):
    """A shard or an image that storage refuses (403: also S3's answer for a missing key to a reader without
    s3:ListBucket) or does not have: training counts the manifest's samples as unreadable, labeling gives the
    input one row, adopt leaves it out; never an exception that fails the task."""
    uri, n = shard["uri"], shard["samples"]
    image = f"{BUCKET}/refused/cat.jpg"
    storage.write_bytes(image, b"jpeg")
    store.faults.status = {"faults/shards/*": status, "faults/refused/*": status}
    got = readings(uri, n)
    why = "access denied" if status == 403 else "does not exist"
    assert len(got["training"]) == n and {r["problem"] for r in got["training"]} == {UNREADABLE}
    assert why in got["training"][0]["error"]
    (row,) = got["labeling"]
    assert row["problem"] == UNREADABLE and why in row["error"]
    assert got["adopt"]["unreadable"]
    assert isinstance(got["whole"], PermissionError if status == 403 else FileNotFoundError)
    (image_row,) = next(_image_rows([Unit(image, "image")])).to_pylist()
    assert image_row["problem"] == UNREADABLE and image_row["image"] is None


def test_a_bucket_that_is_missing_or_forbidden_is_one_error_before_any_work(store, tmp_path, monkeypatch):
    from pipelines.label import job

    storage.ensure_bucket("s3://walled")
    storage.write_bytes("s3://walled/a.jpg", b"x")
    storage.check_buckets(["s3://walled/a.jpg"])
    store.faults.status = {"walled": 403}  # no s3:ListBucket, but the objects may be read: fine
    storage.check_buckets(["s3://walled/a.jpg"])
    store.faults.status = {"walled": 403, "walled/*": 403}
    with pytest.raises(storage.StorageError, match="access denied to bucket walled"):
        storage.check_buckets(["s3://faults/x", "s3://walled/a.jpg"])
    with pytest.raises(storage.StorageError, match="bucket nowhere-at-all does not exist"):
        storage.check_buckets(["s3://nowhere-at-all/a.jpg"])
    listed = tmp_path / "list.txt"
    listed.write_text("s3://walled/a.jpg\n")
    monkeypatch.setattr(job, "connect", lambda: pytest.fail("the job started work"))
    with pytest.raises(storage.StorageError, match="access denied to bucket walled"):
        job.label(job.LabelConfig(str(listed), str(tmp_path / "out"), str(tmp_path / "registry"), "m"))
