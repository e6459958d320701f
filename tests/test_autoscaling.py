"""Jobs and Serve on a cluster that starts empty: a head with 0 CPUs and worker node types that Ray's autoscaler
adds on demand (infra/aws/cluster.yaml's shape: CPU nodes, and "GPU" nodes whose GPU is a custom resource here),
made on this machine with Ray's fake multi-node provider, and used with the README's cluster commands (`ray job
submit`, `ray job stop`). Planned from the CPUs of now, every job refused to start ("the cluster has 0 CPUs", "a
replica needs 1 CPU ... and no node has that") and the autoscaler was never asked for a node."""

import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from helpers import RAY_CLI, autoscaling_cluster, jpeg, label_command, serve_test_config, traffic, write_run

from pipelines.data.dataset import load_manifest
from pipelines.label.job import read_labels
from pipelines.local_s3 import free_port
from pipelines.registry.promote import promote

REPO = Path(__file__).resolve().parent.parent
GPU = "fake_gpu"  # the GPU of the "GPU" node type: a custom resource (Ray would hand a "GPU" to torch)


@pytest.fixture(scope="module")
def empty_cluster(ray_cluster):
    """A 0-CPU head; the autoscaler may add one CPU node (2 CPUs) and two "GPU" nodes (1 CPU and 1 fake_gpu
    each); min_workers 0."""
    types = {
        "cpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 1},
        "gpu": {"resources": {"CPU": 1, GPU: 1}, "min_workers": 0, "max_workers": 2},
    }
    env = {k: v for k, v in ray_cluster["env"].items() if k != "RAY_ADDRESS"}
    with autoscaling_cluster(types, env) as cluster:
        yield {**cluster, "env": {**env, "RAY_ADDRESS": cluster["address"]}}


def _dashboard(cluster: dict, path: str, **params) -> dict:
    """A GET of the cluster's dashboard (Ray's state API, Serve's REST API), as `ray list` and `serve status` read
    it; no driver to start."""
    token = {"Authorization": f"Bearer {cluster['env']['RAY_AUTH_TOKEN']}"}
    r = requests.get(f"{cluster['dashboard']}{path}", params=params, headers=token, timeout=30)
    r.raise_for_status()
    return r.json()


def _nodes(cluster: dict, kind: str | None = None, alive: bool = True) -> list[str]:
    """The IDs of the cluster's nodes (alive ones, or all it ever had) of a kind: "head", "cpu" or "gpu"."""
    nodes = _dashboard(cluster, "/api/v0/nodes", limit=1000, detail=1)["data"]["result"]["result"]

    def kind_of(node: dict) -> str:
        resources = node["resources_total"]
        return "gpu" if resources.get(GPU) else "cpu" if resources.get("CPU") else "head"

    return [
        n["node_id"] for n in nodes if (not alive or n["state"] == "ALIVE") and (kind is None or kind_of(n) == kind)
    ]


def _wait(condition, timeout: float, what: str) -> None:
    """Until ``condition()`` holds, asking every half second (each look asks the dashboard, on 2 cores)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.5)


def _jobs_env(cluster: dict) -> dict:
    """The environment of a user's `ray job ...` commands: the cluster's dashboard as its address."""
    return {**cluster["env"], "RAY_ADDRESS": cluster["dashboard"]}


def test_label_and_train_on_a_cluster_that_starts_with_no_cpu(empty_cluster, sample_shards, tmp_path):
    """`python -m jobs.label`, then (once the idle node is gone again) `ray job submit ... python -m jobs.train`, as
    a user runs them: each plans for the node types the autoscaler may add, the autoscaler adds the CPU node, the
    job finishes."""
    assert _nodes(empty_cluster) == _nodes(empty_cluster, "head")  # the head alone
    cmd = label_command(tmp_path, 12, load_manifest(sample_shards)["classes"])
    done = subprocess.run(cmd, cwd=REPO, env=empty_cluster["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "plan for an autoscaling cluster (nodes of up to 2 CPUs)" in done.stderr
    assert read_labels(str(tmp_path / "labels")).num_rows == 12
    assert len(_nodes(empty_cluster, "cpu")) == 1  # the autoscaler added the CPU node
    _wait(lambda: len(_nodes(empty_cluster)) == 1, 90, "the idle CPU node removed")  # train from empty too

    before = set(_nodes(empty_cluster, alive=False))
    cmd = [RAY_CLI, "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.train", "--config",
           "jobs/configs/sample.yaml", "--data", sample_shards, "--storage", str(tmp_path / "runs"), "--name", "b",
           "--epochs", "1", "--num-workers", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=_jobs_env(empty_cluster), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    planned = [line for line in done.stdout.splitlines() if "CPU plan" in line]
    assert planned and "4 CPUs in the cluster" in planned[0], planned  # 2 on the CPU node, 1 on each GPU node
    # The first node added, for the worker's placement group, is a CPU node: Ray's autoscaler leaves the GPU type
    # (its CPU beside an unused "GPU") to CPU work that the CPU type at its max cannot take: here Ray Data's decode
    # tasks waiting beyond the CPU node's 2 CPUs bring one or two GPU-type nodes too.
    added = sorted(set(_nodes(empty_cluster, alive=False)) - before)  # the fake provider numbers its nodes
    assert added and added[0] in _nodes(empty_cluster, "cpu", alive=False), added


def _serve(cluster: dict) -> dict:
    """Serve's state (applications with their replicas, proxies), as `serve status` reads it."""
    return _dashboard(cluster, "/api/serve/applications/")


def _replicas(cluster: dict) -> list[dict]:
    """The running replicas of the application's Classifier deployment (their state and node)."""
    app = _serve(cluster)["applications"].get("crossvit")
    return [r for r in (app["deployments"]["Classifier"]["replicas"] if app else []) if r["state"] == "RUNNING"]


def test_serve_starts_on_the_empty_head_and_a_burst_adds_replicas_and_a_node_then_both_go(empty_cluster, tmp_path):
    """The README's `ray job submit --working-dir . -- python -m jobs.serve ...` on the cluster that has no CPU and
    no GPU node: jobs.serve's resource check plans for the GPU node type (no --skip-resource-check), the
    autoscaler adds a GPU node for the replica. A burst of requests makes Serve add a replica and the autoscaler a
    second GPU node for it; after the burst both go again. `ray job stop` deletes the application."""
    _wait(lambda: not _nodes(empty_cluster, "gpu"), 60, "no GPU node")
    write_run(str(tmp_path / "runs" / "a"), [50.0], [{"index": i, "wnid": f"n{i}", "name": f"c{i}"} for i in range(4)])
    promote(str(tmp_path / "runs" / "a"), str(tmp_path / "registry"), "tiny")
    config = serve_test_config()  # 1 to 2 replicas of 2 requests each, up after 1 s
    (options,) = config["applications"][0]["deployments"]
    options["autoscaling_config"]["downscale_delay_s"] = 1  # 8 clients keep 2 replicas busy until they stop
    options["ray_actor_options"] = {"num_cpus": 1, "resources": {GPU: 1}}  # as infra/serve-gpu.yaml's replicas
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    port, job = free_port(), f"serve-{free_port()}"
    cmd = [RAY_CLI, "job", "submit", "--submission-id", job, "--working-dir", ".", "--", "python", "-m", "jobs.serve",
           "--registry", str(tmp_path / "registry"), "--model", "tiny", "--config", str(tmp_path / "serve.yaml"),
           "--port", str(port)]  # fmt: skip
    out = tmp_path / "submit.out"
    with out.open("w") as sink:
        submit = subprocess.Popen(cmd, cwd=REPO, env=_jobs_env(empty_cluster), stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: "serving tiny:production" in out.read_text() or submit.poll() is not None, 180, "serving")
        assert submit.poll() is None, out.read_text()[-3000:]
        assert len(_replicas(empty_cluster)) == 1 and len(_nodes(empty_cluster, "gpu")) == 1

        with traffic(f"http://127.0.0.1:{port}", 8, jpeg(3, 64, 48)) as (seen, failures):
            # Serve adds the second replica; it waits for a GPU node, the autoscaler adds one.
            _wait(lambda: len(_replicas(empty_cluster)) == 2, 120, "a second replica")
            replicas = _replicas(empty_cluster)
            assert len({r["node_id"] for r in replicas}) == 2 and len(_nodes(empty_cluster, "gpu")) == 2
            # A Serve proxy (HAProxy) on each node that has a replica, beside the head's: each binds ports of its own.
            proxies = lambda: [p["status"] for p in _serve(empty_cluster)["proxies"].values()]  # noqa: E731
            _wait(lambda: proxies() == ["HEALTHY"] * 3, 30, "a healthy proxy on every node")
            answered = len(seen)
            _wait(lambda: len(seen) > answered + 20, 30, "20 answers more with two replicas")
        assert not failures, failures[:5]
        # After the burst: one replica again, and its idle node removed.
        _wait(lambda: len(_replicas(empty_cluster)) == 1, 60, "one replica again")
        _wait(lambda: len(_nodes(empty_cluster, "gpu")) == 1, 60, "the idle GPU node removed")
    finally:
        stop = subprocess.run(
            [RAY_CLI, "job", "stop", job], env=_jobs_env(empty_cluster), capture_output=True, text=True
        )
        submit.wait(timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = lambda: _serve(empty_cluster)["applications"].get("crossvit", {}).get("status")  # noqa: E731
    _wait(lambda: status() in (None, "DELETING"), 30, "the application deleted")
