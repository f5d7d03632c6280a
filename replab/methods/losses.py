"""Self-supervised losses as pure functions, each with the paper's definition.

Inputs are this worker's embeddings; losses over the global batch gather across workers themselves
(:func:`replab.methods.distributed.gather_with_grad`), so a loss on W workers with B/W rows each has the
same value and gradient as on one worker with B rows. The semi-supervised PAWS / RoPAWS losses are in
:mod:`replab.methods.paws_losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from replab.methods.distributed import (
    all_reduce_sum,
    gather,
    gather_with_grad,
    global_mean,
    local_slice,
    world_size,
)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy (Chen et al. 2020, Eq. 1), mean over all 2N anchors.

    With u = normalize(z) over the 2N views of the global batch and s_ij = u_i . u_j / tau,

        l(i, j) = -log( exp(s_ij) / sum_{k != i} exp(s_ik) ),    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]

    where j is the other view of the same image. Each worker computes the rows of its own anchors against
    all 2N candidates and the mean is taken over the global 2N anchors.
    """
    n_local = z1.shape[0]
    u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    g1, g2 = gather_with_grad(u1), gather_with_grad(u2)
    n = g1.shape[0]
    candidates = torch.cat([g1, g2], dim=0)  # [2N, D]
    anchors = torch.cat([u1, u2], dim=0)  # [2n, D], this worker's anchors
    logits = anchors @ candidates.T / temperature  # [2n, 2N]
    rows = local_slice(n_local)
    idx = torch.arange(rows.start, rows.stop, device=z1.device)
    self_idx = torch.cat([idx, idx + n])
    positive_idx = torch.cat([idx + n, idx])
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n).bool(), float("-inf"))
    loss_sum = F.cross_entropy(logits, positive_idx, reduction="sum")
    return global_mean(loss_sum, 2 * n_local)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity with a stopped-gradient target (SimSiam Eq. 1; BYOL Eq. 2 up to 2 - 2x).

        D(p, z) = - mean_i  p_i / ||p_i|| . sg(z_i) / ||z_i||

    Minimum -1 when every prediction points along its target.
    """
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(dim=1).mean()


def full_precision(x: torch.Tensor):
    """A context with autocast off on ``x``'s device, so that float32 matmuls stay float32 (bf16 keeps 8 bits
    of mantissa: too few for correlations near 1 or for logits divided by small temperatures)."""
    return torch.autocast(x.device.type, enabled=False)


def infonce(q: torch.Tensor, k: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """InfoNCE against the keys of the whole global batch (MoCo v3, Chen, Xie & He 2021, Alg. 1).

    With unit queries q_i (this worker's rows) and unit keys k_j of all N images of the global batch
    (gathered without gradient: they are the momentum encoder's stop-gradient targets),

        L = -1/N sum_i log( exp(q_i . k_i / tau) / sum_{j=1}^{N} exp(q_i . k_j / tau) )

    the key of the same image is the positive, the other N - 1 keys are the negatives. (MoCo v3 then
    multiplies by 2 tau; the method does that.)
    """
    n_local = q.shape[0]
    with full_precision(q):
        q = F.normalize(q.float(), dim=1)
        keys = gather(F.normalize(k.detach().float(), dim=1))  # [N, D]
        logits = q @ keys.T / temperature  # [n, N]
        rows = local_slice(n_local)
        targets = torch.arange(rows.start, rows.stop, device=q.device)
        return global_mean(F.cross_entropy(logits, targets, reduction="sum"), n_local)


def moco_queue_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE with a queue of negatives (He et al. 2020, Eq. 1; MoCo v2, Chen et al. 2020).

    With unit vectors q_i (query), k_i (key of the same image from the momentum encoder, stop-gradient)
    and the K queued keys n_j of earlier batches,

        L = -1/N sum_i log( exp(q_i . k_i / tau) / (exp(q_i . k_i / tau) + sum_{j=1}^{K} exp(q_i . n_j / tau)) )
    """
    n_local = q.shape[0]
    with full_precision(q):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.detach().float(), dim=1)
        negatives = F.normalize(queue.detach().float(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)  # [n, 1]
        logits = torch.cat([positive, q @ negatives.T], dim=1) / temperature  # [n, 1 + K]
        targets = torch.zeros(n_local, dtype=torch.long, device=q.device)
        return global_mean(F.cross_entropy(logits, targets, reduction="sum"), n_local)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    return m[~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)]


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 0.0051) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, Eq. 1-2): drive the views' cross-correlation matrix to the identity.

    Each dimension is standardised over the N images of the global batch (batch norm without affine,
    biased variance, eps 1e-5 as ``nn.BatchNorm1d``), then

        C_ij = 1/N sum_b z1_bi z2_bj,      L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2

    (invariance term + redundancy-reduction term). Minimum 0 when the views agree and the dims are decorrelated.
    """
    def standardize(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + 1e-5)

    with full_precision(z1):
        a = standardize(gather_with_grad(z1.float()))
        b = standardize(gather_with_grad(z2.float()))
        c = a.T @ b / a.shape[0]  # [D, D]
        on_diag = (1 - c.diagonal()).pow(2).sum()
        off_diag = _off_diagonal(c).pow(2).sum()
        return on_diag + lambda_offdiag * off_diag


def vicreg(
    z1: torch.Tensor, z2: torch.Tensor, inv_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0
) -> torch.Tensor:
    """VICReg (Bardes, Ponce & LeCun 2022, Eq. 1-6) over the N images of the global batch, D dimensions:

        s(Z, Z') = 1/(N D) sum_b ||z_b - z'_b||^2                                  invariance
        v(Z)     = 1/D sum_j max(0, 1 - sqrt(Var(z^j) + 1e-4))                       variance (gamma = 1)
        c(Z)     = 1/D sum_{i != j} C(Z)_ij^2,  C(Z) = 1/(N-1) sum_b (z_b - zbar)(z_b - zbar)^T   covariance

        L = inv_weight s(Z, Z') + var_weight (v(Z) + v(Z')) / 2 + cov_weight (c(Z) + c(Z'))

    (the variance term halved as in the official code). Var is the unbiased variance over the batch.
    """
    with full_precision(z1):
        a, b = gather_with_grad(z1.float()), gather_with_grad(z2.float())
        n, d = a.shape
        invariance = F.mse_loss(a, b)
        a, b = a - a.mean(dim=0), b - b.mean(dim=0)
        std_a, std_b = torch.sqrt(a.var(dim=0) + 1e-4), torch.sqrt(b.var(dim=0) + 1e-4)
        variance = F.relu(1 - std_a).mean() / 2 + F.relu(1 - std_b).mean() / 2
        cov_a, cov_b = a.T @ a / (n - 1), b.T @ b / (n - 1)
        covariance = _off_diagonal(cov_a).pow(2).sum() / d + _off_diagonal(cov_b).pow(2).sum() / d
        return inv_weight * invariance + var_weight * variance + cov_weight * covariance


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's online codes (Caron et al. 2020, Sec. 3.1, Eq. 3-5): equipartitioned soft assignments.

    For the B x K scores z_b . c_k of the B samples of the global batch (this worker's rows given),

        Q* = argmax_{Q in Q} Tr(Q^T C^T Z) + eps H(Q),   Q = {Q in R+^{K x B} : Q 1_B = 1/K 1_K, Q^T 1_K = 1/B 1_B}

    is approximated by Sinkhorn-Knopp on Q = exp(C^T Z / eps): alternately rescale each prototype's row to
    sum 1/K (sums over all workers) and each sample's column to 1/B. Returns this worker's ``[B_local, K]``
    codes times B: each sample's codes sum to 1 (exactly, the column step being last) and each prototype
    receives B/K of the global batch's mass (exactly in the limit of many iterations).
    """
    scores = scores.float()
    shift = gather(scores.max().reshape(1)).max()  # a global constant: cancels in the normalisation
    q = torch.exp((scores - shift) / epsilon).T  # [K, B_local]
    k, b = q.shape[0], q.shape[1] * world_size()
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # rows (prototypes) sum to 1 ...
        q /= k  # ... / K
        q /= q.sum(dim=0, keepdim=True)  # columns (samples) sum to 1 ...
        q /= b  # ... / B
    return (q * b).T


def swav(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, Eq. 1-2), averaged over all (assigned crop s, other crop t).

        l(z_t, q_s) = - sum_k q_s^(k) log p_t^(k),     p_t^(k) = exp(z_t . c_k / tau) / sum_k' exp(z_t . c_k' / tau)

    ``scores[t]``: ``[B, K]`` scores z_t . c_k of crop t for every crop; ``codes[s]``: the (Sinkhorn) codes
    of crop s for the first ``len(codes)`` crops (targets, no gradient). Mean over the global batch.
    """
    total, pairs = 0.0, 0
    for s, q in enumerate(codes):
        for t, logits in enumerate(scores):
            if t == s:
                continue
            total = total - (q.detach().float() * F.log_softmax(logits.float() / temperature, dim=1)).sum()
            pairs += 1
    return global_mean(total / pairs, scores[0].shape[0])


def dino(
    student_logits: list[torch.Tensor],
    teacher_logits: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """DINO (Caron et al. 2021, Eq. 1-3 and Alg. 1): cross-entropy from the teacher's to the student's crops.

        P_t(x) = softmax((g_t(x) - c) / tau_t),    P_s(x') = softmax(g_s(x') / tau_s)
        L = 1/|pairs| sum_{x in global crops} sum_{x' in all crops, x' != x}  H(P_t(x), P_s(x')),
        H(a, b) = - sum_k a_k log b_k

    ``teacher_logits``: the teacher's outputs on the global crops (no gradient); ``student_logits``: the
    student's on every crop, the global crops first and in the same order. Centring (c) and sharpening
    (tau_t < tau_s) of the teacher avoid collapse. Mean over the images of the global batch.
    """
    targets = [F.softmax((t.detach().float() - center) / teacher_temp, dim=1) for t in teacher_logits]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=1) for s in student_logits]
    total, pairs = 0.0, 0
    for i, p_t in enumerate(targets):
        for v, log_p_s in enumerate(log_probs):
            if v == i:
                continue
            total = total - (p_t * log_p_s).sum()
            pairs += 1
    return global_mean(total / pairs, student_logits[0].shape[0])


@torch.no_grad()
def dino_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """DINO's centre update (Caron et al. 2021, Eq. 4) over the teacher outputs of the global batch:

        c <- m c + (1 - m) 1/B sum_{i=1}^{B} g_t(x_i)

    ``teacher_logits``: this worker's ``[n, K]`` teacher outputs (all global crops); B = n x workers.
    """
    total = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
    return center * momentum + total / (teacher_logits.shape[0] * world_size()) * (1 - momentum)


def rotation_cross_entropy(logits: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """RotNet (Gidaris et al. 2018, Eq. 2): -1/N sum_i log softmax(F(R_{y_i}(x_i)))[y_i], y in {0,1,2,3}."""
    return F.cross_entropy(logits.float(), rotations)


def mae(pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MAE (He et al. 2022, Sec. 3 "Reconstruction target"): mean squared error on the masked patches only.

    ``pred`` and ``target_patches`` are ``[B, N, p*p*3]``, ``mask`` ``[B, N]`` is 1 on masked (removed) patches.
    With norm_pix every target patch is normalised by its own mean and variance (the official code's unbiased
    variance, eps 1e-6), x_i <- (x_i - mean(x_i)) / sqrt(var(x_i) + 1e-6); then

        L = sum_{b,i} m_bi * mean_k (pred_bik - x_bik)^2 / sum_{b,i} m_bi.
    """
    target = target_patches.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def colorization_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Class-rebalancing weights of Zhang et al. 2016, Eq. 4, from the smoothed empirical bin distribution p~:

        w  proportional to  ((1 - lam) p~ + lam / Q)^-1,   normalised so that  E_{p~}[w] = sum_q p~_q w_q = 1.

    lam = 1 gives uniform weights; lam = 0 weighs each bin by its inverse frequency.
    """
    prior = prior.float() / prior.float().sum()
    w = 1.0 / ((1.0 - lam) * prior + lam / prior.numel())
    return w / (prior * w).sum()


def colorization(logits: torch.Tensor, ab_bins: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Zhang et al. 2016, Eq. 2-3: class-rebalanced multinomial cross entropy over the quantised ab bins.

    ``logits`` ``[B, Q, H, W]``; the target Z is either hard bin indices ``[B, H, W]`` or a (soft-encoded)
    distribution ``[B, Q, H, W]``; ``weights`` ``[Q]`` from :func:`colorization_weights`. With
    v(Z_hw) = w_{q*}, q* = argmax_q Z_hwq (Eq. 3),

        L = - 1/(B H W) sum_{b,h,w} v(Z_bhw) sum_q Z_bhwq log softmax(logits)_bhwq

    (the paper sums over pixels; the mean keeps the scale independent of the resolution).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    if ab_bins.is_floating_point():
        cross_entropy = -(ab_bins * log_p).sum(dim=1)
        q_star = ab_bins.argmax(dim=1)
    else:
        cross_entropy = F.nll_loss(log_p, ab_bins, reduction="none")
        q_star = ab_bins
    return (weights[q_star] * cross_entropy).mean()


def inpainting(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Context-encoder reconstruction loss (Pathak et al. 2016, Eq. 1): masked L2, ||M ⊙ (x - F((1 - M) ⊙ x))||^2.

    ``pred``/``target`` ``[B, C, H, W]``; ``mask`` ``[B, 1, H, W]`` is 0 outside the region to fill and a
    per-pixel weight inside it (1; the official code puts weight 10 on a thin ring overlapping the context).
    Normalised as the official code's MSE over the region:

        L = sum_{b,c,h,w} M_bhw (pred - x)_bchw^2 / (C * #{(b,h,w): M_bhw > 0}).
    """
    mask = mask.float()
    err = (pred.float() - target.float()).pow(2) * mask
    return err.sum() / (pred.shape[1] * (mask > 0).sum().clamp(min=1))


def counting(
    phi_image: torch.Tensor, phi_tiles_sum: torch.Tensor, phi_other: torch.Tensor, margin: float = 10.0
) -> torch.Tensor:
    """Counting loss (Noroozi et al. 2017, Sec. 3), mean over the batch.

    With t(x) = sum_{j=1..4} phi(T_j(x)) the summed counts of the four tiles of x, phi(D(x)) the counts of x
    downsampled to a tile's size and y another image,

        l(x, y) = ||phi(D(x)) - t(x)||^2 + max(0, M - ||phi(D(y)) - t(x)||^2),    M = 10.

    Zero when the tiles' counts add up to the image's and differ from the other image's by at least sqrt(M).
    """
    t = phi_tiles_sum.float()
    positive = (phi_image.float() - t).pow(2).sum(dim=1)
    negative = (phi_other.float() - t).pow(2).sum(dim=1)
    return (positive + F.relu(margin - negative)).mean()


def instance_discrimination(
    features: torch.Tensor, memory: torch.Tensor, ids: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Non-parametric softmax over a memory bank (Wu et al. 2018, Eq. 2), mean over the batch.

    Each instance i is its own class with prototype v_i (an L2-normalised row of ``memory`` ``[M, D]``); for
    the normalised feature f = features_b / ||features_b|| of an image with id i = ids_b,

        P(i | f) = exp(v_i . f / tau) / sum_{j=1..M} exp(v_j . f / tau),    L = - mean_b log P(ids_b | f_b).

    The memory is a constant here (no gradient); it is updated by the caller after the step.
    """
    f = F.normalize(features.float(), dim=1)
    logits = f @ memory.detach().float().T / temperature
    return F.cross_entropy(logits, ids)
