"""``replab report SWEEP``: scaling laws, the compute frontier, plots and a summary of a finished sweep.

SWEEP is the parent run id, the sweep name, or the sweep's YAML (with the same ``--set`` overrides). The
report reads the sweep's child runs from MLflow and, per grid cell, takes the best trial (by the scaling
error; completed trials before ones ASHA stopped early). The error is ``1 - eval/knn_top1`` by default
(``--metric eval/linear_top1``, or ``train/epoch_loss`` for the loss itself). Each first-class axis is
measured by: ``model_size`` -> encoder parameters, ``data_size`` -> training images, ``resolution`` -> pixels
per side, ``compute`` -> training FLOPs.

It fits (see :mod:`replab.platform.sweep.fits`)

- ``error = a * x^(-b) + c`` along each first-class axis with two or more values, separately for every
  combination of the other axes' values (the other axes fixed);
- ``error = a*N^-alpha + b*D^-beta + c`` jointly over parameters N and images D when both ``model_size`` and
  ``data_size`` are axes (per combination of the remaining axes);

with bootstrap intervals, R^2 and a held-out check, and it builds the compute frontier (the best cell per
FLOP budget, and the compute-optimal N and D that the joint fit implies, with C = k*N*D and k measured).
A law is fitted only where there are more distinct sizes than it has parameters would allow a check; fits that
cannot support a claim are flagged (:func:`replab.platform.sweep.fits.flags_of`) in the table, the plots and on
the parent run. Seeds (``train.seed``, ``data.seed``, ``data.split_seed`` axes) are replicates: they are not
fitted separately but pooled, and drawn as mean +- std.

Outputs: ``scaling_fits.json``, ``report.md``, ``report.html`` (self-contained, interactive) and
``plots/*.png|pdf`` (:mod:`replab.platform.sweep.plots`) in ``--out`` (default ``<sweep dir>/report``), logged to
the parent run under ``report/`` with the fitted exponents, their intervals, held-out errors and the best cell
as metrics and a summary as the run's description; the markdown is printed in the terminal.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from replab.config import ConfigError
from replab.platform.sweep import fits as scaling
from replab.platform.sweep import html_report, plots
from replab.platform.sweep.runs import ROLE_TAG, SWEEP_TAG, retry, trial_table, update_parent
from replab.platform.sweep.spec import FIRST_CLASS_AXES, error_of

REPLICATE_AXES = ("train.seed", "data.seed", "data.split_seed")
SHORT = {"model_size": "model", "data_size": "data", "resolution": "res", "compute": "epochs", "method.name": "method"}

AXIS_X = {
    "model_size": ("compute/params", "encoder parameters"),
    "data_size": ("compute/dataset_images", "training images"),
    "resolution": ("data.resolution", "resolution (px)"),
    "compute": ("compute/train_flops", "training FLOPs"),
}


@dataclass
class Point:
    """The best trial of one grid cell."""

    cell: str
    trial: str
    run_id: str
    labels: dict[str, str]
    error: float
    values: dict[str, float]
    """x of each first-class axis (params, images, resolution, FLOPs) plus ``flops``."""
    completed: bool = True
    searched: dict[str, str] = field(default_factory=dict)


def resolve_parent(uri: str, sweep: str):
    """The parent run for a run id or a sweep name (searched in every experiment of the store)."""
    from replab.platform import tracking

    c = tracking.client(uri)
    if re.fullmatch(r"[0-9a-f]{32}", sweep):
        try:
            return retry(c.get_run, sweep, attempts=2)
        except Exception:  # noqa: BLE001 - not a run id after all: try it as a name
            pass
    experiments = [e.experiment_id for e in retry(c.search_experiments)]
    runs = retry(c.search_runs, experiments,
                 filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'sweep'",
                 order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        raise ConfigError(f"report: no sweep {sweep!r} (parent run id or sweep name) in {uri}; "
                          "pass --set tracking.uri=... where the sweep logged")
    return runs[0]


def collect_points(trials: list[dict[str, Any]], metric: str, axes: list[str]) -> tuple[list[Point], list[str]]:
    """The best finished trial per cell as a :class:`Point`; also notes on what was left out."""
    notes = []
    by_cell: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        if t["status"] != "FINISHED":
            notes.append(f"{t['trial']}: {t['status']} (left out)")
            continue
        if metric not in t["metrics"]:
            notes.append(f"{t['trial']}: no {metric} (left out)")
            continue
        by_cell[t["cell"] or t["trial"]].append(t)
    points = []
    for cell, ts in sorted(by_cell.items()):
        completed = [t for t in ts if not t["early_stopped"]]
        pool = completed or ts
        best = min(pool, key=lambda t: error_of(metric, t["metrics"][metric]))
        m, p = best["metrics"], best["params"]
        values = {"flops": float(m.get("compute/train_flops", float("nan")))}
        for axis, (key, _label) in AXIS_X.items():
            raw = m.get(key) if key.startswith("compute/") else p.get(key)
            values[axis] = float(raw) if raw not in (None, "None") else float("nan")
        labels = {a: best["axes"].get(a, "") for a in axes}
        searched = {k[len("sweep.search."):]: v for k, v in p.items() if k.startswith("sweep.search.")}
        points.append(Point(cell, best["trial"], best["run_id"], labels, error_of(metric, m[metric]), values,
                            bool(completed), searched))
    return points, notes


def _label_key(labels: tuple) -> tuple:
    """Sort group keys numerically where labels are numbers (64 before 128)."""
    out = []
    for label in labels:
        try:
            out.append((0, float(label), ""))
        except (TypeError, ValueError):
            out.append((1, 0.0, str(label)))
    return tuple(out)


def _group_name(labels: dict[str, str], axes: list[str]) -> str:
    return ", ".join(f"{a}={labels[a]}" for a in axes) or "all"


def _short(labels: dict[str, str], axes: list[str]) -> str:
    """``method simclr, data 5000``: the fixed settings of a fit, for a legend."""
    return ", ".join(f"{SHORT.get(a, a.rpartition('.')[2])} {labels[a]}" for a in axes)


def _fixed_axes(axes: list[str], *varied: str) -> list[str]:
    """The axes held fixed within one fit: all but the varied ones and the replicate seeds."""
    return [a for a in axes if a not in varied and a not in REPLICATE_AXES]


def axis_fits(points: list[Point], axes: list[str], bootstrap: int, seed: int = 0) -> dict[str, list[dict]]:
    """Per first-class axis: one power-law fit per combination of the other axes' values."""
    out: dict[str, list[dict]] = {}
    for axis in axes:
        if axis not in FIRST_CLASS_AXES or len({p.labels[axis] for p in points}) < 2:
            continue  # not a scaling axis, or a single value here: it is held fixed
        others = _fixed_axes(axes, axis)
        groups: dict[tuple, list[Point]] = defaultdict(list)
        for p in points:
            groups[tuple(p.labels[a] for a in others)].append(p)
        fits = []
        for key, pts in sorted(groups.items(), key=lambda kv: _label_key(kv[0])):
            xs = np.array([p.values[axis] for p in pts])
            ys = np.array([p.error for p in pts])
            ok = np.isfinite(xs) & (xs > 0) & np.isfinite(ys)
            entry: dict[str, Any] = {"group": _group_name(dict(zip(others, key)), others),
                                     "short": _short(dict(zip(others, key)), others),
                                     "fixed": dict(zip(others, key)), "x": xs[ok].tolist(), "error": ys[ok].tolist(),
                                     "cells": [p.cell for p, k in zip(pts, ok) if k]}
            try:
                fit = scaling.fit_power_law(xs[ok], ys[ok], bootstrap=bootstrap, seed=seed)
            except ValueError as exc:
                entry["skipped"] = str(exc)
                fits.append(entry)
                continue
            entry["fit"] = fit.to_dict()
            entry["_fit"] = fit
            fits.append(entry)
        out[axis] = fits
    return out


def joint_fits(points: list[Point], axes: list[str], bootstrap: int, seed: int = 0) -> list[dict]:
    if "model_size" not in axes or "data_size" not in axes:
        return []
    others = _fixed_axes(axes, "model_size", "data_size")
    groups: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        groups[tuple(p.labels[a] for a in others)].append(p)
    out = []
    for key, pts in sorted(groups.items(), key=lambda kv: _label_key(kv[0])):
        n = np.array([p.values["model_size"] for p in pts])
        d = np.array([p.values["data_size"] for p in pts])
        y = np.array([p.error for p in pts])
        flops = np.array([p.values["flops"] for p in pts])
        entry: dict[str, Any] = {"group": _group_name(dict(zip(others, key)), others), "fixed": dict(zip(others, key)),
                                 "short": _short(dict(zip(others, key)), others),
                                 "params": n.tolist(), "images": d.tolist(), "error": y.tolist()}
        try:
            fit = scaling.fit_joint(n, d, y, bootstrap=bootstrap, seed=seed)
        except ValueError as exc:
            entry["skipped"] = str(exc)
            out.append(entry)
            continue
        entry["fit"] = fit.to_dict()
        entry["_fit"] = fit
        if np.all(np.isfinite(flops)) and np.all(flops > 0):
            k = scaling.flops_constant(flops, n, d)
            entry["flops_per_param_image"] = k
            budgets = np.geomspace(flops.min(), flops.max() * 10, 5)
            entry["allocation"] = [a for a in (scaling.optimal_allocation(fit, k, float(b)) for b in budgets) if a]
        out.append(entry)
    return out


def frontier(points: list[Point]) -> dict[str, Any]:
    """The compute frontier over all cells: the best configuration per FLOP budget."""
    ok = [p for p in points if np.isfinite(p.values["flops"]) and p.values["flops"] > 0]
    if not ok:
        return {"points": [], "budgets": []}
    flops = np.array([p.values["flops"] for p in ok])
    err = np.array([p.error for p in ok])
    idx = scaling.pareto_frontier(flops, err)
    rows = []
    for i in idx:
        p = ok[i]
        rows.append({"cell": p.cell, "flops": float(flops[i]), "error": float(err[i]),
                     "params": p.values["model_size"], "images": p.values["data_size"], **p.labels})
    budgets = sorted(set(float(f) for f in flops))
    best = scaling.best_per_budget(flops, err, budgets)
    per_budget = [{"budget": b, "cell": ok[i].cell, "error": float(err[i]), "params": ok[i].values["model_size"],
                   "images": ok[i].values["data_size"]} for b, i in zip(budgets, best) if i is not None]
    return {"points": rows, "budgets": per_budget,
            "all": [{"cell": p.cell, "flops": float(f), "error": float(e)} for p, f, e in zip(ok, flops, err)]}


# ------------------------------------------------------------------------------------------ text


def _ci(fit: dict, key: str, fmt: str = "{:.3g}") -> str:
    value = fmt.format(fit[key])
    ci = fit.get("ci", {}).get(key)
    return f"{value} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else value


def _flags(f: dict) -> str:
    return "; ".join(f.get("flags", [])) or "none"


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Scaling report: {summary['sweep']}", "",
             f"parent run `{summary['parent_run_id']}`; error = {summary['error']}; "
             f"{len(summary['points'])} cells with results; bootstrap {summary['bootstrap']} resamples (95% CI)", ""]
    for axis, entries in summary["axis_fits"].items():
        lines += [f"## {axis} (x = {AXIS_X[axis][1]}): error = a · x^-b + c", "",
                  "| fixed | points | a | b | c | R² | held-out (pred vs actual) | flags |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in entries:
            if "fit" not in e:
                lines.append(f"| {e['group']} | {len(e['x'])} | - | - | - | - | - | {e['skipped']} |")
                continue
            f = e["fit"]
            h = f.get("heldout")
            held = f"{h['predicted']:.4f} vs {h['actual']:.4f} ({100 * h['rel_error']:.1f}%)" if h else "n/a"
            lines.append(f"| {e['group']} | {f['n_points']} | {_ci(f, 'a')} | {_ci(f, 'b')} | {_ci(f, 'c')} | "
                         f"{f['r2']:.3f} | {held} | {_flags(f)} |")
        lines.append("")
    for e in summary["joint_fits"]:
        lines += [f"## joint fit ({e['group']}): error = a · N^-alpha + b · D^-beta + c", ""]
        if "fit" not in e:
            lines += [f"{e['skipped']}", ""]
            continue
        f = e["fit"]
        lines += [f"a = {_ci(f, 'a')}, alpha = {_ci(f, 'alpha')}, b = {_ci(f, 'b')}, beta = {_ci(f, 'beta')}, "
                  f"c = {_ci(f, 'c')}; R² = {f['r2']:.3f}; {f['n_points']} points; flags: {_flags(f)}"]
        h = f.get("heldout")
        if h:
            lines.append(f"held-out (largest N·D): predicted {h['predicted']:.4f}, actual {h['actual']:.4f} "
                         f"({100 * h['rel_error']:.1f}%)")
        if e.get("allocation"):
            lines += ["", f"compute-optimal split (C = k·N·D, k = {e['flops_per_param_image']:.3g} FLOPs per "
                      "parameter-image):", "", "| FLOPs | params N | images D | predicted error |", "|---|---|---|---|"]
            for a in e["allocation"]:
                lines.append(f"| {a['flops']:.3g} | {a['params']:.3g} | {a['images']:.3g} | {a['predicted_error']:.4f} |")
        lines.append("")
    front = summary["frontier"]
    if front.get("points"):
        lines += ["## compute frontier (best cell per FLOP budget)", "",
                  "| FLOPs | cell | params | images | error |", "|---|---|---|---|---|"]
        for p in front["points"]:
            lines.append(f"| {p['flops']:.3g} | {p['cell']} | {p['params']:.3g} | {p['images']:.3g} | {p['error']:.4f} |")
        lines.append("")
    if summary.get("timing"):
        t = summary["timing"]
        lines += ["## time", "",
                  f"sweep wall {t['sweep_wall_s']:.0f} s; trials' training {t['sum_train_s']:.0f} s, trials' wall "
                  f"{t['sum_trial_wall_s']:.0f} s (overhead per trial {t['overhead_per_trial_s']:.0f} s)", ""]
    if summary["notes"]:
        lines += ["## notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "all"


def parent_summary(summary: dict[str, Any]) -> tuple[dict[str, float], str]:
    """(metrics, description) for the sweep's parent run: every fit's exponents with their 95% interval, R²,
    held-out error and flag count, the best cell's error; the description says the same in words."""
    metrics: dict[str, float] = {}
    words = [f"Scaling report of {summary['sweep']}: error = {summary['error']}, {len(summary['points'])} cells."]
    fitted = [(axis, e) for axis, entries in summary["axis_fits"].items() for e in entries]
    fitted += [("joint", e) for e in summary["joint_fits"]]
    for axis, e in fitted:
        f = e.get("fit")
        if f is None:
            words.append(f"{axis} ({e['group']}): {e.get('skipped')}.")
            continue
        prefix = f"scaling/{axis}/{_slug(e['group'])}"
        for key in ("b", "alpha", "beta"):
            if key in f and (axis == "joint") == (key != "b"):
                metrics[f"{prefix}/{key}"] = round(f[key], 4)
                if key in f.get("ci", {}):
                    metrics[f"{prefix}/{key}_ci_low"] = round(f["ci"][key][0], 4)
                    metrics[f"{prefix}/{key}_ci_high"] = round(f["ci"][key][1], 4)
        metrics[f"{prefix}/r2"] = round(f["r2"], 4)
        metrics[f"{prefix}/flags"] = len(f.get("flags", []))
        if f.get("heldout"):
            metrics[f"{prefix}/heldout_abs_error"] = round(f["heldout"]["abs_error"], 4)
        exps = ", ".join(f"{k} = {f[k]:.2f}" for k in ("b", "alpha", "beta") if k in f and (axis == "joint") == (k != "b"))
        words.append(f"{axis} ({e['group']}): {exps}" + (f" [flags: {_flags(f)}]." if f.get("flags") else "."))
    if summary["points"]:
        best = min(summary["points"], key=lambda p: p["error"])
        metrics["sweep/best_error"] = round(best["error"], 4)
        words.append(f"Best cell: {best['cell']} (error {best['error']:.4f}, run {best['run_id']}).")
    return metrics, " ".join(words)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def build_report(uri: str, sweep: str, metric: str | None = None, bootstrap: int | None = None,
                 out_dir: str | Path | None = None, log: bool = True, echo=print, seed: int = 0) -> dict[str, Any]:
    """Fit, plot and summarise the sweep (parent run id or sweep name); returns the JSON summary."""
    from replab.platform import tracking

    parent = resolve_parent(uri, sweep)
    params, tags = parent.data.params, parent.data.tags
    name = tags.get(SWEEP_TAG, sweep)
    metric = metric or params.get("sweep.metric", "eval/knn_top1")
    if metric not in ("eval/knn_top1", "eval/linear_top1", "train/epoch_loss"):
        raise ConfigError(f"--metric: {metric!r} is not valid; choose one of: eval/knn_top1, eval/linear_top1, "
                          "train/epoch_loss")
    if bootstrap is None:  # the sweep's own setting, else the default
        bootstrap = int(params.get("sweep.bootstrap", 200))
    axes = list(json.loads(params.get("sweep.axes", "{}")))
    trials = trial_table(uri, parent.info.run_id)
    points, notes = collect_points(trials, metric, axes)
    fits = axis_fits(points, axes, bootstrap, seed)
    joints = joint_fits(points, axes, bootstrap, seed)
    front = frontier(points)
    finished = [t for t in trials if t["status"] == "FINISHED"]
    timing = None
    wall = parent.data.metrics.get("sweep/wall_time_s")
    if wall and finished:
        train_s = sum(t["metrics"].get("compute/train_time_s", 0.0) for t in finished)
        trial_wall = sum(t["metrics"].get("compute/wall_time_s", 0.0) for t in finished)
        timing = {"sweep_wall_s": wall, "sum_train_s": train_s, "sum_trial_wall_s": trial_wall,
                  "overhead_per_trial_s": (trial_wall - train_s) / len(finished), "trials": len(finished)}
    summary = {
        "sweep": name, "parent_run_id": parent.info.run_id, "metric": metric,
        "error": f"1 - {metric}" if metric.startswith("eval/") else metric, "bootstrap": bootstrap, "axes": axes,
        "points": [p.__dict__ for p in points], "axis_fits": fits, "joint_fits": joints, "frontier": front,
        "timing": timing, "notes": notes,
    }
    if out_dir is None:
        folder = tags.get("replab.sweep_dir")
        out_dir = Path(folder) / "report" if folder and Path(folder).is_dir() else Path(tempfile.mkdtemp(prefix="replab-report-"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_files = plots.draw(out / "plots", fits, joints, front, metric)
    clean = _strip(summary)
    clean["plots"] = [str(p.relative_to(out)) for p in plot_files]
    (out / "scaling_fits.json").write_text(json.dumps(clean, indent=2, default=str))
    text = markdown(clean)
    (out / "report.md").write_text(text)
    run_url = f"/#/experiments/{parent.info.experiment_id}/runs/{{run_id}}"
    (out / "report.html").write_text(html_report.render(clean, fits, run_url))
    if log:
        logger = tracking.RunLogger(uri, parent.info.run_id)
        for name in ("scaling_fits.json", "report.md", "report.html"):
            retry(logger.artifact, out / name, "report")
        for p in plot_files:
            retry(logger.artifact, p, "report/plots")
        metrics, description = parent_summary(clean)
        update_parent(uri, parent.info.run_id, metrics=metrics, note=description)
    echo(text)
    echo(f"report files: {out}")
    clean["out_dir"] = str(out)
    return clean
