"""Progress of long work: a tqdm bar with rate and ETA on a terminal, nothing extra in logs (where the caller's
own periodic lines, such as the epoch line, stand).

``tqdm(disable=None)`` turns the bar off when stderr is not a terminal: in Ray workers, CI logs and redirected
output the bar never appears, so nothing is printed twice or as carriage-return debris.
"""

from __future__ import annotations

from typing import Any, Iterable


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        disable: bool | None = None, **kwargs: Any):
    """A tqdm bar over ``iterable`` (or updated by hand with ``total``) shown only on a terminal; it clears
    itself when done (``leave=False``) so the caller's summary line stays the last thing printed. ``disable``:
    True forces it off (e.g. on every rank but 0), None decides by the terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True,
                mininterval=0.5, **kwargs)
