"""The papers' evaluation protocols on a finished run's encoder (``replab eval RUN --transfer/--few-labels/--cluster``).

- Transfer (:func:`transfer_report`): the frozen encoder's features of each other dataset's train split
  (``eval.bank_limit`` images) and test split (``eval.test_limit``), kNN and linear probe as in
  :mod:`replab.platform.probes.frozen` (top-5 above 10 classes). Images are resized to the *run's* training
  resolution (the encoder is evaluated where it was trained). Keys ``transfer/<dataset>/<metric>``.
- Few labels (:func:`few_labels_report`; SimCLR, Chen et al. 2020, Table 7): for each label fraction f, the
  labeled split of the run's dataset with ``data.label_fraction = f`` (every class, seeded by the split seed;
  the split file is written once and then reused, :mod:`replab.platform.data.labeled`), the encoder + a linear
  head fine-tuned end to end on it (:func:`replab.platform.probes.openset.finetune`), top-1 (and top-5 above
  10 classes) on the test split. Keys ``few_labels/<100 f>pct/<metric>`` plus the ``labeled`` image count.
- Clustering (:func:`cluster_report`): k-means with k = number of classes on the frozen features of each
  dataset's test split; NMI, ARI and cluster accuracy (:mod:`replab.platform.probes.cluster`). Keys
  ``cluster/<dataset>/<metric>``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from replab.config import ConfigError
from replab.platform.data import arrays, catalog
from replab.platform.probes.cluster import cluster_metrics
from replab.platform.probes.frozen import TOP5_MIN_CLASSES, extract_features, frozen_metrics, topk_accuracy
from replab.platform.probes.openset import finetune
from replab.platform.train.loop import use_bf16
from replab.platform.train.ray_train import load_eval_data
from replab.platform.train.restore import LoadedRun

DATASETS = ("cifar10", "tinyimagenet", "imagenette128")


def parse_list(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{option}: empty; give a comma list, e.g. {','.join(DATASETS)}")
    return items


def parse_fractions(text: str) -> list[float]:
    """``"0.01,0.1"`` -> [0.01, 0.1]; each in (0, 1]."""
    out = []
    for item in parse_list(text, "--few-labels"):
        try:
            f = float(item)
        except ValueError:
            raise ConfigError(f"--few-labels: {item!r} is not a number; give fractions such as 0.01,0.1") from None
        if not 0 < f <= 1:
            raise ConfigError(f"--few-labels: {item} is not valid; expected label fractions in (0, 1]")
        out.append(f)
    return out


def _features_kw(run: LoadedRun) -> dict[str, Any]:
    return dict(resolution=run.cfg.data.resolution, device=run.device, batch_size=run.cfg.eval.batch_size,
                bf16=use_bf16(run.cfg.train.precision, run.device))


def _dataset_cfg(run: LoadedRun, dataset: str):
    return dataclasses.replace(run.cfg, eval=dataclasses.replace(run.cfg.eval, dataset=dataset))


def transfer_report(run: LoadedRun, datasets: list[str], knn: bool = True, linear: bool = True) -> dict[str, float]:
    """Frozen kNN / linear probe of ``run``'s encoder on each of ``datasets`` (module doc)."""
    c = run.cfg.eval
    out: dict[str, float] = {}
    for dataset in datasets:
        data = load_eval_data(_dataset_cfg(run, dataset))
        if data is None:
            raise ConfigError(f"--transfer: {dataset} has no labels to evaluate with")
        kw = _features_kw(run)
        bank = extract_features(run.method.encoder, data.bank_images, **kw)
        test = extract_features(run.method.encoder, data.test_images, **kw)
        out.update(frozen_metrics(
            bank, torch.as_tensor(data.bank_labels, device=bank.device).long(), test,
            torch.as_tensor(data.test_labels, device=test.device).long(), data.num_classes, knn=knn, linear=linear,
            k=c.knn_k, temperature=c.knn_temperature, linear_epochs=c.linear_epochs, linear_lr=c.linear_lr,
            prefix=f"transfer/{dataset}/"))
    return out


def cluster_report(run: LoadedRun, datasets: list[str], seed: int = 0) -> dict[str, float]:
    """k-means (k = classes) on the frozen features of each dataset's test split; NMI, ARI, accuracy."""
    out: dict[str, float] = {}
    for dataset in datasets:
        data = _test_split(run, dataset)
        feats = extract_features(run.method.encoder, data[0], **_features_kw(run))
        out.update(cluster_metrics(feats, data[1], data[2], seed=seed, prefix=f"cluster/{dataset}/"))
    return out


def _test_split(run: LoadedRun, dataset: str) -> tuple[np.ndarray, np.ndarray, int]:
    d = run.cfg.data
    info = catalog.dataset_info(dataset, d.root)
    if not info.num_classes:
        raise ConfigError(f"{dataset} has no labels to evaluate with")
    split = run.cfg.eval.test_split or catalog.default_test_split(dataset, d.root)
    images, labels = arrays.load_arrays(dataset, d.root, split, d.resolution, limit=run.cfg.eval.test_limit,
                                        seed=d.seed, image_column=d.image_column, label_column=d.label_column)
    return images, labels, int(info.num_classes)


def fraction_name(fraction: float) -> str:
    """0.01 -> ``1pct`` (MLflow metric names allow no ``%``)."""
    return f"{fraction * 100:g}pct"


def few_labels_report(run: LoadedRun, fractions: list[float], epochs: int | None = None, lr: float = 0.05,
                      batch_size: int = 64, seed: int | None = None) -> dict[str, float]:
    """Fine-tune end to end on each label fraction of the run's dataset (module doc).

    ``epochs`` None: SimCLR's 60 epochs for fractions up to 1 %, 30 above. ``seed`` (default the run's
    ``data.split_seed``) seeds the split and the fine-tuning.
    """
    from replab.platform.data import labeled

    dataset = run.cfg.eval.dataset or run.cfg.data.dataset
    seed = run.cfg.data.split_seed if seed is None else seed
    test_images, test_labels, num_classes = _test_split(run, dataset)
    out: dict[str, float] = {}
    for fraction in fractions:
        folder = run.cfg.data.split_file if run.cfg.data.split_file.endswith("/") else ""
        data = dataclasses.replace(run.cfg.data, dataset=dataset, split=run.cfg.eval.train_split,
                                   labels_per_class=None, label_fraction=fraction, known_classes=None,
                                   split_file=folder, split_seed=seed)
        split = labeled.labeled_split(data)
        if split.known_classes != list(range(num_classes)):
            raise ConfigError(f"--few-labels: {dataset} labels are not 0..{num_classes - 1}")
        images, labels = labeled.load_labeled(data, split)
        n_epochs = epochs if epochs is not None else (60 if fraction <= 0.01 else 30)
        kw = _features_kw(run)
        model = finetune(run.method.encoder, images, labels, num_classes, kw["resolution"], run.device,
                         epochs=n_epochs, lr=lr, batch_size=batch_size, seed=seed, bf16=kw["bf16"])
        logits = extract_features(model, test_images, **kw).cpu()
        y = torch.as_tensor(test_labels).long()
        name = f"few_labels/{fraction_name(fraction)}/"
        out[f"{name}top1"] = topk_accuracy(logits, y, 1)
        if num_classes >= TOP5_MIN_CLASSES:
            out[f"{name}top5"] = topk_accuracy(logits, y, 5)
        out[f"{name}labeled"] = float(len(images))
        out[f"{name}epochs"] = float(n_epochs)
    return out


def format_table(results: dict[str, Any]) -> str:
    """One table per section (the first part of the key): rows ``section/x`` x columns ``metric`` from keys
    ``section/x/metric`` (floats; accuracies as fractions in [0, 1])."""
    sections: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in results.items():
        if isinstance(value, float) and key.count("/") >= 2:
            row, col = key.rsplit("/", 1)
            sections.setdefault(row.split("/", 1)[0], {}).setdefault(row, {})[col] = value
    blocks = []
    for rows in sections.values():
        cols: list[str] = []
        for r in rows.values():
            cols += [c for c in r if c not in cols]
        width = max(len(r) for r in rows)
        lines = [f"{'':<{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
        for row, vals in rows.items():
            lines.append(f"{row:<{width}}  " + "  ".join(f"{_cell(vals.get(c), c):>11}" for c in cols))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


COUNTS = ("labeled", "epochs", "inertia")


def _cell(value: float | None, column: str) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan"
    return f"{value:.0f}" if column in COUNTS else f"{value:.4f}"
