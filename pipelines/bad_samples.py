"""Counting bad samples across all the decode tasks of a dataset.

A small actor in a module of its own, with no heavy imports, so that starting it costs no CPU time that
the decode tasks need.
"""

from __future__ import annotations

import uuid

import ray


class BadDataError(RuntimeError):
    """More samples were bad than the configured maximum fraction allows."""


@ray.remote(num_cpus=0)
class BadSampleCounter:
    """Counts samples and bad samples across all decode tasks; says when the bad fraction is too high."""

    def __init__(self, max_fraction: float, min_samples: int):
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.seen = self.bad = 0
        self.examples: list[str] = []

    def report(self, seen: int, bad: list[str]) -> str | None:
        self.seen += seen
        self.bad += len(bad)
        self.examples = (self.examples + bad)[:20]
        if self.bad and self.seen >= self.min_samples and self.bad > self.max_fraction * self.seen:
            return (
                f"{self.bad} of {self.seen} samples were bad ({100 * self.bad / self.seen:.1f}% > "
                f"{100 * self.max_fraction:.1f}% allowed); first keys: {self.examples[:5]}"
            )
        return None

    def counts(self) -> dict:
        return {"seen": self.seen, "bad": self.bad, "examples": self.examples}


def bad_sample_counter(max_fraction: float = 0.01, min_samples: int = 100):
    """A counter shared by every decode task of a dataset; ask it ``counts`` after (or during) an epoch.

    It is pinned (hard node affinity, as Ray Train pins its own dataset manager) to the node of the process
    that creates it, the driver's, so losing a worker node (a spot preemption) does not take it away. With
    a soft affinity Ray may place it on any node, and the node-loss tests saw it go down with a worker
    node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return BadSampleCounter.options(name=f"bad-samples-{uuid.uuid4().hex[:12]}", scheduling_strategy=here).remote(
        max_fraction, min_samples
    )
