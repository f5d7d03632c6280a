"""``replab eval``: the probes of a finished run's encoder (kNN / linear, open-set), logged to its MLflow run."""

from __future__ import annotations

from typing import Any

from replab.config import ConfigError, RunConfig
from replab.platform.probes.frozen import evaluate_encoder
from replab.platform.probes.openset import openset_report
from replab.platform.train.loop import use_bf16
from replab.platform.train.ray_train import load_eval_data
from replab.platform.train.restore import load_run


def evaluate_target(target: str, cfg: RunConfig, knn: bool = True, linear: bool = True, echo=print) -> dict[str, Any]:
    """kNN / linear-probe accuracy of the encoder in ``target``; logged to its run when there is one. ``echo``
    says first what is measured on how many images (the figures differ from training's when the sizes do)."""
    run = load_run(target, cfg)
    echo(f"evaluating {run.folder} (epoch {run.epoch}, step {run.step}): loading the evaluation images...")
    eval_data = load_eval_data(run.cfg)
    if eval_data is None:
        raise ConfigError(f"eval.dataset: {run.cfg.eval.dataset or run.cfg.data.dataset} has no labels to evaluate with")
    c = run.cfg.eval
    probes = " and ".join(p for p, on in ((f"kNN (k={c.knn_k})", knn), ("a linear probe", linear)) if on)
    echo(f"{probes} on {len(eval_data.test_images)} test images, with {len(eval_data.bank_images)} training "
         f"images as the bank / probe training set")
    results = evaluate_encoder(
        run.method.encoder, eval_data, run.cfg.data.resolution, run.device, knn=knn, linear=linear, k=c.knn_k,
        temperature=c.knn_temperature, linear_epochs=c.linear_epochs, linear_lr=c.linear_lr,
        batch_size=c.batch_size, bf16=use_bf16(run.cfg.train.precision, run.device),
    )
    run.log(cfg, results)
    return {**results, "epoch": run.epoch, "checkpoint": run.folder, "test_images": len(eval_data.test_images),
            "bank_images": len(eval_data.bank_images)}



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


def evaluate_protocols_target(
    target: str,
    cfg: RunConfig,
    *,
    transfer: list[str] | None = None,
    few_labels: list[float] | None = None,
    cluster: list[str] | None = None,
    export: str = "",
    register: str = "",
    knn: bool = True,
    linear: bool = True,
    finetune_epochs: int | None = None,
    seed: int | None = None,
) -> tuple[dict[str, Any], str]:
    """The protocols of :mod:`replab.platform.evaluate.protocols` and the exports of
    :mod:`replab.platform.evaluate.export` for the encoder of ``target``; returns ``(results, table)``.

    Metrics are logged to the run as ``eval_cli/<section>/...``; ``cluster`` empty list: the run's dataset.
    """
    from replab.platform import tracking
    from replab.platform.evaluate import export as exp
    from replab.platform.evaluate import protocols

    run = load_run(target, cfg)
    results: dict[str, Any] = {}
    notes: list[str] = []
    if transfer:
        results.update(protocols.transfer_report(run, transfer, knn=knn, linear=linear))
        notes.append(f"transfer: frozen encoder; every dataset's images resized to the run's resolution, "
                     f"{run.cfg.data.resolution} px")
    if few_labels:
        results.update(protocols.few_labels_report(run, few_labels, epochs=finetune_epochs, seed=seed))
        notes.append("few_labels: encoder + linear head fine-tuned end to end on the labeled fraction (seeded split "
                     "file reused); top-1 on the test split")
    if cluster is not None:
        names = cluster or [run.cfg.eval.dataset or run.cfg.data.dataset]
        results.update(protocols.cluster_report(run, names, seed=cfg.train.seed if seed is None else seed))
        notes.append("cluster: k-means (k = classes) on frozen test-split features; NMI, ARI, Hungarian accuracy")
    run.log(cfg, results)
    if export:
        doc = exp.export_encoder(run.method.encoder, run.cfg.model.backbone, run.cfg.data.resolution, export)
        results["export"] = doc
        notes.append(f"export: {doc['format']} state_dict at {export} (+ {export}.json); load with {doc['load']}"
                     + (f" [not a torchvision architecture: {doc['reason']}]" if doc["format"] == "replab" else ""))
    if register:
        uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
        reg = exp.register_encoder(run.method.encoder, register, uri, run.run_id, cfg.tracking.experiment,
                                   run_name=f"export-{register}")
        results["register"] = reg
        notes.append(f"register: mlflow.pytorch.load_model({reg['model_uri']!r}) returns the encoder")
    table = protocols.format_table(results)
    results.update({"epoch": run.epoch, "checkpoint": run.folder})
    return results, "\n".join(filter(None, [table, *notes]))
