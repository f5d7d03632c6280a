"""Few-label and open-set evaluation of any replab encoder.

Closed-set accuracy is measured on the test images of the *known* classes; open-set detection by the AUROC
of a "known" score between known-class test images (positives) and unknown-class test images, and against
images of another dataset never seen in training (``ood``: e.g. Tiny-ImageNet val against CIFAR-10 test).

Frozen encoder (:func:`evaluate_openset`): L2-normalised encoder features; the soft nearest-neighbour
classifier over the labeled set (PAWS's SNN, Assran et al. 2021: p(y|x) = sum_i softmax_i(cos(x, x_i)/tau)
y_i, tau 0.1) gives the prediction. Known scores: the maximum cosine similarity to the labeled set
(``auroc``; RoPAWS's in-domain prior exp((s - 1)/prior_tau) is a monotone function of it, so it has the
same AUROC) and the maximum SNN probability (``auroc_msp``).

Fine-tuning (:func:`evaluate_finetune`): a copy of the encoder plus a linear head trained end-to-end on the
labeled set only (k labels per class, or a label fraction such as 1% / 10%) for a few epochs, SGD with
Nesterov momentum and a cosine schedule, random-resized-crop + flip; reported: closed-set top-1 and the
max-softmax-probability AUROC.

Labels: the labeled set comes from the run's split file (:mod:`replab.platform.data.labeled`) or, for runs
without one, from ``labels_per_class`` / ``label_fraction`` given here; the known classes are
``data.known_classes`` (default all, in which case only the ``ood`` AUROC is defined).

Entry points: :func:`openset_report` (an encoder + a config -> metrics) and :func:`evaluate_openset_target`
(a run id / run name / checkpoint folder, as ``replab eval``; meant for ``replab eval --openset``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from replab.platform.data.augment import ViewSpec, make_views
from replab.platform.probes.frozen import TOP5_MIN_CLASSES, autocast_context, extract_features, topk_accuracy

log = logging.getLogger(__name__)


# ================================================================================================ scores


def auroc(positive_scores, negative_scores) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative) + P(tie) / 2.

    The Mann-Whitney statistic from average ranks (ties share their mean rank):
    AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg). NaN when either set is empty.
    """
    pos = np.asarray(torch.as_tensor(positive_scores).detach().cpu().double().numpy()).ravel()
    neg = np.asarray(torch.as_tensor(negative_scores).detach().cpu().double().numpy()).ravel()
    n_pos, n_neg = len(pos), len(neg)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average rank of each run of equal scores (1-based)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    run_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_rank, ends - starts)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@torch.no_grad()
def snn_scores(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, tau: float = 0.1,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [N, C], max_sim [N])``: the SNN class probabilities of every query over the labeled ``bank``
    (labels 0..C-1) and its maximum cosine similarity to the bank."""
    bank = F.normalize(bank.float(), dim=1)
    y = F.one_hot(bank_labels.long(), num_classes).float()
    probs, max_sim = [], []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sims = q @ bank.T
        probs.append(F.softmax(sims / tau, dim=1) @ y)
        max_sim.append(sims.max(dim=1).values)
    if not probs:
        return torch.zeros(0, num_classes), torch.zeros(0)
    return torch.cat(probs), torch.cat(max_sim)


def in_class_probability(max_sim: torch.Tensor, prior_tau: float = 0.1) -> torch.Tensor:
    """RoPAWS's in-domain prior exp((max cos to the labeled set - 1) / prior_tau), in (0, 1]."""
    return torch.exp((max_sim - 1.0) / prior_tau)


# ================================================================================================ data


@dataclass
class OpenSetData:
    """Labeled images (labels 0..C-1 over ``known_classes``), test images (original labels), optional OOD."""

    labeled_images: np.ndarray
    labeled_labels: np.ndarray
    known_classes: list[int]
    test_images: np.ndarray
    test_labels: np.ndarray
    ood_images: np.ndarray | None = None
    ood_name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.known_classes)

    @property
    def known_mask(self) -> np.ndarray:
        return np.isin(self.test_labels, self.known_classes)

    def remapped_test_labels(self) -> np.ndarray:
        """Known-class test labels as 0..C-1 (-1 for unknown classes)."""
        lut = {c: i for i, c in enumerate(self.known_classes)}
        return np.asarray([lut.get(int(y), -1) for y in self.test_labels], np.int64)


def load_openset_data(
    cfg,
    *,
    known_classes: list[int] | None = None,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    ood_dataset: str = "",
    ood_split: str = "val",
    test_limit: int | None = None,
    ood_limit: int | None = None,
) -> OpenSetData:
    """The labeled set, test split and OOD images for ``cfg`` (a RunConfig).

    Labeled set: ``labels_per_class`` / ``label_fraction`` when given, else the run's labeled split
    (``data.labels_per_class`` ...), else every known-class image of ``eval.train_split`` up to
    ``eval.bank_limit``. Test: ``eval.test_split`` (default test / val) of the dataset, ``test_limit`` (default
    ``eval.test_limit``) images. OOD: ``ood_limit`` images of ``ood_dataset``/``ood_split`` (none when empty).
    """
    from replab.platform.data import arrays, catalog, labeled

    data = cfg.data
    if known_classes is not None:
        data = dataclasses.replace(data, known_classes=list(known_classes))
    if labels_per_class is not None or label_fraction is not None:
        # a fresh split for these settings (a split folder is kept; an explicit file belongs to the run's split)
        split_file = data.split_file if data.split_file.endswith("/") else ""
        data = dataclasses.replace(data, labels_per_class=labels_per_class, label_fraction=label_fraction,
                                   split_file=split_file)
    dataset = cfg.eval.dataset or data.dataset
    common = dict(root=data.root, resolution=data.resolution, image_column=data.image_column,
                  label_column=data.label_column)
    if labeled.is_semisupervised(data) and dataset == data.dataset:
        split = labeled.labeled_split(data)
        known = split.known_classes
        images, labels = labeled.load_labeled(data, split)
    else:
        bank_images, bank_labels = arrays.load_arrays(dataset, split=cfg.eval.train_split, limit=cfg.eval.bank_limit,
                                                        seed=data.seed, **common)
        present = np.unique(bank_labels[bank_labels >= 0])
        known = [int(c) for c in (data.known_classes if data.known_classes is not None else present)]
        keep = np.isin(bank_labels, known)
        lut = {c: i for i, c in enumerate(known)}
        images = bank_images[keep]
        labels = np.asarray([lut[int(y)] for y in bank_labels[keep]], np.int64)
    test_split = cfg.eval.test_split or catalog.default_test_split(dataset, data.root)
    limit = test_limit if test_limit is not None else cfg.eval.test_limit
    test_images, test_labels = arrays.load_arrays(dataset, split=test_split, limit=limit, seed=data.seed, **common)
    ood_images = None
    if ood_dataset:
        ood_images, _ = arrays.load_arrays(ood_dataset, split=ood_split, limit=ood_limit, seed=data.seed, **common)
    return OpenSetData(images, labels, list(known), test_images, test_labels, ood_images,
                       f"{ood_dataset}/{ood_split}" if ood_dataset else "")


# ================================================================================================ frozen encoder


def _detection_metrics(prefix: str, known_score: torch.Tensor, known_mask: np.ndarray,
                       ood_score: torch.Tensor | None, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    mask = torch.as_tensor(known_mask, dtype=torch.bool)
    if mask.any() and (~mask).any():
        out[f"{prefix}{name}"] = auroc(known_score[mask], known_score[~mask])
    if ood_score is not None and len(ood_score) and mask.any():
        out[f"{prefix}ood_{name}"] = auroc(known_score[mask], ood_score)
    return out


@torch.no_grad()
def evaluate_openset(
    encoder: nn.Module,
    data: OpenSetData,
    resolution: int,
    device: torch.device,
    tau: float = 0.1,
    batch_size: int = 512,
    bf16: bool = False,
    channels_last: bool = False,
    prefix: str = "openset/",
) -> dict[str, float]:
    """Frozen-encoder SNN metrics: ``snn_top1`` (known test images), ``auroc`` (max similarity to the
    labeled set, known vs unknown test), ``auroc_msp`` (max SNN probability), and ``ood_auroc`` /
    ``ood_auroc_msp`` (known test vs the OOD images)."""
    kw = dict(resolution=resolution, device=device, batch_size=batch_size, bf16=bf16, channels_last=channels_last)
    bank = extract_features(encoder, data.labeled_images, **kw)
    test = extract_features(encoder, data.test_images, **kw)
    bank_labels = torch.as_tensor(data.labeled_labels, device=bank.device)
    probs, max_sim = snn_scores(bank, bank_labels, test, data.num_classes, tau)
    y = torch.as_tensor(data.remapped_test_labels(), device=probs.device)
    mask = y >= 0
    out: dict[str, float] = {}
    if mask.any():
        out[f"{prefix}snn_top1"] = (probs[mask].argmax(1) == y[mask]).float().mean().item()
        if data.num_classes >= TOP5_MIN_CLASSES:
            out[f"{prefix}snn_top5"] = topk_accuracy(probs[mask], y[mask], 5)
    ood_sim = ood_msp = None
    if data.ood_images is not None and len(data.ood_images):
        ood = extract_features(encoder, data.ood_images, **kw)
        ood_probs, ood_sim = snn_scores(bank, bank_labels, ood, data.num_classes, tau)
        ood_sim, ood_msp = ood_sim.cpu(), ood_probs.max(1).values.cpu()
    known = data.known_mask
    out.update(_detection_metrics(prefix, max_sim.cpu(), known, ood_sim, "auroc"))
    out.update(_detection_metrics(prefix, probs.max(1).values.cpu(), known, ood_msp, "auroc_msp"))
    out[f"{prefix}labeled"] = float(len(data.labeled_images))
    return out


# ================================================================================================ fine-tuning


def finetune(
    encoder: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    resolution: int,
    device: torch.device,
    epochs: int = 30,
    lr: float = 0.05,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    seed: int = 0,
    bf16: bool = False,
) -> nn.Module:
    """A fine-tuned copy of ``encoder`` + linear head (``nn.Sequential``) trained on the labeled images only.

    SGD (momentum 0.9, Nesterov), cosine schedule per step, ``lr`` for ``batch_size``; each batch gets a
    random resized crop (scale 0.5-1) + flip. The encoder passed in is not modified. Deterministic for a
    ``seed`` on the CPU: the head's init and the augmentations draw from torch's RNG seeded here (inside
    ``fork_rng``, so the caller's RNG state is left as it was).
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _finetune(encoder, images, labels, num_classes, resolution, device, epochs, lr, batch_size,
                         weight_decay, seed, bf16)


def _finetune(encoder, images, labels, num_classes, resolution, device, epochs, lr, batch_size, weight_decay,
              seed, bf16) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(encoder).to(device)
    for p in net.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        was = net.training
        net.eval()
        probe = torch.zeros(1, 3, resolution, resolution, device=device)
        dim = net(probe).shape[1]
        net.train(was)
    model = nn.Sequential(net, nn.Linear(dim, num_classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    n = len(images)
    batch_size = max(1, min(batch_size, n))
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    view = ViewSpec(size=resolution, scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0)
    x_all = torch.as_tensor(np.ascontiguousarray(images))
    y_all = torch.as_tensor(np.asarray(labels, np.int64))
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for s in range(steps_per_epoch):
                idx = order[s * batch_size:(s + 1) * batch_size]
                x = make_views(x_all[idx].to(device), [view])[0]
                with autocast_context(device, bf16):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y_all[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    return model


@torch.no_grad()
def _logits(model: nn.Module, images: np.ndarray, resolution: int, device, batch_size: int, bf16: bool) -> torch.Tensor:
    return extract_features(model, images, resolution, device, batch_size=batch_size, bf16=bf16)


def evaluate_finetune(
    encoder: nn.Module,
    data: OpenSetData,
    resolution: int,
    device: torch.device,
    epochs: int = 30,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    bf16: bool = False,
    eval_batch_size: int = 512,
    prefix: str = "finetune/",
) -> dict[str, float]:
    """Fine-tune on ``data``'s labeled set; ``top1`` on the known test images, ``auroc_msp`` (known vs
    unknown test) and ``ood_auroc_msp`` from the max softmax probability."""
    model = finetune(encoder, data.labeled_images, data.labeled_labels, data.num_classes, resolution, device,
                     epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, bf16=bf16)
    logits = _logits(model, data.test_images, resolution, device, eval_batch_size, bf16).cpu()
    probs = F.softmax(logits, dim=1)
    y = torch.as_tensor(data.remapped_test_labels())
    mask = y >= 0
    out: dict[str, float] = {}
    if mask.any():
        out[f"{prefix}top1"] = (probs[mask].argmax(1) == y[mask]).float().mean().item()
        if data.num_classes >= TOP5_MIN_CLASSES:
            out[f"{prefix}top5"] = topk_accuracy(probs[mask], y[mask], 5)
    ood_msp = None
    if data.ood_images is not None and len(data.ood_images):
        ood_logits = _logits(model, data.ood_images, resolution, device, eval_batch_size, bf16).cpu()
        ood_msp = F.softmax(ood_logits, dim=1).max(1).values
    out.update(_detection_metrics(prefix, probs.max(1).values, data.known_mask, ood_msp, "auroc_msp"))
    return out


# ================================================================================================ entry points


def openset_report(
    cfg,
    encoder: nn.Module,
    device: torch.device,
    *,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.05,
    known_classes: list[int] | None = None,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    ood_dataset: str = "tinyimagenet",
    ood_split: str = "val",
    test_limit: int | None = None,
    ood_limit: int | None = None,
    tau: float = 0.1,
    bf16: bool = False,
) -> dict[str, float]:
    """Open-set metrics of ``encoder`` under ``cfg`` (a RunConfig): the frozen SNN metrics (``openset/*``)
    and, when ``finetune_epochs > 0``, the fine-tuning metrics (``finetune/*``). The OOD dataset is skipped
    (with a warning) when it cannot be found."""
    from replab.platform.data.datasets import DataError

    kw = dict(known_classes=known_classes, labels_per_class=labels_per_class, label_fraction=label_fraction,
              test_limit=test_limit)
    try:
        data = load_openset_data(cfg, ood_dataset=ood_dataset, ood_split=ood_split, ood_limit=ood_limit, **kw)
    except DataError as exc:
        if not ood_dataset:
            raise
        log.warning("open-set evaluation without OOD images: %s", exc)
        data = load_openset_data(cfg, ood_dataset="", **kw)
    res = cfg.data.resolution
    out = evaluate_openset(encoder, data, res, device, tau=tau, batch_size=cfg.eval.batch_size, bf16=bf16)
    if finetune_epochs > 0:
        out.update(evaluate_finetune(encoder, data, res, device, epochs=finetune_epochs, lr=finetune_lr,
                                     seed=cfg.train.seed, bf16=bf16, eval_batch_size=cfg.eval.batch_size))
    return out


