"""PAWS / RoPAWS (semi-supervised): soft nearest neighbours over a labeled support set, as pure functions.

Supports are gathered with gradient (every worker classifies against the global support set); RoPAWS's label
propagation runs over the gathered unlabeled batch, without gradient. Inputs stay float64 when given in
float64 (the parity tests against the official code use it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from replab.methods.distributed import (
    gather,
    gather_with_grad,
    global_mean,
    local_slice,
)


def _fp(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (float64 stays float64, which the parity tests use)."""
    return x if x.dtype == torch.float64 else x.float()


def support_label_matrix(labels: torch.Tensor, smoothing: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """PAWS's support label matrix Y ``[S, K]`` over the K classes present in ``labels`` (ids in any order,
    remapped to 0..K-1 in increasing order): Y = (1 - s) onehot + s / K (label smoothing s)."""
    _, inverse = torch.unique(labels, return_inverse=True)
    k = int(inverse.max().item()) + 1 if inverse.numel() else 0
    return F.one_hot(inverse, k).to(dtype) * (1.0 - smoothing) + smoothing / k


def sharpen(p: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """PAWS's sharpening (Assran et al. 2021, Eq. 3): [rho(p)]_k = p_k^(1/T) / sum_j p_j^(1/T).

    Computed as softmax(log p / T), which stays finite when every p_k^(1/T) underflows.
    """
    p = _fp(p)
    return F.softmax(torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) / temperature, dim=1)


def snn(query: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """PAWS's soft nearest-neighbour classifier (Assran et al. 2021, Eq. 1) of every query row:

        p(y | z) = sum_i softmax_i( cos(z, z_i) / tau ) y_i

    over the support embeddings z_i with label rows y_i (``labels``: the ``[S, K]`` matrix Y). Rows of the
    result sum to 1 when the rows of Y do.
    """
    q = F.normalize(_fp(query), dim=1)
    s = F.normalize(_fp(supports), dim=1)
    return F.softmax(q @ s.T / tau, dim=1) @ labels.to(q.dtype)


@torch.no_grad()
def ropaws_propagate(
    queries: torch.Tensor,
    supports: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 0.1,
    prior_tau: float = 0.1,
    labeled_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPAWS's semi-supervised kernel density estimate of p(y | x) (Mo et al., ICLR 2023, Sec. 3).

    PAWS's SNN is a generative classifier p(y|x) = p(x|y) p(y) / p(x) with the kernel density
    p(x|y) ~ sum_{x' in B_L, y'=y} k(x, x'), k(x, x') = exp(cos(z, z') / tau). RoPAWS estimates the density
    from the labeled batch B_L *and* the M unlabeled queries B_U (the gathered batch of one view), each
    unlabeled x' contributing its own (unknown) prediction p(y|x'):

        p(y|x) = pi(x) * [ sum_{x' in B_L} r k(x,x') y' + sum_{x' in B_U, x' != x} k(x,x') p(y|x') ]
                         / [ sum_{x' in B_L} r k(x,x') + sum_{x' in B_U, x' != x} k(x,x') ]

    with labeled kernels up-weighted by r = ``labeled_weight`` (:func:`paws` passes the official script's
    r = label_ratio x unlabeled images per worker / labeled images per class per worker: facebookresearch/suncet,
    RoPAWS commit c70bb99, ``src/losses.py`` ``init_paws_loss._snn_semi_each`` with ``u_batch_size`` and
    ``s_batch_size = supervised_imgs_per_class`` as ``src/paws_train.py`` ``main`` passes them), and the
    in-domain prior

        pi(x) = exp( (max_{x' in B_L} cos(z, z') - 1) / prior_tau )      (1 next to a labeled image, -> 0 far away)

    With C_L ``[M, N]`` and C_U ``[M, M]`` the two normalised kernel blocks times pi (rows of C_L | C_U sum to
    pi(x) <= 1), the M predictions P solve the fixed point P = C_L Y + C_U P (label propagation), in closed form

        P = (I - C_U)^{-1} C_L Y.

    The mass 1 - pi(x) of every row (and whatever the propagation leaks) is out-of-class: a row of P sums to
    p_in(x) = P_x . 1 <= 1. Returns ``(P [M, K], p_in [M])``; :func:`ropaws_targets` spreads the out-of-class
    mass uniformly.
    """
    q = F.normalize(_fp(queries), dim=1)
    s = F.normalize(_fp(supports), dim=1)
    m, n = q.shape[0], s.shape[0]
    s_sims = q @ s.T  # [M, N]
    u_sims = q @ q.T  # [M, M]
    u_sims.fill_diagonal_(float("-inf"))  # x' != x
    prior = torch.exp((s_sims.max(dim=1).values - 1.0) / prior_tau)  # [M]
    log_r = torch.log(torch.tensor(float(labeled_weight), dtype=q.dtype, device=q.device))
    logits = torch.cat([s_sims / tau + log_r, u_sims / tau], dim=1)
    c = F.softmax(logits, dim=1) * prior[:, None]
    c_l, c_u = c[:, :n], c[:, n:]
    eye = torch.eye(m, device=q.device, dtype=q.dtype)
    p = torch.linalg.solve(eye - c_u, c_l @ labels.to(q.dtype))  # (I - C_U) is strictly diagonally dominant
    return p, p.sum(dim=1)


@torch.no_grad()
def ropaws_targets(
    queries: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float = 0.1, prior_tau: float = 0.1,
    labeled_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPAWS's (unsharpened) targets: P + (1 - p_in) / K, the out-of-class mass spread uniformly over the K
    classes (Mo et al. 2023; see :func:`ropaws_propagate`). Returns ``(targets [M, K], p_in [M])``."""
    p, p_in = ropaws_propagate(queries, supports, labels, tau, prior_tau, labeled_weight)
    k = p.shape[1]
    return p + (1.0 - p_in)[:, None].clamp_min(0.0) / k, p_in


def paws(
    anchors: torch.Tensor,
    anchor_supports: torch.Tensor,
    target_views: list[torch.Tensor],
    target_supports: torch.Tensor,
    support_labels: torch.Tensor,
    tau: float = 0.1,
    sharpen_temperature: float = 0.25,
    label_smoothing: float = 0.1,
    me_max: bool = True,
    ropaws: bool = False,
    prior_tau: float = 0.1,
    prior_pow: float = 1.0,
    label_ratio: float = 5.0,
    support_images_per_class: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PAWS (Assran et al. 2021, Eq. 4-5) and, with ``ropaws``, RoPAWS (Mo et al. 2023); returns (loss, metrics).

    ``anchors`` ``[V n, D]``: this worker's anchor embeddings of its n unlabeled images, view-major, the two
    global views first, then the V - 2 multi-crops; ``target_views``: the two global views' target
    embeddings ``[n, D]`` (no gradient); ``anchor_supports`` / ``target_supports`` ``[S, D]`` and
    ``support_labels`` ``[S]``: this worker's labeled supports (all their views), gathered over workers here
    (anchor supports with gradient). With Y the smoothed label matrix of the gathered supports
    (:func:`support_label_matrix`, K classes):

        p_v     = snn(anchor_v, supports, Y)                                     prediction of every anchor
        t_g     = sharpen(snn(target_g, supports, Y), T)                         PAWS target of global view g
        t_g     = sharpen(P_g + (1 - p_in,g) / K, T)                             RoPAWS (:func:`ropaws_targets`,
                  labeled kernels x r, r = label_ratio x n / ``support_images_per_class``, n and the latter per worker)
        targets: global view 1 <- t_2, global view 2 <- t_1, every multi-crop <- (t_1 + t_2) / 2;
                 entries below 1e-4 are zeroed (the reference code's numerical guard)
        CE      = mean_anchors  w(x) H(target, p_v),   w = 1 (PAWS),  w = ((p_in,1 + p_in,2) / 2)^prior_pow (RoPAWS)
        me-max  = log K - H( mean_anchors sharpen(p_v, T) )                     (mean over the global batch)
        loss    = CE + me-max

    This is the official ``init_paws_loss.loss`` (facebookresearch/suncet, RoPAWS commit c70bb99,
    ``src/losses.py``) as ``src/paws_train.py`` ``main`` calls it, term by term (pinned on fixed inputs by
    ``tests/test_paws_parity.py``, 1 and 2 workers), with three deliberate differences: the me-max term is the
    reference's -H(p_bar) shifted by log K (>= 0, 0 when the classes are used uniformly; same gradient); the
    reported loss is the global mean over workers where the reference logs each worker's own mean (same
    gradient after DDP's averaging); and Y has K columns on any number of workers, where the official
    ``make_labels_matrix`` with ``unique_classes_per_rank: false`` and W > 1 GPUs appends K (W - 1) columns
    holding only smoothing mass (the single-GPU CIFAR-10 runs never hit it). RoPAWS's propagation runs per
    global view over the M = n x workers gathered targets; r does not change with the number of workers. The
    loss is computed in float32 with autocast off (bf16 cosines / tau and the linear solve are too coarse).
    """
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        return _paws_fp32(anchors, anchor_supports, target_views, target_supports, support_labels, tau,
                          sharpen_temperature, label_smoothing, me_max, ropaws, prior_tau, prior_pow, label_ratio,
                          support_images_per_class)


@torch.no_grad()
def paws_targets(target_views, target_supports, y, n_views, tau=0.1, sharpen_temperature=0.25, ropaws=False,
                 prior_tau=0.1, label_ratio=5.0, support_images_per_class=0):
    """The targets ``[V n, K]`` of :func:`paws`'s anchors and, for RoPAWS, this worker's p_in ``[n]`` (the mean
    over the two global views; None for PAWS). ``target_supports`` are this worker's (gathered here), ``y``
    the label matrix of the gathered supports. Official: ``init_paws_loss.loss`` Step 2 (suncet c70bb99)."""
    n = target_views[0].shape[0]
    sup_t = gather(_fp(target_supports.detach()))
    p_in = None
    if ropaws:
        if support_images_per_class < 1:
            raise ValueError("RoPAWS needs support_images_per_class (labeled images per class per worker) "
                             f">= 1 for its labeled-kernel weight, got {support_images_per_class}")
        r = label_ratio * n / support_images_per_class
        rows = local_slice(n)
        per_view, p_ins = [], []
        for t in target_views:
            full, p_in_v = ropaws_targets(gather(_fp(t.detach())), sup_t, y, tau, prior_tau, r)
            per_view.append(full[rows])
            p_ins.append(p_in_v[rows])
        p_in = (p_ins[0] + p_ins[1]) / 2
    else:
        per_view = [snn(t.detach(), sup_t, y, tau) for t in target_views]
    sharp = [sharpen(p, sharpen_temperature) for p in per_view]
    multi = 0.5 * (sharp[0] + sharp[1])
    targets = torch.cat([sharp[1], sharp[0], *[multi] * (n_views - 2)], dim=0)
    return torch.where(targets < 1e-4, torch.zeros_like(targets), targets), p_in


def _paws_fp32(anchors, anchor_supports, target_views, target_supports, support_labels, tau, sharpen_temperature,
               label_smoothing, me_max, ropaws, prior_tau, prior_pow, label_ratio, support_images_per_class):
    n = target_views[0].shape[0]
    n_anchor = anchors.shape[0]
    if n_anchor % n or n_anchor // n < 2:
        raise ValueError(f"anchors ({n_anchor} rows) must be V x n with V >= 2 views of the n = {n} images")
    n_views = n_anchor // n
    sup_a = gather_with_grad(_fp(anchor_supports))
    labels_all = gather(support_labels)
    y = support_label_matrix(labels_all, label_smoothing, dtype=sup_a.dtype)
    k = y.shape[1]
    probs = snn(_fp(anchors), sup_a, y, tau)  # [V n, K]
    targets, p_in = paws_targets(target_views, target_supports, y, n_views, tau, sharpen_temperature, ropaws,
                                 prior_tau, label_ratio, support_images_per_class)
    metrics: dict[str, torch.Tensor] = {}
    if p_in is not None:
        metrics["p_in"] = p_in.mean()
    multi = targets[2 * n:3 * n] if n_views > 2 else 0.5 * (targets[:n] + targets[n:2 * n])
    metrics["target_entropy"] = -(multi * torch.log(multi.clamp_min(1e-12))).sum(dim=1).mean()
    ce_rows = -(targets * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=1)
    if ropaws:
        weight = p_in.clamp_min(0.0).pow(prior_pow).repeat(n_views)
        ce_rows = weight * ce_rows
    ce = global_mean(ce_rows.sum(), n_anchor)
    loss = ce
    metrics["ce"] = ce.detach()
    if me_max:
        local_avg = sharpen(probs, sharpen_temperature).mean(dim=0, keepdim=True)  # [1, K]
        avg = gather_with_grad(local_avg).mean(dim=0)
        reg = (avg * torch.log(avg.clamp_min(1e-12))).sum() + torch.log(torch.tensor(float(k), device=avg.device))
        loss = loss + reg
        metrics["me_max"] = reg.detach()
    metrics["support_classes"] = torch.tensor(float(k))
    return loss, metrics
