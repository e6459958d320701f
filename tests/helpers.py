"""Small helpers shared by the training tests (importable: pytest puts tests/ on the path)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import requests
import torch

from crossvit import CrossViT
from pipelines import storage
from pipelines.checkpoint import save_checkpoint
from pipelines.data.sample import draw_sample
from pipelines.train.config import TrainConfig
from pipelines.train.metrics import load_history, record_epoch

RAY_CLI = str(Path(sys.executable).with_name("ray"))  # this environment's, as a cluster user runs it


def stop_ray(temp_dir: str) -> None:
    """Stop the Ray cluster whose temp dir is ``temp_dir``, and only it (``ray stop`` stops every Ray on the
    machine): the processes that name the folder on their command line (GCS, raylet, dashboard, log
    monitor), with all their children (workers, agents), TERM first, then KILL."""
    import psutil

    marker = temp_dir.rstrip("/") + "/"
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or []):
                roots.append(proc)
    procs = {}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


# The autoscaler's config for Ray's fake multi-node provider (its example.yaml in Ray's repository, which the wheel
# lacks; Ray's v1 autoscaler merges no defaults: every key is here), through tests/fake_nodes.py.
# fmt: off
FAKE_CLUSTER = {
    "cluster_name": "fake",
    "max_workers": 4,
    "provider": {"type": "external", "module": "fake_nodes.FakeNodesApart", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",  # the name the fake provider gives its head
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {}, "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}
# fmt: on
# Where Serve's HAProxy keeps its files on a node (/tmp/haproxy-serve/<node id>/ by default): the fake provider's
# node IDs are the same in every run, so each cluster keeps them in its own folder.
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}  # fmt: skip


@contextlib.contextmanager
def autoscaling_cluster(worker_types: dict, env: dict):
    """A cluster shaped like infra/aws/cluster.yaml on this machine: a head with 0 CPUs and the given worker
    node types (``{"cpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 1}}``), added by Ray's
    autoscaler (v1, as ``ray up`` runs it) through its fake multi-node provider, which starts each node as a
    raylet on this machine (tests/fake_nodes.py: each with Serve's ports and a runtime-env folder of its own).
    Not Ray's ``AutoscalingCluster`` (ray/cluster_utils.py): its start and shutdown run ``ray stop --force``,
    which stops every Ray on the machine, this session's cluster too, and it reads the provider's example.yaml,
    which the wheel lacks. Token authentication as the session's cluster (``env``); the dashboard on, for ``ray
    job submit``; Serve's ports and HAProxy's files apart from another Ray's. The node types are published as
    infra/aws/cluster.yaml's head does (``python -m jobs.cluster report-node-types``). Yields the head's address
    (``address``), the dashboard's URL (``dashboard``) and the cluster's ``temp_dir``."""
    from pipelines.cluster import HAPROXY_PORTS
    from pipelines.local_s3 import free_port

    temp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard_port = free_port(), free_port()
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    config = {**FAKE_CLUSTER, "provider": {**FAKE_CLUSTER["provider"], "gcs_address": address}}
    config["available_node_types"] = {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        **{name: {"node_config": {}, **t} for name, t in worker_types.items()},
    }
    path = Path(temp) / "autoscaling.json"
    path.write_text(json.dumps(config))
    command = [RAY_CLI, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               "--num-cpus=0", f"--temp-dir={temp}", f"--autoscaling-config={path}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]  # fmt: skip
    # The monitor stops its nodes on SIGTERM with RAY_AUTOSCALER_FATESHARE_WORKERS.
    fake = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTOSCALER_FATESHARE_WORKERS": "1"}
    serve = {  # Serve's listeners and HAProxy's files, apart from those of another Ray on this machine
        **{name: str(free_port()) for name in (*HAPROXY_PORTS, "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")},
        **{name: str(Path(temp) / "haproxy" / file) for name, file in HAPROXY_FILES.items()},
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "32000",  # the replicas' ports: the session cluster's are 31xxx
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "32700",
    }
    python_path = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))  # fake_nodes
    head = subprocess.Popen(
        command,
        env={**env, **fake, **serve, "PYTHONPATH": python_path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        report = [sys.executable, "-m", "jobs.cluster", "report-node-types", str(path), f"--address={address}"]
        deadline = time.monotonic() + 60
        while subprocess.run(report, env=env, capture_output=True, cwd=Path(__file__).parent.parent).returncode:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the autoscaling test cluster did not start")
            time.sleep(0.5)
        token = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
        while not _answers(f"{dashboard}/api/version", token):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the autoscaling test cluster's dashboard did not start")
            time.sleep(0.5)
        yield {"address": address, "dashboard": dashboard, "temp_dir": temp}
    finally:
        head.send_signal(signal.SIGTERM)
        stop_ray(temp)  # the fake nodes too (their processes name the folder): no 30 s of graceful stops
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def _answers(url: str, headers: dict) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(url, headers=headers, timeout=5).ok
    return False


def train_workers() -> list:
    """The live Ray Train worker actors of the cluster (their pid and node_id)."""
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def checkpointed(run_uri: str) -> bool:
    """An epoch is recorded and Ray Train has registered its checkpoint (its snapshot file is in storage),
    so a failure from now on resumes from a checkpoint rather than from scratch."""
    return bool(load_history(run_uri)) and storage.exists(f"{run_uri}/checkpoint_manager_snapshot.json")


def when(condition, action, timeout: float = 240) -> threading.Thread:
    """Run ``action`` in the background as soon as ``condition()`` holds; ``thread.result`` is what it
    returned (None until then)."""

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                thread.result = action()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.result = None
    thread.start()
    return thread


def write_run(run_uri: str, top1s: list[float | None], classes: list[dict], seed: int = 0, data: str = "") -> None:
    """A training run's folder as training writes it (checkpoint_*/ with the real checkpoint format, and
    the run's metrics.json), for models that need no training: epoch i has validation top-1 ``top1s[i]``
    (None: not evaluated) and weights drawn from ``seed + i``."""
    cfg = TrainConfig.from_yaml(Path(__file__).parent.parent / "jobs/configs/sample.yaml", data=data or "s3://x/y")
    record = {"cfg": cfg.to_dict(), "classes": classes, "train_samples": 96, "data_fingerprint": "f" * 64}
    for epoch, top1 in enumerate(top1s):
        torch.manual_seed(seed + epoch)
        model = CrossViT(dataclasses.replace(cfg.model_config(), num_classes=len(classes)))
        optimizer = torch.optim.AdamW(model.parameters())
        top5 = None if top1 is None else min(100.0, top1 + 10)
        metrics = {"epoch": epoch, "step": epoch + 1, "lr": 1e-3, "train_loss": 1.0, "val_loss": None,
                   "val_top1": top1, "val_top5": top5, "val_samples": 24}  # fmt: skip
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(Path(d), model, optimizer, record, metrics)
            for f in Path(d).iterdir():
                storage.upload_file(f, storage.join(run_uri, f"checkpoint_{epoch:06d}", f.name))
        record_epoch(run_uri, metrics)


def label_command(tmp_path: Path, images: int, classes: list[dict]) -> list[str]:
    """`python -m jobs.label` as a user types it: over ``images`` small JPEGs in tmp_path/images, with "tiny"
    version 1 (untrained, ``classes``) promoted in tmp_path/registry, into tmp_path/labels."""
    from PIL import Image

    from pipelines.registry.promote import promote

    write_run(str(tmp_path / "runs" / "a"), [50.0], classes)
    promote(str(tmp_path / "runs" / "a"), str(tmp_path / "registry"), "tiny")
    (tmp_path / "images").mkdir()
    for i in range(images):
        Image.new("RGB", (64, 48), (8 * i % 256, 100, 200)).save(tmp_path / "images" / f"{i}.jpg")
    return [sys.executable, "-m", "jobs.label", "--input", str(tmp_path / "images"), "--output",
            str(tmp_path / "labels"), "--registry", str(tmp_path / "registry"), "--model", "tiny"]  # fmt: skip


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


def jpeg(i: int, width: int = 500, height: int = 375) -> bytes:
    buf = io.BytesIO()
    draw_sample(i % 4, 4, width, height, np.random.default_rng(i)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _traffic(url: str, stop: threading.Event, seen: list, failures: list, data: bytes) -> None:
    while not stop.is_set():
        try:
            r = requests.post(f"{url}/v1/classify", data=data, timeout=60)
            if r.status_code == 200:
                seen.append(r.json()["version"])
            else:
                failures.append((time.monotonic(), r.json().get("error", r.status_code)))
        except requests.RequestException as e:
            failures.append((time.monotonic(), repr(e)))


@contextlib.contextmanager
def traffic(url: str, clients: int, data: bytes | None = None):
    """``clients`` threads classifying ``data`` (a 500x375 JPEG by default) in a loop while the block runs;
    yields (versions seen, failures as (time.monotonic(), what))."""
    stop, seen, failures, data = threading.Event(), [], [], data or jpeg(5)
    threads = [threading.Thread(target=_traffic, args=(url, stop, seen, failures, data)) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield seen, failures
    finally:
        stop.set()
        for t in threads:
            t.join()


def until(condition, timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.1)
    return time.monotonic() - start


QUICK_STOP = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 2, "health_check_period_s": 2}


def serve_test_config(**autoscaling) -> dict:
    """infra/serve.yaml with the test's timings: quick autoscaling, small limits that are cheap to pass, and a
    replica that stops within a second once idle (Serve's defaults wait 2 s between looks at its queue, 20 s
    at most, at every scale-down, deletion and shutdown)."""
    from pipelines.serve.deploy import load_serve_config  # Serve and FastAPI: for the tests that serve only

    config = copy.deepcopy(load_serve_config("infra/serve.yaml"))
    (options,) = config["applications"][0]["deployments"]
    options.update(QUICK_STOP)
    options["autoscaling_config"].update(
        min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=1, downscale_delay_s=4,
        look_back_period_s=2,
        **autoscaling,
    )  # fmt: skip
    return config


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    operators = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
    }
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        operators[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", [])
    )
