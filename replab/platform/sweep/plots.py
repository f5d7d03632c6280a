"""The scaling report's figures, for a paper draft: PNG (200 dpi) and PDF of each.

- ``scaling_<axis>``: error against the axis (log-log), one colour per fixed setting of the other axes. Points
  are the mean over replicate seeds with +-1 std error bars (a single seed: no bar); the fitted law is drawn
  over the measured range only, with its 95% bootstrap band; the legend gives the setting and the exponent
  with its interval; a flagged fit (see :func:`replab.platform.sweep.fits.flags_of`) is dashed and marked "!".
- ``scaling_joint_<i>``: error against encoder parameters N, one curve of the joint law per data size D.
- ``frontier``: every cell (grey), the best error reachable within each FLOP budget (a line over budgets), and
  the compute-optimal allocation a joint fit implies (dashed).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from replab.platform.sweep import fits as scaling

AXIS_LABEL = {
    "model_size": "encoder parameters",
    "data_size": "training images",
    "resolution": "resolution (px)",
    "compute": "training FLOPs",
}
FORMATS = ("png", "pdf")
DPI = 200


def human(value: float, _pos=None) -> str:
    """``1500 -> 1.5k``, ``2e6 -> 2M``, ``0.25 -> 0.25``: tick labels a reader takes in at a glance."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:g}{suffix}"
    return f"{value:.3g}"


def replicate_stats(x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct x, mean error, std error) over the points sharing each x (std 0 for a single point)."""
    groups: dict[float, list[float]] = defaultdict(list)
    for xi, yi in zip(x, y):
        groups[float(xi)].append(float(yi))
    xs = np.array(sorted(groups))
    return (xs, np.array([np.mean(groups[v]) for v in xs]),
            np.array([np.std(groups[v], ddof=1) if len(groups[v]) > 1 else 0.0 for v in xs]))


def interval(fit: dict[str, Any], key: str) -> str:
    """``0.31 [0.12, 0.50]`` (the 95% bootstrap interval when there is one)."""
    ci = fit.get("ci", {}).get(key)
    return f"{fit[key]:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{fit[key]:.2f}"


def _axes(plt, xlabel: str, ylabel: str):
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(human))
        axis.set_minor_formatter(FuncFormatter(lambda v, p: ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _save(fig, out: Path, stem: str) -> list[Path]:
    files = []
    fig.tight_layout()
    for fmt in FORMATS:
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, dpi=DPI)
        files.append(path)
    return files


def _axis_figure(plt, out: Path, axis: str, entries: list[dict], ylabel: str) -> list[Path]:
    fig, ax = _axes(plt, AXIS_LABEL[axis], ylabel)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    exponents = []
    for i, e in enumerate(entries):
        color = colors[i % len(colors)]
        xs, mean, std = replicate_stats(e["x"], e["error"])
        fit_obj, fit = e.get("_fit"), e.get("fit")
        label = e["short"]
        if fit is None:
            label += f" ({e.get('skipped', 'no fit')})"
        else:
            flagged = bool(fit.get("flags"))
            label += f": b = {interval(fit, 'b')}" + (" !" if flagged else "")
            exponents.append(interval(fit, "b"))
            grid = np.geomspace(min(e["x"]), max(e["x"]), 100)  # the measured range only
            band = scaling.band(fit_obj, grid)
            if band is not None:
                ax.fill_between(grid, band[0], band[1], color=color, alpha=0.15, linewidth=0)
            ax.plot(grid, fit_obj.predict(grid), color=color, linestyle="--" if flagged else "-", linewidth=1.5)
        ax.errorbar(xs, mean, yerr=np.where(std > 0, std, np.nan), fmt="o", color=color, markersize=4, capsize=3,
                    label=label, zorder=3)
    law = "error = a·x$^{-b}$ + c"
    ax.set_title(law + (f",  b = {exponents[0]}" if len(exponents) == 1 else ""), fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    files = _save(fig, out, f"scaling_{axis}")
    plt.close(fig)
    return files


def _joint_figure(plt, out: Path, j: int, e: dict, ylabel: str) -> list[Path]:
    fit_obj, fit = e["_fit"], e["fit"]
    fig, ax = _axes(plt, "encoder parameters N", ylabel)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n, d, y = (np.array(e[k], float) for k in ("params", "images", "error"))
    for i, dv in enumerate(sorted(set(d))):
        color = colors[i % len(colors)]
        sel = d == dv
        xs, mean, std = replicate_stats(n[sel], y[sel])
        ax.errorbar(xs, mean, yerr=np.where(std > 0, std, np.nan), fmt="o", color=color, markersize=4, capsize=3,
                    label=f"D = {human(dv)}", zorder=3)
        grid = np.geomspace(n[sel].min(), n[sel].max(), 100)
        ax.plot(grid, fit_obj.predict(grid, dv), color=color, linewidth=1.5)
    ax.set_title(f"a·N$^{{-\\alpha}}$ + b·D$^{{-\\beta}}$ + c:  α = {interval(fit, 'alpha')},  "
                 f"β = {interval(fit, 'beta')}" + ("  !" if fit.get("flags") else ""), fontsize=9)
    ax.legend(fontsize=8, frameon=False, title=e["short"] or None, title_fontsize=8)
    files = _save(fig, out, f"scaling_joint_{j}")
    plt.close(fig)
    return files


def _frontier_figure(plt, out: Path, front: dict[str, Any], joints: list[dict], ylabel: str) -> list[Path]:
    fig, ax = _axes(plt, "training FLOPs", ylabel)
    ax.scatter([p["flops"] for p in front["all"]], [p["error"] for p in front["all"]], s=14, color="0.65",
               label="every cell")
    budgets = front.get("budgets") or []
    if budgets:
        ax.plot([b["budget"] for b in budgets], [b["error"] for b in budgets], "-o", color="C3", markersize=4,
                label="best within budget")
    for e in joints:
        if e.get("allocation"):
            ax.plot([a["flops"] for a in e["allocation"]], [a["predicted_error"] for a in e["allocation"]], "--",
                    color="C0", label="compute-optimal (joint law)" + (f", {e['short']}" if e["short"] else ""))
    ax.set_title("compute frontier", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    files = _save(fig, out, "frontier")
    plt.close(fig)
    return files


def draw(out: Path, fits: dict[str, list[dict]], joints: list[dict], front: dict[str, Any], metric: str) -> list[Path]:
    """Write every figure of the report into ``out``; returns the files (PNG and PDF of each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ylabel = f"error (1 - {metric.removeprefix('eval/')})" if metric.startswith("eval/") else metric
    files: list[Path] = []
    with plt.rc_context({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False}):
        for axis, entries in fits.items():
            files += _axis_figure(plt, out, axis, entries, ylabel)
        for j, e in enumerate(joints):
            if e.get("_fit") is not None:
                files += _joint_figure(plt, out, j, e, ylabel)
        if front.get("all"):
            files += _frontier_figure(plt, out, front, joints, ylabel)
    return files
