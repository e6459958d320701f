"""The served models: versions loaded on the replica's device, and the thread that follows the registry.

``Served`` holds production and, if configured, a canary beside it (pipelines/serve/rollout.py), one
``Follower`` per alias, checked by one watcher thread. A Follower owns everything the watcher and the request
handlers share for its alias: the version being served (one reference, swapped whole), the version it
refused, and why, and whether the registry could be read at the last check. Handlers read ``current``
without a lock (one reference assignment is atomic) and the rest through ``status()``, a consistent snapshot.

Two kinds of failure, kept apart:
- the registry cannot be read (storage unreachable, throttled): the served version keeps serving, the
  status says so (readiness, /healthz, the admin status), and the next poll tries again;
- a version is broken (a checksum that does not match, weights that do not load): it is refused and not
  tried again until the alias moves, however often a reload is asked for; a new replica starts with the
  newest earlier version of the alias's lineage that loads. A canary that is refused serves nobody.

Each check is counted as a Ray metric (CHECKS, by outcome), and the time of the last one that succeeded is a
gauge (LAST_OK), set again at every check: a watch that keeps failing shows as that time falling behind
(infra/k8s/monitoring/: the registry-watch alert). Ray 2.60 exports a gauge only in the report intervals in
which it was set and forgets it after two (10 s each by default): the poll interval (10 s) keeps it there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import torch
from ray.serve import metrics

from pipelines.preprocess import normalize
from pipelines.registry.store import ModelVersion, Registry
from pipelines.storage import StorageError

log = logging.getLogger("ray.serve.crossvit")  # under Serve's logger: into the replica's log files

# The registry watch's Ray metrics, per model and alias; Serve adds the application, deployment and replica.
# Exported as ray_<name>, the counter as ray_<name>_total (tests/test_monitoring.py).
# CHECKS by outcome: ok; failed: the status has a registry_error (storage unreadable, the alias gone, a load
# that failed for storage); error: the check raised.
CHECKS = "crossvit_registry_checks"
LAST_OK = "crossvit_registry_last_ok_timestamp_seconds"


class Loaded:
    """A version ready to answer: its model on the device, its description and class names."""

    def __init__(self, version: ModelVersion, model: torch.nn.Module, device: torch.device):
        self.version, self.model, self.device = version, model, device
        self.names = [c["name"] for c in version.classes]
        self.size = version.image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) on any device -> class probabilities (B, classes), float32 on the CPU."""
        x = normalize(images.to(self.device, non_blocking=True), channels_last=self.device.type == "cuda")
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.model(x).float().softmax(dim=-1).cpu()


def load_version(
    registry: Registry, version: ModelVersion, device: torch.device, model_thread: Executor, shapes: list[int],
    compile: bool = False,
) -> Loaded:  # fmt: skip
    """Read and check a version's weights on the caller's thread; build it and warm it up (each batch size
    of ``shapes``) on the model thread, one step at a time, so that the served version's batches run in
    between."""
    data = registry.read_weights(version)
    model = model_thread.submit(registry.load, version, device, data).result()
    if compile:
        model = torch.compile(model)  # compiles at the first call: the warm-ups below
    loaded = Loaded(version, model, device)
    for n in sorted(set(shapes)):  # every shape, allocated before serving
        # The zeros are made on the model thread too: a large torch.zeros runs in parallel, and a second thread
        # running parallel ops gets an OpenMP team of its own, after which OpenMP stops spinning between ops:
        # made on the caller's thread, they made crossvit_tiny_240's served latency 51 ms instead of 40.
        blank = (n, loaded.size, loaded.size, 3)
        model_thread.submit(lambda shape=blank: loaded.forward(torch.zeros(shape, dtype=torch.uint8))).result()
    return loaded


def transient(e: BaseException) -> bool:
    """A fault worth trying again, not a broken version: storage unreachable or throttled, or memory short
    on this replica (the next poll, or another replica, may have it)."""
    if isinstance(e, StorageError | MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(e, OSError) and not isinstance(e, FileNotFoundError)


def why(e: BaseException) -> str:
    """An error as the status and the logs show it: its type and message."""
    return f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class Status:
    serving: int | None  # the version that answers (None: a canary alias that has nothing to serve)
    alias_version: int | None  # what the alias named at the last check that could read it
    refused: int | None  # a version that does not load; not tried again until the alias moves
    load_error: str | None  # why it was refused
    registry_error: str | None  # why the last check could not read the registry (None: it could)
    last_check: float  # time.time() of the last check that finished


class Follower:
    """One alias of a replica: the version it serves for it (``current``) and why not another. Production is
    a pinned version or an alias, and always serves something; a canary (``optional``) serves nothing while
    its alias names nothing or a version that does not load. Checked by the replica's one watcher thread
    (``Served``); request handlers read ``current`` (one reference, swapped whole) and ``status()``."""

    def __init__(
        self, registry: Registry, model: str, alias: str, load: Callable[[ModelVersion], Loaded],
        pinned: int | None = None, optional: bool = False,
    ):  # fmt: skip
        self.registry, self.model, self.alias, self.pinned = registry, model, alias, pinned
        self.optional, self._load = optional, load
        self._tags = {"model": model, "alias": alias}
        self._last_ok_at: float | None = None  # time.time() of the last check that succeeded
        self._checks = metrics.Counter(
            CHECKS, description="Registry checks of an alias by outcome", tag_keys=("model", "alias", "outcome")
        )
        self._last_ok = metrics.Gauge(
            LAST_OK, description="When a check of the alias last succeeded (Unix time, s)", tag_keys=("model", "alias")
        )
        self._lock = threading.Lock()
        self._status = Status(None, None, None, None, None, time.time())
        self.current: Loaded | None = None
        self.retired: Loaded | None = None  # a canary's model until the next check: a promotion takes it over
        if optional:
            self.check()
        else:
            self.current = self._first_load()
            self._update(serving=self.current.version.number)

    @property
    def follows(self) -> bool:
        return self.pinned is None

    def status(self) -> Status:
        with self._lock:
            return self._status

    def _update(self, **changes) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)

    def _first_load(self) -> Loaded:
        """The version to start with: the pinned one, or the alias's; if the alias names a version that does
        not load (a damaged upload), the newest earlier version of its lineage that does, as the running
        replicas keep serving it."""
        if self.pinned is not None:
            return self._load(self.registry.get(self.model, self.pinned))
        record, _ = self.registry.read_alias(self.model, self.alias)
        if record is None or record["version"] is None:
            self.registry.resolve(self.model, self.alias)  # the registry's error: no such alias, or cleared
        self._update(alias_version=record["version"])
        self._last_ok_at = time.time()
        self._last_ok.set(self._last_ok_at, self._tags)
        for number in reversed(record["lineage"]):
            try:
                return self._load(self.registry.get(self.model, number))
            except Exception as e:
                if transient(e):
                    raise  # the registry cannot be read: Serve retries the replica, nothing is refused
                if number == record["version"]:
                    self._update(refused=number, load_error=why(e))
                log.error("%s version %d does not load: %s", self.model, number, e)
        raise RuntimeError(
            f"no version of {self.model}:{self.alias}'s lineage {record['lineage']} loads: {self.status().load_error}"
        )

    def _serving(self) -> str:
        return f"still serving version {self.current.version.number}" if self.current else "serving nothing"

    def check(self) -> None:
        """One poll: read the alias; load what it names if that is new and not refused, and swap it in."""
        outcome = "error"
        try:
            self._check()
            outcome = "failed" if self.status().registry_error else "ok"
        finally:
            now = time.time()
            self._update(last_check=now)
            self._checks.inc(tags={**self._tags, "outcome": outcome})
            if outcome == "ok":
                self._last_ok_at = now
            if self._last_ok_at is not None:  # again when it failed: a gauge not set leaves the export
                self._last_ok.set(self._last_ok_at, self._tags)

    def _check(self) -> None:
        name = f"{self.model}:{self.alias}"
        self.retired = None
        try:
            record, _ = self.registry.read_alias(self.model, self.alias)
        except Exception as e:
            self._update(registry_error=why(e))
            log.error("cannot read %s: %s (%s)", name, e, self._serving())
            return
        number = record["version"] if record else None
        if number is None:
            if self.optional:  # a canary alias that names nothing (yet, or any more): nothing to serve
                if self.current is not None:
                    log.warning("%s names no version any more: version %d serves nobody", name,
                                self.current.version.number)  # fmt: skip
                self.current, self.retired = None, self.current
                self._update(serving=None, alias_version=None, refused=None, load_error=None, registry_error=None)
            else:
                what = "does not exist any more" if record is None else "names no version any more"
                self._update(registry_error=f"the alias {name} {what}")
            return
        status = self.status()
        self._update(alias_version=number, registry_error=None)
        if (self.current and number == self.current.version.number) or number == status.refused:
            if number != status.refused:  # the alias is back on the served version: nothing is refused
                self._update(refused=None, load_error=None)
            return
        log.warning("%s names version %d: loading", name, number)
        try:
            loaded = self._load(self.registry.get(self.model, number))
        except Exception as e:
            if transient(e):  # not the version's fault: tried again at the next poll
                self._update(registry_error=why(e))
            else:
                self._update(refused=number, load_error=why(e))
                if self.optional:  # a canary serves what its alias names, or nobody
                    self.current = None
                    self._update(serving=None)
            log.error("%s: not switching to version %d: %s (%s)", name, number, why(e), self._serving())
            return
        self.current = loaded  # one assignment: a request sees the old version or the new one
        self._update(serving=number, refused=None, load_error=None)
        log.warning("%s: now serving version %d", name, number)


class Served:
    """What a replica serves: production and, if configured, a canary beside it, followed by one watcher
    thread that checks both aliases every ``poll_interval_s``. A version one alias serves is not loaded again
    for the other: a promotion (the canary cleared, then production moved to its version) takes over the
    canary's model, which a cleared canary keeps until its next check."""

    def __init__(
        self, registry: Registry, model: str, alias: str, pinned: int | None, canary_alias: str,
        poll_interval_s: float, load: Callable[[ModelVersion], Loaded],
    ):  # fmt: skip
        self.poll_interval_s, self._load = poll_interval_s, load
        self.canary: Follower | None = None
        self.production = Follower(registry, model, alias, self._shared, pinned=pinned)
        if canary_alias:
            self.canary = Follower(registry, model, canary_alias, self._shared, optional=True)
        self._followers = [f for f in (self.production, self.canary) if f and f.follows]
        self._checks = threading.Condition()
        self._wake = threading.Event()
        self._started = self._finished = 0  # checks begun / the last one finished (see check_now)
        self._thread = threading.Thread(target=self._follow, name="registry-watcher", daemon=True)
        if self._followers:
            self._thread.start()

    def _shared(self, version: ModelVersion) -> Loaded:
        """A version the other alias serves already is shared, not loaded twice (nor its memory taken twice)."""
        for follower in (getattr(self, "production", None), self.canary):
            for loaded in (follower.current, follower.retired) if follower else ():
                if loaded is not None and loaded.version.number == version.number:
                    return loaded
        return self._load(version)

    @property
    def alive(self) -> bool:
        """The watcher runs (or nothing needs one: a pinned version and no canary)."""
        return not self._followers or self._thread.is_alive()

    def check_now(self, timeout: float) -> bool:
        """Ask for a check that begins after this call and wait for it; False if it did not end in time."""
        with self._checks:
            wanted = self._started + 1
        self._wake.set()
        with self._checks:
            return self._checks.wait_for(lambda: self._finished >= wanted, timeout=timeout)

    def _follow(self) -> None:
        while True:
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
            with self._checks:
                self._started += 1
                mine = self._started
            for follower in self._followers:
                try:
                    follower.check()
                except Exception as e:  # never ends the thread: the next poll tries again
                    log.exception("checking %s:%s failed: %s", follower.model, follower.alias, e)
            with self._checks:
                self._finished = mine
                self._checks.notify_all()
