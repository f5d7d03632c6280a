"""``report.html``: the scaling report as one self-contained page that renders offline, also inside MLflow's
artifact viewer.

Contract: no script, style sheet, font or image is fetched from anywhere (no ``src=``/``href=`` to a network
or file address; styles are inline, figures are inline SVG). Per scaling axis one log-log panel: every cell's
best trial as a point (hover: its axis values, searched settings, error and run id; click: the run in the
MLflow UI), the fitted laws overlaid over their measured range with their 95% bands; then the fit table with
each fit's flags.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from replab.platform.sweep import fits as scaling
from replab.platform.sweep.plots import AXIS_LABEL, human, interval

WIDTH, HEIGHT, PAD = 560, 360, 56
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


class _LogScale:
    def __init__(self, lo: float, hi: float, start: float, end: float):
        lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        margin = 0.05 * (hi - lo)
        self.lo, self.hi, self.start, self.end = lo - margin, hi + margin, start, end

    def __call__(self, v: float) -> float:
        return self.start + (math.log10(v) - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self) -> list[float]:
        """1-2-5 ticks per decade; every integer multiple when that leaves fewer than three."""
        for mantissas in ((1, 2, 5), tuple(range(1, 10))):
            out = [m * 10.0 ** e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1) for m in mantissas
                   if self.lo <= math.log10(m * 10.0 ** e) <= self.hi]
            if len(out) >= 3:
                break
        return out


def _panel(axis: str, entries: list[dict], points: dict[str, dict], run_url: str, ylabel: str) -> str:
    xs_all = [x for e in entries for x in e["x"]]
    ys_all = [y for e in entries for y in e["error"]]
    if not xs_all:
        return ""
    sx = _LogScale(min(xs_all), max(xs_all), PAD, WIDTH - 12)
    sy = _LogScale(min(ys_all), max(ys_all), HEIGHT - PAD + 12, 12)
    parts = [f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'aria-label="{html.escape(axis)}" style="font:11px sans-serif">']
    for v in sx.ticks():
        x = sx(v)
        parts.append(f'<line x1="{x:.1f}" y1="12" x2="{x:.1f}" y2="{HEIGHT - PAD + 12}" stroke="#eee"/>'
                     f'<text x="{x:.1f}" y="{HEIGHT - PAD + 26}" text-anchor="middle">{human(v)}</text>')
    for v in sy.ticks():
        y = sy(v)
        parts.append(f'<line x1="{PAD}" y1="{y:.1f}" x2="{WIDTH - 12}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{PAD - 4}" y="{y + 4:.1f}" text-anchor="end">{human(v)}</text>')
    parts.append(f'<text x="{(PAD + WIDTH) / 2:.0f}" y="{HEIGHT - 8}" text-anchor="middle">'
                 f'{html.escape(AXIS_LABEL[axis])} (log)</text>'
                 f'<text transform="translate(14,{HEIGHT / 2:.0f}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(ylabel)} (log)</text>')
    for i, e in enumerate(entries):
        color = COLORS[i % len(COLORS)]
        fit_obj = e.get("_fit")
        if fit_obj is not None:
            grid = np.geomspace(min(e["x"]), max(e["x"]), 60)
            band = scaling.band(fit_obj, grid)
            if band is not None:
                poly = [(sx(g), sy(max(v, 1e-12))) for g, v in zip(grid, band[1])]
                poly += [(sx(g), sy(max(v, 1e-12))) for g, v in zip(grid[::-1], band[0][::-1])]
                parts.append(f'<polygon fill="{color}" fill-opacity="0.15" stroke="none" points="'
                             + " ".join(f"{a:.1f},{b:.1f}" for a, b in poly) + '"/>')
            line = " ".join(f"{sx(g):.1f},{sy(max(v, 1e-12)):.1f}" for g, v in zip(grid, fit_obj.predict(grid)))
            dash = ' stroke-dasharray="5,3"' if e["fit"].get("flags") else ""
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{line}"/>')
        for x, y, cell in zip(e["x"], e["error"], e["cells"]):
            p = points.get(cell, {})
            settings = ", ".join(f"{k}={v}" for k, v in {**p.get("labels", {}), **p.get("searched", {})}.items())
            tip = f"{cell}: error {y:.4f}\n{settings}\nrun {p.get('run_id', '?')}"
            dot = (f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}">'
                   f'<title>{html.escape(tip)}</title></circle>')
            if p.get("run_id") and run_url:
                dot = f'<a href="{html.escape(run_url.format(run_id=p["run_id"]))}" target="_blank">{dot}</a>'
            parts.append(dot)
    parts.append("</svg>")
    legend = "".join(f'<li><span style="color:{COLORS[i % len(COLORS)]}">&#9679;</span> {html.escape(e["short"])}'
                     + (f": b = {interval(e['fit'], 'b')}" if e.get("fit") else f" ({html.escape(e.get('skipped', ''))})")
                     + "</li>" for i, e in enumerate(entries))
    return (f"<h2>{html.escape(axis)}: error = a·x<sup>-b</sup> + c</h2>{''.join(parts)}"
            f'<ul style="list-style:none;padding-left:0">{legend}</ul>')


def _fit_rows(summary: dict[str, Any]) -> str:
    rows = []
    for axis, entries in summary["axis_fits"].items():
        for e in entries:
            f = e.get("fit")
            if f is None:
                rows.append(f"<tr><td>{html.escape(axis)}</td><td>{html.escape(e['short'])}</td><td>{len(e['x'])}</td>"
                            f"<td colspan=4>{html.escape(e.get('skipped', ''))}</td></tr>")
                continue
            h = f.get("heldout")
            held = f"{h['abs_error']:.4f}" if h else "n/a"
            rows.append(f"<tr><td>{html.escape(axis)}</td><td>{html.escape(e['short'])}</td><td>{f['n_points']}</td>"
                        f"<td>{interval(f, 'b')}</td><td>{f['r2']:.3f}</td><td>{held}</td>"
                        f"<td>{html.escape('; '.join(f.get('flags', [])) or 'none')}</td></tr>")
    for e in summary["joint_fits"]:
        f = e.get("fit")
        text = (f"α = {interval(f, 'alpha')}, β = {interval(f, 'beta')}" if f else e.get("skipped", ""))
        flags = "; ".join(f.get("flags", [])) if f else ""
        rows.append(f"<tr><td>joint</td><td>{html.escape(e['short'])}</td><td>{f['n_points'] if f else '-'}</td>"
                    f"<td>{html.escape(text)}</td><td>{f['r2']:.3f}</td><td>"
                    f"{(f['heldout'] or {}).get('abs_error', float('nan')):.4f}</td>"
                    f"<td>{html.escape(flags or 'none')}</td></tr>" if f else
                    f"<tr><td>joint</td><td>{html.escape(e['short'])}</td><td>-</td><td colspan=4>"
                    f"{html.escape(text)}</td></tr>")
    return ("<table><tr><th>axis</th><th>fixed</th><th>points</th><th>exponent [95% CI]</th><th>R²</th>"
            "<th>held-out |error|</th><th>flags</th></tr>" + "".join(rows) + "</table>")


def render(summary: dict[str, Any], fits: dict[str, list[dict]], run_url: str = "") -> str:
    """The page for a report ``summary`` (as :func:`replab.platform.sweep.report.build_report` builds it) and
    its live ``fits`` (with the fitted objects, for the curves); ``run_url`` formats ``{run_id}`` into a link."""
    points = {p["cell"]: p for p in summary["points"]}
    ylabel = summary["error"]
    panels = "".join(_panel(axis, entries, points, run_url, ylabel) for axis, entries in fits.items())
    style = ("body{font:14px sans-serif;max-width:980px;margin:24px auto;color:#222}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "h2{font-size:16px;margin-top:28px}")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in summary.get("notes", []))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Scaling report: "
            f"{html.escape(summary['sweep'])}</title><style>{style}</style></head><body>"
            f"<h1>Scaling report: {html.escape(summary['sweep'])}</h1>"
            f"<p>error = {html.escape(summary['error'])}; {len(summary['points'])} cells with results; "
            f"{summary['bootstrap']} bootstrap resamples (95% intervals). Hover a point for its settings; click "
            f"it to open its run. A dashed curve is a flagged fit.</p>{panels}<h2>fits</h2>{_fit_rows(summary)}"
            + (f"<h2>notes</h2><ul>{notes}</ul>" if notes else "") + "</body></html>")
