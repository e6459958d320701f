"""The README's commands as a new user runs them: a fresh HOME (no ~/.ray), the machine's real CPUs, no
cluster given. Each test runs a Ray of its own in a temp dir of its own, so that it neither joins the test
session's cluster (a driver with no address joins any local cluster it finds through Ray's temp dir) nor
stops it (``ray stop`` stops every Ray on the machine): it stops only what it started."""

import io
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import requests
from helpers import label_command, stop_ray, write_run
from PIL import Image

from pipelines import storage
from pipelines.data.prepare import prepare
from pipelines.label.job import LabelConfig, label
from pipelines.local_s3 import free_port
from pipelines.registry.promote import promote
from pipelines.train.metrics import load_history

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def user_env(tmp_path, s3_endpoint):
    """A new user's shell: a fresh HOME, no RAY_* settings, this environment's `python` and `ray` first on
    the PATH, the S3 endpoint in AWS_* (inherited from the session), and a Ray temp dir of its own."""
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="ru-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home),
        RAY_TMPDIR=ray_tmp,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    yield env
    stop_ray(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _readme_commands(heading: str) -> list[str]:
    """The commands of the first ```bash block after ``heading`` in the README, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading) :], re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _tail(out: subprocess.CompletedProcess) -> str:
    return (out.stdout or "")[-3000:] + (out.stderr or "")[-3000:]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_readmes_training_steps_work_on_a_fresh_machine(user_env, sample_images):
    """Exactly the README's commands, one after the other in one shell, as a user pastes them: a token made
    first, then `ray start --head`, then `ray job submit`. A head node just started may not have its job
    agent yet ("try again later", Ray says), or on a busy machine not yet its dashboard's address in GCS:
    then the submit is repeated, as the message asks. The state
    after the first step (a token in ~/.ray) is the one of a machine that ran the demo before; the end shows
    that the first step keeps such a token."""
    if _port_in_use(6379) or _port_in_use(8265):
        pytest.skip("another Ray on this machine uses the README's default ports (6379, 8265)")
    prepare(str(sample_images), "s3://bucket/datasets/sample", shard_size_mb=0.05, workers=2)
    commands = _readme_commands("## Training")
    submit = next(i for i, c in enumerate(commands) if c.startswith("ray job submit"))
    setup = "\n".join(commands[:submit])
    out = subprocess.run(["bash", "-ec", setup], cwd=REPO, env=user_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, _tail(out)
    exports = "\n".join(c for c in commands[:submit] if c.startswith("export "))
    for _ in range(30):
        out = subprocess.run(
            ["bash", "-ec", f"{exports}\n{commands[submit]}"],
            cwd=REPO,
            env=user_env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        # Not up yet: the job agent ("No available agent"), or on a busy machine the dashboard's address
        # (seen once with another Ray running beside: "Could not read 'dashboard' from GCS").
        not_yet = r"No available agent to submit job|Could not read 'dashboard' from GCS"
        if not re.search(not_yet, out.stdout + out.stderr):
            break
        time.sleep(2)
    assert out.returncode == 0 and "succeeded" in out.stdout and "final metrics" in out.stdout, _tail(out)
    assert [m["epoch"] for m in load_history("s3://bucket/runs/sample")] == [0, 1]
    # On a machine that has a token already (it ran the demo, or these steps), the first step keeps it.
    token = Path(user_env["HOME"], ".ray", "auth_token").read_text()
    again = subprocess.run(["bash", "-ec", commands[0]], cwd=REPO, env=user_env, capture_output=True, timeout=120)
    assert again.returncode == 0 and Path(user_env["HOME"], ".ray", "auth_token").read_text() == token


def test_train_with_no_cluster_runs_on_the_machines_own_cpus(user_env, sample_shards, tmp_path):
    """`python -m jobs.train ... --num-workers 2` with no Ray running: it starts one with the machine's CPUs
    (2 on CI), plans them between the 2 workers and the data pipeline, and finishes. Without the plan the
    workers took every CPU and the run waited for its first batch forever: one epoch shows it (the README's
    steps run two on the machine's CPUs, through `ray start`)."""
    cmd = [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/sample.yaml", "--data", sample_shards]
    cmd += ["--storage", str(tmp_path / "runs"), "--name", "sample", "--epochs", "1", "--num-workers", "2"]
    out = subprocess.run(cmd, cwd=REPO, env=user_env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and "final metrics" in out.stdout, _tail(out)
    # As many CPUs as Ray finds on this machine (its cores, or a container's CPU quota), none given.
    assert re.search(r"CPU plan: \d+ CPUs in the cluster: 2 training worker\(s\)", out.stdout + out.stderr)
    assert [m["epoch"] for m in load_history(str(tmp_path / "runs" / "sample"))] == [0]


def test_the_demo_runs_with_another_class_count(user_env, tmp_path):
    """`python -m jobs.demo --classes 12`, the suite's one demo run as a user: the model, the mixing and the
    printed chance follow the data set (10 classes were hard-coded). What it made stays in --workdir after it
    exits (the endpoint does not). The variants on a bucket and a cluster of yours are checked in-process,
    below."""
    cmd = [sys.executable, "-m", "jobs.demo", "--classes", "12", "--train-per-class", "8", "--val-per-class", "2",
           "--workdir", str(tmp_path / "demo")]  # fmt: skip
    out = subprocess.run([*cmd, "--epochs", "1"], cwd=REPO, env=user_env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, _tail(out)
    assert "12 classes" in out.stdout and "(chance 8%)" in out.stdout and "over 24 images" in out.stdout
    assert "S3-compatible endpoint on" in out.stdout  # an endpoint of its own
    assert "production -> version 1" in out.stdout  # promoted into the registry
    # a second, longer run, promoted as the candidate, shadows production and is judged on that evidence
    assert "epoch 1/1" in out.stdout[out.stdout.index("== 3b.") :] and "candidate -> version 2" in out.stdout
    assert re.search(r"^24 requests in .* \(0 failed\), each also run on the candidate; the judge: (promoted|rolled "
                     r"back)\n(  - .*\n)+  production \(version 1\): 2\d answered.*\n  canary \(version 2\): 2\d "
                     r"shadowed, .* top-1 agreement [\d.]+%", out.stdout, re.M), _tail(out)  # fmt: skip
    # progress, as a log shows it (a bar in a terminal): every image of both splits written, one epoch read
    assert "writing shards: 120/120 img" in out.stderr and "decode + augment + forward: 96/96 img" in out.stderr
    assert re.search(r"^epoch 1/1 lr .* top1 ", out.stdout, re.M), _tail(out)  # the driver shows the epochs
    # and not the output of Ray's tasks and actors (Serve's controller, Train's, ...): it stays in Ray's logs
    assert not re.search(r"pid=\d+\)", out.stdout + out.stderr), _tail(out)
    assert len(re.findall(r"^POST .*\.JPEG -> .*\(version 1\)", out.stdout, re.M)) == 4  # classified over HTTP
    assert "example predictions, online (Serve) and in bulk (Parquet):" in out.stdout
    # and the validation split labeled in bulk, one row per image, scored against its ground truth
    assert re.search(r"labeled 24 input\(s\) .* holds 24 row\(s\), 0 with an error", out.stdout), _tail(out)
    assert re.search(r"accuracy of the labels against the ground truth: [\d.]+% \(\d+ of 24\)", out.stdout)
    kept = tmp_path / "demo" / "bucket"
    assert (kept / "datasets" / "sample" / "manifest.json").is_file()
    assert Image.open(kept / "runs" / "sample" / "curves.png").size == (1200, 360)
    assert (kept / "registry" / "sample").is_dir() and list((kept / "labels" / "val").glob("*.parquet"))
    assert f"training curves:                 {kept}/runs/sample/curves.png" in out.stdout


def test_the_demo_on_a_cluster_and_a_bucket_that_hold_earlier_work(ray_cluster, tmp_path, capsys, monkeypatch):
    """The demo's steps with `--ray-address` and `--bucket` (here: the session's cluster, and the loopback
    endpoint standing in for S3), run in this process on a bucket where an earlier demo left its work: a
    finished run, version 1 in the registry, the labels. No endpoint of its own; the finished run is not
    trained again, it is promoted as version 2, the labeling resumes and writes nothing new, and what it made
    stays in the bucket. The Serve application is gone before labeling starts: labeling plans from the CPUs
    that are free, and on 2 cores a resumed labeling did not fit beside the replica."""
    from ray import serve

    from pipelines import demo

    bucket = f"s3://demo-cluster/{tmp_path.name}"
    storage.ensure_bucket(bucket)
    workdir = tmp_path / "demo"
    data = demo._prepare(bucket, workdir, 4, 8, 2)  # what an earlier demo left: its shards,
    write_run(f"{bucket}/runs/sample", [50.0], data.classes)  # a finished 1-epoch run,
    promote(f"{bucket}/runs/sample", f"{bucket}/registry", "sample")  # version 1,
    label(LabelConfig(data.uri, f"{bucket}/labels/val", f"{bucket}/registry", "sample", split="val", top_k=3))
    capsys.readouterr()

    apps_when_labeling, connected = [], []

    def label_after_serve(cfg):
        apps_when_labeling.append(list(serve.status().applications))
        return label(cfg)

    monkeypatch.setattr(demo, "label", label_after_serve)
    monkeypatch.setattr(demo, "connect", lambda **kwargs: connected.append(kwargs))  # this process is connected
    for name in ("ray.data", "ray.serve"):  # the demo quiets them for its own output
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the demo's own end; this process stays connected
    for name in ("RAY_DATA_LOG_LEVEL", "PYTHONWARNINGS"):  # what the demo sets, restored afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
    try:
        demo.run(workdir, 4, 8, 2, 48, 1, bucket=bucket, ray_address=ray_cluster["address"])
    finally:
        serve.shutdown()  # the demo deleted its app; its proxy must not keep the session's HTTP port
    out = capsys.readouterr().out
    assert "S3-compatible endpoint on" not in out and not (workdir / "bucket").exists()
    assert f"shards and manifest:             {bucket}/datasets/sample/" in out
    assert "has finished its 1 epochs already" in out and "production -> version 2" in out
    assert "candidate -> version 3" in out and re.search(r"the judge: (promoted|rolled back)", out), out
    # four images classified over HTTP by version 2 (counted, not matched by line: this process also prints
    # what Ray's workers log, which may break into a line)
    served = out[out.index("== 5. Ray Serve") : out.index("== 6. batch labeling")]
    assert served.count("POST ") == served.count(".JPEG -> ") == served.count("% (version 2)") == 4, out
    assert connected == [{"address": ray_cluster["address"], "logging_level": "ERROR", "log_to_driver": False}]
    assert len(apps_when_labeling) == 1 and demo.DEMO_APP not in apps_when_labeling[0], apps_when_labeling
    assert re.search(r"labeled 0 input\(s\) .* holds 8 row\(s\), 0 with an error", out), out
    assert storage.exists(f"{bucket}/registry/sample/aliases/production.json")


def test_serve_with_no_cluster_answers_until_ctrl_c(user_env, tmp_path):
    """`python -m jobs.serve` with no Ray running: its own Ray with the machine's CPUs, the application of
    infra/serve.yaml, answers over HTTP (administration off: no admin token), and Ctrl-C stops it within
    seconds. Its output goes to a file, not a
    pipe: a pipe nobody reads any more fills up with Ray's forwarded logs and blocks the process on its next
    print (how this test once failed in CI, as if Ctrl-C hung)."""
    classes = [{"index": i, "wnid": f"n0000000{i}", "name": f"class {i}"} for i in range(4)]
    write_run(str(tmp_path / "runs" / "a"), [50.0], classes)
    promote(str(tmp_path / "runs" / "a"), str(tmp_path / "registry"), "tiny")
    port = free_port()
    cmd = [sys.executable, "-m", "jobs.serve", "--registry", str(tmp_path / "registry"), "--model", "tiny"]
    out = tmp_path / "serve.out"
    with out.open("w") as sink:
        # Ctrl-C as in a terminal: a suite started in the background (`.ci/run &`, nohup) ignores SIGINT, and its
        # children inherit that; Python then installs no KeyboardInterrupt handler (how this failed once).
        proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO, env=user_env, stdout=sink,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 240  # never wait forever for the "serving" line
        while "serving tiny:production at" not in out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(out.read_text()[-4000:])
            time.sleep(0.5)
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), "red").save(buf, format="JPEG")
        answer = requests.post(f"http://127.0.0.1:{port}/v1/classify", data=buf.getvalue(), timeout=60).json()
        assert answer["version"] == 1 and len(answer["labels"]) == 4
        # No admin token set: administration is off, not anonymous (it once answered a reload with 200).
        reload = requests.post(f"http://127.0.0.1:{port}/v1/admin/reload", timeout=60)
        assert reload.status_code == 403 and "administration is off" in reload.json()["error"]
    finally:
        proc.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("jobs.serve did not end within 180 s of Ctrl-C:\n" + out.read_text()[-4000:]) from None
    assert code == 0, out.read_text()[-4000:]
    assert "stopped" in out.read_text()
    # Promptly: no load balancer waits on a Ray of its own, so no 30 s of Serve's draining (pipelines/cluster.py)
    assert time.monotonic() - stopping < 20, f"Ctrl-C took {time.monotonic() - stopping:.0f} s"


def test_label_with_no_cluster_then_again_on_the_machines_cpus(user_env, tmp_path):
    """`python -m jobs.label` with no Ray running, on this machine's CPUs (2 here), twice: the second run is
    a resumed one, whose aggregation of the inputs with the done ids needs CPUs of its own before the model's
    actor takes its share. It must find everything done, read nothing and write nothing, not wait for a CPU
    forever."""
    classes = [{"index": i, "wnid": f"n0000000{i}", "name": f"class {i}"} for i in range(4)]
    cmd = label_command(tmp_path, 30, classes)
    first = subprocess.run(cmd, cwd=REPO, env=user_env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "labeled 30 input(s)" in first.stdout, _tail(first)
    again = subprocess.run(cmd, cwd=REPO, env=user_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, _tail(again)
    assert "labeled 0 input(s)" in again.stdout and "holds 30 row(s), 0 with an error" in again.stdout
    assert "0 unit(s) to read" in again.stdout + again.stderr


def test_demo_arguments_are_checked_before_anything_starts(capsys, monkeypatch):
    from jobs import demo

    for args, message in (
        (["--image-size", "50"], "--image-size 50: branch image size 50 is not a positive multiple of patch size"),
        (["--image-size", "0"], "--image-size 0"),
        (["--classes", "21"], "--classes must be between 1 and 20"),
        (["--bucket", "bucket/x"], "--bucket bucket/x: an s3:// prefix"),
        (["--ray-address", "10.0.0.1:6379"], "--ray-address needs --bucket"),
    ):
        with pytest.raises(SystemExit):
            demo.main(args)
        assert message in capsys.readouterr().err
    # A bucket and a cluster of yours reach the demo's steps (which test_the_demo_on_a_cluster_... runs).
    given = {}
    monkeypatch.setattr(demo.demo, "run", lambda *args, **kwargs: given.update(kwargs))
    demo.main(["--bucket", "s3://mine/x", "--ray-address", "10.0.0.1:6379"])
    assert given == {"bucket": "s3://mine/x", "ray_address": "10.0.0.1:6379"}


def test_pyproject_admits_the_ray_release_the_code_is_written_for():
    """Train V2, the autoscaling coordinator and the Ray Data APIs used here are Ray 2.60's."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert ray.specifier.contains("2.60.0") and ray.specifier.contains("2.60.3")
    assert not ray.specifier.contains("2.59.0") and not ray.specifier.contains("2.61.0")
