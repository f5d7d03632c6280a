"""``replab sweep``: spec and grid, trials, the Tune driver, MLflow parent/child runs, compute counts, scaling
fits and the report (one module each; see docs/ARCHITECTURE.md)."""


def __getattr__(name: str):
    # Sweeps started before the sweep package existed pickled their Tune callback as
    # ``replab.platform.sweep._StatusCallback``; ``Tuner.restore`` of such a sweep looks it up here.
    if name == "_StatusCallback":
        from replab.platform.sweep import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
