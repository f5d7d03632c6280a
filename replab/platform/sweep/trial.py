"""One trial of a sweep: a Tune function trainable (:func:`_trial`) that runs a full replab training run.

A one-worker trial (``sweep.trial_runner`` auto or direct) runs the training loop in the trial's own process
(:mod:`replab.platform.sweep.direct`); a trial with several workers builds and fits a Ray Train ``TorchTrainer``
over :func:`replab.platform.train.ray_train.ray_train_fn` with ``RunConfig(name=<trial name>,
storage_path=<sweep dir>/train, callbacks=[TuneReportCallback()])``. Either way every epoch's report is a Tune
iteration (ASHA can stop it) and checkpoints live under ``<sweep dir>/train/<trial name>``. A direct trial whose
cell shares the sweep's decode in memory (:mod:`replab.platform.sweep.shared`) trains on its rows of it instead of
a Ray dataset. A trial that already finished (``trials/<name>/done.json``) only re-reports its result. Every trial
records its compute (encoder and total parameters, training FLOPs, images seen, training and wall time,
accelerator).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from replab.config import RunConfig, apply_override
from replab.platform.sweep.compute import accelerator, count_compute
from replab.platform.sweep.grid import cell_raw, runner_of, trial_name
from replab.platform.sweep.runs import CELL_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG, open_child, retry
from replab.validate import from_dict


def build_trial_data(cfg: RunConfig, shared=None):
    """The training data of a trial: its rows of the sweep's shared decode (``DecodedRows``) when the driver
    shared one with its cell (``shared``, a :class:`~replab.platform.sweep.shared.SharedRows`), else the same
    ``TrainData`` stream ``replab train`` builds (the dataset, or the mixed unlabeled pool of a semi-supervised /
    open-set config)."""
    if shared is not None:
        return shared.rows()
    from replab.platform.train.ray_train import build_train_data

    return build_train_data(cfg)


def json_write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def trial_config(config: dict[str, Any], plan: dict[str, Any]) -> tuple[str, RunConfig]:
    """(trial name, validated run config) of the Tune ``config`` (a cell id plus searched values)."""
    cell = plan["cells"][config["cell"]]
    searched = {k: v for k, v in config.items() if k != "cell"}
    name = trial_name(config["cell"], searched)
    raw = copy.deepcopy(cell["config"])
    for key, value in searched.items():
        apply_override(raw, key, value)
    raw["train"]["name"] = name
    raw["train"]["storage_path"] = f"{plan['dir']}/train"
    return name, from_dict(raw)


def trial_compute(folder: Path, cfg: RunConfig) -> dict[str, Any]:
    """The trial's compute count (:func:`count_compute` + accelerator), counted once and kept in its folder."""
    compute_file = folder / "compute.json"
    if compute_file.exists():
        return json.loads(compute_file.read_text())
    compute = count_compute(cfg)
    compute["accelerator"] = accelerator(cfg)
    json_write(compute_file, compute)
    return compute


def axis_values(cell: dict[str, Any], cfg: RunConfig, compute: dict[str, Any], num_rows: int) -> dict[str, Any]:
    """Each axis of the cell as a number: encoder parameters (model_size), training images (data_size),
    resolution, epochs (compute), a config key's own value; a non-numeric value (a method name) as its label."""
    measured = {"model_size": compute["params"], "data_size": num_rows, "resolution": cfg.data.resolution,
                "compute": cfg.train.epochs}
    out = {}
    for axis, value in cell["axes"].items():
        if axis in measured:
            out[axis] = measured[axis]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[axis] = value
        else:
            out[axis] = cell["labels"][axis]
    return out


def open_trial_run(cfg: RunConfig, config: dict[str, Any], plan: dict[str, Any], name: str,
                   compute: dict[str, Any], num_rows: int) -> str:
    """Open the trial's MLflow child run under the sweep's parent, named ``<axis values> <sweep>``
    (``m0.25-d5000 scaling-cifar10``): each axis a numeric ``sweep.<axis>`` param and ``sweep/<axis>`` metric
    and its label a tag, the run's flat config (tracking keys aside) and its compute count as params. Returns
    the run id."""
    cell = plan["cells"][config["cell"]]
    searched = {k: v for k, v in config.items() if k != "cell"}
    values = axis_values(cell, cfg, compute, num_rows)
    label = cell["run_label"] + (name[len(config["cell"]):] if searched else "")  # + the searched values' hash
    tags = {SWEEP_TAG: plan["name"], ROLE_TAG: "trial", TRIAL_TAG: name, CELL_TAG: config["cell"],
            "method": cfg.method.name, "backbone": cfg.model.backbone, "dataset": cfg.data.dataset,
            "compute.accelerator": compute["accelerator"], "replab.trial_runner": runner_of(plan["trial_runner"], cfg),
            **{f"sweep.{a}": cell["labels"][a] for a in cell["axes"]}}
    params = {**cfg.flat(), **{f"sweep.{a}": v for a, v in values.items()},
              **{f"sweep.search.{k}": v for k, v in searched.items()}, "compute.params": compute["params"],
              "compute.params_total": compute["params_total"], "compute.flops_per_step": compute["flops_per_step"],
              "compute.flops_counted_on": compute["counted_on"], "compute.dataset_images": num_rows}
    params = {k: v for k, v in params.items() if not k.startswith("tracking.")}
    run_id = open_child(cfg, plan["parent_run_id"], f"{label} {plan['name']}", params, tags)
    numeric = {f"sweep/{a}": v for a, v in values.items() if isinstance(v, (int, float))}
    numeric.update({f"sweep/search.{k}": v for k, v in searched.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    from replab.platform import tracking

    retry(tracking.RunLogger(cfg.tracking.uri, run_id).metrics, numeric, step=0)
    return run_id


def fit_trial(cfg: RunConfig, name: str, train_data, run_id: str, runner: str):
    """Train the trial, its epochs reported to Tune: in this process (``direct``) or on Ray Train's worker group;
    returns the run's last metrics and checkpoint (Ray's ``Result`` or a :class:`DirectResult`)."""
    if runner == "direct":
        from replab.platform.sweep.direct import fit_direct

        return fit_direct(cfg, f"{cfg.train.storage_path}/{name}", train_data, run_id)
    return fit_ray_train(cfg, name, train_data, run_id)


def fit_ray_train(cfg: RunConfig, name: str, train_data, run_id: str):
    """Fit the trial's Ray Train ``TorchTrainer``; returns Ray's ``Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from replab.platform.train.ray_train import ray_train_fn, train_logging_config

    loop_config = {"config": cell_raw(cfg), "num_rows": train_data.num_rows,
                   "shuffle_buffer": train_data.shuffle_buffer, "skip_counter": train_data.counter_name,
                   "run_id": run_id, "tracking_uri": cfg.tracking.uri}
    trainer = TorchTrainer(
        ray_train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=cfg.train.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=train_logging_config(),
            callbacks=[TuneReportCallback()],
        ),
        datasets={"train": train_data.dataset},
    )
    return trainer.fit()


def trial_summary(cfg: RunConfig, run_id: str, result, compute: dict[str, Any], num_rows: int,
                  fit_wall: float, start: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's final metrics, the ``compute/*`` summary of the trial: parameters, FLOPs, steps, images,
    training and wall time)."""
    from replab.platform import tracking

    uri = cfg.tracking.uri
    metrics = dict(result.metrics or {})
    if "step" not in metrics:  # every epoch was done before (the run finished, its trial's bookkeeping did not)
        logged = retry(tracking.client(uri).get_run, run_id).data.metrics
        metrics = {**{k: v for k, v in logged.items() if not k.startswith("compute/")}, **metrics}
    epoch_times = retry(tracking.client(uri).get_metric_history, run_id, "train/epoch_time_s")
    # each epoch's record is logged at its global step: a resumed trial that had nothing left to run still counts
    # the steps its run took before the interruption
    logged_epochs = retry(tracking.client(uri).get_metric_history, run_id, "epoch")
    steps = max([int(metrics.get("step", 0))] + [m.step for m in logged_epochs])
    summary = {
        "compute/params": compute["params"],
        "compute/params_total": compute["params_total"],
        "compute/flops_per_step": compute["flops_per_step"],
        "compute/train_flops": compute["flops_per_step"] * steps,
        "compute/steps": steps,
        "compute/images_seen": steps * cfg.train.batch_size,
        "compute/dataset_images": num_rows,
        "compute/train_time_s": sum(m.value for m in epoch_times),
        "compute/fit_wall_s": fit_wall,
        "compute/wall_time_s": time.time() - start,
    }
    return metrics, summary


def log_trial(logger, result, metrics: dict[str, Any], summary: dict[str, Any], save_encoders: bool) -> None:
    """Log the trial's summary and outputs (encoder and history, or only the eval summary) and finish its run."""
    from replab.platform.train.ray_train import log_outputs

    retry(logger.metrics, summary, step=0)  # constants of the trial: one value each, not a series
    if save_encoders:
        retry(log_outputs, logger, result, metrics)
    else:
        retry(logger.dict, {k: v for k, v in metrics.items() if k.startswith(("eval/", "train/epoch"))},
              "eval_summary.json")
    retry(logger.tag, "replab.completed", "true")
    retry(logger.tag, "replab.early_stopped", "false")
    retry(logger.finish, "FINISHED")


def _append_line(path: Path, start: float) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"time": start, "pid": os.getpid()}) + "\n")


def _trial(config: dict[str, Any], plan: dict[str, Any] | None = None) -> None:
    """The Tune function trainable: one full replab training run (in this process, or Ray Train's)."""
    import ray.tune
    from ray.data import DataContext

    from replab.platform import tracking

    start = time.time()
    DataContext.get_current().enable_progress_bars = False  # this trial drives its own Ray Data pipeline
    name, cfg = trial_config(config, plan)
    folder = Path(plan["dir"]) / "trials" / name
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "done.json"
    if done.exists():  # finished earlier: only re-report (Tune lost track of it, e.g. a driver killed mid-save)
        _append_line(folder / "rereports.log", start)
        ray.tune.report(json.loads(done.read_text())["result"])
        return
    _append_line(folder / "starts.log", start)  # one line per training attempt (a resume adds one)

    phases: dict[str, float] = {}
    mark = time.time()
    compute = trial_compute(folder, cfg)
    phases["compute_count_s"], mark = time.time() - mark, time.time()
    train_data = build_trial_data(cfg, plan["cells"][config["cell"]].get("shared"))
    phases["dataset_s"], mark = time.time() - mark, time.time()
    run_id = open_trial_run(cfg, config, plan, name, compute, train_data.num_rows)
    logger = tracking.RunLogger(cfg.tracking.uri, run_id)
    phases["mlflow_open_s"], mark = time.time() - mark, time.time()
    try:
        result = fit_trial(cfg, name, train_data, run_id, runner_of(plan["trial_runner"], cfg))
        phases["fit_s"], mark = time.time() - mark, time.time()
        metrics, summary = trial_summary(cfg, run_id, result, compute, train_data.num_rows, phases["fit_s"], start)
        log_trial(logger, result, metrics, summary, plan.get("save_encoders", True))
        phases["log_outputs_s"] = time.time() - mark
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            retry(logger.finish, status, attempts=3)
        except Exception:  # noqa: BLE001
            pass
        raise
    final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update(summary)
    final["trial_done"] = 1
    json_write(done, {"result": final, "run_id": run_id, "trial": name, "phases": phases})
    ray.tune.report(final)
