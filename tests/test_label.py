"""Batch labeling (pipelines/label/): real Ray Data on the session cluster, the loopback S3 endpoint."""

import io
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from helpers import write_run
from PIL import Image

from pipelines import storage
from pipelines.data.prepare import prepare
from pipelines.label.inputs import InputError, resolve
from pipelines.label.job import LabelConfig, label
from pipelines.preprocess import eval_transform, normalize
from pipelines.registry.promote import promote
from pipelines.registry.store import Registry

ROOT = "s3://label-test/registry"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def registry(ray_cluster, s3_endpoint, sample_images):
    """Version 1 of "tiny" (the sample images' 4 classes) promoted, and the sample data set prepared."""
    data = "s3://label-test/data"
    manifest = prepare(str(sample_images), data, shard_size_mb=0.05, workers=2)
    write_run("s3://label-test/runs/a", [50.0], manifest["classes"], seed=7)
    promote("s3://label-test/runs/a", ROOT, "tiny")
    return {"data": data, "manifest": manifest}


def rows(output: str) -> list[dict]:
    fs, path = storage.filesystem(output)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def test_labels_equal_direct_inference_with_one_row_per_sample(registry, tmp_path):
    out = str(tmp_path / "labels")
    result = label(LabelConfig(registry["data"], out, ROOT, "tiny", split="val", top_k=3, embeddings=True))
    got = {r["path"]: r for r in rows(out)}
    assert len(got) == result.rows == registry["manifest"]["splits"]["val"]["samples"] and result.errors == 0
    reg = Registry(ROOT)
    version = reg.resolve("tiny", "production")
    model = reg.load(version)
    shard = next(iter(resolve(registry["data"], "val")))
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


def test_inputs_that_name_nothing_are_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"no manifest\.json, no \.tar shards and no images"):
        resolve(str(tmp_path))
    with pytest.raises(InputError, match=r"--split val: .* is no prepared data set"):
        resolve(str(tmp_path), "val")
    with pytest.raises(InputError, match=r"2 of the 2 shards of .* do not exist"):
        resolve(str(tmp_path / "shard-{0..1}.tar"))


def test_a_run_killed_midway_then_resumed_has_exactly_one_row_per_input(registry, ray_cluster, tmp_path):
    """`python -m jobs.label` on the session cluster, its driver SIGKILLed once some output is committed; the
    same command again completes what is missing: every input exactly once."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(600):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.jpg")
    out = tmp_path / "labels"
    cmd = [sys.executable, "-m", "jobs.label", "--input", str(folder), "--output", str(out), "--registry", ROOT,
           "--model", "tiny", "--batch-size", "4"]  # fmt: skip
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]}
    log = tmp_path / "first.out"
    with log.open("w") as sink:
        first = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    committed = out / "_checkpoint"
    while not [f for f in committed.glob("*.parquet") if ".pending" not in f.name]:
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    partial = len(rows(str(out)))
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    paths = [r["path"] for r in rows(str(out))]
    assert partial < 600, "the first run ended before it was killed: give it more images"
    assert len(paths) == 600 and len(set(paths)) == 600, (partial, len(paths), len(set(paths)))
