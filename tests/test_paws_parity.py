"""Parity of replab's PAWS / RoPAWS loss with the official code, as the official training script calls it.

The reference below is transcribed from facebookresearch/suncet at the RoPAWS commit c70bb99
(``src/losses.py``: ``init_paws_loss`` with ``sharpen``, ``snn``, ``snn_semi``, ``_snn_semi_each``, ``loss``,
and ``make_labels_matrix``; ``src/utils.py``: ``AllGather``, ``AllReduce``), called the way
``src/paws_train.py`` ``main`` calls it: ``s_batch_size = supervised_imgs_per_class``, ``u_batch_size`` the
unlabeled images per GPU, the two target views swapped before the call, labels = the label matrix repeated
once per supervised view. Changes to the transcription: dtype arguments on ``torch.ones`` / ``torch.eye`` (so
that it runs in float64), and it also returns its targets and p_in. The label matrix is built for K classes
(``make_labels_matrix`` at world_size 1): on W > 1 GPUs with ``unique_classes_per_rank: false`` the official
one has K (W - 1) extra columns of pure smoothing mass, which replab does not reproduce (paws_losses.paws says so).

Checked in float64 to 1e-6: targets, p_in, the loss value (replab's me-max is the reference's + log K, and
its value is the mean over workers) and the gradients of the anchors and anchor supports, on one process and
on 2 gloo workers (``torch.multiprocessing``), where each worker must also equal its slice of the 1-process
result (the official r = label_ratio x u_batch_size / s_batch_size does not change with the worker count).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from replab.methods import distributed, paws_losses

TOL = dict(rtol=1e-6, atol=1e-6)
K, S_PER_CLASS, S_VIEWS, N, MULTICROP, D = 3, 4, 2, 8, 2, 16


# ----------------------------------------------------------------------------- official (transcribed)


class AllGather(torch.autograd.Function):  # src/utils.py
    @staticmethod
    def forward(ctx, x):
        if dist.is_available() and dist.is_initialized() and (dist.get_world_size() > 1):
            outputs = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(outputs, x)
            return torch.cat(outputs, 0)
        return x

    @staticmethod
    def backward(ctx, grads):
        if dist.is_available() and dist.is_initialized() and (dist.get_world_size() > 1):
            s = (grads.shape[0] // dist.get_world_size()) * dist.get_rank()
            e = (grads.shape[0] // dist.get_world_size()) * (dist.get_rank() + 1)
            grads = grads.contiguous()
            dist.all_reduce(grads)
            return grads[s:e]
        return grads


class AllReduce(torch.autograd.Function):  # src/utils.py
    @staticmethod
    def forward(ctx, x):
        if dist.is_available() and dist.is_initialized() and (dist.get_world_size() > 1):
            x = x.contiguous() / dist.get_world_size()
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grads):
        return grads


def make_labels_matrix(num_classes, s_batch_size, smoothing):  # src/losses.py, world_size 1, not unique
    off_value = smoothing / num_classes
    labels = torch.zeros(s_batch_size * num_classes, num_classes, dtype=torch.float64) + off_value
    for i in range(num_classes):
        labels[i::num_classes][:, i] = 1. - smoothing + off_value
    return labels


def init_paws_loss(multicrop=6, tau=0.1, T=0.25, me_max=True, ropaws=False, prior_tau=3.0, prior_pow=1.0,
                   label_ratio=5.0, s_batch_size=6720, u_batch_size=4096, rank=0, world_size=1):
    softmax = torch.nn.Softmax(dim=1)

    def sharpen(p):
        sharp_p = p**(1./T)
        sharp_p /= torch.sum(sharp_p, dim=1, keepdim=True)
        return sharp_p

    def snn(query, supports, labels):
        query = torch.nn.functional.normalize(query)
        supports = torch.nn.functional.normalize(supports)
        supports = AllGather.apply(supports)
        return softmax(query @ supports.T / tau) @ labels

    def snn_semi(query, supports, labels, n_views):
        query = torch.nn.functional.normalize(query)
        supports = torch.nn.functional.normalize(supports)
        supports = AllGather.apply(supports)
        probs = []
        for q in query.chunk(n_views):
            p = _snn_semi_each(q, supports, labels)
            probs.append(p)
        probs = torch.cat(probs, dim=0)
        M, C = probs.shape
        p_in = probs.sum(dim=1)
        unif = torch.ones(M, C, dtype=probs.dtype) / C
        probs = probs + (1 - p_in.view(M, 1)) * unif
        p_in = sum(p_in.chunk(n_views)) / n_views
        return probs, p_in

    def _snn_semi_each(query, supports, labels):
        query = AllGather.apply(query)
        M = query.size(0)
        N, K = labels.size()
        arange = lambda n: torch.arange(n)  # noqa: E731
        eye = lambda n: torch.eye(n, n, dtype=query.dtype)  # noqa: E731
        s_sims = query @ supports.T
        u_sims = query @ query.T
        u_sims[arange(M), arange(M)] = -float('inf')
        max_sim = s_sims.max(dim=1)[0]
        prior = ((max_sim - 1) / prior_tau).exp().view(M, 1)
        r = label_ratio * u_batch_size / s_batch_size
        s_sims = s_sims + math.log(r) * tau
        C = softmax(torch.cat([s_sims, u_sims], dim=1) / tau) * prior
        C_L, C_U = C[:, :N], C[:, N:]
        probs = torch.linalg.inv(eye(M) - C_U) @ C_L @ labels
        probs = probs[M//world_size * rank: M//world_size * (rank + 1)]
        return probs

    def loss(anchor_views, anchor_supports, anchor_support_labels, target_views, target_supports,
             target_support_labels):
        batch_size = len(anchor_views) // (2+multicrop)
        probs = snn(anchor_views, anchor_supports, anchor_support_labels)
        p_in = None
        with torch.no_grad():
            if ropaws:
                targets, p_in = snn_semi(target_views, target_supports, target_support_labels, n_views=2)
            else:
                targets = snn(target_views, target_supports, target_support_labels)
            targets = sharpen(targets)
            if multicrop > 0:
                mc_target = 0.5*(targets[:batch_size]+targets[batch_size:])
                targets = torch.cat([targets, *[mc_target for _ in range(multicrop)]], dim=0)
            targets[targets < 1e-4] *= 0
        if ropaws:
            weight = p_in.repeat(2 + multicrop) ** prior_pow
            loss = torch.mean(weight * torch.sum(-targets * torch.log(probs), dim=1))
        else:
            loss = torch.mean(torch.sum(torch.log(probs ** (-targets)), dim=1))
        rloss = 0.
        if me_max:
            avg_probs = AllReduce.apply(torch.mean(sharpen(probs), dim=0))
            rloss -= torch.sum(torch.log(avg_probs**(-avg_probs)))
        return loss, rloss, targets, p_in

    return loss


# ----------------------------------------------------------------------------- inputs and the two sides

CASES = {
    "paws": dict(ropaws=False),
    "ropaws": dict(ropaws=True, prior_tau=0.1, prior_pow=1.0, label_ratio=5.0),  # configs/ropaws/cifar10_train.yaml
    "ropaws_other": dict(ropaws=True, prior_tau=0.5, prior_pow=2.0, label_ratio=2.0),
}


def _inputs(seed=0):
    """Unlabeled images near the K class centres (in-class) and far from them (out-of-class), float64.

    Supports per view are class-interleaved (the reference's ClassStratifiedSampler order)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    cls = torch.arange(K).repeat(S_PER_CLASS)
    supports = [centres[cls] + 0.3 * torch.randn(len(cls), D, generator=g, dtype=torch.float64)
                for _ in range(S_VIEWS)]
    near = centres[torch.arange(N // 2) % K]
    base = torch.cat([near, torch.randn(N - N // 2, D, generator=g, dtype=torch.float64)])
    views = [base + 0.25 * torch.randn(N, D, generator=g, dtype=torch.float64) for _ in range(2 + MULTICROP)]
    return {"supports": supports, "labels": cls, "views": views}


def _local(data, rank, world):
    """This worker's rows: its n = N / W images and its S_PER_CLASS / W supports per class and view."""
    n, s = N // world, (S_PER_CLASS // world) * K
    return {"supports": [v[rank * s:(rank + 1) * s] for v in data["supports"]],
            "labels": data["labels"][rank * s:(rank + 1) * s],
            "views": [v[rank * n:(rank + 1) * n] for v in data["views"]]}


def _official(local, case, world, rank):
    s_per_class = len(local["labels"]) // K
    n = local["views"][0].shape[0]
    fn = init_paws_loss(multicrop=MULTICROP, tau=0.1, T=0.25, me_max=True, s_batch_size=s_per_class,
                        u_batch_size=n, rank=rank, world_size=world,
                        **{"prior_tau": 3.0, "prior_pow": 1.0, "label_ratio": 5.0, **case})
    # labels for the gathered supports [rank 0: view 1, view 2, rank 1: ...]: period K, as in paws_train.main
    labels = make_labels_matrix(K, S_VIEWS * s_per_class * world, smoothing=0.1)
    anchors = torch.cat(local["views"]).clone().requires_grad_(True)
    supports = torch.cat(local["supports"]).clone().requires_grad_(True)
    targets_in = torch.cat([local["views"][1], local["views"][0]])  # paws_train.main swaps the target views
    loss, rloss, targets, p_in = fn(anchors, supports, labels, targets_in, supports.detach(), labels)
    (loss + rloss).backward()
    return {"loss": (loss + rloss).detach(), "targets": targets, "p_in": p_in,
            "g_anchors": anchors.grad, "g_supports": supports.grad}


def _replab(local, case):
    s_per_class = len(local["labels"]) // K
    anchors = torch.cat(local["views"]).clone().requires_grad_(True)
    supports = torch.cat(local["supports"]).clone().requires_grad_(True)
    labels = local["labels"].repeat(S_VIEWS)
    opts = dict(tau=0.1, sharpen_temperature=0.25, label_smoothing=0.1, me_max=True,
                support_images_per_class=s_per_class, **{k: v for k, v in case.items()})
    loss, metrics = paws_losses.paws(anchors, supports, local["views"][:2], supports.detach(), labels, **opts)
    loss.backward()
    y = paws_losses.support_label_matrix(distributed.gather(labels), 0.1, dtype=torch.float64)
    targets, p_in = paws_losses.paws_targets(local["views"][:2], supports.detach(), y, 2 + MULTICROP, 0.1, 0.25,
                                        case["ropaws"], case.get("prior_tau", 0.1), case.get("label_ratio", 5.0),
                                        s_per_class)
    return {"loss": loss.detach() - math.log(K), "targets": targets, "p_in": p_in, "metrics": metrics,
            "g_anchors": anchors.grad, "g_supports": supports.grad}


def _compare(ours, ref, case_name):
    torch.testing.assert_close(ours["targets"], ref["targets"], **TOL, msg=f"{case_name}: targets")
    if ref["p_in"] is not None:
        torch.testing.assert_close(ours["p_in"], ref["p_in"], **TOL, msg=f"{case_name}: p_in")
    torch.testing.assert_close(ours["g_anchors"], ref["g_anchors"], **TOL, msg=f"{case_name}: anchor gradient")
    torch.testing.assert_close(ours["g_supports"], ref["g_supports"], **TOL, msg=f"{case_name}: support gradient")


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case_name", list(CASES))
def test_one_process_matches_official(case_name):
    data = _inputs()
    ref = _official(data, CASES[case_name], world=1, rank=0)
    ours = _replab(data, CASES[case_name])
    _compare(ours, ref, case_name)
    torch.testing.assert_close(ours["loss"], ref["loss"], **TOL)
    if CASES[case_name]["ropaws"]:
        # the inputs make p_in informative: in-class images (first half) far above the out-of-class ones
        assert ref["p_in"][: N // 2].min() > ref["p_in"][N // 2:].max()
        assert ours["metrics"]["p_in"].item() == pytest.approx(ref["p_in"].mean().item(), abs=1e-9)


def test_labeled_weight_is_per_class_not_per_support_row():
    """r = label_ratio x u_batch / supervised_imgs_per_class; the old label_ratio x M / N gives other targets."""
    data = _inputs()
    case = CASES["ropaws"]
    ours = _replab(data, case)
    y = paws_losses.support_label_matrix(data["labels"].repeat(S_VIEWS), 0.1, dtype=torch.float64)
    sup = torch.cat(data["supports"])
    _, p_in_old = paws_losses.ropaws_targets(data["views"][1], sup, y, 0.1, 0.1, 5.0 * N / len(sup))
    _, p_in_new = paws_losses.ropaws_targets(data["views"][1], sup, y, 0.1, 0.1, 5.0 * N / S_PER_CLASS)
    assert not torch.allclose(p_in_old, p_in_new, atol=1e-3)
    assert ours["p_in"].shape == (N,)
    with pytest.raises(ValueError, match="support_images_per_class"):
        paws_losses.paws(torch.cat(data["views"]), sup, data["views"][:2], sup, data["labels"].repeat(S_VIEWS),
                    ropaws=True)


def _worker(rank, world, init_file, data, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = _local(data, rank, world)
        result = {}
        for name, case in CASES.items():
            ref, ours = _official(local, case, world, rank), _replab(local, case)
            ref_loss = ref["loss"].clone()
            dist.all_reduce(ref_loss)  # the official loss is each worker's own mean; replab's the global one
            ref["loss_mean"] = ref_loss / world
            result[name] = (ref, ours)
        torch.save(result, os.path.join(out_dir, f"parity{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_match_official_and_one_process(tmp_path):
    import torch.multiprocessing as mp

    data = _inputs(seed=1)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), data, str(tmp_path)), nprocs=2)
    whole = {name: _official(data, case, world=1, rank=0) for name, case in CASES.items()}
    n = N // 2
    for rank in range(2):
        result = torch.load(tmp_path / f"parity{rank}.pt", weights_only=False)
        for name, (ref, ours) in result.items():
            _compare(ours, ref, f"{name} rank {rank}")
            torch.testing.assert_close(ours["loss"], ref["loss_mean"], **TOL)
            # each worker's official targets and p_in are its slice of the 1-process result
            rows = torch.cat([torch.arange(v * N + rank * n, v * N + (rank + 1) * n) for v in range(2 + MULTICROP)])
            torch.testing.assert_close(ref["targets"], whole[name]["targets"][rows], **TOL)
            if ref["p_in"] is not None:
                torch.testing.assert_close(ref["p_in"], whole[name]["p_in"][rank * n:(rank + 1) * n], **TOL)
