"""Scaling-law fits (replab.platform.scaling) and the sweep report (replab.platform.report), without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from replab.platform.sweep import fits as scaling


def noisy_power_law(x, a, b, c, noise, seed=0):
    rng = np.random.default_rng(seed)
    return scaling.power_law(x, a, b, c) * (1 + noise * rng.standard_normal(len(x)))


def test_power_law_fit_recovers_known_parameters_with_intervals_and_heldout():
    a, b, c = 40.0, 0.4, 0.15
    x = np.geomspace(1e4, 1e7, 8)
    y = noisy_power_law(x, a, b, c, noise=0.01, seed=3)
    fit = scaling.fit_power_law(x, y, bootstrap=100, seed=0)
    assert fit.b == pytest.approx(b, abs=0.06)
    assert fit.c == pytest.approx(c, abs=0.03)
    assert fit.predict(1e5) == pytest.approx(scaling.power_law(1e5, a, b, c), rel=0.03)
    assert fit.r2 > 0.99 and fit.n_points == 8 and fit.flags == []
    assert fit.bootstrap_fits >= 80
    for key, true in (("b", b), ("c", c)):
        lo, hi = fit.ci[key]
        assert lo <= true <= hi, (key, fit.ci[key])
        assert hi - lo < 0.5
    # held out: fitted without the largest x, its prediction there is close to the measurement
    assert fit.heldout["x"] == pytest.approx(1e7)
    assert fit.heldout["fit_points"] == 7
    assert fit.heldout["rel_error"] < 0.05


def test_power_law_fit_fails_on_noise_it_cannot_explain():
    """The fit is not a rubber stamp: a non-monotone cloud gets a poor R^2 and a wide interval."""
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e6, 10)
    y = 0.5 + 0.2 * rng.standard_normal(10) ** 2
    fit = scaling.fit_power_law(x, y, bootstrap=50)
    assert fit.r2 < 0.6


def test_too_few_points_are_not_a_fit_and_bad_input_is_refused():
    with pytest.raises(scaling.NotEnoughPoints, match="not enough points: 2 distinct sizes"):
        scaling.fit_power_law([100, 400], [0.8, 0.4], bootstrap=50)
    with pytest.raises(scaling.NotEnoughPoints):
        scaling.fit_power_law([100, 100, 400, 400], [0.5, 0.4, 0.3, 0.3])
    with pytest.raises(ValueError):
        scaling.fit_power_law([-1, 10, 100], [0.5, 0.4, 0.3])
    with pytest.raises(scaling.NotEnoughPoints, match="distinct \\(N, D\\) cells"):
        scaling.fit_joint([1e5, 1e5, 1e6, 1e6], [1e3, 1e4, 1e3, 1e4], [0.5, 0.4, 0.4, 0.3], bootstrap=0)


def test_fits_that_cannot_support_a_claim_are_flagged():
    exact = scaling.fit_power_law([100, 400, 1600], [0.8, 0.5, 0.4], bootstrap=20)
    assert any(f.startswith("exact: 3 points for 3 parameters") for f in exact.flags)
    assert "no held-out check (too few sizes)" in exact.flags
    rising = scaling.fit_power_law([100, 200, 400, 800, 1600], [0.40, 0.42, 0.45, 0.47, 0.50], bootstrap=20)
    assert rising.b < scaling.FLAT_EXPONENT and "b = 0: the error does not fall with size" in rising.flags
    rng = np.random.default_rng(1)
    x = np.geomspace(100, 1e5, 6)
    noisy = scaling.fit_power_law(x, 0.3 + 0.05 * rng.standard_normal(6), bootstrap=50)
    assert noisy.flags  # noise around a constant: flat, a CI reaching 0 or a held-out miss, never a clean law
    clean = scaling.fit_power_law(x, scaling.power_law(x, 2.0, 0.4, 0.1), bootstrap=50)
    assert clean.flags == []
    # a drop between the first two sizes and flat after: the exponent runs to its bound, which says nothing
    step = scaling.fit_power_law([100, 200, 400, 800, 1600], [0.90, 0.50, 0.50, 0.50, 0.50], bootstrap=20)
    assert step.b > scaling.STEEP_EXPONENT and "b = 10, the fit's bound: a step, not a power law" in step.flags
    unpinned = scaling.flags_of([0.9, 0.5, 0.4], 5, 3, {"b": 0.5}, {"b": [0.2, scaling.EXP_MAX]}, None)
    assert "the 95% CI of b reaches the fit's bound 10: not pinned above" in unpinned


def test_joint_fit_recovers_exponents_and_implies_a_compute_optimal_split():
    truth = dict(a=8.0, alpha=0.3, b=20.0, beta=0.45, c=0.1)
    n = np.repeat(np.geomspace(1e5, 8e6, 4), 4)
    d = np.tile(np.geomspace(1e3, 6.4e4, 4), 4)
    rng = np.random.default_rng(1)
    y = scaling.joint_law(n, d, **truth) * (1 + 0.005 * rng.standard_normal(len(n)))
    fit = scaling.fit_joint(n, d, y, bootstrap=40, seed=0)
    assert fit.alpha == pytest.approx(truth["alpha"], abs=0.08)
    assert fit.beta == pytest.approx(truth["beta"], abs=0.05)
    assert fit.c == pytest.approx(truth["c"], abs=0.04)
    assert fit.r2 > 0.99 and fit.n_points == 16
    assert fit.ci["beta"][0] <= truth["beta"] <= fit.ci["beta"][1]
    assert fit.heldout is not None and fit.heldout["rel_error"] < 0.05
    k = scaling.flops_constant(6.0 * n * d, n, d)
    assert k == pytest.approx(6.0)
    small, large = (scaling.optimal_allocation(fit, k, budget) for budget in (1e12, 1e14))
    # the optimum spends the budget: C = k N D, and a larger budget buys both more parameters and more data
    assert k * small["params"] * small["images"] == pytest.approx(1e12, rel=1e-6)
    assert large["params"] > small["params"] and large["images"] > small["images"]
    assert large["predicted_error"] < small["predicted_error"]
    # it is a minimum: moving along the budget in either direction does worse
    for factor in (0.5, 2.0):
        n_alt = small["params"] * factor
        alt = fit.predict(n_alt, 1e12 / (k * n_alt))
        assert alt > small["predicted_error"]


def test_compute_frontier_and_best_per_budget():
    flops = [1, 2, 2, 4, 8, 8]
    error = [0.9, 0.7, 0.8, 0.75, 0.5, 0.4]
    assert scaling.pareto_frontier(flops, error) == [0, 1, 5]
    assert scaling.best_per_budget(flops, error, [0.5, 1, 3, 100]) == [None, 0, 1, 5]


# ------------------------------------------------------------------------------------------ the report


def fake_sweep(uri: str, law: dict, widths, sizes, name="fake-sweep"):
    """A parent run and one finished child per cell, as replab sweep logs them, errors from a known law."""
    from mlflow.tracking import MlflowClient

    from replab.platform import tracking

    client = MlflowClient(uri)
    exp = tracking.experiment_id(uri, "scaling-test")
    axes = {"model_size": [{"backbone": "resnet18", "width": w} for w in widths], "data_size": list(sizes)}
    parent = client.create_run(exp, tags={"replab.sweep": name, "replab.role": "sweep", "mlflow.runName": name},
                               run_name=name)
    pid = parent.info.run_id
    tracking.log_params(uri, pid, {"sweep.axes": json.dumps(axes), "sweep.metric": "eval/knn_top1"})
    client.log_metric(pid, "sweep/wall_time_s", 100.0)
    rng = np.random.default_rng(0)
    i = 0
    for w in widths:
        for size in sizes:
            params = 700_000 * (w / 0.25) ** 2
            error = scaling.joint_law(params, size, **law) * (1 + 0.003 * rng.standard_normal())
            cell = f"c{i:03d}-mr18w{w:g}_d{size}"
            run = client.create_run(exp, tags={"mlflow.parentRunId": pid, "replab.trial": cell, "replab.cell": cell,
                                               "replab.sweep": name, "replab.role": "trial"}, run_name=cell)
            tracking.log_params(uri, run.info.run_id, {"sweep.model_size": f"r18w{w:g}", "sweep.data_size": str(size),
                                                       "data.resolution": "32"})
            flops = 6.0 * params * size * 10
            for key, value in {"eval/knn_top1": 1 - error, "compute/params": params, "compute/dataset_images": size,
                               "compute/train_flops": flops, "compute/train_time_s": 10.0,
                               "compute/wall_time_s": 15.0}.items():
                client.log_metric(run.info.run_id, key, value)
            client.set_terminated(run.info.run_id, "FINISHED")
            i += 1
    # a failed trial is reported as left out, not fitted
    run = client.create_run(exp, tags={"mlflow.parentRunId": pid, "replab.trial": "broken", "replab.cell": "broken"})
    client.set_terminated(run.info.run_id, "FAILED")
    client.set_terminated(pid, "FINISHED")
    return pid


LAW = dict(a=3.0, alpha=0.25, b=6.0, beta=0.35, c=0.12)


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """One MLflow store (creating a SQLite store takes seconds) holding a fake 4x4 sweep."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return uri, fake_sweep(uri, LAW, widths=[0.25, 0.5, 1.0, 2.0], sizes=[500, 1000, 2000, 4000])


def test_report_fits_the_sweep_and_writes_plots_json_and_markdown(fake_store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from replab.platform.sweep import report

    uri, pid = fake_store
    law = LAW
    out = tmp_path / "report"
    summary = report.build_report(uri, "fake-sweep", bootstrap=30, out_dir=out)

    assert summary["parent_run_id"] == pid and len(summary["points"]) == 16
    assert any("broken" in n and "FAILED" in n for n in summary["notes"])
    # per axis: one fit per value of the other axis (4 + 4)
    assert len(summary["axis_fits"]["model_size"]) == 4 and len(summary["axis_fits"]["data_size"]) == 4
    for entries in summary["axis_fits"].values():
        for e in entries:
            assert e["fit"]["r2"] > 0.95 and e["fit"]["heldout"] is not None and e["fit"]["ci"]
    joint = summary["joint_fits"][0]["fit"]
    assert joint["alpha"] == pytest.approx(law["alpha"], abs=0.08)
    assert joint["beta"] == pytest.approx(law["beta"], abs=0.08)
    assert summary["joint_fits"][0]["allocation"]
    front = summary["frontier"]["points"]
    assert front and all(p["error"] > q["error"] for p, q in zip(front, front[1:]))
    assert summary["timing"]["overhead_per_trial_s"] == pytest.approx(5.0)

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    stems = ("scaling_model_size", "scaling_data_size", "scaling_joint_0", "frontier")
    assert {"scaling_fits.json", "report.md", "report.html"} | {f"plots/{s}.{x}" for s in stems for x in ("png", "pdf")} <= files
    for png in out.glob("plots/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    for pdf in out.glob("plots/*.pdf"):
        assert pdf.read_bytes()[:5] == b"%PDF-"
    on_disk = json.loads((out / "scaling_fits.json").read_text())
    assert on_disk["joint_fits"][0]["fit"]["beta"] == pytest.approx(joint["beta"])
    text = (out / "report.md").read_text()
    assert "joint fit" in text and "compute frontier" in text and "held-out" in text
    assert "*" not in text.split("## joint fit")[1].splitlines()[0]  # no markdown italics in the heading
    assert "# Scaling report: fake-sweep" in capsys.readouterr().out  # also printed

    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(pid, "report")}
    assert {"report/scaling_fits.json", "report/report.md", "report/report.html", "report/plots"} <= logged
    assert len(client.list_artifacts(pid, "report/plots")) == 8
    parent = client.get_run(pid)
    joint_alpha = [k for k in parent.data.metrics if k.startswith("scaling/joint/") and k.endswith("/alpha")]
    assert joint_alpha and parent.data.metrics[joint_alpha[0]] == pytest.approx(round(joint["alpha"], 4))
    assert any(k.endswith("/b_ci_low") for k in parent.data.metrics) and "sweep/best_error" in parent.data.metrics
    assert "Scaling report of fake-sweep" in parent.data.tags["mlflow.note.content"]

    # by run id too, and with another error metric that the runs lack: every trial is left out, nothing fitted
    again = report.build_report(uri, pid, metric="eval/linear_top1", bootstrap=0, out_dir=tmp_path / "r2", log=False)
    assert again["points"] == [] and again["axis_fits"] == {} and again["joint_fits"] == []
    assert sum("no eval/linear_top1" in n for n in again["notes"]) == 16


def test_report_names_a_missing_sweep(fake_store):
    from replab.config import ConfigError
    from replab.platform.sweep import report

    with pytest.raises(ConfigError, match="no sweep 'nope'"):
        report.build_report(fake_store[0], "nope", log=False)


def test_html_report_is_self_contained(fake_store, tmp_path):
    import re

    from replab.platform.sweep import report

    uri, pid = fake_store
    report.build_report(uri, pid, bootstrap=10, out_dir=tmp_path, log=False)
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2 and page.count("<circle") == 32
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    fetched = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert all(not re.match(r"[a-z][a-z0-9+.-]*:|//", u) for u in fetched), fetched  # relative links to runs only
    assert "/#/experiments/" in page and "<title>" in page  # hover text and run links
