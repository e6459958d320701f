"""Ray Train: the recipe's pieces, and a real 2-worker DDP run on the sample data from the loopback S3."""

import itertools
import json

import pytest
import torch

import crossvit
from pipelines import storage
from pipelines.shards import prepare
from pipelines.train import TrainConfig, fit, lr_at, param_groups, scaling


def test_no_weight_decay_on_norms_biases_tokens_and_position_embeddings():
    model = crossvit.create_model("crossvit_9_240")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed_0", "cls_token_1", "norm.0.weight", "head.0.bias"} <= skipped
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_warms_up_then_follows_a_cosine_per_iteration():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    lrs = [lr_at(s / 100, cfg, peak=1e-3) for s in range(1000)]  # per iteration, 100 per epoch
    assert lrs[0] == pytest.approx(1e-6) and lrs[200] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:201]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[200:])) and lrs[-1] == pytest.approx(1e-5, rel=1e-2)


def test_worker_counts_are_fixed_or_an_elastic_range():
    assert scaling(4) == 4 and scaling("4") == 4 and scaling("2-8") == (2, 8)


def test_config_loads_from_yaml_with_overrides(tmp_path):
    cfg = TrainConfig.from_yaml("jobs/configs/sample.yaml", data="s3://x/y", epochs=2, name=None)
    assert cfg.data == "s3://x/y" and cfg.epochs == 2 and cfg.model_overrides["embed_dim"] == [32, 64]
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")


def test_two_worker_ddp_run_evaluates_exactly_checkpoints_to_s3_and_resumes(ray_cluster, sample_images):
    data = "s3://train-test/data"
    prepare(str(sample_images), data, shard_size_mb=0.05, workers=2)
    cfg = TrainConfig.from_yaml(
        "jobs/configs/sample.yaml", data=data, storage="s3://train-test/runs", name="resume", epochs=2, batch_size=8
    )
    result = fit(cfg)
    assert result.error is None
    assert result.metrics["epoch"] == 1 and result.metrics["val_samples"] == 24  # all val images, once
    files = storage.list_files("s3://train-test/runs/resume")
    checkpoints = sorted({f.rsplit("/", 2)[-2] for f in files if f.endswith("weights.safetensors")})
    assert len(checkpoints) == 2
    latest = f"s3://train-test/runs/resume/{checkpoints[-1]}"
    saved = json.loads(storage.read_bytes(f"{latest}/config.json"))
    assert saved["cfg"]["name"] == "resume" and saved["num_classes"] == 4
    # Started again with the same name and more epochs: it resumes from the latest checkpoint.
    resumed = fit(TrainConfig(**{**cfg.__dict__, "epochs": 3}))
    assert resumed.error is None and resumed.metrics["epoch"] == 2
    assert torch.isfinite(torch.tensor(resumed.metrics["train_loss"]))
    history = json.loads(storage.read_bytes("s3://train-test/runs/resume/metrics.json"))
    assert [m["epoch"] for m in history] == [0, 1, 2]  # every epoch once, across the restart
    assert set(history[0]) >= {"lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "epoch_s"}
    assert storage.read_bytes("s3://train-test/runs/resume/metrics.csv").startswith(b"epoch,lr,train_loss")
    assert storage.read_bytes("s3://train-test/runs/resume/curves.png")[:4] == b"\x89PNG"
    assert fit(TrainConfig(**{**cfg.__dict__, "epochs": 3})) is None  # a finished run: nothing to do


def test_the_job_runs_under_the_real_ray_job_submit_cli(ray_cluster, sample_images, tmp_path):
    """As a cluster user would: ``ray job submit --working-dir . -- python -m jobs.train ...`` against the
    head node the session started (token authentication on, as ``ray start`` leaves it)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    data = "s3://job-test/data"
    prepare(str(sample_images), data, shard_size_mb=0.05, workers=2)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    repo = Path(__file__).resolve().parent.parent
    cmd = [
        ray_cli,
        "job",
        "submit",
        "--address",
        ray_cluster["dashboard"],
        "--working-dir",
        str(repo),
        "--",
        "python",
        "-m",
        "jobs.train",
        "--config",
        "jobs/configs/sample.yaml",
        "--data",
        data,
        "--storage",
        "s3://job-test/runs",
        "--name",
        "submitted",
        "--epochs",
        "1",
    ]
    for _ in range(12):  # a head node just started may not have its job agent yet: "try again later"
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in out.stdout + out.stderr:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout and "final metrics" in out.stdout
    history = json.loads(storage.read_bytes("s3://job-test/runs/submitted/metrics.json"))
    assert [m["epoch"] for m in history] == [0]


def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_finishes(ray_cluster, sample_images):
    """SIGKILL one training worker while epoch 2 runs: Ray Train restarts the group from the last checkpoint
    (FailureConfig) and the run finishes with every epoch recorded once."""
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    data = "s3://kill-test/data"
    prepare(str(sample_images), data, shard_size_mb=0.05, workers=2)
    cfg = TrainConfig.from_yaml(
        "jobs/configs/sample.yaml", data=data, storage="s3://kill-test/runs", name="killed", epochs=3, batch_size=8
    )
    killed = []

    def kill_a_worker_after_the_first_epoch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            try:
                done = json.loads(storage.read_bytes("s3://kill-test/runs/killed/metrics.json"))
            except FileNotFoundError:
                done = []
            if done:
                workers = [
                    a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                ]
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.append(workers[-1].pid)
            time.sleep(0.5)

    killer = threading.Thread(target=kill_a_worker_after_the_first_epoch, daemon=True)
    killer.start()
    result = fit(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert result.error is None and result.metrics["epoch"] == 2
    history = json.loads(storage.read_bytes("s3://kill-test/runs/killed/metrics.json"))
    assert [m["epoch"] for m in history] == [0, 1, 2]
