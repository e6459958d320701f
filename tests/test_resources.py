"""Planning the cluster's CPUs, the stall watchdog, and local paths on a cluster of several nodes."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from pipelines import local_s3
from pipelines.cluster import NotSharedError, ResourcePlanError, check_shared_path, plan_training_cpus
from pipelines.local_s3 import free_port
from pipelines.train.config import TrainConfig
from pipelines.train.launch import fit

REPO = Path(__file__).resolve().parent.parent


def test_free_ports_are_never_ones_the_kernel_gives_to_outgoing_connections(monkeypatch):
    """A port for a server to bind a moment later comes from outside the ephemeral range (from which the
    kernel picks every outgoing connection's local port: one of Ray's took Serve's port before HAProxy
    bound it, and the demo failed in CI) and from outside the ports Serve's replicas take for themselves (a
    test's Serve HTTP port once met a replica's), and is never handed out twice while the first is not yet
    bound."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not ephemeral.exists() or int(ephemeral.read_text().split()[0]) < 21000:
        pytest.skip("no Linux ephemeral port range here, or one that leaves no room below it")
    low, high = map(int, ephemeral.read_text().split())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high or p < 20000 or p >= 30000]
    # A drawn port that something listens on, or that was handed out already, is passed over.
    with socket.socket() as busy, socket.socket() as probe:
        busy.bind(("127.0.0.1", 0))
        probe.bind(("127.0.0.1", 0))
        spare = probe.getsockname()[1]
        probe.close()
        draws = iter([busy.getsockname()[1], ports[0], spare])
        monkeypatch.setattr(local_s3.random.SystemRandom, "choice", lambda self, seq: next(draws))
        assert free_port() == spare
    # A machine whose ephemeral range starts just above 20000 leaves no room below it: the kernel's choice.
    monkeypatch.setattr(local_s3, "_port_range", lambda: range(20000, 20500))
    assert free_port() >= 1024


def test_a_small_machine_is_divided_between_the_workers_and_the_data_pipeline():
    laptop = plan_training_cpus(2, 2, use_gpu=False)
    assert (laptop.cpus_per_worker, laptop.ingest_cpus, laptop.lowered) == (0.5, 1.0, True)
    assert laptop.decode_cpus == 0.5  # two decode tasks share the CPU that is left: one reads while one decodes
    elastic = plan_training_cpus(2, (1, 4), use_gpu=False)  # planned for the largest group it may become
    assert (elastic.workers, elastic.cpus_per_worker, elastic.ingest_cpus) == (4, 0.25, 1.0)
    big = plan_training_cpus(16, 2, use_gpu=False)
    assert (big.cpus_per_worker, big.ingest_cpus, big.decode_cpus, big.lowered) == (1.0, 14.0, 1.0, False)
    gpu = plan_training_cpus(8, 1, use_gpu=True)  # Ray's default: a GPU worker reserves no CPU
    assert (gpu.cpus_per_worker, gpu.ingest_cpus) == (0.0, 8.0)


def test_a_configuration_that_cannot_decode_is_refused_with_the_numbers_and_the_fix():
    # A GPU node whose CPUs the worker takes entirely (resources_per_worker {CPU: 8, GPU: 1} on 8 CPUs).
    with pytest.raises(ResourcePlanError, match=r"has 8 CPUs on 1 node\(s\); 1 training worker\(s\) reserving 8") as e:
        plan_training_cpus(8, 1, use_gpu=True, cpus_per_worker=8)
    assert "Fix: set resources_per_worker.CPU to 7 or less, or add a node" in str(e.value)  # not "use 0 workers"
    with pytest.raises(ResourcePlanError, match=r"use 3 worker\(s\)"):
        plan_training_cpus(16, 4, use_gpu=False, cpus_per_worker=4)
    with pytest.raises(ResourcePlanError, match="start Ray with more CPUs"):
        plan_training_cpus(1, 1, use_gpu=False)
    # Across nodes, fractions would leave scraps on every node that no decode task fits into: no lowering.
    with pytest.raises(ResourcePlanError, match=r"100 CPUs on 50 node\(s\); 150 training worker\(s\)"):
        plan_training_cpus(100, 150, use_gpu=False, cpu_nodes=50)
    # An elastic group that may outgrow the cluster as it is now: a warning, never a negative share.
    assert plan_training_cpus(2, (1, 4), use_gpu=False, cpus_per_worker=1).ingest_cpus == 0
    # An autoscaling cluster that will add CPU nodes: the check is off, nothing is lowered.
    assert plan_training_cpus(0, 2, use_gpu=True, min_ingest_cpus=0).cpus_per_worker == 0


@pytest.fixture
def small_data(ray_cluster, sample_shards) -> str:
    return sample_shards


def _config(data: str, storage: str, **fields) -> TrainConfig:
    return TrainConfig.from_yaml(
        REPO / "jobs/configs/sample.yaml", data=data, storage=storage, epochs=1, batch_size=8, **fields
    )


def test_fit_refuses_workers_that_would_leave_ray_data_no_cpu(small_data, tmp_path):
    cpus = ray.cluster_resources()["CPU"]
    # (A short watchdog: were the plan not checked, the run would starve and fail fast with another error.)
    cfg = _config(small_data, str(tmp_path), name="greedy", resources_per_worker={"CPU": cpus / 2}, batch_timeout_s=20)
    with pytest.raises(ResourcePlanError, match=rf"has {cpus:g} CPUs on 1 node\(s\); 2 training worker\(s\)"):
        fit(cfg)
    assert not (tmp_path / "greedy").exists()  # refused before anything ran or was written


def test_no_batch_within_the_timeout_is_an_error_that_says_what_ray_waits_for(small_data, tmp_path):
    """The plan's check switched off (min_ingest_cpus 0, as on an autoscaling cluster that never grows) and
    the workers holding every CPU: the decode tasks wait forever. The watchdog stops the run with what Ray
    reports instead of hanging, and the restart Ray Train makes (max_failures) ends at once with the same
    reason instead of waiting for a batch again (the error would then be another StalledError)."""
    cpus = ray.cluster_resources()["CPU"]
    cfg = _config(
        small_data, str(tmp_path), name="starved", resources_per_worker={"CPU": cpus / 2}, min_ingest_cpus=0,
        batch_timeout_s=5, max_failures=1,
    )  # fmt: skip
    with pytest.raises(Exception, match=r"RunStoppedError: StalledError: no training batch for 5 s") as err:
        fit(cfg)
    message = str(err.value)
    assert f"CPU {cpus:g} of {cpus:g} in use" in message
    assert "waiting for resources: task ReadShard->MapBatches(DecodeBatch) (needs CPU 1)" in message


def _can_unshare() -> bool:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs mount namespaces (unshare -m) to give a node its own disk")
def test_a_local_path_that_another_node_cannot_see_is_refused(small_data, add_nodes, tmp_path):
    """A second node in a mount namespace of its own, where the run folder is an empty tmpfs: a machine with
    its own disk. Storage there is not shared, and fit says so before training; a path both see passes."""
    private = tmp_path / "runs"
    private.mkdir()
    mount = f'mount -t tmpfs none {private} && exec "$0" "$@"'
    (node,) = add_nodes(1, num_cpus=1, wrap=["unshare", "-m", "sh", "-c", mount])
    check_shared_path(str(tmp_path / "visible-to-all"), "storage")  # the rest of the disk is shared
    with pytest.raises(NotSharedError, match=r"storage .*/runs is a local path, and node\(s\) .* cannot see it"):
        check_shared_path(str(private), "storage")
    with pytest.raises(NotSharedError, match="not shared storage"):
        fit(_config(small_data, str(private), name="unshared"))
    assert node.node_id


@pytest.mark.slow  # a fresh interpreter
def test_processes_that_decode_nothing_import_no_torchvision_and_decode_tasks_no_torch():
    """What a Ray process imports is CPU that every training and labeling run pays again for each of its
    processes (a fit starts about fifteen): Ray Data's coordinators and the decode tasks unpickle
    pipelines.data.ingest, Train's DatasetManager pipelines.train.data_config, its controller and workers
    pipelines.train.loop. torchvision costs about
    1.6 s of CPU to import, torch as much, timm and matplotlib more on top."""
    code = (
        "import sys; import {module}; "
        "print(','.join(sorted(m for m in ('torch', 'torchvision', 'timm', 'matplotlib') if m in sys.modules)))"
    )

    def heavy(module: str) -> str:
        cmd = [sys.executable, "-c", code.format(module=module)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip()

    assert heavy("pipelines.data.ingest") == ""
    assert heavy("pipelines.train.data_config") == ""
    assert heavy("pipelines.train.loop") == "torch"
