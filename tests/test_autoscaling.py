"""Jobs on a cluster that starts empty: a head with 0 CPUs and worker node types that Ray's autoscaler adds on
demand (infra/aws/cluster.yaml's shape), made on this machine with Ray's fake multi-node provider. Planned
from the CPUs of now, both jobs refused to start ("the cluster has 0 CPUs") and the autoscaler was never
asked for a node."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import autoscaling_cluster, label_command

from pipelines.data.dataset import load_manifest
from pipelines.label.job import read_labels

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def empty_cluster(ray_cluster):
    """A 0-CPU head; the autoscaler may add one node of 2 CPUs (the worker type's min_workers is 0)."""
    types = {"cpu_worker": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 1}}
    env = {k: v for k, v in ray_cluster["env"].items() if k != "RAY_ADDRESS"}
    with autoscaling_cluster(types, env) as cluster:
        yield {**cluster, "env": {**env, "RAY_ADDRESS": cluster["address"]}}


def _nodes(cluster: dict) -> int:
    code = "import ray; ray.init(log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=60)
    return int(done.stdout.strip().splitlines()[-1])


def test_label_and_train_on_a_cluster_that_starts_with_no_cpu(empty_cluster, sample_shards, tmp_path):
    """`python -m jobs.label`, then (once the idle node is gone again) `python -m jobs.train`, as a user submits
    them: each plans for the node type the autoscaler may add, the autoscaler adds the node, the job finishes."""
    assert _nodes(empty_cluster) == 1  # the head alone
    cmd = label_command(tmp_path, 12, load_manifest(sample_shards)["classes"])
    done = subprocess.run(cmd, cwd=REPO, env=empty_cluster["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "plan for an autoscaling cluster (nodes of up to 2 CPUs)" in done.stderr
    assert read_labels(str(tmp_path / "labels")).num_rows == 12
    assert _nodes(empty_cluster) == 2  # the autoscaler added the worker node
    deadline = time.monotonic() + 90
    while _nodes(empty_cluster) > 1:  # idle for 6 s, it is removed again: training starts from empty too
        assert time.monotonic() < deadline, "the idle worker node was not removed"
        time.sleep(2)

    cmd = [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/sample.yaml", "--data", sample_shards,
           "--storage", str(tmp_path / "runs"), "--name", "b", "--epochs", "1", "--num-workers", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=empty_cluster["env"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    planned = [line for line in (done.stdout + done.stderr).splitlines() if "CPU plan" in line]
    assert planned and "2 CPUs in the cluster" in planned[0], planned
