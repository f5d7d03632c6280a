"""replab sweep: the sweep section, the grid, compute accounting, and a real 2x2 sweep (Ray Tune over Ray Train,
two trials at once) whose driver is killed mid-run and then resumed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from replab.config import ConfigError
from replab.platform.sweep import compute, driver, grid
from replab.platform.sweep import spec as spec_lib
from replab.validate import load_config

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "data": {"dataset": "cifar10", "resolution": 32, "cache": "on"},
    "model": {"backbone": "resnet18", "width": 0.25},
    "method": {"name": "simclr", "proj_hidden_dim": 64, "proj_dim": 32},
    "train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "cpus_per_worker": 0.5, "log_every": 2},
    "eval": {"linear": False, "bank_limit": 200, "test_limit": 100, "knn_k": 20, "before_training": False},
}


def raw_config(sweep_section: dict, **sections) -> dict:
    raw = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    raw["sweep"] = sweep_section
    return raw


def expand(raw: dict) -> list[grid.Cell]:
    return grid.expand(raw, spec_lib.parse_spec(raw, "/x/test.yaml"))


# ------------------------------------------------------------------------------------------ the grid


def test_grid_is_the_product_of_the_axes_in_order():
    raw = raw_config({"axes": {
        "model_size": ["resnet18", {"backbone": "resnet34", "width": 0.5}, 0.125],
        "data_size": [100, 200],
        "method.name": ["simclr", "byol"],
        "train.lr": [0.1, 0.2],
    }})
    cells = expand(raw)
    assert len(cells) == 3 * 2 * 2 * 2
    first, last = cells[0].config, cells[-1].config
    assert (first.model.backbone, first.model.width, first.data.limit, first.method.name, first.train.lr) == \
        ("resnet18", 0.25, 100, "simclr", 0.1)  # a backbone name keeps the base width
    assert (last.model.backbone, last.model.width, last.data.limit, last.method.name, last.train.lr) == \
        ("resnet18", 0.125, 200, "byol", 0.2)  # a number is a width on the base backbone
    assert cells[1].config.train.lr == 0.2 and cells[2].config.method.name == "byol"  # last axis fastest
    mid = cells[8].config
    assert (mid.model.backbone, mid.model.width) == ("resnet34", 0.5)
    byol = [c for c in cells if c.config.method.name == "byol"]
    assert byol and all("pred_hidden_dim" in c.config.method.params for c in byol)
    assert all(c.config.method.params["proj_dim"] == 32 for c in cells)
    # ids are unique, readable and deterministic (they name the trials, so a re-run finds them)
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids) and ids == [c.id for c in expand(raw)]
    assert ids[0] == "c000-mr18_d100_method-simclr_lr-0.1"
    assert cells[5].axes == {"model_size": "resnet18", "data_size": 200, "method.name": "simclr", "train.lr": 0.2}
    # the sweep name defaults to the file stem + a hash of what defines the trials (not where they are logged)
    name = spec_lib.parse_spec(raw, "/x/test.yaml").name
    assert name.startswith("test-")
    moved = json.loads(json.dumps(raw))
    moved["tracking"] = {"uri": "sqlite:////elsewhere.db"}
    moved["sweep"]["max_concurrent"] = 4
    assert spec_lib.parse_spec(moved, "/x/test.yaml").name == name
    moved["train"]["epochs"] = 2
    assert spec_lib.parse_spec(moved, "/x/test.yaml").name != name


def test_first_class_axes_set_their_keys_and_set_overrides_nested_axes(data_root):
    raw = raw_config({"axes": {"resolution": [32, 64], "compute": [1, 3], "method.name": ["simclr", "byol"]}})
    from replab.config import apply_override, parse_override

    apply_override(raw, *parse_override("sweep.axes.method.name=[byol]"))  # what --set does to a dotted axis
    cells = expand(raw)
    assert [(c.config.data.resolution, c.config.train.epochs, c.config.method.name) for c in cells] == [
        (32, 1, "byol"), (32, 3, "byol"), (64, 1, "byol"), (64, 3, "byol")]
    apply_override(raw, *parse_override("sweep.axes.method.name=null"))  # and null drops an axis
    assert len(expand(raw)) == 4 and "method.name" not in expand(raw)[0].axes


def test_data_size_subsets_are_nested(data_root):
    from replab.platform.data import arrays, catalog, indexes

    raw = raw_config({"axes": {"data_size": [64, 160, 400]}}, data={"root": str(data_root)})
    cells = expand(raw)
    assert [c.config.data.limit for c in cells] == [64, 160, 400]
    total = catalog.dataset_info("cifar10", str(data_root)).splits["train"]
    assert total == 50000
    rows = [set(indexes.subset_indices(total, c.config.data.limit, c.config.data.seed).tolist()) for c in cells]
    assert [len(r) for r in rows] == [64, 160, 400]
    assert rows[0] < rows[1] < rows[2]
    # and the data layer really trains on those images: the 64 decoded images are among the 160
    small, _ = arrays.load_arrays("cifar10", str(data_root), "train", 32, limit=64, seed=0)
    large, _ = arrays.load_arrays("cifar10", str(data_root), "train", 32, limit=160, seed=0)
    large_keys = {img.tobytes() for img in large}
    assert len(small) == 64 and all(img.tobytes() in large_keys for img in small)


def test_data_size_sets_the_pool_size_of_a_mixed_pool():
    raw = raw_config({"axes": {"data.ood_fraction": [0.0, 0.5], "data_size": [128, 256]}},
                     data={"ood_dataset": "tinyimagenet", "ood_fraction": 0.0})
    cells = expand(raw)
    assert [(c.config.data.ood_fraction, c.config.data.unlabeled_size, c.config.data.limit) for c in cells] == [
        (0.0, 128, None), (0.0, 256, None), (0.5, 128, None), (0.5, 256, None)]


@pytest.mark.parametrize("section, message", [
    ({"axes": {"model_size": ["resnet19"]}}, "sweep.axes.model_size[0].backbone: 'resnet19' is not valid; choose one of: resnet18"),
    ({"axes": {"model_size": [{"depth": 3}]}}, "sweep.axes.model_size[0].depth: unknown key; valid keys: backbone, width"),
    ({"axes": {"size": [1, 2]}}, "sweep.axes.size: unknown axis; choose one of: model_size, data_size, resolution, compute"),
    ({"axes": {"data_size": []}}, "sweep.axes.data_size: expected a non-empty list"),
    ({"axes": {"data_size": [100, 100]}}, "sweep.axes.data_size: repeated values"),
    ({"axes": {"data_size": [100], "data.limit": [5]}}, "sweep.axes: data_size and data.limit both set data.limit"),
    ({"axes": {"compute": [0]}}, "sweep.axes.compute[0]: 0 is not valid; expected an integer >= 1"),
    ({"axes": {"train.bogus": [1]}}, "train.bogus: unknown key; valid keys: epochs"),
    ({"axes": {"method.temperature": ["hot"]}}, "method.temperature"),
    ({"axes": {"data_size": [16]}}, "data.limit: 16 is below train.batch_size=32"),
    ({"axes": {"data_size": [100]}, "speed": 1}, "sweep.speed: unknown key; valid keys: name, axes, search"),
    ({"axes": {"data_size": [100]}, "metric": "eval/top5"}, "sweep.metric: 'eval/top5' is not valid; choose one of: eval/knn_top1"),
    ({"axes": {"data_size": [100]}, "scheduler": "asha"}, "sweep.scheduler: asha stops trials within one grid cell and needs sweep.search"),
    ({"axes": {"data_size": [100]}, "scheduler": "hyperband"}, "sweep.scheduler: 'hyperband' is not valid; choose one of: asha, none"),
    ({"axes": {"data_size": [100]}, "search": {"space": {"train.lr": {"type": "normal"}}}},
     "sweep.search.space.train.lr.type: 'normal' is not valid; choose one of: uniform, loguniform, randint"),
    ({"axes": {"data_size": [100]}, "search": {"space": {"train.lr": {"type": "loguniform", "low": 1, "high": 0.1}}}},
     "sweep.search.space.train.lr.high: 0.1 is not valid; expected a number above low=1"),
    ({"axes": {"data_size": [100]}, "search": {"mode": "best", "space": {"train.lr": {"type": "uniform", "low": 0, "high": 1}}}},
     "sweep.search.mode: 'best' is not valid; choose one of: min, max"),
    ({"axes": {"data_size": [100]}, "search": {"space": {"method.nope": {"type": "uniform", "low": 0, "high": 1}}}},
     "sweep.search.space.method.nope"),
    ({"axes": {"data_size": [100]}, "search": {"space": {"train.lr": {"type": "uniform", "low": 0.1, "high": 1}}},
      "scheduler": "asha"}, "sweep.scheduler: asha compares eval/knn_top1 after every epoch; set eval.every=1"),
    ({"axes": {"data_size": [100]}, "metric": "eval/linear_top1"}, "sweep.metric: eval/linear_top1 needs eval.linear=true"),
    ({"axes": {"data_size": [100]}, "name": "has space"}, "sweep.name: 'has space' is not valid"),
])
def test_bad_sweep_sections_fail_up_front_with_one_line(section, message):
    with pytest.raises(ConfigError) as info:
        expand(raw_config(section))
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_cli_reports_a_bad_sweep_in_one_line_and_dry_run_prints_the_grid(tmp_path, capsys, data_root):
    from replab import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw_config({"axes": {"model_size": ["resnet19"]}}, data={"root": str(data_root)})))
    assert cli.main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("replab: sweep.axes.model_size[0].backbone") and "\n" not in err
    assert cli.main(["sweep", str(bad), "--set", "sweep.axes.model_size=[resnet18, resnet34]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cells" in out and "c001-mr34" in out
    assert cli.main(["sweep", str(bad), "--resume", "--set", "sweep.axes.model_size=[resnet18]",
                     "--set", f"train.storage_path={tmp_path / 'runs'}"]) == 2
    assert "--resume: no sweep" in capsys.readouterr().err


def tiny_variant(path: Path) -> list[str]:
    """The ``--set`` overrides of the tiny variant documented at the top of an experiment YAML."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "replab sweep" in line and "--set" in line:
            args = shlex.split(line.lstrip("# "))
            return [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    raise AssertionError(f"{path.name} documents no tiny variant")


@pytest.mark.parametrize("name", ["scaling_cifar10", "scaling_resolution", "scaling_uncurated"])
def test_scaling_experiments_and_their_tiny_variants_validate(name, data_root):
    path = REPO / "experiments" / f"{name}.yaml"
    load_config(path)
    raw, spec, cells = driver.plan_sweep(path, [f"data.root={data_root}"])
    assert len(cells) >= 4 and spec.name == name.replace("_", "-")
    raw, spec, cells = driver.plan_sweep(path, [f"data.root={data_root}", *tiny_variant(path)])
    assert spec.name.endswith("-tiny") and 2 <= len(cells) <= 4
    for cell in cells:
        c = cell.config
        assert c.train.epochs == 1 and not c.train.use_gpu and c.model.width <= 0.25 and not c.eval.linear
        assert (c.data.unlabeled_size if spec_lib.uses_pool(c.data) else c.data.limit) <= 256
    from replab.platform.data import sources

    for cell in cells:
        sources.resolve_config(cell.config.data)  # the dataset is there


def test_search_space_and_optuna_searcher_per_cell():
    from ray import tune

    from replab.platform.sweep.driver import _searcher, _space

    raw = raw_config({"axes": {"data_size": [100]}, "search": {"num_samples": 2, "space": {
        "train.lr": {"type": "loguniform", "low": 0.01, "high": 1.0},
        "method.temperature": {"type": "choice", "values": [0.2, 0.5]},
        "train.warmup_epochs": {"type": "randint", "low": 0, "high": 2}}}})
    spec = spec_lib.parse_spec(raw)
    assert (spec.search.metric, spec.search.mode, spec.search.num_samples) == ("eval/knn_top1", "max", 2)
    space = {"cell": "c000", **{k: _space(d) for k, d in spec.search.space.items()}}
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    searcher = _searcher(spec, seed=0)
    searcher.set_search_properties("eval/knn_top1", "max", space)
    suggested = [searcher.suggest(f"t{i}") for i in range(2)]
    for s in suggested:  # (Tune merges the constant cell id into each trial's config)
        assert 0.01 <= s["train.lr"] <= 1.0 and s["method.temperature"] in (0.2, 0.5)
        assert s["train.warmup_epochs"] in (0, 1, 2)
    assert grid.trial_name("c000", {k: v for k, v in suggested[0].items() if k != "cell"}).startswith("c000-s")
    # epochs without the metric (evaluation only at the end) are ignored, not a KeyError
    searcher.on_trial_result("t0", {"epoch": 1, "training_iteration": 1})
    searcher.on_trial_result("t0", {"epoch": 2, "training_iteration": 2, "eval/knn_top1": 0.3})
    searcher.on_trial_complete("t0", {"eval/knn_top1": 0.3})
    # every searched value is valid for every cell: checked up front
    cells = expand(raw)
    assert len(cells) == 1


# ------------------------------------------------------------------------------------------ compute


def test_training_flops_scale_with_batch_and_width_and_match_a_real_step():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from replab.platform.train.loop import build_method

    def cfg(**over):
        return load_config(None, [f"{k.replace('__', '.')}={v}" for k, v in {
            "method__proj_hidden_dim": 64, "method__proj_dim": 32, "model__width": 0.125, "train__batch_size": 16,
            **over}.items()])

    base = compute.count_compute(cfg())
    assert base["counted_on"] == "meta" and base["batch_size"] == 16
    method = build_method(cfg())
    assert base["params"] == sum(p.numel() for p in method.backbone.parameters())
    assert base["params_total"] == sum(p.numel() for p in method.parameters())
    # the meta-device count equals FlopCounterMode on a real CPU step of the same batch
    views = [torch.rand(16, 3, 32, 32) for _ in method.views()]
    with FlopCounterMode(display=False) as counter:
        method(views, None).loss.backward()
    assert base["flops_per_step"] == counter.get_total_flops()
    double = compute.count_compute(cfg(train__batch_size=32))
    assert double["flops_per_step"] == pytest.approx(2 * base["flops_per_step"], rel=0.02)
    wide = compute.count_compute(cfg(model__width=0.25))
    assert 3.0 < wide["flops_per_step"] / base["flops_per_step"] < 4.5  # convolutions grow with width^2
    assert 3.0 < wide["params"] / base["params"] < 4.5
    byol = compute.count_compute(cfg(method__name="byol"))
    assert byol["flops_per_step"] > base["flops_per_step"]  # BYOL runs the teacher too


# ------------------------------------------------------------------------------------------ a real sweep


def write_sweep_yaml(tmp: Path, data_root: Path) -> Path:
    raw = raw_config(
        {"name": "kill-resume", "max_concurrent": 2, "bootstrap": 20, "save_encoders": False,
         "axes": {"model_size": [0.125, 0.25], "data_size": [64, 128]}},
        data={"root": str(data_root)},
        train={"storage_path": str(tmp / "runs")},
        tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "sweep-test"},
    )
    path = tmp / "tiny_sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def killed_and_resumed(ray_session, data_root, tmp_path_factory):
    """Start the 2x2 sweep in a driver subprocess (on the shared Ray instance), SIGKILL it as soon as its first
    trial has finished, then resume it here with ``--resume``."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = write_sweep_yaml(tmp, data_root)
    trials = tmp / "runs" / "sweeps" / "kill-resume" / "trials"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    log = open(tmp / "first_driver.log", "w")
    start = time.time()
    first = subprocess.Popen([sys.executable, "-m", "replab.cli", "sweep", str(config)], cwd=tmp, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    done_before_kill: list[str] = []
    try:
        while time.time() - start < 900 and first.poll() is None:
            done_before_kill = sorted(p.parent.name for p in trials.glob("*/done.json"))
            if done_before_kill:
                break
            time.sleep(0.5)
        assert first.poll() is None, f"the driver ended before it could be killed:\n{(tmp / 'first_driver.log').read_text()[-3000:]}"
        assert done_before_kill, "no trial finished in time"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    killed_at = time.time()
    time.sleep(3)  # let Ray reap the dead driver's trial actors

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    after_kill = {r.data.tags.get("replab.trial"): r.info.status for r in client.search_runs([exp.experiment_id])
                  if r.data.tags.get("replab.role") == "trial"}
    resumed_start = time.time()
    result = driver.run_sweep(config, resume=True)
    resumed_wall = time.time() - resumed_start
    return {"tmp": tmp, "config": config, "uri": uri, "result": result, "done_before_kill": done_before_kill, "trials": trials,
            "after_kill": after_kill, "first_wall": killed_at - start, "resumed_wall": resumed_wall}


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_logs_a_parent_and_one_finished_child_per_cell(killed_and_resumed):
    from mlflow.tracking import MlflowClient

    k = killed_and_resumed
    result = k["result"]
    assert not result.interrupted and result.failed == 0
    client = MlflowClient(k["uri"])
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("replab.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["replab.sweep"] == "kill-resume"
    assert parent.data.metrics["sweep/trials_finished"] == 4
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    assert all(c.info.status == "FINISHED" for c in children)
    cells = {(c.data.tags["sweep.model_size"], c.data.tags["sweep.data_size"]) for c in children}
    assert cells == {("w0.125", "64"), ("w0.125", "128"), ("w0.25", "64"), ("w0.25", "128")}
    for c in children:
        m, p = c.data.metrics, c.data.params
        assert float(p["sweep.model_size"]) == m["compute/params"]  # axis labels as tags, numbers as params
        assert 0.0 <= m["eval/knn_top1"] <= 1.0 and m["train/epoch_loss"] > 0
        steps = int(p["data.limit"]) // 32
        assert m["compute/steps"] == steps and m["compute/images_seen"] == steps * 32
        assert m["compute/dataset_images"] == int(p["data.limit"])
        assert m["compute/train_flops"] == pytest.approx(m["compute/flops_per_step"] * steps)
        assert m["compute/params"] == float(p["compute.params"]) > 0
        assert m["compute/wall_time_s"] > m["compute/train_time_s"] > 0
        assert "CPU" in c.data.tags["compute.accelerator"]
        # the per-epoch history is in the child run (logged by rank 0 by run id)
        assert [h.value for h in client.get_metric_history(c.info.run_id, "train/epoch_loss")]
        assert len(client.get_metric_history(c.info.run_id, "train/loss")) >= steps // 2
    widths = {c.data.tags["sweep.model_size"]: c.data.metrics["compute/params"] for c in children}
    assert widths["w0.25"] > 3 * widths["w0.125"]
    # (whether two trials overlap in time depends on the load now that a direct trial trains from memory in a
    # few seconds; concurrency itself is Tune's max_concurrent_trials, not asserted here)
    # the report ran at the end: fits, plots and the JSON are artifacts of the parent
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/scaling_fits.json", "report/report.md", "report/plots"} <= logged
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "report/plots")}
    assert {"report/plots/scaling_model_size.png", "report/plots/scaling_data_size.png",
            "report/plots/frontier.png"} <= plots
    fits = result.report["axis_fits"]  # 2 sizes per axis: not a fit of a 3-parameter law, and the report says so
    assert len(fits["model_size"]) == 2
    assert all("fit" not in e and e["skipped"].startswith("not enough points: 2 distinct sizes")
               for e in fits["model_size"])
    print(f"\nsweep: first driver {k['first_wall']:.0f} s until killed, resumed {k['resumed_wall']:.0f} s; "
          f"trials' training {sum(c.data.metrics['compute/train_time_s'] for c in children):.0f} s, "
          f"trials' wall {sum(c.data.metrics['compute/wall_time_s'] for c in children):.0f} s")


@pytest.mark.ray
@pytest.mark.slow
def test_resumed_sweep_does_not_rerun_finished_trials(killed_and_resumed):
    from mlflow.tracking import MlflowClient

    k = killed_and_resumed
    trials = k["trials"]
    # the driver was killed while trials were unfinished, and those children were left RUNNING by the kill
    assert len(k["done_before_kill"]) < 4
    assert any(status == "RUNNING" for name, status in k["after_kill"].items() if name not in k["done_before_kill"]) \
        or len(k["after_kill"]) < 4
    for name in k["done_before_kill"]:
        assert k["after_kill"][name] == "FINISHED"
        starts = (trials / name / "starts.log").read_text().splitlines()
        assert len(starts) == 1, f"{name} trained again after the resume"
    # every trial finished exactly once; unfinished ones trained again (in the same MLflow run)
    names = sorted(p.name for p in trials.iterdir())
    assert len(names) == 4 and all((trials / n / "done.json").exists() for n in names)
    client = MlflowClient(k["uri"])
    for name in k["done_before_kill"]:
        run_id = json.loads((trials / name / "done.json").read_text())["run_id"]
        assert [h.value for h in client.get_metric_history(run_id, "epoch")] == [1.0]
    # a second resume has nothing left to run: no trial trains again
    before = {n: len((trials / n / "starts.log").read_text().splitlines()) for n in names}
    again = driver.run_sweep(k["config"], resume=True, report=False)
    assert not again.interrupted and len(again.trials) == 4
    assert {n: len((trials / n / "starts.log").read_text().splitlines()) for n in names} == before
    assert np.all([t["status"] == "FINISHED" for t in again.trials])
