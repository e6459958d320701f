"""Safe rollouts: a canary version beside production, on a share of live traffic or in its shadow, judged on
live evidence and then promoted or rolled back by compare-and-swap. Written once for every caller: the
replicas route with ``choose``, and ``judge`` decides and acts for ``python -m jobs.rollout`` and for the
application's own timer (``canary.auto``, pipelines/serve/evidence.py).

- ``split``: the canary answers its share of the requests. ``shadow``: production answers every request;
  the share is also run on the canary and the two answers compared, never returned.
- The share is deterministic for a request id (``X-Request-ID``): a client's retry that repeats its id lands on
  the same version. The id is hashed with the canary's version, so each new canary takes a slice of its own.
- ``X-Model-Version: production | canary | <number>`` forces a version, for debugging; such requests are
  answered but are not evidence (they are no sample of the traffic).
- The judge reads both aliases, then the evidence (pipelines/serve/evidence.py: per version, over a sliding
  window, from every replica) and decides: ``wait`` (too little evidence yet), ``rollback`` or ``promote``.
  It acts on the canary alias first: clearing it by compare-and-swap is the ticket, so of two judges (or a
  judge and the timer) that read the same canary only one goes on, and the other changes nothing. A promotion
  then moves production to the canary's version, compare-and-swap against what it read at the start. Both
  history entries carry the decision, its reasons and the evidence. Clearing first also means that for a
  moment between the two writes production answers everything, never that two versions claim production.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from pipelines.registry.store import AliasMovedError, Registry

if TYPE_CHECKING:
    from pipelines.serve.model import Loaded

log = logging.getLogger("ray.serve.crossvit")

SPLIT, SHADOW = "split", "shadow"
# The roles a version's evidence is kept under: it answered as production or as the canary, or it ran a request
# in production's shadow.
PRODUCTION, CANARY, SHADOW_RUN = "production", "canary", "shadow"
FORCE_HEADER = "x-model-version"

# What the judge did, and its exit code in ``python -m jobs.rollout`` (75: sysexits' EX_TEMPFAIL, "try again").
PROMOTED, ROLLED_BACK, WAIT, NOTHING, CONFLICT = "promoted", "rolled back", "wait", "nothing to judge", "conflict"
EXIT_CODES = {PROMOTED: 0, ROLLED_BACK: 3, NOTHING: 4, CONFLICT: 5, WAIT: 75}


@dataclass
class Criteria:
    """What a canary must show to be promoted: at least ``min_requests`` requests (in shadow mode: compared
    answers) in the last ``window_s``, an error rate (5xx) at most ``max_error_rate``, a p95 latency at most
    ``max_latency_ratio`` times production's, and in shadow mode a top-1 agreement with production of at
    least ``min_agreement``."""

    window_s: float = 600.0
    min_requests: int = 200
    max_error_rate: float = 0.01
    max_latency_ratio: float = 1.5
    min_agreement: float = 0.9

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and self.min_requests >= 1 and 0 <= self.max_error_rate <= 1
                and self.max_latency_ratio > 0 and 0 <= self.min_agreement <= 1):  # fmt: skip
            raise ValueError(
                f"criteria: window_s > 0, min_requests >= 1, max_error_rate and min_agreement in [0, 1], "
                f"max_latency_ratio > 0; not {asdict(self)}"
            )

    @classmethod
    def of(cls, settings: object) -> Criteria:
        """The criteria among another dataclass's fields (the canary settings)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


# -- routing (on the replicas) ------------------------------------------------------------------------------
def in_share(request_id: str, percent: float, salt: str) -> bool:
    """Whether a request id falls in the canary's share: a hash, so the same id gives the same answer."""
    digest = hashlib.blake2b(f"{salt}/{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 < round(percent * 100)


@dataclass(frozen=True)
class Pick:
    """Who answers a request: ``loaded`` in ``role``; ``shadow``, if set, also runs it to be compared.
    ``forced``: a version the client asked for (answered, but no evidence: not a sample of the traffic)."""

    loaded: Loaded
    role: str = PRODUCTION
    shadow: Loaded | None = None
    forced: bool = False


class NotServed(LookupError):
    """A forced version that this application does not serve (the client's 404)."""


def choose(
    production: Loaded, canary: Loaded | None, mode: str, percent: float, request_id: str, forced: str | None,
    split: bool = True,
) -> Pick:  # fmt: skip
    """The version that answers a request, and the one that shadows it. ``split``: the route is an inference
    (metadata routes describe production unless forced)."""
    if forced:
        for role, loaded in ((PRODUCTION, production), (CANARY, canary)):
            if loaded is not None and forced.strip().lower() in (role, str(loaded.version.number)):
                return Pick(loaded, role, forced=True)
        numbers = sorted({production.version.number, *([canary.version.number] if canary else [])})
        roles = f"production {production.version.number}, " + (
            f"canary {canary.version.number}" if canary else "no canary"
        )
        raise NotServed(f"version {forced} is not served here; served: {numbers} ({roles})")
    if not split or canary is None or canary.version.number == production.version.number:
        return Pick(production)
    if not in_share(request_id, percent, str(canary.version.number)):
        return Pick(production)
    return Pick(canary, CANARY) if mode == SPLIT else Pick(production, shadow=canary)


# -- judging ------------------------------------------------------------------------------------------------
@dataclass
class Decision:
    action: str  # promote, rollback or wait (decide); the outcome's name once judged (PROMOTED, ...)
    reasons: list[str]
    production: int | None = None
    canary: int | None = None
    evidence: dict = field(default_factory=dict)  # what the history records: both versions' figures

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.action]


def decide(evidence: dict, production: int, canary: int, criteria: Criteria) -> Decision:
    """``evidence``: the window the replicas reported (evidence.Board.evidence), for the canary ``canary``
    beside ``production``. Pure: no registry, no clock."""
    mode = evidence["canary"]["mode"]
    by_version = evidence["versions"]
    base = by_version.get(str(production), {}).get(PRODUCTION, {})
    mine = by_version.get(str(canary), {}).get(CANARY if mode == SPLIT else SHADOW_RUN, {})
    record = {"window_s": evidence["window_s"], "mode": mode, "percent": evidence["canary"]["percent"],
              "criteria": asdict(criteria), PRODUCTION: {"version": production, **base},
              CANARY: {"version": canary, **mine}}  # fmt: skip

    def decision(action: str, *reasons: str) -> Decision:
        return Decision(action, list(reasons), production, canary, record)

    refused = [r for r in evidence.get("replicas", {}).values() if r.get("canary_refused") == canary]
    if refused:
        return decision("rollback", f"version {canary} does not load on {len(refused)} replica(s): "
                                    f"{refused[0].get('canary_error')}")  # fmt: skip
    what = "requests" if mode == SPLIT else "compared answers"
    n = mine.get("requests", 0)
    if n < criteria.min_requests:
        return decision("wait", f"{n} {what} on version {canary} in the last {evidence['window_s']:g} s, "
                                f"{criteria.min_requests} needed")  # fmt: skip
    failed, passed = [], []
    rate = mine["errors"] / n
    (failed if rate > criteria.max_error_rate else passed).append(
        f"error rate {rate:.2%} (at most {criteria.max_error_rate:.2%})"
    )
    p95, base_p95 = mine.get("latency_ms", {}).get("p95"), base.get("latency_ms", {}).get("p95")
    if p95 is not None and base_p95:
        ratio = p95 / base_p95
        (failed if ratio > criteria.max_latency_ratio else passed).append(
            f"p95 latency {p95:.1f} ms, {ratio:.2f}x production's {base_p95:.1f} ms (at most "
            f"{criteria.max_latency_ratio:g}x)"
        )
    else:  # the canary's share all failed, or production answered nothing (a split at 100 %)
        who = f"version {canary}" if p95 is None else "production"
        passed.append(f"latency not compared: {who} answered nothing in the window")
    if mode == SHADOW:
        agreement = mine.get("agreement")
        if agreement is None:
            failed.append(f"no shadow run of version {canary} completed")
        else:
            (failed if agreement < criteria.min_agreement else passed).append(
                f"top-1 agreement with production {agreement:.1%} (at least {criteria.min_agreement:.0%})"
            )
    return decision("rollback", *failed) if failed else decision("promote", *passed)


def judge(
    registry: Registry, model: str, production_alias: str, canary_alias: str, evidence: dict, criteria: Criteria,
    *, dry_run: bool = False, who: str = "jobs.rollout",
) -> Decision:  # fmt: skip
    """Read both aliases, decide on ``evidence`` and act (unless ``dry_run``); the Decision's ``action`` is
    what happened: PROMOTED, ROLLED_BACK, WAIT, NOTHING (no canary) or CONFLICT (another writer moved an alias
    first: nothing, or only the canary's clearing, was done)."""
    if evidence["canary"]["alias"] != canary_alias:
        raise ValueError(f"the application's canary alias is {evidence['canary']['alias']!r}, not {canary_alias!r}")
    if evidence.get("production_alias", production_alias) != production_alias:
        raise ValueError(f"the application serves {evidence['production_alias']!r}, not {production_alias!r}")
    production_read = registry.read_alias(model, production_alias)
    canary_read = registry.read_alias(model, canary_alias)
    canary = canary_read[0]["version"] if canary_read[0] else None
    production = production_read[0]["version"] if production_read[0] else None
    if canary is None:
        return Decision(NOTHING, [f"{model}:{canary_alias} names no version"], production, None)
    if production == canary:  # a promotion done by hand, or one whose clearing was lost: finish it
        already = f"{model}:{production_alias} names version {canary} already"
        decision = Decision("promote", [already], production, canary)
    else:
        decision = decide(evidence, production, canary, criteria)
    if decision.action == "wait" or dry_run:
        decision.action = {"wait": WAIT, "promote": PROMOTED, "rollback": ROLLED_BACK}[decision.action]
        return decision
    promoting = decision.action == "promote"
    verdict = f"promote to {production_alias}" if promoting else "rolled back"
    why = f"{who}: {verdict}: {'; '.join(decision.reasons)}"
    try:
        registry.clear_alias(model, canary_alias, expected=canary_read, why=why, evidence=decision.evidence)
    except AliasMovedError as e:
        return Decision(CONFLICT, [str(e)], production, canary, decision.evidence)
    if promoting and production != canary:
        try:
            registry.move_alias(model, production_alias, canary, expected=production_read,
                                why=f"{who}: canary {canary_alias} promoted: {'; '.join(decision.reasons)}",
                                evidence=decision.evidence)  # fmt: skip
        except AliasMovedError as e:
            return Decision(CONFLICT, [f"{model}:{canary_alias} was cleared, but {e}"], production, canary,
                            decision.evidence)  # fmt: skip
    decision.action = PROMOTED if promoting else ROLLED_BACK
    log.info("%s:%s version %d %s: %s", model, canary_alias, canary, decision.action, "; ".join(decision.reasons))
    return decision
