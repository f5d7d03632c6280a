"""Shared fixtures: the real data root, and one Ray instance for every test that needs Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    """$REPLAB_DATA_ROOT, else ../shared/datasets beside the checkout (where CI puts it)."""
    env = os.environ.get("REPLAB_DATA_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = real_data_root()
    if not (root / "cifar10").is_dir():
        pytest.fail(f"real datasets not found at {root}; set REPLAB_DATA_ROOT to the shared datasets folder")
    return root


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance shared by all tests that need it (starting Ray costs tens of seconds here)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(num_cpus=4, logging_level="ERROR")
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Every test that starts (or joins) Ray is also ``slow``: ``-m "not slow"`` is the fast subset."""
    for item in items:
        if item.get_closest_marker("ray") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
