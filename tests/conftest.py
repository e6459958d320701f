"""Shared test fixtures: tiny model configurations, the loopback S3 endpoint, the session's Ray cluster."""

import atexit
import contextlib
import json
import multiprocessing.process
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import RAY_CLI, stop_ray

from crossvit import CrossViTConfig

# Ray 2.60 authenticates with a token: `ray start --head` turns it on when RAY_AUTH_MODE=token (or when
# ~/.ray/auth_token exists, which the first local `ray.init()` writes), and every client (this process,
# `ray job submit`, the cluster's own processes) must present the same token. The session uses its own
# token in the environment, which `ray start` and every child inherit, so the tests neither depend on nor
# touch the user's ~/.ray. Ray reads the mode when it is first imported: set both before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# The session's Ray keeps its files in a folder of its own, so that it neither joins nor stops any other Ray
# on the machine (a user's, or the ones the as-a-user tests start). Short: socket paths have a length limit.
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["RAY_TMPDIR"], True)
# The MLflow test logs to a local folder (file store), which MLflow 3 only allows when asked; the cluster's
# workers inherit this from `ray start`.
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
# Ray Train's controller looks at its workers every 2 s by default: a finished, failed or resized worker group
# is noticed up to 2 s late, at every run's end and every restart. The tests' runs are seconds long; the
# controller (started from this process or a submitted job's) reads this from the environment it inherits.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
# After a node is lost, an elastic run's first restart asks for as many workers as Ray's resource view held
# just before (the dead node's included); that group's placement group waits for its start timeout, 60 s by
# default, before the run restarts smaller. A retry that costs no failure (Train retries start timeouts
# without a limit), so a short one here only makes the shrink come sooner: 72 s -> about 20 s measured with
# 10 s, 12 s with 3 s. (The timeout covers the placement group only, not the workers' start-up: 3 s is ample
# where the resources exist.)
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "3"
# Ray Train watches for nodes being drained (spot preemption) with an actor of its own per run: one more
# process to start on 2 cores for every fit, and no test here drains a node.
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
# botocore's adaptive retries (the product's default) slow a client down after throttling, for the rest of
# its process: after one test's storm of 503s, every later test of the session (and of Ray's reused workers)
# would wait on it. Standard retries back off per request only.
os.environ["AWS_RETRY_MODE"] = "standard"
# Serve's proxies drain for at least 30 s before they stop, so `serve.shutdown()` waited 30 s (and then gave
# up) at the end of every module that serves; the session's Serve controller reads these where it starts.
# (jobs that start a Ray of their own set 1 s: pipelines/cluster.py)
os.environ["RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S"] = "0.5"
os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0.5"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers from what a test uses, so that the fast tier (``-m "not cluster and not slow"``, README) never
    starts a server by mistake: a test that needs a Ray cluster (the session's, or one it starts as a user) is
    ``cluster``; one that needs the loopback S3 endpoint (a server process) is ``slow``. Tests that start
    processes of their own are marked ``slow`` where they are written."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"ray_cluster", "user_env"}:  # user_env: a Ray the test starts as a user does
            item.add_marker(pytest.mark.cluster)
        elif fixtures & {"s3_endpoint", "store"}:
            item.add_marker(pytest.mark.slow)


# Two branches (patch 12 on 48 px, patch 16 on 48 px), two multi-scale blocks: every code path of the
# published models, at a size that trains on a laptop CPU in seconds.
TINY = CrossViTConfig(
    img_size=48,
    img_scale=(1.0, 1.0),
    patch_size=(12, 16),
    embed_dim=(32, 64),
    depth=((1, 2, 0), (1, 2, 0)),
    num_heads=(2, 2),
    mlp_ratio=(2.0, 2.0, 1.0),
    num_classes=10,
)


@pytest.fixture
def tiny_cfg() -> CrossViTConfig:
    return TINY


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _the_fast_tier_starts_no_process(request, monkeypatch) -> None:
    """A test with neither marker belongs to the fast tier, which starts no process: no server, no
    ``python -m``, no worker pool. One that does fails here, and is marked ``slow`` where it is written."""
    if request.node.get_closest_marker("cluster") or request.node.get_closest_marker("slow"):
        return

    def refuse(*args, **kwargs):
        raise AssertionError("this test starts a process: mark it slow (the fast tier starts none)")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.fixture(scope="session")
def _storage_proxy():
    """The session's object store: moto's server behind the storage proxy (pipelines/storage_proxy.py)."""
    from pipelines.storage_proxy import proxied_local_s3

    with proxied_local_s3() as proxy:
        yield proxy


@pytest.fixture(scope="session")
def s3_endpoint(_storage_proxy) -> str:
    """An S3-compatible endpoint on loopback for the whole session, the AWS_* variables pointing at it: the
    storage proxy, at the loopback profile unless a test (``store``) asks for another. Started before the
    session's Ray cluster, whose workers inherit the variables."""
    return _storage_proxy.url


@pytest.fixture
def store(_storage_proxy):
    """The session's storage proxy for one test, which sets its profile and faults and reads its counts;
    reset before and after."""
    _storage_proxy.reset()
    yield _storage_proxy
    _storage_proxy.reset()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One Ray cluster per test session, started the way a cluster user does (``ray start --head``) after
    the S3 variables are set, so that its workers and submitted jobs inherit them. Token authentication is
    on (see the top of this file). A node that stops answering is declared dead after about 3 s instead of
    Ray's default 15 s, so that the node-loss tests do not wait on it."""
    import ray

    from pipelines.cluster import HAPROXY_PORTS, SERVE_ENV
    from pipelines.local_s3 import free_port

    port, dashboard_port = free_port(), free_port()
    # Submitted jobs run `python ...` from the PATH the head node was started with: this environment's.
    env = {
        **SERVE_ENV,
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **FAST_NODE_FAILURE_DETECTION,
        # Keep idle worker processes and take Serve's fast path, as pipelines.cluster.connect does for a
        # local cluster (see there): the tests exercise the Serve configuration the product starts.
        "RAY_num_workers_soft_limit": "16",
        **{name: str(free_port()) for name in HAPROXY_PORTS},  # as connect() does: another Serve may run here
        # Serve's replicas pick their own ports, every cluster from 30000 up by default; beside another Ray with
        # Serve on this machine (the tests that run jobs.serve or the demo as a user), HAProxy here once routed
        # requests to the other cluster's replica. The session cluster's replicas take ports of their own.
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "31000",
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "31999",
    }
    subprocess.run(
        [
            RAY_CLI,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            # The head's dashboard agent (through which `ray job submit` runs jobs) on a free port: with Ray's
            # fixed default, another Ray starting on this machine at the same moment takes it, and every job
            # submission then fails with "Agent info not found" (seen once in CI beside a demo run).
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}", "env": env}
    finally:
        ray.shutdown()
        stop_ray(os.environ["RAY_TMPDIR"])
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


FAST_NODE_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class RayNode:
    """One more node of the session cluster, added as a cluster user adds a machine
    (``ray start --address=<head> --block``): its own raylet, agents and worker processes. ``wrap`` is a
    command the node runs under (e.g. a mount namespace of its own, a machine with other disks)."""

    def __init__(self, cluster: dict, num_cpus: int, resources: dict, wrap: list[str] | None = None):
        self.node_id = ""
        self.process = subprocess.Popen(
            [
                *(wrap or []),
                RAY_CLI,
                "start",
                f"--address={cluster['address']}",
                "--block",
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources)}",
                f"--object-store-memory={200 * 2**20}",
                "--include-log-monitor=false",  # the head's log monitor already follows this machine's logs
                "--disable-usage-stats",
            ],
            env=cluster["env"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_until_joined(self, timeout: float = 120) -> None:
        """The node's raylet names its node ID on its command line; wait until the cluster lists it alive."""
        import psutil
        import ray

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("a Ray worker node did not join the cluster")
            if not self.node_id:
                for proc in psutil.Process(self.process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        ids = [a.split("=", 1)[1] for a in proc.cmdline() if a.startswith("--node_id=")]
                        if proc.name() == "raylet" and ids:
                            self.node_id = ids[0]
            if self.node_id and any(n["NodeID"] == self.node_id and n["Alive"] for n in ray.nodes()):
                return
            time.sleep(0.2)

    def kill(self) -> None:
        """The machine vanishes: every process of the node is SIGKILLed at once, nothing shuts down cleanly."""
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            for proc in [*root.children(recursive=True), root]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        self.process.wait(timeout=30)


@contextlib.contextmanager
def _joined_nodes(cluster: dict):
    """``add(n, num_cpus, resources, wrap)`` joins n more nodes to the session cluster and returns them; they
    are removed again at the end. One after the other: nodes on one machine name their sockets by the first
    free name, and two starting at once can pick the same one."""
    added = []

    def add(n: int = 1, num_cpus: int = 1, resources: dict | None = None, wrap: list[str] | None = None):
        for _ in range(n):
            added.append(RayNode(cluster, num_cpus, resources or {}, wrap))
            added[-1].wait_until_joined()
        return added[-n:]

    try:
        yield add
    finally:
        for node in added:
            node.kill()


@pytest.fixture
def add_nodes(ray_cluster):
    """Nodes for one test (see _joined_nodes)."""
    with _joined_nodes(ray_cluster) as add:
        yield add


@pytest.fixture(scope="module")
def add_module_nodes(ray_cluster):
    """Nodes that the tests of one module share (a node takes seconds to start on 2 cores)."""
    with _joined_nodes(ray_cluster) as add:
        yield add


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    """The built-in sample data set, small: 4 classes, 24 train and 6 val images each, 64 x 48 px."""
    from pipelines.data.sample import SampleSpec, write_sample_dataset

    return write_sample_dataset(tmp_path_factory.mktemp("sample") / "images", SampleSpec(4, 24, 6, 64, 48, seed=3))


@pytest.fixture(scope="session")
def sample_shards(s3_endpoint, sample_images) -> str:
    """``sample_images`` prepared once as shards in the loopback bucket (small shards, so there are several),
    for every test that only reads them; a test that changes its data prepares its own."""
    from pipelines.data.prepare import prepare

    uri = "s3://shared/sample"
    prepare(str(sample_images), uri, shard_size_mb=0.05, workers=2)
    return uri
