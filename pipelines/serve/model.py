"""The served model: a version loaded on the replica's device, and the thread that follows the registry.

``Follower`` owns everything the watcher thread and the request handlers share: the version being served
(one reference, swapped whole), the version it refused, and why, and whether the registry could be read at
the last check. Handlers read ``current`` without a lock (one reference assignment is atomic) and the rest
through ``status()``, a consistent snapshot.

Two kinds of failure, kept apart:
- the registry cannot be read (storage unreachable, throttled): the served version keeps serving, the
  status says so (readiness, /healthz, the admin status), and the next poll tries again;
- a version is broken (a checksum that does not match, weights that do not load): it is refused and not
  tried again until the alias moves, however often a reload is asked for; a new replica starts with the
  newest earlier version of the alias's lineage that loads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import torch

from pipelines.preprocess import normalize
from pipelines.registry.store import ModelVersion, Registry
from pipelines.storage import StorageError

log = logging.getLogger("ray.serve.crossvit")  # under Serve's logger: into the replica's log files


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


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class Status:
    serving: int  # the version that answers
    alias_version: int | None  # what the alias named at the last check that could read it
    refused: int | None  # a version that does not load; not tried again until the alias moves
    load_error: str | None  # why it was refused
    registry_error: str | None  # why the last check could not read the registry (None: it could)
    last_check: float  # time.time() of the last check that finished


class Follower:
    """The version a replica serves: a pinned one, or the one ``alias`` names, followed by polling."""

    def __init__(
        self, registry: Registry, model: str, alias: str, pinned: int | None, poll_interval_s: float,
        load: Callable[[ModelVersion], Loaded],
    ):  # fmt: skip
        self.registry, self.model, self.alias, self.pinned = registry, model, alias, pinned
        self.poll_interval_s, self._load = poll_interval_s, load
        self._lock = threading.Condition()
        self._status = Status(0, None, None, None, None, time.time())
        self._wake = threading.Event()
        self._started = self._finished = 0  # checks begun / the last one finished (see check_now)
        self.current: Loaded = self._first_load()
        self._update(serving=self.current.version.number)
        self._thread = threading.Thread(target=self._follow, name="registry-watcher", daemon=True)
        if pinned is None:
            self._thread.start()

    @property
    def alive(self) -> bool:
        """The watcher runs (or nothing needs one: a pinned version)."""
        return self.pinned is not None or self._thread.is_alive()

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
        if record is None:
            self.registry.resolve(self.model, self.alias)  # the registry's error: no such alias
        self._update(alias_version=record["version"])
        for number in reversed(record["lineage"]):
            try:
                return self._load(self.registry.get(self.model, number))
            except Exception as e:
                if transient(e):
                    raise  # the registry cannot be read: Serve retries the replica, nothing is refused
                if number == record["version"]:
                    self._update(refused=number, load_error=_why(e))
                log.error("%s version %d does not load: %s", self.model, number, e)
        raise RuntimeError(
            f"no version of {self.model}:{self.alias}'s lineage {record['lineage']} loads: {self.status().load_error}"
        )

    def check_now(self, timeout: float) -> bool:
        """Ask for a check that begins after this call and wait for it; False if it did not end in time."""
        with self._lock:
            wanted = self._started + 1
        self._wake.set()
        with self._lock:
            return self._lock.wait_for(lambda: self._finished >= wanted, timeout=timeout)

    def _follow(self) -> None:
        while True:
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
            with self._lock:
                self._started += 1
                mine = self._started
            try:
                self._check()
            except Exception as e:  # never ends the thread: the next poll tries again
                log.exception("checking %s:%s failed: %s", self.model, self.alias, e)
            with self._lock:
                self._finished = mine
                self._status = replace(self._status, last_check=time.time())
                self._lock.notify_all()

    def _check(self) -> None:
        """One poll: read the alias; load what it names if that is new and not refused, and swap it in."""
        try:
            record, _ = self.registry.read_alias(self.model, self.alias)
        except Exception as e:
            self._update(registry_error=_why(e))
            log.error("cannot read %s:%s: %s (still serving version %d)", self.model, self.alias, e,
                      self.current.version.number)  # fmt: skip
            return
        if record is None:
            self._update(registry_error=f"the alias {self.model}:{self.alias} does not exist any more")
            return
        number, status = record["version"], self.status()
        self._update(alias_version=number, registry_error=None)
        if number == self.current.version.number or number == status.refused:
            if number != status.refused:  # the alias is back on the served version: nothing is refused
                self._update(refused=None, load_error=None)
            return
        log.warning("%s:%s moved to version %d: loading", self.model, self.alias, number)
        try:
            loaded = self._load(self.registry.get(self.model, number))
        except Exception as e:
            if transient(e):  # not the version's fault: tried again at the next poll
                self._update(registry_error=_why(e))
            else:
                self._update(refused=number, load_error=_why(e))
            log.error("not switching to version %d: %s (still serving version %d)", number, _why(e),
                      self.current.version.number)  # fmt: skip
            return
        self.current = loaded  # one assignment: a request sees the old version or the new one
        self._update(serving=number, refused=None, load_error=None)
        log.warning("now serving %s version %d", self.model, number)
