"""``replab eval``: the probes of a finished run's encoder (kNN / linear, open-set), logged to its MLflow run."""

from __future__ import annotations

from typing import Any

from replab.config import ConfigError, RunConfig
from replab.platform.probes.frozen import evaluate_encoder
from replab.platform.probes.openset import openset_report
from replab.platform.train.loop import use_bf16
from replab.platform.train.ray_train import load_eval_data
from replab.platform.train.restore import load_run


def evaluate_target(target: str, cfg: RunConfig, knn: bool = True, linear: bool = True) -> dict[str, Any]:
    """kNN / linear-probe accuracy of the encoder in ``target``; logged to its run when there is one."""
    run = load_run(target, cfg)
    eval_data = load_eval_data(run.cfg)
    if eval_data is None:
        raise ConfigError(f"eval.dataset: {run.cfg.eval.dataset or run.cfg.data.dataset} has no labels to evaluate with")
    c = run.cfg.eval
    results = evaluate_encoder(
        run.method.encoder, eval_data, run.cfg.data.resolution, run.device, knn=knn, linear=linear, k=c.knn_k,
        temperature=c.knn_temperature, linear_epochs=c.linear_epochs, linear_lr=c.linear_lr,
        batch_size=c.batch_size, bf16=use_bf16(run.cfg.train.precision, run.device),
    )
    run.log(cfg, results)
    return {**results, "epoch": run.epoch, "checkpoint": run.folder}



def evaluate_openset_target(target: str, cfg, **options: Any) -> dict[str, Any]:
    """:func:`openset_report` for the encoder of a run (MLflow run id or name, run folder, or checkpoint
    folder): ``replab eval --openset``. Metrics are logged to the run as ``eval_cli/openset/*``.

    The run's own data section (dataset, known classes, labeled split) is used; ``cfg`` gives the eval and
    tracking sections and the data root. ``options`` go to :func:`openset_report`.
    """
    run = load_run(target, cfg)
    options.setdefault("bf16", use_bf16(run.cfg.train.precision, run.device))
    results: dict[str, Any] = openset_report(run.cfg, run.method.encoder, run.device, **options)
    run.log(cfg, results)
    return {**results, "epoch": run.epoch, "checkpoint": run.folder}
