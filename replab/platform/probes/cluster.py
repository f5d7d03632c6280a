"""Clustering of frozen features: k-means, then NMI, ARI and cluster accuracy against the true classes.

- k-means (Lloyd) on L2-normalised features with k-means++ seeding (Arthur & Vassilvitskii 2007), ``restarts``
  seeded runs, the one with the lowest inertia kept; k = the number of classes.
- NMI (sklearn's ``normalized_mutual_info_score`` default, arithmetic mean):
  NMI = I(Y; C) / ((H(Y) + H(C)) / 2), with I(Y; C) = sum_ij n_ij/N log(N n_ij / (a_i b_j)),
  H(Y) = -sum_i a_i/N log(a_i/N) (a_i, b_j the row / column sums of the contingency table n_ij).
  1 when both labelings are a single cluster (H(Y) = H(C) = 0), as sklearn returns.
- ARI (Hubert & Arabie 1985, sklearn's ``adjusted_rand_score``):
  ARI = (sum_ij C(n_ij, 2) - E) / ((sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2 - E),
  E = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(N, 2); 1 when the denominator is 0 (identical trivial labelings).
- Cluster accuracy: max over one-to-one cluster -> class maps of the fraction matched, by Hungarian matching
  on the contingency table (``scipy.optimize.linear_sum_assignment``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def contingency(labels_true, labels_pred) -> np.ndarray:
    """``n_ij`` = number of items of class i (rows, sorted unique ``labels_true``) in cluster j (columns)."""
    t = np.unique(np.asarray(labels_true), return_inverse=True)[1].ravel()
    p = np.unique(np.asarray(labels_pred), return_inverse=True)[1].ravel()
    if len(t) != len(p):
        raise ValueError(f"labelings of different lengths: {len(t)} and {len(p)}")
    table = np.zeros((t.max(initial=-1) + 1, p.max(initial=-1) + 1), np.int64)
    np.add.at(table, (t, p), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information with the arithmetic mean of the entropies (see the module doc)."""
    n = contingency(labels_true, labels_pred).astype(np.float64)
    total = n.sum()
    if total == 0:
        return float("nan")
    a, b = n.sum(1), n.sum(0)
    h_true, h_pred = _entropy(a), _entropy(b)
    if h_true == 0 and h_pred == 0:
        return 1.0
    i, j = np.nonzero(n)
    mi = float((n[i, j] / total * np.log(total * n[i, j] / (a[i] * b[j]))).sum())
    return max(0.0, mi) / ((h_true + h_pred) / 2)


def _pairs(x: np.ndarray) -> float:
    return float((x * (x - 1) / 2).sum())


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (see the module doc)."""
    n = contingency(labels_true, labels_pred).astype(np.float64)
    total = n.sum()
    if total < 2:
        return float("nan")
    sum_ij, sum_a, sum_b = _pairs(n), _pairs(n.sum(1)), _pairs(n.sum(0))
    expected = sum_a * sum_b / (total * (total - 1) / 2)
    denom = (sum_a + sum_b) / 2 - expected
    if denom == 0:
        return 1.0
    return (sum_ij - expected) / denom


def cluster_accuracy(labels_true, labels_pred) -> float:
    """Best one-to-one cluster -> class matching accuracy (Hungarian matching on the contingency table)."""
    n = contingency(labels_true, labels_pred)
    if n.sum() == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(n, maximize=True)
    return float(n[rows, cols].sum() / n.sum())


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    first = torch.randint(len(x), (1,), generator=generator)
    centers = [x[first]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2.clamp_min(0)
        idx = torch.multinomial(probs / probs.sum(), 1, generator=generator) if probs.sum() > 0 else \
            torch.randint(len(x), (1,), generator=generator)
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    return torch.cat(centers)


def kmeans(features: torch.Tensor, k: int, iters: int = 100, restarts: int = 3, seed: int = 0,
           normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(assignments [N], centres [k, D], inertia)`` of Lloyd's k-means, best of ``restarts`` seeded runs.

    Inertia = sum_n ||x_n - c_{a(n)}||^2. An empty cluster is re-seeded at the point farthest from its centre.
    """
    x = features.detach().float().cpu()
    if normalize:
        x = F.normalize(x, dim=1)
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means: k={k} must be in [1, {len(x)}] (the number of points)")
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(max(1, restarts)):
        centers = _kmeans_pp(x, k, generator)
        assign = None
        for _ in range(iters):
            dist = torch.cdist(x, centers) ** 2
            new = dist.argmin(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            own = dist.gather(1, assign.view(-1, 1)).squeeze(1)
            for c in range(k):
                members = assign == c
                if members.any():
                    centers[c] = x[members].mean(0)
                else:
                    far = own.argmax()
                    centers[c] = x[far]
                    own[far] = -1.0
        inertia = float(((x - centers[assign]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (assign.clone(), centers.clone(), inertia)
    return best


def cluster_metrics(features: torch.Tensor, labels, num_classes: int, seed: int = 0, restarts: int = 3,
                    prefix: str = "cluster/") -> dict[str, float]:
    """k-means with k = ``num_classes`` on ``features``; ``nmi``, ``ari`` and ``acc`` against ``labels``."""
    labels = np.asarray(torch.as_tensor(labels).cpu().numpy())
    assign, _, inertia = kmeans(features, num_classes, restarts=restarts, seed=seed)
    pred = assign.numpy()
    return {f"{prefix}nmi": nmi(labels, pred), f"{prefix}ari": ari(labels, pred),
            f"{prefix}acc": cluster_accuracy(labels, pred), f"{prefix}inertia": inertia}
