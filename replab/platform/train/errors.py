"""The errors a training run ends with when the user can act on them; each message is one line.

Kept free of heavy imports so the command line can catch them without loading torch or Ray.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, garbage, not written by replab): names the file."""


class RunLocked(RuntimeError):
    """The run is being trained by another live process."""


class RunFailed(RuntimeError):
    """Training failed inside Ray (a worker error, a non-finite loss)."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM during a run: the message says how to resume."""
