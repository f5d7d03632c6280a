"""Scaling-law fits: ``error = a * x^(-b) + c`` along one axis, ``a*N^-alpha + b*D^-beta + c`` jointly over
model size N (parameters) and data size D (images), bootstrap confidence intervals, R^2, a held-out check,
and the compute frontier with the model/data split a joint fit implies.

Pure numpy/scipy, no MLflow or Ray: :mod:`replab.platform.sweep.report` feeds it the sweep's points.

Fitting. x (and N, D) are divided by their geometric mean before fitting so the amplitude is well scaled;
parameters are reported in the original units. ``curve_fit`` (trust-region, bounded: a, b >= 0, exponents
<= 10, 0 <= c <= max(error)) starts from a small grid of exponents and offsets (amplitudes by non-negative
least squares for each) and keeps the best fit.

Honest fits. A law is not fitted to fewer distinct sizes than it has parameters (3 for one axis, 5 jointly):
:class:`NotEnoughPoints` says so instead of an exponent. A fit is *flagged* (``fit.flags``, one short sentence
each) when it cannot support a claim: as many points as parameters (R^2 = 1 by construction); an exponent at
its bound 0 (error does not fall with size) or a bootstrap interval reaching 0; an exponent, or its interval's
upper end, at the bound ``EXP_MAX`` (the data hold a step, or do not pin the exponent from above); no held-out
check; a held-out error larger than the spread of the measured errors.

Bootstrap. Points are resampled with replacement ``bootstrap`` times and refitted; the confidence interval
of each parameter is the percentile interval (default 95%), and the band of the fitted curve is the
pointwise percentile band of the refitted curves. Resamples with too few distinct x are skipped.

Held-out check. The fit is repeated without the points at the largest x (for the joint fit, the largest
N*D) and its prediction there is compared with the measured error (absolute and relative error).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

EXP_MAX = 10.0
POWER_LAW_PARAMETERS = 3
JOINT_PARAMETERS = 5
FLAT_EXPONENT = 1e-3
"""An exponent below this is at its bound 0: the error does not fall with size."""
STEEP_EXPONENT = 0.99 * EXP_MAX
"""An exponent above this is at its bound EXP_MAX (the optimiser stops just short of it)."""


class NotEnoughPoints(ValueError):
    """Fewer distinct points than the law has parameters: there is nothing to fit."""


def power_law(x, a, b, c):
    return a * np.power(np.asarray(x, dtype=float), -b) + c


def joint_law(n, d, a, alpha, b, beta, c):
    return a * np.power(np.asarray(n, dtype=float), -alpha) + b * np.power(np.asarray(d, dtype=float), -beta) + c


def r_squared(y, yhat) -> float:
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    ss_res = float(np.sum((y - yhat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot <= 0:
        return 1.0 if ss_res <= 1e-24 else 0.0
    return 1.0 - ss_res / ss_tot


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


@dataclass
class PowerLawFit:
    a: float
    b: float
    c: float
    r2: float
    n_points: int
    ci: dict[str, list[float]] = field(default_factory=dict)
    """Parameter -> [low, high] bootstrap percentile interval (empty without bootstrap)."""
    bootstrap_fits: int = 0
    heldout: dict[str, float] | None = None
    x_range: list[float] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    """Why this fit cannot support a claim (empty: none found); see :func:`flags_of`."""

    def predict(self, x):
        return power_law(x, self.a, self.b, self.c)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JointFit:
    a: float
    alpha: float
    b: float
    beta: float
    c: float
    r2: float
    n_points: int
    ci: dict[str, list[float]] = field(default_factory=dict)
    bootstrap_fits: int = 0
    heldout: dict[str, float] | None = None
    flags: list[str] = field(default_factory=list)

    def predict(self, n, d):
        return joint_law(n, d, self.a, self.alpha, self.b, self.beta, self.c)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ one axis


def _fit_raw(x: np.ndarray, y: np.ndarray, starts: list[tuple[float, float]] | None = None) -> tuple[float, float, float]:
    """(a, b, c) in the original units, or raise ValueError (:class:`NotEnoughPoints` below 3 distinct x)."""
    from scipy.optimize import curve_fit, nnls

    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.any(x <= 0) or not np.all(np.isfinite(y)) or not np.all(np.isfinite(x)):
        raise ValueError("power-law fits need positive x and finite errors")
    distinct = len(np.unique(x))
    if distinct < POWER_LAW_PARAMETERS:
        raise NotEnoughPoints(f"not enough points: {distinct} distinct sizes for the {POWER_LAW_PARAMETERS} "
                              "parameters of a·x^-b + c")
    x0 = _geomean(x)
    xs = x / x0
    ymax = float(np.max(y)) if np.max(y) > 0 else 1.0
    best = None
    if starts is None:
        starts = [(b0, c0) for b0 in (0.05, 0.2, 0.5, 1.0, 2.0) for c0 in (0.0, 0.5 * max(y.min(), 0), 0.9 * max(y.min(), 0))]
    for b0, c0 in starts:
        basis = xs ** -b0
        a0 = float(nnls(basis[:, None], np.maximum(y - c0, 0.0))[0][0]) or 1e-3
        p0 = [max(a0, 1e-9), min(max(b0, 1e-6), EXP_MAX - 1e-6), min(max(c0, 0.0), ymax * (1 - 1e-9))]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                popt, _ = curve_fit(power_law, xs, y, p0=p0, bounds=([0, 0, 0], [np.inf, EXP_MAX, ymax]),
                                    method="trf", maxfev=4000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((power_law(xs, *popt) - y) ** 2))
        if best is None or sse < best[0] - 1e-15:
            best = (sse, popt)
    if best is None:
        raise ValueError("the power-law fit did not converge")
    a, b, c = (float(v) for v in best[1])
    return a * x0 ** b, b, c


def fit_power_law(x, y, *, bootstrap: int = 200, seed: int = 0, level: float = 0.95,
                  heldout: bool = True) -> PowerLawFit:
    """Fit ``y = a * x^(-b) + c`` with bootstrap intervals and a held-out check (see the module docstring)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    a, b, c = _fit_raw(x, y)
    fit = PowerLawFit(a, b, c, r_squared(y, power_law(x, a, b, c)), len(x),
                      x_range=[float(x.min()), float(x.max())])
    if bootstrap and len(np.unique(x)) >= 3:
        rng = np.random.default_rng(seed)
        starts = [(b, c), (max(b * 0.5, 0.01), c * 0.5), (b * 1.5 + 0.05, 0.0)]
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(x), len(x))
            if len(np.unique(x[idx])) < 3:
                continue
            try:
                pa, pb, pc = _fit_raw(x[idx], y[idx], starts=[(s[0], s[1]) for s in starts])
            except ValueError:
                continue
            samples.append((pa, pb, pc))
        if samples:
            arr = np.array(samples)
            lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
            fit.ci = {k: [float(np.percentile(arr[:, i], lo)), float(np.percentile(arr[:, i], hi))]
                      for i, k in enumerate(("a", "b", "c"))}
            fit.bootstrap_fits = len(samples)
            fit._samples = samples  # type: ignore[attr-defined]  # for the plot's band
    if heldout:
        fit.heldout = heldout_power_law(x, y)
    fit.flags = flags_of(y, len(np.unique(x)), POWER_LAW_PARAMETERS, {"b": fit.b}, fit.ci, fit.heldout)
    return fit


def flags_of(y, distinct: int, parameters: int, exponents: dict[str, float], ci: dict[str, list[float]],
             heldout: dict[str, float] | None) -> list[str]:
    """The reasons a fit cannot support a claim (see the module docstring), one short sentence each."""
    y = np.asarray(y, float)
    flags = []
    if distinct <= parameters:
        flags.append(f"exact: {distinct} points for {parameters} parameters (R² = 1 by construction)")
    for name, value in exponents.items():
        if value < FLAT_EXPONENT:
            flags.append(f"{name} = 0: the error does not fall with size")
        elif value > STEEP_EXPONENT:
            flags.append(f"{name} = {EXP_MAX:g}, the fit's bound: a step, not a power law")
        elif name in ci and ci[name][0] < FLAT_EXPONENT:
            flags.append(f"the 95% CI of {name} reaches 0")
        elif name in ci and ci[name][1] > STEEP_EXPONENT:
            flags.append(f"the 95% CI of {name} reaches the fit's bound {EXP_MAX:g}: not pinned above")
    if heldout is None:
        flags.append("no held-out check (too few sizes)")
    else:
        spread = float(y.max() - y.min())
        if heldout["abs_error"] > spread:
            flags.append(f"held-out error {heldout['abs_error']:.3f} exceeds the spread of the data ({spread:.3f})")
    return flags


def band(fit: PowerLawFit, xs, level: float = 0.95) -> tuple[np.ndarray, np.ndarray] | None:
    """Pointwise bootstrap band of the fitted curve at ``xs`` (None without bootstrap samples)."""
    samples = getattr(fit, "_samples", None)
    if not samples:
        return None
    xs = np.asarray(xs, float)
    curves = np.array([power_law(xs, *s) for s in samples])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return np.percentile(curves, lo, axis=0), np.percentile(curves, hi, axis=0)


def heldout_power_law(x, y) -> dict[str, float] | None:
    """Fit without the points at the largest x; predict there. None when the rest has too few distinct x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    top = x.max()
    keep = x < top
    if len(np.unique(x[keep])) < POWER_LAW_PARAMETERS:
        return None
    try:
        a, b, c = _fit_raw(x[keep], y[keep])
    except ValueError:
        return None
    actual = float(y[~keep].mean())
    predicted = float(power_law(top, a, b, c))
    return {"x": float(top), "actual": actual, "predicted": predicted, "abs_error": abs(predicted - actual),
            "rel_error": abs(predicted - actual) / abs(actual) if actual else float("inf"),
            "fit_points": int(keep.sum())}


# ------------------------------------------------------------------------------------------ joint


def _fit_joint_raw(n, d, y, starts=None) -> tuple[float, float, float, float, float]:
    from scipy.optimize import curve_fit, nnls

    n, d, y = (np.asarray(v, float) for v in (n, d, y))
    if np.any(n <= 0) or np.any(d <= 0):
        raise ValueError("joint fits need positive N and D")
    cells = len({(a, b) for a, b in zip(n, d)})
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or cells < JOINT_PARAMETERS:
        raise NotEnoughPoints(f"not enough points: {cells} distinct (N, D) cells for the {JOINT_PARAMETERS} "
                              "parameters of a·N^-alpha + b·D^-beta + c (and 2+ distinct N and D)")
    n0, d0 = _geomean(n), _geomean(d)
    ns, ds = n / n0, d / d0
    ymax = float(np.max(y)) if np.max(y) > 0 else 1.0

    def model(nd, a, alpha, b, beta, c):
        return joint_law(nd[0], nd[1], a, alpha, b, beta, c)

    if starts is None:
        starts = [(al, be, c0) for al in (0.1, 0.4, 1.0) for be in (0.1, 0.4, 1.0)
                  for c0 in (0.0, 0.5 * max(y.min(), 0))]
    best = None
    for al, be, c0 in starts:
        basis = np.stack([ns ** -al, ds ** -be], axis=1)
        coef = nnls(basis, np.maximum(y - c0, 0.0))[0]
        p0 = [max(coef[0], 1e-6), min(max(al, 1e-6), EXP_MAX - 1e-6), max(coef[1], 1e-6),
              min(max(be, 1e-6), EXP_MAX - 1e-6), min(max(c0, 0.0), ymax * (1 - 1e-9))]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                popt, _ = curve_fit(model, np.stack([ns, ds]), y, p0=p0,
                                    bounds=([0, 0, 0, 0, 0], [np.inf, EXP_MAX, np.inf, EXP_MAX, ymax]),
                                    method="trf", maxfev=6000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((model(np.stack([ns, ds]), *popt) - y) ** 2))
        if best is None or sse < best[0] - 1e-15:
            best = (sse, popt)
    if best is None:
        raise ValueError("the joint fit did not converge")
    a, alpha, b, beta, c = (float(v) for v in best[1])
    return a * n0 ** alpha, alpha, b * d0 ** beta, beta, c


def fit_joint(n, d, y, *, bootstrap: int = 200, seed: int = 0, level: float = 0.95) -> JointFit:
    """Fit ``y = a*N^-alpha + b*D^-beta + c`` with bootstrap intervals and a held-out check."""
    n, d, y = (np.asarray(v, float) for v in (n, d, y))
    params = _fit_joint_raw(n, d, y)
    fit = JointFit(*params, r2=r_squared(y, joint_law(n, d, *params)), n_points=len(y))
    if bootstrap:
        rng = np.random.default_rng(seed)
        a, alpha, b, beta, c = params
        starts = [(alpha, beta, c), (alpha * 0.5 + 0.05, beta * 0.5 + 0.05, 0.0)]
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(y), len(y))
            try:
                samples.append(_fit_joint_raw(n[idx], d[idx], y[idx], starts=starts))
            except ValueError:
                continue
        if samples:
            arr = np.array(samples)
            lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
            fit.ci = {k: [float(np.percentile(arr[:, i], lo)), float(np.percentile(arr[:, i], hi))]
                      for i, k in enumerate(("a", "alpha", "b", "beta", "c"))}
            fit.bootstrap_fits = len(samples)
    prod = n * d
    keep = prod < prod.max()
    if keep.sum() >= JOINT_PARAMETERS:
        try:
            p = _fit_joint_raw(n[keep], d[keep], y[keep])
            actual = float(y[~keep].mean())
            predicted = float(joint_law(n[~keep][0], d[~keep][0], *p))
            fit.heldout = {"n": float(n[~keep][0]), "d": float(d[~keep][0]), "actual": actual,
                           "predicted": predicted, "abs_error": abs(predicted - actual),
                           "rel_error": abs(predicted - actual) / abs(actual) if actual else float("inf"),
                           "fit_points": int(keep.sum())}
        except ValueError:
            fit.heldout = None
    fit.flags = flags_of(y, len({(a, b) for a, b in zip(n, d)}), JOINT_PARAMETERS,
                         {"alpha": fit.alpha, "beta": fit.beta}, fit.ci, fit.heldout)
    return fit


# ------------------------------------------------------------------------------------------ compute


def pareto_frontier(flops, error) -> list[int]:
    """Indices of the compute frontier: points no cheaper-or-equal point beats, sorted by FLOPs."""
    flops, error = np.asarray(flops, float), np.asarray(error, float)
    order = np.lexsort((error, flops))
    out, best = [], math.inf
    for i in order:
        if error[i] < best:
            out.append(int(i))
            best = float(error[i])
    return out


def best_per_budget(flops, error, budgets) -> list[int | None]:
    """For each FLOP budget, the index of the lowest-error point that fits in it (None if none does)."""
    flops, error = np.asarray(flops, float), np.asarray(error, float)
    out: list[int | None] = []
    for budget in budgets:
        ok = np.where(flops <= budget * (1 + 1e-9))[0]
        out.append(int(ok[np.argmin(error[ok])]) if len(ok) else None)
    return out


def flops_constant(flops, n, d) -> float:
    """k in C = k * N * D, from the measured points (median ratio)."""
    flops, n, d = (np.asarray(v, float) for v in (flops, n, d))
    return float(np.median(flops / (n * d)))


def optimal_allocation(fit: JointFit, k: float, budget: float) -> dict[str, float] | None:
    """Minimise the joint law subject to C = k*N*D: N_opt = G (C/k)^(beta/(alpha+beta)), D_opt = C/(k N_opt)."""
    a, alpha, b, beta, c = fit.a, fit.alpha, fit.b, fit.beta, fit.c
    if min(a, b, alpha, beta) <= 1e-9 or k <= 0 or budget <= 0:
        return None
    g = (alpha * a / (beta * b)) ** (1.0 / (alpha + beta))
    n_opt = g * (budget / k) ** (beta / (alpha + beta))
    d_opt = budget / (k * n_opt)
    return {"flops": float(budget), "params": float(n_opt), "images": float(d_opt),
            "predicted_error": float(joint_law(n_opt, d_opt, a, alpha, b, beta, c)),
            "params_exponent": float(beta / (alpha + beta)), "data_exponent": float(alpha / (alpha + beta))}
