"""Fast sweep trials (training in the Tune trial's own process), MLflow as the review window, a quiet terminal.

The Ray tests share one small sweep (2 cells, 8 epochs of 4 steps), run the way a user runs it: ``replab sweep`` in a
subprocess, killed once a trial has written its first checkpoint, then the same command again (it resumes and
finishes; its terminal is the one checked for chatter), then once more (a finished sweep: nothing changes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from replab.config import ConfigError
from replab.platform import tracking
from replab.platform.sweep import grid, runs
from replab.platform.sweep import spec as spec_lib
from replab.platform.sweep.callbacks import TrialPrinter

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "data": {"dataset": "cifar10", "resolution": 32, "cache": "on"},
    "model": {"backbone": "resnet18", "width": 0.125},
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


def cells_of(raw: dict) -> tuple[spec_lib.SweepSpec, list[grid.Cell]]:
    spec = spec_lib.parse_spec(raw, "/x/test.yaml")
    return spec, grid.expand(raw, spec, resolve=False)


# ------------------------------------------------------------------------------------------ no Ray


def test_run_labels_are_the_varying_axis_values_short_and_distinct():
    raw = raw_config({"axes": {"model_size": [0.25, 0.5], "data_size": [5000, 10000], "resolution": [32],
                               "method.name": ["simclr", "byol"]}})
    _spec, cells = cells_of(raw)
    labels = grid.run_labels(cells)
    assert labels[cells[0].id] == "m0.25-d5000-simclr"  # resolution has one value: it tells no run apart
    assert len(set(labels.values())) == len(cells) == 8
    assert all(len(v) <= 20 for v in labels.values())
    assert grid.short_label("model_size", "r18w0.5") == "mr18w0.5"
    assert grid.short_label("train.lr", "0.1") == "lr0.1" and grid.short_label("resolution", "64") == "r64"


def test_trial_runner_is_validated_and_auto_picks_direct_for_one_worker():
    raw = raw_config({"axes": {"data_size": [64, 128]}, "trial_runner": "fast"})
    with pytest.raises(ConfigError, match=r"sweep.trial_runner: 'fast' is not valid; choose one of: auto, direct"):
        cells_of(raw)
    raw = raw_config({"axes": {"data_size": [64, 128]}, "trial_runner": "direct"}, train={"num_workers": 2})
    with pytest.raises(ConfigError, match="sweep.trial_runner: direct trains one worker"):
        cells_of(raw)
    _spec, cells = cells_of(raw_config({"axes": {"data_size": [64, 128]}}))
    assert grid.runner_of("auto", cells[0].config) == "direct"
    two = cells_of(raw_config({"axes": {"data_size": [64, 128]}}, train={"num_workers": 2}))[1]
    assert grid.runner_of("auto", two[0].config) == "ray_train"
    assert grid.runner_of("ray_train", cells[0].config) == "ray_train"
    # the runner does not define the trials: switching it keeps the sweep's default name
    a = spec_lib.parse_spec(raw_config({"axes": {"data_size": [64]}}), "/x/t.yaml").name
    b = spec_lib.parse_spec(raw_config({"axes": {"data_size": [64]}, "trial_runner": "ray_train"}), "/x/t.yaml").name
    assert a == b


def test_parent_params_are_what_every_cell_shares_plus_the_axes_as_lists():
    spec, cells = cells_of(raw_config({"name": "p", "axes": {"model_size": [0.125, 0.25], "data_size": [64, 128]}}))
    params = runs.parent_params(spec, cells)
    assert "data.limit" not in params and "model.width" not in params  # they differ between cells
    assert params["data.resolution"] == 32 and params["method.name"] == "simclr"
    assert params["sweep.axis.model_size"] == ["w0.125", "w0.25"] and params["sweep.axis.data_size"] == ["64", "128"]
    assert not any(k.startswith("tracking.") for k in params)
    note = runs.parent_note(spec, cells)
    assert "4 cells" in note and "w0.125, w0.25" in note


def test_logged_values_are_rounded_to_what_they_mean():
    assert tracking.tidy(float(np.float32(0.14))) == 0.14
    assert tracking.tidy(12.3456789123) == 12.34568
    assert tracking.tidy(12345678.0) == 12345678.0 and tracking.tidy(7) == 7 and tracking.tidy("a") == "a"
    assert tracking._param_value(float(np.float32(0.3))) == "0.3"


def test_replab_experiments_open_on_the_model_training_runs_view(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.experiment_id(uri, "fresh")
    tags = MlflowClient(uri).get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "replab" in tags["mlflow.note.content"]


def test_a_trial_resumed_with_nothing_left_to_run_counts_the_steps_its_run_took(tmp_path):
    """The kill can land after a trial's last checkpoint and before Tune heard of it: on resume the trial restores,
    runs no step, and its result has no ``step``; the summary reads the steps from the run's logged epochs."""
    from types import SimpleNamespace

    from replab.platform.sweep.trial import trial_summary
    from replab.validate import from_dict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "resumed", "cell", {}, {})
    logger = tracking.RunLogger(uri, run_id)
    logger.metrics({"epoch": 1, "train/epoch_time_s": 1.5, "eval/knn_top1": 0.2}, step=4)
    logger.metrics({"epoch": 2, "train/epoch_time_s": 1.0, "eval/knn_top1": 0.3}, step=8)
    cfg = from_dict(raw_config({"name": "s"}, tracking={"uri": uri}))
    compute = {"params": 10, "params_total": 12, "flops_per_step": 100.0}
    metrics, summary = trial_summary(cfg, run_id, SimpleNamespace(metrics={}), compute, 256, 0.5, time.time())
    assert metrics["eval/knn_top1"] == 0.3
    assert summary["compute/steps"] == 8 and summary["compute/images_seen"] == 8 * 32
    assert summary["compute/train_flops"] == 800.0 and summary["compute/train_time_s"] == 2.5


def test_a_sweep_stopped_before_every_trial_started_is_not_marked_done(tmp_path, monkeypatch):
    """Ctrl-C: Tune's fit returns with the trials it created TERMINATED and the rest never created. The grid must
    not be marked done (a re-run would then say "already finished" with cells never trained)."""
    from types import SimpleNamespace

    from ray import tune

    from replab.platform.sweep import driver

    created = []

    class FakeTuner:
        def __init__(self, *args, **kwargs):
            created.append(self)

        can_restore = staticmethod(lambda path: False)

        def fit(self):  # 2 of 3 cells ran and finished, then the interrupt (first fit: the third never created)
            for name in ("c000", "c001"):
                (tmp_path / "trials" / name).mkdir(parents=True, exist_ok=True)
                (tmp_path / "trials" / name / "done.json").write_text("{}")
            trials = [SimpleNamespace(status="TERMINATED")] * (2 if len(created) == 1 else 3)
            return SimpleNamespace(_experiment_analysis=SimpleNamespace(trials=trials))

    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    spec = SimpleNamespace(search=None, scheduler=None, max_concurrent=1)
    cells = [SimpleNamespace(id=f"c00{i}") for i in range(3)]
    (tmp_path / "tune").mkdir()
    assert driver._fit_tune_jobs(spec, cells, str(tmp_path), None, None, False) is True
    assert not (tmp_path / "tune" / "grid.done").exists()
    # all 3 trials read TERMINATED, but the one the interrupt stopped wrote no done.json
    assert driver._fit_tune_jobs(spec, cells, str(tmp_path), None, None, False) is True
    assert not (tmp_path / "tune" / "grid.done").exists()
    (tmp_path / "trials" / "c002").mkdir()
    (tmp_path / "trials" / "c002" / "done.json").write_text("{}")
    assert driver._fit_tune_jobs(spec, cells, str(tmp_path), None, None, False) is False
    assert (tmp_path / "tune" / "grid.done").exists() and len(created) == 3


def test_trial_printer_writes_one_line_per_event_and_the_error_in_full():
    lines: list[str] = []
    p = TrialPrinter(3, {"c002-x"}, {"c000-x": "m0.125", "c001-y": "m0.25"}, "eval/knn_top1", echo=lines.append)
    p.start("c000-x")
    p.end("c000-x", {"eval/knn_top1": 0.41234})
    p.start("c001-y-s1a2b3c4d")
    p.error("c001-y-s1a2b3c4d", "Traceback (most recent call last):\n  boom\nValueError: bad\n")
    p.close()
    assert lines[0].split() == ["start", "m0.125"]
    assert lines[1].split()[:4] == ["done", "m0.125", "eval/knn_top1", "0.4123"]
    assert lines[2].split() == ["start", "m0.25-s1a2b3c4d"]
    assert lines[3].split()[:2] == ["FAILED", "m0.25-s1a2b3c4d"] and lines[4].endswith("ValueError: bad")
    assert p.count == 3


# ------------------------------------------------------------------------------------------ one decode per sweep


def test_nested_sizes_taken_out_of_one_decode_are_the_rows_each_limit_decodes(data_root, tmp_path, monkeypatch):
    """Two nested data sizes taken out of one decode (by row id) are exactly what ``load_arrays(limit=n)`` returns,
    on CIFAR-10 and on a folder with undecodable files (the skipped rows of each subset counted as its own)."""
    from replab.config import DataConfig
    from replab.platform.data import arrays

    try:
        from tests.data_fixtures import build_broken_folder
    except ImportError:  # rootdir-relative import when tests/ is not a package
        from data_fixtures import build_broken_folder  # type: ignore[no-redef]

    monkeypatch.setenv("REPLAB_CACHE_DIR", str(tmp_path / "cache"))
    cifar = DataConfig(dataset="cifar10", root=str(data_root), resolution=32, seed=3)
    big = arrays.load_rows(cifar, 1000)
    assert big.num_rows == len(big.images) == 1000 and big.total_rows == 50_000 and big.skipped() == 0
    for n in (300, 600):
        images, labels = arrays.load_arrays("cifar10", str(data_root), "train", 32, limit=n, seed=3)
        rows = big.nested(n)
        assert rows.num_rows == n and np.array_equal(rows.images, images) and np.array_equal(rows.labels, labels)
    assert big.nested(1000) is big  # the largest cell reads the decode itself, no copy
    with pytest.raises(ValueError, match="not inside"):
        big.nested(2000)
    again = arrays.load_rows(cifar, 1000)  # from the disk cache: row ids and skips come back with it
    assert np.array_equal(again.row_ids(), big.row_ids()) and np.array_equal(again.images, big.images)

    folder = DataConfig(dataset=str(build_broken_folder(tmp_path / "broken")), resolution=24, seed=1)
    whole = arrays.load_rows(folder, None)
    assert whole.num_rows == 14 and whole.skipped() == 5 and len(whole.images) == 9
    for n in (6, 10):
        stats: dict = {}
        images, labels = arrays.load_arrays(folder.dataset, "", "train", 24, limit=n, seed=1, stats=stats)
        rows = whole.nested(n)
        assert np.array_equal(rows.images, images) and np.array_equal(rows.labels, labels)
        assert rows.skipped() == stats["skipped"] and rows.num_rows == stats["rows"] == n


def test_an_array_cache_without_row_ids_is_decoded_again(tmp_path, monkeypatch):
    from replab.config import DataConfig
    from replab.platform.data import arrays

    try:
        from tests.data_fixtures import build_broken_folder
    except ImportError:
        from data_fixtures import build_broken_folder  # type: ignore[no-redef]

    monkeypatch.setenv("REPLAB_CACHE_DIR", str(tmp_path / "cache"))
    folder = DataConfig(dataset=str(build_broken_folder(tmp_path / "broken")), resolution=16)
    first = arrays.load_rows(folder, None)
    (meta,) = (tmp_path / "cache" / "arrays").glob("*/meta.json")
    old = {k: v for k, v in json.loads(meta.read_text()).items() if k not in ("total_rows", "skipped_rows")}
    meta.write_text(json.dumps(old))  # what a cache written before row ids were kept holds
    again = arrays.load_rows(folder, None)
    assert np.array_equal(again.skipped_rows, first.skipped_rows) and again.total_rows == 14
    assert "total_rows" in json.loads(meta.read_text())


def test_direct_cells_that_read_one_decode_are_grouped_and_others_keep_the_ray_data_path():
    from replab.platform.sweep import shared

    raw = raw_config({"axes": {"data_size": [64, 128, None], "resolution": [32, 64]}})
    spec, cells = cells_of(raw)
    groups = shared.share_groups(spec, cells)
    assert sorted(len(g) for g in groups.values()) == [3, 3]  # one decode per resolution, all sizes in it
    for group in groups.values():
        assert len({c.config.data.resolution for c in group}) == 1
        assert shared.largest_limit([c.config.data.limit for c in group]) is None
    assert shared.largest_limit([64, 128]) == 128
    two_workers = cells_of(raw_config({"axes": {"data_size": [64, 128]}}, train={"num_workers": 2}))
    assert shared.share_groups(*two_workers) == {}  # Ray Train trials
    uncached = cells_of(raw_config({"axes": {"data_size": [64, 128]}}, data={"cache": "off"}))
    assert shared.share_groups(*uncached) == {}
    searched = cells_of(raw_config({"axes": {"data_size": [64]}, "search": {
        "num_samples": 2, "space": {"data.seed": {"type": "choice", "values": [0, 1]}}}}))
    assert shared.share_groups(*searched) == {}  # a searched data key changes the decode per trial
    pool = cells_of(raw_config({"axes": {"data_size": [64]}}, data={"labels_per_class": 2}))
    assert shared.share_groups(*pool) == {}  # labeled splits and unlabeled pools keep today's path
    seeds = cells_of(raw_config({"axes": {"data.seed": [0, 1], "data_size": [64]}}))
    assert len(shared.share_groups(*seeds)) == 2


def test_an_in_memory_trial_reports_every_epoch_counts_skips_and_resumes_from_its_checkpoint(data_root, tmp_path,
                                                                                            monkeypatch, request):
    """:class:`ArrayTrialEnv`: each epoch reported to Tune with the decode's skip count, checkpoints kept like a
    Ray-dataset trial's, and a trial killed after an epoch's checkpoint continues from it."""
    import ray.tune
    import torch

    from replab.platform.data import arrays
    from replab.platform.sweep import direct
    from replab.platform.train.loop import train_worker
    from replab.validate import from_dict

    images, labels = arrays.load_arrays("cifar10", str(data_root), "train", 32, limit=64, seed=0)
    rows = arrays.DecodedRows(images, labels, 50_000, 64, 0, np.asarray([7, 9]))
    reported: list[dict] = []

    def report(metrics):
        reported.append(metrics)
        if killed_after and metrics["epoch"] == killed_after:
            raise KeyboardInterrupt  # the driver is killed once this epoch's checkpoint is in place

    monkeypatch.setattr(ray.tune, "report", report)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fit_direct does for one CPU: on a busy machine more threads crawl (~100x)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    cfg = from_dict(raw_config({"name": "s"}, train={"epochs": 2, "checkpoint_every": 1, "precision": "fp32"},
                               eval={"knn": False}))
    root = tmp_path / "train" / "c000"
    env = direct.trial_env(cfg, rows, str(root), "cpu")
    assert isinstance(env, direct.ArrayTrialEnv)
    order = [b["label"].tolist() for b in env.batches(0, 32)]
    assert len(order) == 2 and order == [b["label"].tolist() for b in env.batches(0, 32)]  # seeded per epoch
    assert order != [b["label"].tolist() for b in env.batches(1, 32)]

    killed_after = 1
    with pytest.raises(KeyboardInterrupt):
        train_worker(cfg, env, rows.num_rows)
    assert [r["epoch"] for r in reported] == [1] and reported[0]["data/skipped"] == 2
    killed_after = None
    loop = train_worker(cfg, direct.trial_env(cfg, rows, str(root), "cpu"), rows.num_rows)
    assert [r["epoch"] for r in reported] == [1, 2] and loop.steps == 2 * 2  # epoch 1 not redone
    assert reported[1]["data/skipped"] == 2
    assert sorted(p.name for p in root.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_000001",
                                                                        "checkpoint_epoch_000002"]


# ------------------------------------------------------------------------------------------ a real sweep

CHATTER = ("Trial status", "TrainController", "PreemptionWatcher", "TrainingReport", "tensorboard",
           "View detailed results", "INFO", "(_trial pid=", "Logical resource usage", "Configuration for experiment")


def write_yaml(tmp: Path, data_root: Path) -> Path:
    raw = raw_config(
        {"name": "fast", "max_concurrent": 2, "bootstrap": 0, "save_encoders": False,
         "axes": {"model_size": [0.125, 0.25], "data_size": [128]}},
        data={"root": str(data_root)},
        train={"storage_path": str(tmp / "runs"), "epochs": 8, "checkpoint_every": 1},
        tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "fast-test"},
    )
    path = tmp / "fast.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sweep(config: Path, tmp: Path, env: dict, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replab.cli", "sweep", str(config), "--no-report", *extra], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fast_sweep(ray_session, data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast")
    config = write_yaml(tmp, data_root)
    sweep_dir = tmp / "runs" / "sweeps" / "fast"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO)}
    log = open(tmp / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "replab.cli", "sweep", str(config), "--no-report"], cwd=tmp,
                             env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed: list[str] = []
    try:
        start = time.time()
        while time.time() - start < 600 and first.poll() is None and not killed:
            killed = sorted(p.parent.name for p in (sweep_dir / "train").glob("*/checkpoint_epoch_000001"))
            time.sleep(0.1)
        assert first.poll() is None, f"the driver ended before it could be killed:\n{(tmp / 'first.log').read_text()}"
        assert killed, "no trial wrote its first checkpoint in time"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    time.sleep(3)  # let Ray reap the dead driver's trial actors
    killed = [name for name in killed if not (sweep_dir / "trials" / name / "done.json").exists()]
    assert killed, "the trials finished before the kill took effect; lengthen them"
    resumed = _sweep(config, tmp, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    parent_before = tracking.client(uri).get_run(json.loads((sweep_dir / "plan.json").read_text())["parent_run_id"])
    again = _sweep(config, tmp, env, timeout=300)
    return {"tmp": tmp, "uri": uri, "dir": sweep_dir, "killed": killed, "resumed": resumed, "again": again,
            "parent_before": parent_before}


def _children(k):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(k["uri"])
    exp = client.get_experiment_by_name("fast-test")
    found = client.search_runs([exp.experiment_id])
    parent = [r for r in found if r.data.tags.get("replab.role") == "sweep"]
    assert len(parent) == 1
    return client, parent[0], [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]


@pytest.mark.ray
@pytest.mark.slow
def test_each_trial_has_a_child_run_with_numeric_axes_and_a_short_distinct_name(fast_sweep):
    client, parent, children = _children(fast_sweep)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    names = sorted(c.info.run_name for c in children)
    assert names == ["m0.125 fast", "m0.25 fast"]
    for c in children:
        p, m = c.data.params, c.data.metrics
        assert c.data.tags["replab.trial_runner"] == "direct"
        assert float(p["sweep.model_size"]) == m["sweep/model_size"] == m["compute/params"] > 0
        assert float(p["sweep.data_size"]) == m["sweep/data_size"] == 128
        assert c.data.tags["sweep.model_size"] in ("w0.125", "w0.25")
        assert 0.0 <= m["eval/knn_top1"] <= 1.0 and m["compute/steps"] == 32
        assert m["data/skipped"] == 0  # the SkipCounter actor's count reached the run
        assert [h.step for h in client.get_metric_history(c.info.run_id, "compute/steps")] == [0]  # one value
        assert all(len(v.split(".")[-1]) <= 7 for k, v in p.items() if k.startswith("compute.") and "." in v)
    widths = {c.data.tags["sweep.model_size"]: c.data.metrics["sweep/model_size"] for c in children}
    assert widths["w0.25"] > 3 * widths["w0.125"]
    assert "data.limit" in parent.data.params and "model.width" not in parent.data.params
    assert json.loads(parent.data.params["sweep.axis.model_size"]) == ["w0.125", "w0.25"]
    assert parent.data.tags["mlflow.note.content"].startswith("Scaling sweep `fast`")


@pytest.mark.ray
@pytest.mark.slow
def test_an_interrupted_trial_resumes_from_its_checkpoint(fast_sweep):
    client, _parent, children = _children(fast_sweep)
    trials = fast_sweep["dir"] / "trials"
    by_trial = {c.data.tags["replab.trial"]: c for c in children}
    for name in fast_sweep["killed"]:
        assert len((trials / name / "starts.log").read_text().splitlines()) == 2  # killed once, resumed once
        epochs = [h.value for h in client.get_metric_history(by_trial[name].info.run_id, "epoch")]
        assert sorted(set(epochs)) == [1, 2, 3, 4, 5, 6, 7, 8] and epochs.count(1.0) == 1, epochs  # epoch 1 not redone
        kept = sorted(p.name for p in (fast_sweep["dir"] / "train" / name).glob("checkpoint_epoch_*"))
        assert kept == ["checkpoint_epoch_000007", "checkpoint_epoch_000008"]


@pytest.mark.ray
@pytest.mark.slow
def test_the_terminal_shows_one_line_per_trial_event_and_no_chatter(fast_sweep):
    out = fast_sweep["resumed"].stdout + fast_sweep["resumed"].stderr
    lines = [line for line in out.splitlines() if line.strip()]
    for word in CHATTER:
        assert word not in out, f"{word!r} in the sweep's terminal:\n{out}"
    done = [line for line in lines if line.split()[0] == "done"]
    assert sorted(line.split()[1] for line in done) == ["m0.125", "m0.25"] or len(done) == 1  # one ran before
    assert all("eval/knn_top1" in line and line.rstrip().endswith(" s") for line in done)
    starts = [line for line in lines if line.split()[0] == "start"]
    assert len(starts) == len(done)
    assert len(lines) <= 4 + len(starts) + len(done), out  # header (3), the trials' lines, the summary
    assert "2 cell(s) train on 1 decode(s) held in memory" in lines[0]  # decoded once by the driver, shared
    assert len(set(lines)) == len(lines)  # nothing printed twice


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_of_a_finished_sweep_changes_nothing(fast_sweep):
    again = fast_sweep["again"]
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr
    client, parent, children = _children(fast_sweep)
    before = fast_sweep["parent_before"]
    assert parent.data.metrics == before.data.metrics and parent.info.end_time == before.info.end_time
    assert len(client.get_metric_history(parent.info.run_id, "sweep/wall_time_s")) == 1
    assert len(children) == 2
