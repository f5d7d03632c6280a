"""Training images decoded once per sweep and shared by the direct trials that read them.

Before Tune starts, the driver groups the cells whose training images can be held in memory (:func:`share_groups`:
the direct runner, the plain training split, neither a labeled split nor an unlabeled pool, no searched ``data.*``
key, ``data.cache`` not off and the decode under a quarter of the object store, as
:func:`~replab.platform.data.pipeline.should_cache` decides) by what defines their decode (:func:`decode_key`).
Each group is decoded once, at the largest ``data.limit`` of its cells, by
:func:`~replab.platform.data.arrays.load_rows` (``load_arrays``: its disk cache, its skip counting) and put in the
object store; every cell gets a :class:`SharedRows` handle in the plan its trials receive. A trial takes its own
nested subset out of the decode by row id (:meth:`~replab.platform.data.arrays.DecodedRows.nested`: the images
``data.limit`` selects on the Ray Data path) and trains on it in memory
(:class:`~replab.platform.sweep.direct.ArrayTrialEnv`). Every other cell keeps the Ray Data pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from replab.config import DataConfig
from replab.platform.sweep.grid import Cell, runner_of
from replab.platform.sweep.spec import SweepSpec

DECODE_KEYS = ("dataset", "root", "split", "resolution", "image_column", "label_column", "seed", "cache")
"""The ``data.*`` keys that define a decode (``limit`` only chooses a nested subset of it), and ``cache``, which
decides whether it is held in memory."""


@dataclass
class SharedRows:
    """A cell's handle on its group's decode: the object-store reference of the
    :class:`~replab.platform.data.arrays.DecodedRows` and the cell's ``data.limit``."""

    ref: Any
    """``ray.ObjectRef`` of the group's ``DecodedRows``."""
    limit: int | None

    def rows(self):
        """The cell's own rows (``DecodedRows``): all of the decode, or the nested subset its limit selects."""
        import ray

        return ray.get(self.ref).nested(self.limit)


def decode_key(data: DataConfig) -> tuple:
    """What two cells must share to read one decode (``data.limit`` aside)."""
    return tuple(getattr(data, key) for key in DECODE_KEYS)


def shareable(spec: SweepSpec, cell: Cell) -> bool:
    """True when ``cell``'s trials train in their own process on the plain training split, with no searched data
    key and ``data.cache`` not off (sizes are checked per group, :func:`fits_in_memory`)."""
    from replab.platform.data import labeled

    cfg = cell.config
    searched = spec.search.space if spec.search is not None else {}
    return (runner_of(spec.trial_runner, cfg) == "direct" and not labeled.uses_unlabeled_pool(cfg.data)
            and cfg.data.cache != "off" and not any(key.startswith("data.") for key in searched))


def largest_limit(limits: list[int | None]) -> int | None:
    """The limit whose subset holds every other one's (None, all rows, holds them all)."""
    return None if any(limit is None for limit in limits) else max(limits)


def share_groups(spec: SweepSpec, cells: list[Cell]) -> dict[tuple, list[Cell]]:
    """The shareable cells (:func:`shareable`) by :func:`decode_key`, in grid order."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        if shareable(spec, cell):
            groups.setdefault(decode_key(cell.config.data), []).append(cell)
    return groups


def fits_in_memory(data: DataConfig, limit: int | None) -> bool:
    """True when ``data`` decoded at ``limit`` is one that ``data.cache`` keeps in the object store (``on``, or
    ``auto`` and under a quarter of it: :func:`~replab.platform.data.pipeline.should_cache`)."""
    from replab.platform.data import pipeline
    from replab.platform.data.indexes import build_index
    from replab.platform.data.sources import resolve_for_split

    total = build_index(resolve_for_split(data, data.split)).total_rows
    rows = total if limit is None else min(int(limit), total)
    return pipeline.should_cache(data.cache, rows, int(data.resolution))


def share_data(spec: SweepSpec, cells: list[Cell]) -> tuple[dict[str, SharedRows], float]:
    """Decode each group that fits in memory once and put it in the object store (Ray must be up); returns
    ({cell id: its :class:`SharedRows`}, seconds spent). Cells not in the result keep the Ray Data path."""
    import ray

    from replab.platform.data.arrays import load_rows

    start = time.time()
    out: dict[str, SharedRows] = {}
    for group in share_groups(spec, cells).values():
        data = group[0].config.data
        limit = largest_limit([c.config.data.limit for c in group])
        if not fits_in_memory(data, limit):
            continue
        ref = ray.put(load_rows(data, limit))
        out.update({c.id: SharedRows(ref, c.config.data.limit) for c in group})
    return out, time.time() - start
