"""Live evidence per version, over a sliding window, from every replica of the application.

Each replica counts what its own requests show (``Tally``: requests, errors, latency, top-1 confidence, and in
shadow mode the agreement with production) and reports it every second to the application's ``Rollout``
deployment (``Board``, one replica, no CPU reserved); a report is numbered and sent again until the board has
it, and the board adds each number once (a report whose answer timed out may have arrived). The board adds
the reports into one-second buckets and
answers the sum over any window up to an hour: the admin status route shows it, ``python -m jobs.rollout``
judges on it, and with ``canary.auto`` the board judges by itself on a timer (pipelines/serve/rollout.py).
Ray Serve has no state shared between a deployment's replicas, and Prometheus is not always there, so the
sums live in a deployment of the application; the same figures are Ray metrics (``crossvit_rollout_*``).

Latencies are kept as counts in logarithmic buckets (each 10 % wider than the last), so a replica's figures add
up with another's and a percentile is read within 5 %. A restarted board starts an empty window.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from ray import serve
from ray.serve import metrics

from pipelines.registry.store import Registry
from pipelines.serve import rollout
from pipelines.serve.settings import ServeSettings

log = logging.getLogger("ray.serve.crossvit")

REPORT_S = 1.0  # how often a replica reports
KEEP_S = 3600  # the longest window the board can answer
_STEP = math.log(1.1)  # latency buckets: each 10 % wider than the last


@dataclass
class Stats:
    """What one version showed in one role: sums, so that two replicas' (or two seconds') figures add."""

    requests: int = 0  # requests the version answered or failed (shadow: images run on the canary)
    errors: int = 0  # of those, 5xx: the version's fault (a failed shadow run)
    client_errors: int = 0  # 4xx, apart: the request's fault, not the version's
    latency: dict[int, int] = field(default_factory=dict)  # log bucket -> requests answered
    images: int = 0
    confidence: float = 0.0  # the sum of top-1 probabilities over ``images``
    agreed: int = 0  # shadow: top-1 equal to production's
    gap: float = 0.0  # shadow: the sum of (canary's - production's) top-1 probability

    def add(self, other: Stats) -> None:
        for name in ("requests", "errors", "client_errors", "images", "confidence", "agreed", "gap"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for bucket, n in other.latency.items():
            self.latency[bucket] = self.latency.get(bucket, 0) + n

    def observe_ms(self, ms: float) -> None:
        bucket = math.floor(math.log(max(ms, 0.01)) / _STEP)
        self.latency[bucket] = self.latency.get(bucket, 0) + 1

    def percentile(self, q: float) -> float | None:
        total = sum(self.latency.values())
        if not total:
            return None
        seen = 0
        for bucket in sorted(self.latency):
            seen += self.latency[bucket]
            if seen >= q * total:
                return math.exp((bucket + 0.5) * _STEP)  # the bucket's middle
        raise AssertionError("unreachable")

    def summary(self, role: str) -> dict:
        out = {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "client_errors": self.client_errors,
            "latency_ms": {"p50": self.percentile(0.5), "p95": self.percentile(0.95)},
            "images": self.images,
            "mean_confidence": self.confidence / self.images if self.images else None,
        }
        if role == rollout.SHADOW_RUN:
            compared = self.requests - self.errors
            out["agreement"] = self.agreed / compared if compared else None
            out["confidence_gap"] = self.gap / compared if compared else None
        return out

    def to_wire(self) -> dict:
        return {**self.__dict__, "latency": {str(k): v for k, v in self.latency.items()}}

    @classmethod
    def from_wire(cls, wire: dict) -> Stats:
        return cls(**{**wire, "latency": {int(k): v for k, v in wire["latency"].items()}})


class Tally:
    """A replica's figures since its last report: requests add to it, the reporter takes it whole (``take``).
    Both run on the replica's event loop today; the lock keeps that an assumption nobody has to check."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stats: dict[tuple[int, str], Stats] = defaultdict(Stats)

    def _at(self, version: int, role: str) -> Stats:
        return self._stats[(version, role)]  # under the caller's lock

    def request(self, version: int, role: str, outcome: str, ms: float) -> None:
        """One request; ``outcome``: "ok", "error" (5xx) or "client_error" (4xx: not in ``requests``)."""
        with self._lock:
            s = self._at(version, role)
            if outcome == "client_error":
                s.client_errors += 1
                return
            s.requests += 1
            if outcome == "ok":
                s.observe_ms(ms)
            else:
                s.errors += 1

    def confidence(self, version: int, role: str, top1: float) -> None:
        with self._lock:
            s = self._at(version, role)
            s.images += 1
            s.confidence += top1

    def shadow(self, version: int, ms: float, canary_top1: float | None = None, production_top1: float | None = None,
               agreed: bool = False) -> None:  # fmt: skip
        """One shadow run on the canary ``version``: compared with production's answer, or failed (no top1)."""
        with self._lock:
            s = self._at(version, rollout.SHADOW_RUN)
            s.requests += 1
            if canary_top1 is None:
                s.errors += 1
                return
            s.observe_ms(ms)
            s.images += 1
            s.confidence += canary_top1
            s.agreed += agreed
            s.gap += canary_top1 - production_top1

    def take(self) -> list[tuple[int, str, dict]]:
        with self._lock:
            taken, self._stats = self._stats, defaultdict(Stats)
        return [(version, role, s.to_wire()) for (version, role), s in taken.items()]


class Window:
    """Reports added into one-second buckets, summed over any window up to ``KEEP_S``."""

    def __init__(self):
        self._lock = threading.Lock()  # Serve runs a sync deployment's calls on a thread pool
        self._buckets: dict[int, dict[tuple[int, str], Stats]] = {}
        self.replicas: dict[str, tuple[float, dict]] = {}  # replica id -> (when it last reported, its state)
        self._last: dict[str, int] = {}  # replica id -> the number of the last report added

    def add(self, replica: str, reports: list[tuple[int, list]], state: dict, now: float) -> int:
        """``reports``: (number, figures) that ``replica`` has not seen acknowledged; each number is added once.
        Returns the last number added, which the replica may forget."""
        with self._lock:
            bucket = self._buckets.setdefault(int(now), defaultdict(Stats))
            for number, stats in reports:
                if number <= self._last.get(replica, 0):
                    continue  # arrived before, though its answer did not
                for version, role, wire in stats:
                    bucket[(version, role)].add(Stats.from_wire(wire))
                self._last[replica] = number
            self.replicas[replica] = (now, state)
            for second in [s for s in self._buckets if s < now - KEEP_S]:
                del self._buckets[second]
            for gone in [r for r, (at, _) in self.replicas.items() if at < now - KEEP_S]:
                del self.replicas[gone], self._last[gone]
            return self._last.get(replica, 0)

    def summary(self, window_s: float, now: float) -> dict:
        """Per version and role, the window's figures; and every replica heard from in the window."""
        total: dict[tuple[int, str], Stats] = defaultdict(Stats)
        with self._lock:
            for second, bucket in self._buckets.items():
                if second > now - window_s:
                    for key, s in bucket.items():
                        total[key].add(s)
            replicas = {r: {**state, "seconds_ago": round(now - at, 1)} for r, (at, state) in self.replicas.items()
                        if at > now - max(window_s, 3 * REPORT_S)}  # fmt: skip
        versions: dict[str, dict] = {}
        for (version, role), s in sorted(total.items()):
            versions.setdefault(str(version), {})[role] = s.summary(role)
        return {"versions": versions, "replicas": replicas}


# Serve's access log would write a line per replica per second for the reports: off.
@serve.deployment(
    name="Rollout", num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False}
)
class Board:
    """The application's evidence board and, with ``canary.auto``, its judge on a timer."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings(**settings)
        self.window = Window()
        self.last_decision: dict | None = None
        gauges = {  # the window's figures per version and role (0 once a version has left the window)
            "requests": "Requests answered or failed in the window",
            "errors": "5xx answers in the window",
            "error_rate": "The 5xx share in the window",
            "latency_p50_ms": "p50 latency in the window (ms)",
            "latency_p95_ms": "p95 latency in the window (ms)",
            "mean_confidence": "Mean top-1 probability in the window",
            "agreement": "Shadow: the top-1 agreement with production in the window",
            "confidence_gap": "Shadow: the mean of the canary's top-1 probability minus production's",
        }
        self.gauges = {name: metrics.Gauge(f"crossvit_rollout_{name}", description=text, tag_keys=("version", "role"))
                       for name, text in gauges.items()}  # fmt: skip
        self._exported: set[tuple[str, str, str]] = set()  # (gauge, version, role) set at the last tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="rollout-board", daemon=True)
        self._thread.start()

    def report(self, replica: str, reports: list, state: dict) -> int:
        return self.window.add(replica, reports, state, time.time())

    def evidence(self, window_s: float | None = None) -> dict:
        """The window's figures (``window_s``: the canary criteria's unless given), with what they are about."""
        c = self.settings.canary
        window_s = min(float(window_s or c.window_s), KEEP_S)
        return {
            "window_s": window_s,
            "production_alias": self.settings.alias,
            "canary": {"alias": c.alias or None, "mode": c.mode, "percent": c.percent, "auto": c.auto},
            **self.window.summary(window_s, time.time()),
            "last_auto_decision": self.last_decision,
        }

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the rollout board's timer died")

    def _tick(self) -> None:
        """Every few seconds: the gauges; with ``canary.auto``, every ``every_s``, the judge."""
        c, next_judging = self.settings.canary, time.monotonic() + self.settings.canary.every_s
        while not self._stop.wait(min(5.0, c.every_s)):
            try:
                evidence = self.evidence()
                self._export(evidence)
                if c.auto and c.alias and time.monotonic() >= next_judging:
                    next_judging = time.monotonic() + c.every_s
                    self._judge(evidence)
            except Exception:  # never ends the timer: the next tick tries again
                log.exception("the rollout board's tick failed")

    def _export(self, evidence: dict) -> None:
        """The window's figures as gauges; what was exported before and is not in the window now goes to 0
        (Ray's gauges keep their last value, and an alert on a rolled-back canary's error rate would go on)."""
        exported = set()
        for version, roles in evidence["versions"].items():
            for role, s in roles.items():
                values = {**s, "latency_p50_ms": s["latency_ms"]["p50"], "latency_p95_ms": s["latency_ms"]["p95"]}
                for name, gauge in self.gauges.items():
                    if values.get(name) is not None:
                        gauge.set(values[name], tags={"version": version, "role": role})
                        exported.add((name, version, role))
        for name, version, role in self._exported - exported:
            self.gauges[name].set(0, tags={"version": version, "role": role})
        self._exported = exported

    def _judge(self, evidence: dict) -> None:
        s = self.settings
        decision = rollout.judge(Registry(s.registry), s.model, s.alias, s.canary.alias, evidence,
                                 rollout.Criteria.of(s.canary), who="canary.auto")  # fmt: skip
        if decision.action != rollout.NOTHING:
            self.last_decision = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "action": decision.action, "reasons": decision.reasons,
                                  "production": decision.production, "canary": decision.canary}  # fmt: skip
            log.warning("canary.auto: %s", self.last_decision)
