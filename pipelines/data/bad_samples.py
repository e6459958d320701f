"""Counting bad samples across all the decode tasks of a dataset, and telling them which epoch they decode.

A small actor in a module of its own, with no heavy imports, so that starting it costs no CPU time that
the decode tasks need. One per dataset:

- the training loop names the epoch before it iterates (``set_epoch``); the dataset's read tasks ask for it
  once per execution (``begin_execution``), so each sample's augmentation can be drawn from (seed, epoch,
  key) and the shard order from (seed, epoch). A dataset nobody sets an epoch for (evaluation, the demo)
  numbers its executions 0, 1, 2, ...;
- decode tasks report every block they decoded (``report``). Ray retries a failed task, and a worker group
  restarted mid-epoch reads the epoch again: a block reported twice in the same epoch, and a bad sample
  reported twice in the same epoch, count once;
- the report that takes the bad fraction past the limit records the verdict, which stays: the decode task
  that sees it raises, and the training loop asks for it (``verdict``) after every pass over a data set, so
  that the limit holds whether or not a task waited for its reports' answers;
- a training run that must stop (too many bad samples, no batch for too long) records why (``stop``): Ray
  Train restarts a failed worker group up to ``max_failures`` times, and each new attempt then ends at once
  with the same reason (``stopped``) instead of waiting for the same failure again.
"""

from __future__ import annotations

import uuid

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class BadDataError(RuntimeError):
    """More samples were bad than the configured maximum fraction allows."""


@ray.remote(num_cpus=0)
class BadSampleCounter:
    """Counts samples and bad samples across all decode tasks; says when the bad fraction is too high."""

    def __init__(self, max_fraction: float, min_samples: int):
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.seen = self.bad = 0
        self.examples: list[str] = []
        self.epoch: int | None = None  # set by the training loop; None: number the executions
        self.executions = 0
        self.blocks: dict[int, set[str]] = {}  # epoch -> blocks counted (for retried tasks)
        self.bad_keys: dict[int, set[str]] = {}  # epoch -> bad samples counted
        self.stop_reason: str | None = None
        self.failed: str | None = None  # the verdict of the report that passed the limit
        self.tallied: dict[str, dict] = {}  # what else a job counts on the way: {what: {count, examples}}
        self.tallied_blocks: set[tuple[str, str]] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def begin_execution(self) -> int:
        """The epoch of the execution that is starting: the one the training loop set, else a counter."""
        self.executions += 1
        return self.epoch if self.epoch is not None else self.executions - 1

    def report(
        self, epoch: int, block: str | None, seen: int, bad: list[str], bad_count: int | None = None
    ) -> str | None:
        """A decoded block: ``seen`` rows of which ``bad`` (keys) were skipped. ``block`` names it (None for
        samples that failed later, on the device). Returns what is wrong when the limit is passed. With
        ``bad_count`` (labeling's millions of inputs), ``bad`` are only examples: counted, not kept."""
        if block is not None:
            counted = self.blocks.setdefault(epoch, set())
            if block in counted:
                return self.failed  # a retried task: counted already
            counted.add(block)
            self.seen += seen
        if bad_count is not None:
            self.bad += bad_count
            self.examples = (self.examples + bad)[:20]
            self.failed = self.failed or self._verdict()
            return self.failed
        known = self.bad_keys.setdefault(epoch, set())
        new = [k for k in bad if k not in known]
        known.update(new)
        self.bad += len(new)
        self.examples = (self.examples + new)[:20]
        for old in [e for e in self.blocks.keys() | self.bad_keys.keys() if e < epoch - 1]:
            self.blocks.pop(old, None)  # bounded memory: only the last two epochs can still be retried
            self.bad_keys.pop(old, None)
        self.failed = self.failed or self._verdict()
        return self.failed

    def verdict(self) -> str | None:
        """Why the limit was passed, once it was (it stays passed); None until then."""
        return self.failed

    def _verdict(self) -> str | None:
        if self.bad and self.seen >= self.min_samples and self.bad > self.max_fraction * self.seen:
            return (
                f"{self.bad} of {self.seen} samples were bad ({100 * self.bad / self.seen:.1f}% > "
                f"{100 * self.max_fraction:.1f}% allowed); first keys: {self.examples[:5]}"
            )
        return None

    def tally(self, what: str, count: int, examples: list[str], block: str) -> None:
        """Something else a job counts on the way (labeling: inputs named more than once), once per ``block``
        (a retried task reports its block again)."""
        if (what, block) in self.tallied_blocks:
            return
        self.tallied_blocks.add((what, block))
        entry = self.tallied.setdefault(what, {"count": 0, "examples": []})
        entry["count"] += count
        entry["examples"] = (entry["examples"] + examples)[:10]

    def tallies(self) -> dict[str, dict]:
        return self.tallied

    def counts(self) -> dict:
        return {"seen": self.seen, "bad": self.bad, "examples": self.examples}

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def stopped(self) -> str | None:
        return self.stop_reason


def bad_sample_counter(max_fraction: float = 0.01, min_samples: int = 100):
    """A counter shared by every decode task of a dataset; ask it ``counts`` after (or during) an epoch.

    It is pinned (hard node affinity, as Ray Train pins its own dataset manager) to the node of the process
    that creates it, the driver's, so losing a worker node (a spot preemption) does not take it away. With
    a soft affinity Ray may place it on any node, and the node-loss tests saw it go down with a worker
    node."""
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return BadSampleCounter.options(name=f"bad-samples-{uuid.uuid4().hex[:12]}", scheduling_strategy=here).remote(
        max_fraction, min_samples
    )


def surfaced(error: Exception) -> Exception:
    """A BadDataError raised in a decode task reaches the consumer wrapped in Ray's own exceptions, as text
    in the middle of a long traceback (Ray Train then cuts the middle out of what it shows). Returns the
    BadDataError by itself, so that its message is what a user sees, or ``error`` if it is another one."""
    text = str(error)
    marker = f"{BadDataError.__name__}: "
    if isinstance(error, BadDataError) or marker not in text:
        return error
    return BadDataError(text.split(marker)[-1].splitlines()[0])


def report_bad_keys(counter, failed: list[tuple[int, str]]) -> None:
    """Samples that failed after their block was counted (on the device): (epoch, key) pairs."""
    for epoch in sorted({e for e, _ in failed}):
        problem = ray.get(counter.report.remote(epoch, None, 0, [k for e, k in failed if e == epoch]))
        if problem:
            raise BadDataError(problem)
