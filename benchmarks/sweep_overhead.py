"""Overhead per single-worker sweep trial, direct (training in the Tune trial's process) vs Ray Train, side by side.

Runs the tiny variant of ``experiments/scaling_cifar10.yaml`` (4 one-epoch trials, 2 at once) once per trial runner
in one Ray session, alternating, and prints per runner the median over trials of

    overhead = trial wall (``compute/wall_time_s``, the trial function's own time) - training time
               (``compute/train_time_s``, the sum of the epochs' time)

and the sweep's wall time, and the ratio of the sweep walls (Ray Train / direct). ``--grid20`` widens the grid to
20 trials (5 widths x 4 data sizes, the same one-epoch trials): the issue's "a grid of 20 small trials in less than
half of the Ray Train path's wall time". Usage (state and MLflow under OUT, default a fresh temporary folder)::

    REPLAB_DATA_ROOT=/path/to/datasets python benchmarks/sweep_overhead.py [--repeats 1] [--grid20] [--out OUT]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "scaling_cifar10.yaml"


def tiny_overrides() -> list[str]:
    for line in EXPERIMENT.read_text().splitlines():
        if line.startswith("#") and "replab sweep" in line and "--set" in line:
            args = shlex.split(line.lstrip("# "))
            return [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    raise SystemExit(f"{EXPERIMENT.name} documents no tiny variant")


GRID20 = ["sweep.axes.model_size=[0.0625, 0.125, 0.1875, 0.25, 0.3125]", "sweep.axes.data_size=[128, 192, 256, 320]"]


def run_once(out: Path, runner: str, repeat: int, grid: list[str]) -> dict:
    from replab.platform.sweep import driver

    name = f"overhead-{runner}-{repeat}" + ("-grid20" if grid else "")
    overrides = [*tiny_overrides(), *grid, f"sweep.name={name}", f"sweep.trial_runner={runner}",
                 f"train.storage_path={out / 'runs'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
                 "tracking.experiment=overhead"]
    start = time.time()
    result = driver.run_sweep(EXPERIMENT, overrides, report=False, echo=lambda line: None)
    wall = time.time() - start
    rows = []
    for trial in sorted((out / "runs" / "sweeps" / name / "trials").glob("*/done.json")):
        r = json.loads(trial.read_text())["result"]
        rows.append({"wall": r["compute/wall_time_s"], "train": r["compute/train_time_s"],
                     "overhead": r["compute/wall_time_s"] - r["compute/train_time_s"]})
    return {"runner": runner, "sweep_wall": wall, "trials": rows, "failed": result.failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--grid20", action="store_true", help="5 widths x 4 data sizes instead of 2 x 2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="replab-overhead-")).resolve()
    runs = []
    for repeat in range(args.repeats):
        for runner in ("ray_train", "direct"):
            runs.append(run_once(out, runner, repeat, GRID20 if args.grid20 else []))
            print(json.dumps(runs[-1]), flush=True)
    print(f"\n{'runner':<10} {'trials':>6} {'median overhead s':>18} {'median train s':>15} {'median sweep wall s':>20}")
    for runner in ("ray_train", "direct"):
        mine = [r for r in runs if r["runner"] == runner]
        trials = [t for r in mine for t in r["trials"]]
        print(f"{runner:<10} {len(trials):>6} {statistics.median(t['overhead'] for t in trials):>18.1f} "
              f"{statistics.median(t['train'] for t in trials):>15.1f} "
              f"{statistics.median(r['sweep_wall'] for r in mine):>20.1f}")
    walls = {runner: statistics.median(r["sweep_wall"] for r in runs if r["runner"] == runner)
             for runner in ("ray_train", "direct")}
    print(f"sweep wall ratio ray_train / direct: {walls['ray_train'] / walls['direct']:.2f}")


if __name__ == "__main__":
    main()
