"""Batch labeling (pipelines/label/): real Ray Data on the session cluster, the loopback S3 endpoint."""

import io
import json
import re
import secrets
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from helpers import write_run
from PIL import Image
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.state import list_tasks

from pipelines import storage
from pipelines.cluster import HEAD, Capacity, NodeType, ResourcePlanError
from pipelines.data.bad_samples import bad_sample_counter
from pipelines.data.dataset import DataSet, load_manifest
from pipelines.label.inputs import SCHEMA, InputError, pending_units, resolve
from pipelines.label.job import (
    LabelConfig,
    LabelConfigError,
    LabelPlan,
    label,
    output_files,
    plan_for,
    plan_label_cpus,
    read_labels,
)
from pipelines.label.model import Decode, Labeler
from pipelines.preprocess import eval_transform, normalize
from pipelines.registry.promote import promote
from pipelines.registry.store import Registry

ROOT = "s3://label-test/registry"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def registry(ray_cluster, sample_shards):
    """Version 1 of "tiny" (the sample images' 4 classes) promoted, and the sample data set prepared."""
    data = sample_shards
    manifest = load_manifest(data)
    storage.ensure_bucket(ROOT)
    write_run("s3://label-test/runs/a", [50.0], manifest["classes"], seed=7)
    promote("s3://label-test/runs/a", ROOT, "tiny")
    return {"data": data, "manifest": manifest}


def sample_memory_growth() -> tuple[list[int], threading.Event]:
    """Samples how far this process's RSS has grown, every 50 ms, into the list, until the event is set."""
    proc = psutil.Process()
    base, peak, stop = proc.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak.append(proc.memory_info().rss - base)

    threading.Thread(target=sample, daemon=True).start()
    return peak, stop


def rows(output: str) -> list[dict]:
    return read_labels(output).to_pylist()


def jpeg(i: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (37 * i % 256, 91 * i % 256, 53 * i % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(uri: str, members: dict[str, bytes], cut: int | None = None) -> None:
    """A WebDataset tar of ``members`` at ``uri``, its first ``cut`` bytes only when given (broken off)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(uri, buf.getvalue()[:cut])


def test_labels_equal_direct_inference_with_one_row_per_sample(registry, tmp_path):
    out = str(tmp_path / "labels")
    result = label(LabelConfig(registry["data"], out, ROOT, "tiny", split="val", top_k=3, embeddings=True))
    got = {r["path"]: r for r in rows(out)}
    assert len(got) == result.rows == registry["manifest"]["splits"]["val"]["samples"] and result.errors == 0
    reg = Registry(ROOT)
    version = reg.resolve("tiny", "production")
    model = reg.load(version)
    shard = resolve(registry["data"], "val").first(1)[0]
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shard.uri))) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:4]
        for m in members:
            pixels = eval_transform(tar.extractfile(m).read(), version.image_size)
            with torch.inference_mode():
                x = normalize(torch.from_numpy(pixels[None]), channels_last=False)
                features = model.forward_features(x)
                probs = model.forward_head(features).softmax(-1)[0]
            row = got[f"{shard.uri}#{m.name.rsplit('.', 1)[0]}"]
            assert row["labels"][0] == int(probs.argmax()) and abs(row["probs"][0] - float(probs.max())) < 1e-4
            assert row["version"] == 1 and row["model"] == "tiny" and row["error"] is None
            assert np.allclose(np.asarray(row["embedding"], np.float32), features[0].numpy(), atol=1e-2)
            assert len(row["names"]) == 3 and row["label"] is not None


def test_bad_files_get_a_row_each_with_their_error(registry, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(folder / f"good{i}.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    good = io.BytesIO()
    Image.new("RGB", (40, 30)).save(good, format="PNG")
    (folder / "cut.png").write_bytes(good.getvalue()[:50])
    out = str(tmp_path / "labels")
    result = label(LabelConfig(str(folder), out, ROOT, "tiny"))
    got = {Path(r["path"]).name: r for r in rows(out)}
    assert set(got) == {"good0.jpg", "good1.jpg", "good2.jpg", "empty.jpg", "text.png", "cut.png"}
    assert result.rows == 6 and result.errors == 3
    assert all(got[f"good{i}.jpg"]["error"] is None for i in range(3))
    assert all(
        "cannot decode" in got[n]["error"] and got[n]["labels"] is None for n in ("empty.jpg", "text.png", "cut.png")
    )


def test_a_finished_job_run_again_writes_nothing(registry, tmp_path):
    out = str(tmp_path / "labels")
    cfg = LabelConfig(registry["data"], out, ROOT, "tiny", split="val")
    first = label(cfg)
    again = label(cfg)
    assert again.written == 0 and again.rows == first.rows == len({r["path"] for r in rows(out)})


def test_a_rerun_must_label_as_the_first_run_did(registry, tmp_path):
    """The output records what its first run labeled with: a rerun with another top-k (another schema) is
    refused, and so is an output that holds files of something else."""
    out = str(tmp_path / "labels")
    label(LabelConfig(registry["data"], out, ROOT, "tiny", split="val", top_k=3))
    with pytest.raises(LabelConfigError, match=r"labeled differently \(top_k 3 then, 2 now\)"):
        label(LabelConfig(registry["data"], out, ROOT, "tiny", split="val", top_k=2))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.parquet").write_bytes(_parquet({"a": [1]}))
    with pytest.raises(LabelConfigError, match="holds files of something else"):
        label(LabelConfig(registry["data"], str(tmp_path / "other"), ROOT, "tiny", split="val"))


def test_inputs_that_name_nothing_are_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"no manifest\.json, no \.tar shards and no images"):
        resolve(str(tmp_path))
    with pytest.raises(InputError, match=r"--split val: .* is no prepared data set"):
        resolve(str(tmp_path), "val")
    with pytest.raises(InputError, match=r"2 of the 2 shards of .* do not exist"):
        resolve(str(tmp_path / "shard-{0..1}.tar"))
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    assert [(u.uri, u.kind) for u in resolve(str(tmp_path / "b.jpg")).first()] == [(str(tmp_path / "b.jpg"), "image")]
    with pytest.raises(InputError, match=r"holds both \.tar shards and image files"):
        resolve(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"manifest\.json"):
        resolve(str(tmp_path))


def test_a_run_killed_at_90_percent_fetches_only_what_is_left_and_ends_with_one_row_per_input(
    registry, ray_cluster, store, tmp_path
):
    """600 images in S3; `python -m jobs.label` on the session cluster, its driver SIGKILLed once 90 % of them
    are committed; the same command again fetches at most 15 % of the images' bytes (what was left, and what
    the killed run had in flight), and the output ends with every input exactly once. Filtered after the
    read, as Ray Data's checkpointing does, the rerun fetched every image again."""
    folder = f"s3://label-test/resume-{tmp_path.name}"
    rng = np.random.default_rng(0)
    images = []
    for _ in range(600):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        images.append(buf.getvalue())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: storage.write_bytes(f"{folder}/{i:04d}.jpg", images[i]), range(600)))
    out = tmp_path / "labels"
    cmd = [sys.executable, "-m", "jobs.label", "--input", folder, "--output", str(out), "--registry", ROOT,
           "--model", "tiny", "--batch-size", "10", "--rows-per-file", "10"]  # fmt: skip
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]}
    log = tmp_path / "first.out"
    with log.open("w") as sink:
        first = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 240
    while committed_rows(out) < 540:
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    partial = committed_rows(out)
    store.reset_counts()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    paths = [r["path"] for r in rows(str(out))]
    assert partial < 600, "the first run ended before it was killed: give it more images"
    assert len(paths) == 600 and len(set(paths)) == 600, (partial, len(paths), len(set(paths)))
    bucket_and_folder = folder.removeprefix("s3://")
    fetched = sum(store.gets_by_key[f"{bucket_and_folder}/{i:04d}.jpg"] * len(images[i]) for i in range(600))
    fresh = sum(map(len, images))  # a GET per image; the model's weights come from S3 too, in either run
    print(f"killed at {partial} of 600 committed; the rerun fetched {fetched:,} bytes ({fetched / fresh:.1%})")
    assert fetched <= 0.15 * fresh, f"the rerun fetched {fetched / fresh:.0%} of a fresh run's bytes"


def test_each_distinct_input_is_labeled_once_and_the_files_hold_rows_per_file(registry, tmp_path, monkeypatch):
    """A list naming some images twice, in other spellings (``./a.jpg``, ``x/../a.jpg``, the absolute path;
    relative to the driver's working directory): one row each, the duplicates counted in the result and the
    job record. Output files hold at least ``rows_per_file`` rows (one may hold the rest)."""
    folder = noise_images(tmp_path / "images", 40)
    monkeypatch.chdir(tmp_path)
    names = [f"images/img{i:04d}.jpg" for i in range(40)]
    again = ["./images/img0000.jpg", str(folder / "img0001.jpg"), "images/../images/img0002.jpg", names[3]]
    (tmp_path / "list.txt").write_text("\n".join(names + again) + "\n")
    out = tmp_path / "labels"
    result = label(LabelConfig("list.txt", str(out), ROOT, "tiny", batch_size=4, rows_per_file=16))
    paths = [r["path"] for r in rows(str(out))]
    assert sorted(paths) == [str(folder / f"img{i:04d}.jpg") for i in range(40)]
    assert result.rows == 40 and result.duplicates == 4
    record = json.loads((out / "_label_job.json").read_text())
    assert record["duplicates"]["count"] == 4 and len(record["duplicates"]["examples"]) == 4
    sizes = sorted(pq.read_metadata(f).num_rows for f in committed_parts(out))
    assert sum(sizes) == 40 and len(sizes) >= 2 and all(n >= 16 for n in sizes[1:]), sizes


def test_a_million_names_are_listed_deduplicated_and_filtered_on_the_cluster(ray_cluster, tmp_path):
    """A list of 1,000,000 image URIs (1,000 of them named twice) and an output that holds 100,000 of them:
    resolved and reduced to what is left to label by Ray Data on the cluster, with the driver's memory
    growing by far less than the names would take there (about 2 GB per 10 M, held as objects), in seconds.
    No image is fetched."""
    n, done = 1_000_000, 100_000
    listed = tmp_path / "names.txt"
    with listed.open("w") as f:
        f.writelines(f"s3://corpus/images/{i:08d}.jpg\n" for i in range(n))
        f.writelines(f"s3://corpus/images/{i:08d}.jpg\n" for i in range(0, n, 1000))
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"path": [f"s3://corpus/images/{i:08d}.jpg" for i in range(done)]}),
                   tmp_path / "out" / "part.parquet")  # fmt: skip
    peak, stop = sample_memory_growth()
    start = time.monotonic()
    try:
        inputs = resolve(str(listed))
        fs, path = storage.filesystem(str(tmp_path / "out"))
        counter = bad_sample_counter()
        left = pending_units(inputs, output_files(fs, path), fs, counter).materialize().count()
    finally:
        stop.set()
    seconds, grown = time.monotonic() - start, max(peak) / 2**20
    print(f"1,001,000 names -> {left:,} to label in {seconds:.1f} s; the driver's memory grew by {grown:.0f} MiB")
    assert left == n - done and ray.get(counter.tallies.remote())["duplicates"]["count"] == 1000
    assert grown < 200 and seconds < 120


def test_retry_errors_labels_again_only_what_storage_failed_to_deliver(registry, store, tmp_path):
    """A forbidden image (403) is its row's error; run again, the job has nothing to do; with --retry-errors,
    that image alone is fetched again and labeled, and the undecodable one (the data's own fault) is kept."""
    folder = f"s3://label-test/retry-{tmp_path.name}"
    for i in range(10):
        storage.write_bytes(f"{folder}/{i}.jpg", jpeg(i))
    storage.write_bytes(f"{folder}/bad.jpg", b"not an image")
    store.faults.status = {f"{folder.removeprefix('s3://')}/3.jpg": 403}
    out = str(tmp_path / "labels")
    assert label(LabelConfig(folder, out, ROOT, "tiny")).errors == 2
    store.faults.status = {}
    assert label(LabelConfig(folder, out, ROOT, "tiny")).written == 0
    store.reset_counts()
    retried = label(LabelConfig(folder, out, ROOT, "tiny", retry_errors=True))
    got = {r["path"]: r for r in rows(out)}
    assert len(got) == retried.rows == 11 and retried.errors == 1 and retried.written == 1
    assert got[f"{folder}/3.jpg"]["labels"] is not None and "cannot decode" in got[f"{folder}/bad.jpg"]["error"]
    assert store.gets(".jpg") == 1


def test_a_cut_write_and_a_rewritten_file_are_not_taken_for_done(tmp_path):
    """A file a killed run left without its footer holds no done rows: deleted. A file rewritten without some
    rows (``-kept``) replaces its original, also when the run was killed before deleting it."""
    whole = _parquet({"path": ["a"], "problem": [None], "error": [None]})
    cut = whole[: len(whole) // 2]
    for name, data in (("x", whole), ("x-kept", whole), ("y", cut), ("z", whole), ("z-kept", cut)):
        (tmp_path / f"{name}.parquet").write_bytes(data)
    fs, path = storage.filesystem(str(tmp_path))
    assert [Path(f).name for f in output_files(fs, path)] == ["x-kept.parquet", "z.parquet"]  # z's rewrite was cut
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-kept.parquet", "z.parquet"]


def test_a_job_whose_inputs_mostly_fail_stops_with_the_counts_and_examples(registry, ray_cluster, tmp_path):
    """`python -m jobs.label` over 110 files that are no images and 10 that are: once 100 inputs are seen and
    more than half failed, the job stops (exit 1) with the counts and the first failing inputs. (As a user
    runs it: in a process that goes on, Ray Data keeps the failed pipeline's model actor, and its CPUs, for
    the lineage of the blocks it made until those are released.)"""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(110):
        (folder / f"bad{i:03d}.jpg").write_bytes(b"not an image")
    for i in range(10):
        (folder / f"good{i}.jpg").write_bytes(jpeg(i))
    cmd = [sys.executable, "-m", "jobs.label", "--input", str(folder), "--output", str(tmp_path / "labels"),
           "--registry", ROOT, "--model", "tiny", "--max-error-fraction", "0.5"]  # fmt: skip
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    said = done.stderr.strip().splitlines()[-1]
    assert re.search(r"cannot label: stopped: too many inputs fail\. \d+ of \d+ samples were bad .*bad\d{3}\.jpg", said)


def test_jpegs_decoded_by_the_labeling_actor_label_as_the_cpu_path_does(registry):
    """``--decode-on-gpu``'s path: the decode tasks pass JPEGs on encoded (a PNG, and bytes that are no image,
    are handled there as before), and the actor decodes and transforms them itself, with torchvision (nvJPEG
    on a GPU; its CPU decoder here): the same top-1 as the CPU path."""
    images = [jpeg(i, (300, 200)) for i in range(8)]
    png = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(png, format="PNG")
    table = pa.Table.from_pylist(
        [{"path": f"x{i}", "image": d} for i, d in enumerate([*images, png.getvalue(), b"\xff\xd8 no jpeg"])],
        schema=SCHEMA,
    )
    version = Registry(ROOT).resolve("tiny", "production")
    labeler = Labeler(ROOT, "tiny", version.number, 3, False, use_gpu=False, threads=2)
    on_cpu = labeler(Decode(version.image_size, 10**8)(table)).to_pylist()
    passed = Decode(version.image_size, 10**8, pass_jpegs=True)(table)
    assert [bool(e) for e in passed["encoded"]] == [True] * 8 + [False, False]
    on_actor = labeler(passed).to_pylist()
    assert [r["labels"][0] for r in on_actor[:9]] == [r["labels"][0] for r in on_cpu[:9]]
    assert np.allclose([r["probs"] for r in on_actor[:9]], [r["probs"] for r in on_cpu[:9]], atol=0.05)
    assert on_actor[9]["problem"] == on_cpu[9]["problem"] == "undecodable"


def noise_images(folder: Path, n: int) -> Path:
    """``n`` distinct 64 x 48 JPEGs of noise in ``folder``."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.jpg")
    return folder


def committed_rows(out: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in committed_parts(out))


def committed_parts(out: Path) -> list[Path]:
    """The output's complete files (their footer written): each is the commit of its rows."""
    parts = []
    for f in out.glob("*.parquet"):
        try:
            pq.read_metadata(f)
            parts.append(f)
        except (OSError, pa.ArrowInvalid):  # a file being written
            pass
    return parts


def test_a_worker_node_lost_midway_leaves_the_counts_exact(registry, add_nodes, tmp_path):
    """A node joins, takes part of the decoding (and maybe the model's actor), and vanishes once some output
    is committed: Ray re-runs what it held; every input still gets exactly one row."""
    folder = noise_images(tmp_path / "images", 600)
    (node,) = add_nodes(1, num_cpus=2)
    out = tmp_path / "labels"
    done: list = []
    job = threading.Thread(target=lambda: done.append(label(LabelConfig(str(folder), str(out), ROOT, "tiny",
                                                                         batch_size=4))), daemon=True)  # fmt: skip
    job.start()
    deadline = time.monotonic() + 240
    while not committed_parts(out):
        assert job.is_alive() and time.monotonic() < deadline, "the job ended (or stalled) before any commit"
        time.sleep(0.1)
    node.kill()
    job.join(400)
    assert done, "the job did not finish after the node was lost"
    paths = [r["path"] for r in rows(str(out))]
    assert len(paths) == len(set(paths)) == 600 and done[0].errors == 0
    ran_there = list_tasks(filters=[("node_id", "=", node.node_id)], limit=1000)
    assert ran_there, "nothing ran on the lost node: the test proved nothing"


def test_beside_a_job_that_holds_cpus_the_plan_fits_what_is_free_or_is_an_error(registry, tmp_path):
    """Labeling on a cluster where something else (a training run, a Serve app) holds all CPUs but one: the
    decode and the model share the free one (planned from all CPUs, the job waited forever). None free: a
    clear error once the plan's wait for CPUs being freed is over."""
    folder = noise_images(tmp_path / "images", 20)
    deadline = time.monotonic() + 30
    while sum(n["Alive"] for n in ray.nodes()) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)  # a node an earlier test killed still counts until Ray declares it dead
    free = ray.available_resources()["CPU"]
    held = placement_group([{"CPU": free - 1}])
    ray.get(held.ready(), timeout=60)
    try:
        done: list = []
        job = threading.Thread(target=lambda: done.append(label(LabelConfig(str(folder), str(tmp_path / "a"), ROOT,
                                                                             "tiny"))), daemon=True)  # fmt: skip
        job.start()
        job.join(120)
        assert done and done[0].rows == 20, "labeling in the one free CPU did not finish"
    finally:
        remove_placement_group(held)
    held = placement_group([{"CPU": free}])
    ray.get(held.ready(), timeout=60)
    try:
        with pytest.raises(ResourcePlanError, match=r"has 0 free CPU\(s\)"):
            label(LabelConfig(str(folder), str(tmp_path / "b"), ROOT, "tiny", free_cpu_wait_s=1))
    finally:
        remove_placement_group(held)


def test_storage_that_fails_stops_the_job_with_its_error_and_the_rerun_labels_the_rest(registry, tmp_path):
    """A bucket that does not exist (as an endpoint that does not answer) is no property of one image: the
    job stops with the storage's error before any work starts, and the same command labels everything once
    the storage answers. An image that is gone is only its own row's error (test_storage_faults.py)."""
    folder = noise_images(tmp_path / "images", 3)
    bucket = f"s3://label-gone-{secrets.token_hex(4)}"
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in sorted(folder.iterdir())) + f"{bucket}/a.jpg\n")
    cfg = LabelConfig(str(listed), str(tmp_path / "labels"), ROOT, "tiny")
    with pytest.raises(storage.StorageError, match=f"bucket {bucket[5:]} does not exist"):
        label(cfg)
    storage.ensure_bucket(bucket)
    storage.write_bytes(f"{bucket}/a.jpg", jpeg(1))
    result = label(cfg)
    assert result.rows == 4 and result.errors == 0


def test_forbidden_missing_and_flaky_inputs_change_nothing_else(registry, store, tmp_path):
    """32 images in an S3 folder: one forbidden (403), one gone since it was listed (404); every object's first
    GET breaks off mid-body and 30 % of all requests are throttled (503). The job labels the 30 others as
    a run without faults does and gives the two their own error rows; nothing fails, nothing is left out."""
    folder = f"s3://label-test/flaky-{tmp_path.name}"
    for i in range(32):
        storage.write_bytes(f"{folder}/{i:02d}.jpg", jpeg(i, (64, 48)))
    clean = {r["path"]: r for r in rows(label(LabelConfig(folder, str(tmp_path / "clean"), ROOT, "tiny")).output)}
    bucket_and_key = folder.removeprefix("s3://")
    store.faults.status = {f"{bucket_and_key}/00.jpg": 403, f"{bucket_and_key}/01.jpg": 404}
    store.faults.reset_after, store.faults.slow_down = 300, 0.3
    result = label(LabelConfig(folder, str(tmp_path / "faults"), ROOT, "tiny"))
    got = {r["path"]: r for r in rows(result.output)}
    assert result.rows == 32 and result.errors == 2 and set(got) == set(clean)
    refused = {p: got[p] for p in (f"{folder}/00.jpg", f"{folder}/01.jpg")}
    assert all(r["problem"] == "unreadable" and r["labels"] is None for r in refused.values())
    assert "access denied" in refused[f"{folder}/00.jpg"]["error"]
    same = ("labels", "problem", "error")  # and the probabilities, to float32's precision (other batches)
    assert all({k: got[p][k] for k in same} == {k: clean[p][k] for k in same} for p in got if p not in refused)
    assert all(np.allclose(got[p]["probs"], clean[p]["probs"], atol=1e-5) for p in got if p not in refused)
    assert store.counts["body cut"] >= 30 and store.counts["503 injected"] > 0


def test_an_output_of_the_earlier_format_is_refused_with_how_to_start_again(tmp_path):
    """Outputs written before rows had a ``problem`` column are not resumed into (their files would not read
    as one data set): the message says how to start again."""
    from pipelines.label.job import JOB_RECORD, _pin_the_job

    out = tmp_path / "labels"
    out.mkdir()
    before = {"input": "in", "split": None, "model": "tiny", "version": 1, "top_k": 5, "embeddings": False}
    (out / JOB_RECORD).write_text(json.dumps(before))
    cfg = LabelConfig("in", str(out), str(tmp_path / "registry"), "tiny")
    with pytest.raises(LabelConfigError, match=f"earlier version of this job.*delete {out} to start it again"):
        _pin_the_job(cfg, Registry(cfg.registry), resuming=True)


def test_tens_of_thousands_of_images_keep_the_driver_memory_flat(registry, tmp_path):
    """30,000 small images in 30 shards: the driver holds neither rows nor pixels (about 200 MB of them at
    the model's 48 px), its memory stays flat, and the counts are exact."""
    encoded = [jpeg(i, (16, 12)) for i in range(50)]
    for s in range(30):
        write_tar(str(tmp_path / "tars" / f"shard-{s:06d}.tar"), {f"{s}-{i}.jpg": encoded[i % 50] for i in range(1000)})
    peak, stop = sample_memory_growth()
    try:
        result = label(LabelConfig(str(tmp_path / "tars"), str(tmp_path / "labels"), ROOT, "tiny", top_k=1,
                                   batch_size=256))  # fmt: skip
    finally:
        stop.set()
    grown = max(peak) / 2**20
    print(f"driver memory grew by {grown:.0f} MiB at most while labeling {result.rows:,} images")
    assert result.rows == 30_000 and result.errors == 0
    assert grown < 100, f"the driver's memory grew by {grown:.0f} MiB"


def test_the_cpu_plan_fits_decode_beside_the_model_or_is_a_clear_error():
    """On CPUs the model is the work: the actors take a node's CPUs but a tenth (at least 0.2 for a decode task)
    and the writes' 0.1, and run as many torch threads as they reserved; a GPU actor takes 1 CPU to feed it."""
    assert plan_label_cpus(2, (1, 1), use_gpu=False) == LabelPlan(0.2, 1.7)
    assert plan_label_cpus(2, (1, 1), use_gpu=False).threads == 2  # the model's 2 threads on 2 cores, as before
    assert plan_label_cpus(2, (1, 4), use_gpu=False) == LabelPlan(0.2, 0.42)  # 4 actors share 1.7
    assert plan_label_cpus(16, (1, 4), use_gpu=False) == LabelPlan(1.0, 3.72)
    assert plan_label_cpus(16, (1, 4), use_gpu=False, nodes=4) == LabelPlan(1.0, 14.9)  # one actor per node
    assert plan_label_cpus(4, (1, 1), use_gpu=True, gpus_per_actor=0.25) == LabelPlan(1.0, 1.0, 0.25)
    with pytest.raises(ResourcePlanError, match=r"0.25 CPU\(s\) on a node: 1 model actor\(s\), decode"):
        plan_label_cpus(0.25, (1, 1), use_gpu=False)


def test_a_cluster_that_starts_empty_is_planned_for_what_it_can_become():
    """A 0-CPU head with worker types the autoscaler may add (infra/aws/cluster.yaml's shape): planned for
    the node an actor goes to, not refused for the 0 CPUs of now. A GPU asked of a cluster that can never have
    one, or an actor bigger than any node, is an error before anything starts."""
    head = ({"CPU": 0.0, "memory": 1e9},)
    cpu = NodeType("cpu", {"CPU": 8}, 4)
    gpu = NodeType("gpu", {"CPU": 16, "GPU": 1}, 2)
    cfg = LabelConfig("in", "out", "reg", "tiny")
    where, plan = plan_for(cfg, Capacity(head, (cpu,)))
    assert plan == LabelPlan(0.8, 7.1) and "autoscaling" in where
    assert plan_for(cfg, Capacity(head, (cpu, gpu)))[1] == LabelPlan(0.8, 7.1)  # CPU work on CPU nodes
    with pytest.raises(ResourcePlanError, match="no node has a GPU, and no node type the autoscaler may add has one"):
        plan_for(LabelConfig("in", "out", "reg", "tiny", use_gpu=True), Capacity(head, (cpu,)))
    gpu_cfg = LabelConfig("in", "out", "reg", "tiny", use_gpu=True, gpus_per_actor=0.5, replicas=(1, 4))
    assert plan_for(gpu_cfg, Capacity(head, (cpu, gpu)))[1] == LabelPlan(1.0, 1.0, 0.5)
    with pytest.raises(ResourcePlanError, match=r"can hold a model actor \(\{'GPU': 2"):
        plan_for(LabelConfig("in", "out", "reg", "tiny", use_gpu=True, gpus_per_actor=2), Capacity(head, (cpu, gpu)))
    with pytest.raises(LabelConfigError, match="--gpus-per-actor"):
        LabelConfig("in", "out", "reg", "tiny", use_gpu=True, gpus_per_actor=0)
    fixed = LabelConfig("in", "out", "reg", "tiny", free_cpu_wait_s=0)
    with pytest.raises(ResourcePlanError, match=r"has 0 free CPU\(s\)"):
        plan_for(fixed, Capacity(head), free_cpus=lambda: 0)
    assert plan_for(fixed, Capacity(({"CPU": 4.0},)), free_cpus=lambda: 2)[1] == LabelPlan(0.2, 1.7)
    # What it can become: the head and the most nodes of each type, those up now among them.
    up = Capacity(({"CPU": 0.0, HEAD: 1.0}, {"CPU": 8.0}), (cpu,))
    assert up.most("CPU") == 32 and up.nodes_with("CPU") == 4 and up.most("GPU") == 0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_each_input_kind_local_and_on_s3(registry, tmp_path, where):
    """Foreign shards (a folder or prefix of .tar, a brace pattern), an image folder or prefix (recursive) and
    a URI list, each labeled into one row per image. A shard that breaks off keeps its samples before the
    break and gets one row of its own; without a manifest nobody knows how many samples it missed."""
    root = str(tmp_path) if where == "local" else f"s3://label-test/kinds-{tmp_path.name}"
    for s in range(2):
        members = {f"s{s}-{i}.{ext}": jpeg(i) if ext == "jpg" else b"1" for i in range(4) for ext in ("jpg", "cls")}
        write_tar(storage.join(root, "tars", f"shard-{s:06d}.tar"), members)
    first = jpeg(0, (300, 200))
    cut = 512 + -(-len(first) // 512) * 512 + 512 + 100  # c-0 whole, c-1's header, then 100 bytes of its data
    members = {f"c-{i}.jpg": jpeg(i, (300, 200)) for i in range(3)}
    write_tar(storage.join(root, "tars", "shard-000002.tar"), members, cut=cut)
    images = [storage.join(root, "images", sub, f"{i}.jpg") for sub in ("a", "a/b") for i in range(3)]
    for i, uri in enumerate(images):
        storage.write_bytes(uri, jpeg(i))
    listed = storage.join(root, "list.txt" if where == "s3" else "list.csv")
    if where == "s3":
        storage.write_bytes(listed, "".join(f"{u}\n" for u in images[:4]).encode())
    else:
        storage.write_bytes(listed, ("uri,note\n" + "".join(f"{u},x\n" for u in images[:4])).encode())

    def labeled(spec: str) -> dict[str, dict]:
        out = storage.join(root, "out", str(abs(hash(spec))))
        result = label(LabelConfig(spec, out, ROOT, "tiny", top_k=2))
        got = {r["path"]: r for r in rows(out)}
        assert result.rows == len(got)
        return got

    tars = labeled(storage.join(root, "tars"))
    shard = storage.join(root, "tars", "shard-000002.tar")
    assert len(tars) == 8 + 1 + 1 and tars[f"{shard}#c-0"]["error"] is None
    assert "truncated or corrupt tar after c-1" in tars[shard]["error"] and "no manifest says" in tars[shard]["error"]
    assert all(r["labels"] is not None for p, r in tars.items() if p != shard)
    brace = labeled(storage.join(root, "tars", "shard-{000000..000001}.tar"))
    assert set(brace) == {p for p in tars if "shard-000002" not in p}
    assert set(labeled(storage.join(root, "images"))) == set(images)
    assert set(labeled(listed)) == set(images[:4])


def _parquet(columns: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def test_uri_lists_in_parquet_csv_and_text(tmp_path):
    uris = [f"s3://b/p/{i}.jpg" for i in range(3)]
    (tmp_path / "a.parquet").write_bytes(_parquet({"n": [1, 2, 3], "uri": uris}))
    (tmp_path / "b.csv").write_text("\n".join(uris) + "\n")  # no header: the first column
    (tmp_path / "c.txt").write_text("\n".join(uris) + "\n\n")
    for name in ("a.parquet", "b.csv", "c.txt"):
        assert [u.uri for u in resolve(str(tmp_path / name)).first()] == uris
    (tmp_path / "d.txt").write_text("\n")
    with pytest.raises(InputError, match="lists no image URIs"):
        resolve(str(tmp_path / "d.txt"))


def test_a_data_set_shard_that_breaks_off_gets_one_row_saying_how_many_samples_are_missing(registry, tmp_path):
    """The manifest knows each shard's count: the broken shard's row says how many it lost."""
    data = DataSet.load(registry["data"])
    cut = f"s3://label-test/cut-{tmp_path.name}"
    shards = data.shards("val")
    for key in ("manifest.json",):
        storage.write_bytes(storage.join(cut, key), storage.read_bytes(storage.join(registry["data"], key)))
    for s in data.shards("train") + shards:
        raw = storage.read_bytes(s.uri)
        target = s.uri.replace(registry["data"], cut)
        storage.write_bytes(target, raw[: len(raw) // 2] if s.uri == shards[0].uri else raw)
    out = str(tmp_path / "labels")
    label(LabelConfig(cut, out, ROOT, "tiny", split="val"))
    got = {r["path"]: r for r in rows(out)}
    broken = shards[0].uri.replace(registry["data"], cut)
    kept = [p for p, r in got.items() if p.startswith(broken + "#") and r["error"] is None]
    assert len(got) == registry["manifest"]["splits"]["val"]["samples"] - shards[0].samples + len(kept) + 1
    assert f"{shards[0].samples - len(kept)} of its {shards[0].samples} samples are missing" in got[broken]["error"]


@pytest.fixture(autouse=True)
def _no_labeling_actor_outlives_its_job(request):
    """A model actor that stays alive after its job holds most of a node's CPUs: every later job waits."""
    yield
    if "ray_cluster" not in request.fixturenames and "registry" not in request.fixturenames:
        return
    from ray.util.state import list_actors

    deadline = time.monotonic() + 15
    while alive := [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "MapWorker" in a.class_name]:
        assert time.monotonic() < deadline, f"left alive: {[(a.class_name, a.pid) for a in alive]}"
        time.sleep(0.5)
