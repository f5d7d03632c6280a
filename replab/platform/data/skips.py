"""Counting skipped images across processes.

Bad rows are dropped inside the decode function (never an exception: Ray Data's ``max_errored_blocks`` is 0)
and reported to a named Ray actor (``SkipCounter``, namespace ``replab``, created with ``get_if_exists``),
keyed by row id, so the count is the number of distinct bad rows however many epochs re-decode them.
:func:`skipped_count` looks the actor up by name from the driver or from train workers on any node.
"""

from __future__ import annotations

from collections import Counter

from replab.platform.data import decode as _decode

SKIP_NAMESPACE = "replab"


class SkipCounter:
    """Distinct skipped rows of one dataset (a named Ray actor; see :func:`build_train_dataset`)."""

    MAX_EXAMPLES = 20

    def __init__(self) -> None:
        self.rows: set[int] = set()
        self.reasons: Counter = Counter()
        self.examples: list[tuple[str, str]] = []

    def add(self, rows: list[int], names: list[str], reasons: list[str]) -> int:
        for row, name, reason in zip(rows, names, reasons):
            if row in self.rows:
                continue
            self.rows.add(int(row))
            self.reasons[_decode.category(reason)] += 1
            if len(self.examples) < self.MAX_EXAMPLES:
                self.examples.append((name, reason))
        return len(self.rows)

    def count(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        return {"skipped": len(self.rows), "reasons": dict(self.reasons), "examples": list(self.examples)}


def skip_actor(name: str, create: bool = False):
    import ray

    if create:
        actor_cls = ray.remote(num_cpus=0, max_restarts=0)(SkipCounter)
        return actor_cls.options(name=name, namespace=SKIP_NAMESPACE, get_if_exists=True).remote()
    return ray.get_actor(name, namespace=SKIP_NAMESPACE)


def skipped_count(counter_name: str) -> int:
    """Skipped rows recorded under ``counter_name`` (``TrainData.counter_name``), from any node."""
    import ray

    return int(ray.get(skip_actor(counter_name).count.remote()))


def skipped_summary(counter_name: str) -> dict:
    import ray

    return ray.get(skip_actor(counter_name).summary.remote())
