"""Evaluation of frozen encoders: weighted kNN and a linear probe on extracted features.

- Features: the encoder on the whole image (resized to the training resolution, ImageNet-normalised), in
  large batches, under bf16 autocast where training used it; float32 out.
- kNN (Wu et al. 2018, as used by DINO and the lightly benchmark): cosine similarity s between L2-normalised
  test and bank features, the k most similar bank images vote for their class with weight exp(s / T);
  prediction = argmax of the summed votes. k = 200, T = 0.1 by default.
- Linear probe: a linear classifier on standardised frozen features, trained with SGD + cosine schedule;
  top-1 on the test features.
- Top-5 (datasets with more than 10 classes, as the papers report): the true class is among the 5 highest
  summed kNN votes / probe logits.
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from replab.platform.data.augment import normalize, resize, to_float
from replab.platform.progress import bar


@dataclass
class EvalData:
    """Decoded evaluation images: a labeled bank (train split) and a test split, uint8 [N, R, R, 3]."""

    bank_images: np.ndarray
    bank_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int


def autocast_context(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: np.ndarray | torch.Tensor,
    resolution: int,
    device: torch.device,
    batch_size: int = 512,
    bf16: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """``[N, D]`` float32 features of uint8 images ``[N, H, W, 3]`` (encoder in eval mode, restored after)."""
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for start in bar(range(0, len(images), batch_size), desc="features", unit="batch"):
            chunk = torch.as_tensor(images[start : start + batch_size]).to(device, non_blocking=True)
            x = normalize(resize(to_float(chunk), resolution))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, bf16):
                feats = encoder(x)
            out.append(feats.float())
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


TOP5_MIN_CLASSES = 11
"""Top-5 is reported for datasets with more than 10 classes."""


def knn_votes(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int = 200,
    temperature: float = 0.1, chunk: int = 1024,
) -> torch.Tensor:
    """``[N, C]`` summed votes sum_{i in top-k} exp(cos(q, b_i) / T) [y_i = c] (features L2-normalised here)."""
    bank = F.normalize(bank, dim=1)
    queries = F.normalize(queries, dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ bank.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_predict(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int = 200,
    temperature: float = 0.1, chunk: int = 1024,
) -> torch.Tensor:
    """Class predictions of a temperature-weighted kNN vote (argmax of :func:`knn_votes`)."""
    return knn_votes(bank, bank_labels, queries, num_classes, k, temperature, chunk).argmax(dim=1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (ties broken by ``torch.topk``)."""
    if len(labels) == 0:
        return float("nan")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels.view(-1, 1)).any(dim=1).float().mean().item()


def knn_top1(bank, bank_labels, queries, query_labels, num_classes, k=200, temperature=0.1) -> float:
    preds = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return (preds == query_labels).float().mean().item()


def linear_probe_top1(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    num_classes: int, epochs: int = 30, lr: float = 0.1, batch_size: int = 256, seed: int = 0,
) -> float:
    """Top-1 of a linear classifier trained on standardised frozen features (SGD, momentum 0.9, cosine)."""
    logits = linear_probe_logits(train_feats, train_labels, test_feats, num_classes, epochs, lr, batch_size, seed)
    return (logits.argmax(1) == test_labels).float().mean().item()


def linear_probe_logits(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
    epochs: int = 30, lr: float = 0.1, batch_size: int = 256, seed: int = 0,
) -> torch.Tensor:
    """``[N_test, C]`` logits of the linear probe of :func:`linear_probe_top1` on ``test_feats``."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_feats.mean(0, keepdim=True), train_feats.std(0, keepdim=True) + 1e-6
    xs, xt = (train_feats - mean) / std, (test_feats - mean) / std
    head = nn.Linear(xs.shape[1], num_classes).to(xs.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = max(1, (len(xs) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(xs), generator=generator).to(xs.device)
            for start in range(0, len(xs), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(head(xs[idx]), train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return head(xt)


def evaluate_encoder(
    encoder: nn.Module,
    data: EvalData,
    resolution: int,
    device: torch.device,
    knn: bool = True,
    linear: bool = True,
    k: int = 200,
    temperature: float = 0.1,
    linear_epochs: int = 30,
    linear_lr: float = 0.1,
    batch_size: int = 512,
    bf16: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """``eval/knn_top1`` and ``eval/linear_top1`` (fractions) of a frozen encoder, and ``eval/knn_top5`` /
    ``eval/linear_top5`` when the dataset has more than 10 classes."""
    if not (knn or linear):
        return {}
    kw = dict(resolution=resolution, device=device, batch_size=batch_size, bf16=bf16, channels_last=channels_last)
    bank = extract_features(encoder, data.bank_images, **kw)
    test = extract_features(encoder, data.test_images, **kw)
    bank_labels = torch.as_tensor(data.bank_labels, device=device).long()
    test_labels = torch.as_tensor(data.test_labels, device=device).long()
    return frozen_metrics(bank, bank_labels, test, test_labels, data.num_classes, knn=knn, linear=linear, k=k,
                          temperature=temperature, linear_epochs=linear_epochs, linear_lr=linear_lr)


def frozen_metrics(
    bank: torch.Tensor, bank_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
    knn: bool = True, linear: bool = True, k: int = 200, temperature: float = 0.1, linear_epochs: int = 30,
    linear_lr: float = 0.1, prefix: str = "eval/",
) -> dict[str, float]:
    """kNN / linear-probe ``<prefix>{knn,linear}_top1`` (+ ``_top5`` above 10 classes) from extracted features."""
    results: dict[str, float] = {}
    top5 = num_classes >= TOP5_MIN_CLASSES
    if knn:
        votes = knn_votes(bank, bank_labels, test, num_classes, k, temperature)
        results[f"{prefix}knn_top1"] = (votes.argmax(1) == test_labels).float().mean().item()
        if top5:
            results[f"{prefix}knn_top5"] = topk_accuracy(votes, test_labels, 5)
    if linear:
        logits = linear_probe_logits(bank, bank_labels, test, num_classes, epochs=linear_epochs, lr=linear_lr)
        results[f"{prefix}linear_top1"] = (logits.argmax(1) == test_labels).float().mean().item()
        if top5:
            results[f"{prefix}linear_top5"] = topk_accuracy(logits, test_labels, 5)
    return results
