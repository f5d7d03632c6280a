"""Semi-supervised and open-set pieces: PAWS / RoPAWS losses against their formulas, labeled splits, the
support sampler, unlabeled pools, AUROC and the open-set evaluation, and short PAWS / RoPAWS runs on CIFAR-10."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from replab.config import ConfigError
from replab.methods import paws_losses
from replab.platform.data import labeled as labeled_lib
from replab.platform.data import pool as pool_lib
from replab.platform.data import support as support_lib
from replab.platform.probes import openset
from replab.validate import load_config

KNOWN = "data.known_classes=[2,3,4,5,6,7]"


def _unit(x):
    return F.normalize(x.float(), dim=1)


# ------------------------------------------------------------------------------------------ losses


def test_snn_and_sharpen_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    q, s = torch.randn(5, 8, generator=g), torch.randn(12, 8, generator=g)
    labels = torch.arange(3).repeat(4)
    y = paws_losses.support_label_matrix(labels, smoothing=0.1)
    assert torch.allclose(y.sum(1), torch.ones(12))
    assert y[0, 0] == pytest.approx(0.9 + 0.1 / 3) and y[0, 1] == pytest.approx(0.1 / 3)
    probs = paws_losses.snn(q, s, y, tau=0.1)
    for i in range(5):
        w = torch.tensor([math.exp(F.cosine_similarity(q[i], s[j], dim=0).item() / 0.1) for j in range(12)])
        expected = (w[:, None] * y).sum(0) / w.sum()
        assert torch.allclose(probs[i], expected, atol=1e-5)
    p = torch.softmax(torch.randn(4, 6, generator=g), dim=1)
    direct = p ** 4 / (p ** 4).sum(1, keepdim=True)
    assert torch.allclose(paws_losses.sharpen(p, 0.25), direct, atol=1e-6)
    # remapping: labels need not be 0..K-1
    remapped = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(paws_losses.support_label_matrix(torch.tensor([7, 2, 7])), remapped)


def _kernel_blocks(q, s, tau, prior_tau, r):
    """C_L, C_U written out from the definition (independently of paws_losses.ropaws_propagate)."""
    q, s = _unit(q).double(), _unit(s).double()
    m = len(q)
    kl = r * torch.exp(q @ s.T / tau)
    ku = torch.exp(q @ q.T / tau) * (1 - torch.eye(m, dtype=torch.float64))
    prior = torch.exp(((q @ s.T).max(1).values - 1) / prior_tau)
    z = kl.sum(1, keepdim=True) + ku.sum(1, keepdim=True)
    return kl / z * prior[:, None], ku / z * prior[:, None], prior


def test_label_propagation_equals_iterative_fixed_point():
    g = torch.Generator().manual_seed(1)
    q, s = torch.randn(20, 6, generator=g), torch.randn(9, 6, generator=g)
    y = paws_losses.support_label_matrix(torch.arange(3).repeat(3), 0.1)
    p, p_in = paws_losses.ropaws_propagate(q, s, y, tau=0.5, prior_tau=0.5, labeled_weight=5.0 * 20 / 3)
    c_l, c_u, _ = _kernel_blocks(q, s, 0.5, 0.5, 5.0 * 20 / 3)
    it = torch.zeros(20, 3, dtype=torch.float64)
    for _ in range(2000):
        it = c_l @ y.double() + c_u @ it
    assert torch.allclose(p.double(), it, atol=1e-5)
    assert torch.allclose(p_in.double(), it.sum(1), atol=1e-5)
    assert (p_in <= 1 + 1e-6).all() and (p_in > 0).all()


def test_ropaws_targets_on_a_toy_embedding():
    e = torch.eye(4)
    supports = torch.stack([e[0], e[0] + 0.05 * e[3], e[1], e[1] + 0.05 * e[3]])  # class 0 at e0, class 1 at e1
    labels = torch.tensor([0, 0, 1, 1])
    y = paws_losses.support_label_matrix(labels)
    near = e[0] + 0.02 * e[1]  # next to a labeled image of class 0
    far = e[2]  # orthogonal to every labeled image
    between = e[0] + e[1]  # equally close to both classes
    queries = torch.stack([near, far, between])
    targets, p_in = paws_losses.ropaws_targets(queries, supports, y, tau=0.1, prior_tau=0.1, labeled_weight=5.0 * 3 / 2)
    assert torch.allclose(targets.sum(1), torch.ones(3), atol=1e-5)
    assert targets[0, 0] > 0.95 and p_in[0] > 0.9  # inherits its neighbour's label, in-class
    assert torch.allclose(targets[1], torch.full((2,), 0.5), atol=1e-3) and p_in[1] < 1e-3  # uniform, out-of-class
    assert abs(targets[2, 0].item() - 0.5) < 0.02  # equidistant: undecided (up to its unlabeled neighbours)
    # through the loss: the far image gets a near-zero weight, its targets stay uniform after sharpening
    sharp = paws_losses.sharpen(targets, 0.25)
    assert torch.allclose(sharp[1], torch.full((2,), 0.5), atol=1e-3) and sharp[0, 0] > 0.99


def _reference_paws(anchors, supports, targets, support_labels, tau, T, smoothing, weight=None):
    """PAWS's loss written the way the reference code computes it (single worker)."""
    y = paws_losses.support_label_matrix(support_labels, smoothing)
    n = targets[0].shape[0]
    probs = torch.softmax(_unit(anchors) @ _unit(supports).T / tau, 1) @ y
    t = [paws_losses.sharpen(torch.softmax(_unit(v) @ _unit(supports).T / tau, 1) @ y, T) for v in targets]
    tgt = torch.cat([t[1], t[0]] + [0.5 * (t[0] + t[1])] * (anchors.shape[0] // n - 2))
    tgt[tgt < 1e-4] = 0
    ce = torch.sum(torch.log(probs ** (-tgt)), dim=1)
    if weight is not None:
        ce = weight.repeat(anchors.shape[0] // n) * ce
    avg = paws_losses.sharpen(probs, T).mean(0)
    me = torch.sum(avg * torch.log(avg)) + math.log(len(avg))
    return ce.mean() + me


def test_paws_loss_matches_reference_and_reaches_supports():
    g = torch.Generator().manual_seed(2)
    n, d = 8, 16
    anchors = torch.randn(4 * n, d, generator=g)
    supports = torch.randn(12, d, generator=g, requires_grad=True)
    targets = [torch.randn(n, d, generator=g) for _ in range(2)]
    support_labels = torch.tensor([5, 6, 7]).repeat_interleave(4)
    loss, metrics = paws_losses.paws(anchors, supports, targets, supports.detach(), support_labels, 0.1, 0.25, 0.1)
    ref = _reference_paws(anchors, supports.detach(), targets, support_labels, 0.1, 0.25, 0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert metrics["support_classes"].item() == 3 and metrics["me_max"] >= 0
    loss.backward()
    assert supports.grad is not None and supports.grad.abs().sum() > 0


def _paws_cases(model, data, rows, support_rows):
    """PAWS and RoPAWS on this worker's rows: (loss, gradient of the shared layer) per case."""
    out = {}
    for name, ropaws in (("paws", False), ("ropaws", True)):
        model.zero_grad(set_to_none=True)
        z = model(*[v[rows] for v in data["views"]], data["supports"][support_rows])
        anchors, supports = torch.cat(z[:4]), z[4]
        loss, _ = paws_losses.paws(anchors, supports, [z[0].detach(), z[1].detach()], supports.detach(),
                              data["labels"][support_rows], tau=0.5, ropaws=ropaws, prior_tau=0.5,
                              support_images_per_class=len(data["labels"][support_rows]) // 3)
        loss.backward()
        net = model.module if hasattr(model, "module") else model
        out[name] = (loss.detach().clone(), net.weight.grad.clone())
    return out


class _SharedLinear(torch.nn.Linear):
    def forward(self, *xs):
        return [super(_SharedLinear, self).forward(x) for x in xs]


def _paws_worker(rank, world, init_file, state, data, out_dir):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = _SharedLinear(6, 5)
        net.load_state_dict(state)
        n, s = 8 // world, 12 // world
        result = _paws_cases(DDP(net), data, slice(rank * n, (rank + 1) * n), slice(rank * s, (rank + 1) * s))
        torch.save(result, os.path.join(out_dir, f"paws{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_match_one_worker(tmp_path):
    """Supports and RoPAWS's propagation gathered over 2 gloo workers: value and DDP gradient == 1 worker."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    data = {"views": [torch.randn(8, 6, generator=g) for _ in range(4)], "supports": torch.randn(12, 6, generator=g),
            "labels": torch.tensor([0, 1, 2]).repeat(4)}
    torch.manual_seed(0)
    net = _SharedLinear(6, 5)
    reference = _paws_cases(net, data, slice(0, 8), slice(0, 12))
    mp.spawn(_paws_worker, args=(2, str(tmp_path / "init"), net.state_dict(), data, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"paws{rank}.pt")
        for name, (loss, grad) in reference.items():
            assert torch.allclose(got[name][0], loss, rtol=1e-5, atol=1e-6), (name, rank)
            assert torch.allclose(got[name][1], grad, rtol=1e-4, atol=1e-6), (name, rank)


# ------------------------------------------------------------------------------------------ AUROC


def test_auroc_against_pairwise_counts():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 20, 300).astype(float)  # many ties
    neg = rng.integers(0, 15, 200).astype(float)
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (300 * 200)
    assert openset.auroc(pos, neg) == pytest.approx(pairwise, abs=1e-12)
    assert openset.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and openset.auroc([0.0], [1.0]) == 0.0
    assert openset.auroc([1.0, 1.0], [1.0]) == 0.5 and math.isnan(openset.auroc([], [1.0]))


# ------------------------------------------------------------------------------------------ splits and supports


def test_select_labeled_is_deterministic_and_nested():
    labels = np.repeat(np.arange(10), 100)
    a = labeled_lib.select_labeled(labels, [2, 3], labels_per_class=25, seed=0)
    b = labeled_lib.select_labeled(labels, [2, 3], labels_per_class=25, seed=0)
    c = labeled_lib.select_labeled(labels, [2, 3], labels_per_class=25, seed=1)
    big = labeled_lib.select_labeled(labels, [2, 3], labels_per_class=50, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a[2], c[2])
    assert set(a[2]) <= set(big[2]) and len(a[2]) == 25 and (labels[a[3]] == 3).all()
    frac = labeled_lib.select_labeled(labels, [0], label_fraction=0.1, seed=0)
    assert len(frac[0]) == 10


def test_split_files_are_deterministic(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAB_CACHE_DIR", str(tmp_path / "cache"))
    base = [f"data.root={data_root}", KNOWN, "data.labels_per_class=25"]
    cfg = load_config(None, base)
    first = labeled_lib.labeled_split(cfg.data)
    path = labeled_lib.split_path(cfg.data)
    assert path.is_file() and str(path).startswith(str(tmp_path / "cache" / "splits"))
    text = path.read_text()
    path.unlink()
    again = labeled_lib.labeled_split(cfg.data)
    assert path.read_text() == text  # same seed -> the same file, byte for byte
    assert {c: list(r) for c, r in again.rows.items()} == {c: list(r) for c, r in first.rows.items()}
    assert again.known_classes == [2, 3, 4, 5, 6, 7] and all(len(r) == 25 for r in again.rows.values())
    other = load_config(None, base + ["data.split_seed=1", f"data.split_file={tmp_path}/seed1.json"])
    labeled_lib.labeled_split(other.data)
    assert (tmp_path / "seed1.json").read_text() != text  # different seed -> a different file
    # an existing file is read as is, and must agree with the config
    bad = load_config(None, [f"data.root={data_root}", "data.known_classes=[0,1]", f"data.split_file={path}"])
    with pytest.raises(ConfigError, match="known_classes"):
        labeled_lib.labeled_split(bad.data)


def test_support_sampler_balance_and_streams():
    labels = np.repeat(np.arange(4), [3, 5, 7, 9])
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    sampler = support_lib.SupportSampler(images, labels, classes_per_step=0, images_per_class=6, seed=0)
    seen = {c: [] for c in range(4)}
    for _ in range(5):
        x, y = next(sampler)
        assert x.shape == (24, 2, 2, 3) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(torch.bincount(y, minlength=4), torch.full((4,), 6))
        assert (labels[x[:, 0, 0, 0].numpy()] == y.numpy()).all()  # each image carries its own label
        for img, lab in zip(x[:, 0, 0, 0].tolist(), y.tolist()):
            seen[lab].append(img)
    # class 0 (3 images) is cycled in passes: every image exactly 10 times in 30 draws
    assert sorted(np.bincount(seen[0]).tolist()) == [10, 10, 10]
    sub = support_lib.SupportSampler(images, labels, classes_per_step=2, images_per_class=3, seed=0)
    x, y = next(sub)
    assert x.shape[0] == 6 and len(torch.unique(y)) == 2


def test_support_sampler_from_config_on_cifar(data_root, tmp_path, monkeypatch):
    from replab.methods.base import SupportSpec
    from replab.platform.data.augment import ViewSpec

    monkeypatch.setenv("REPLAB_CACHE_DIR", str(tmp_path))
    cfg = load_config(None, [f"data.root={data_root}", KNOWN, "data.labels_per_class=4"])
    spec = SupportSpec(0, 3, (ViewSpec.plain(32),))
    it = support_lib.support_sampler(cfg, spec, 0, 1, torch.device("cpu"))
    x, y = next(it)
    assert x.shape == (18, 32, 32, 3) and torch.equal(torch.bincount(y), torch.full((6,), 3))
    rows = labeled_lib.labeled_split(cfg.data).rows[2]  # class 2 (bird) -> support label 0
    src = labeled_lib.resolve_source(cfg.data)
    images, labels = labeled_lib.load_rows(src, rows, 32)
    first = x[y == 0][0].numpy()
    assert any(np.array_equal(first, img) for img in images) and (labels == 2).all()
    # a resumed run (start_epoch > 0) draws its own stream; the same start epoch gives the same stream
    again = support_lib.support_sampler(cfg, spec, 0, 1, torch.device("cpu"))
    assert torch.equal(next(again)[0], x)
    resumed = [next(support_lib.support_sampler(cfg, spec, 0, 1, torch.device("cpu"), start_epoch=3))[0] for _ in range(2)]
    assert torch.equal(resumed[0], resumed[1]) and not torch.equal(resumed[0], x)
    no_labels = load_config(None, [f"data.root={data_root}"])
    with pytest.raises(ConfigError, match="labels_per_class"):
        support_lib.support_sampler(no_labels, spec, 0, 1, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ unlabeled pools


def test_mismatch_pool_and_mixing(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAB_CACHE_DIR", str(tmp_path))
    base = [f"data.root={data_root}", KNOWN, "data.labels_per_class=10", "data.unlabeled_exclude_labeled=true"]
    cfg = load_config(None, base + ["data.ood_fraction=0.25", "data.unlabeled_size=200"])
    sources = pool_lib.pool_manifest(cfg.data)
    assert [len(s.rows) for s in sources] == [150, 50]
    assert sources[0].in_class.all() and not sources[1].in_class.any()
    labeled = labeled_lib.labeled_split(cfg.data).all_rows()
    assert not np.isin(sources[0].rows, labeled).any()
    assert pool_lib.pool_summary(sources)["pool/out_of_class_fraction"] == pytest.approx(0.25)
    pool = pool_lib.load_unlabeled_arrays(cfg.data)
    assert pool.images.shape == (200, 32, 32, 3) and (pool.labels == -1).all()
    assert pool.in_class.sum() == 150 and set(np.unique(pool.true_labels[~pool.in_class])) <= {0, 1, 8, 9}
    # nested across ratios: the known rows at 50% are inside those at 25% (same pool size)
    half = pool_lib.pool_manifest(load_config(None, base + ["data.ood_fraction=0.5", "data.unlabeled_size=200"]).data)
    assert set(half[0].rows) <= set(sources[0].rows)
    mix = load_config(None, base + ["data.mix=[{classes: known, count: 30}, "
                                    "{dataset: tinyimagenet, split: val, count: 20}]"])
    pool = pool_lib.load_unlabeled_arrays(mix.data)
    assert pool.images.shape[0] == 50 and pool.in_class.sum() == 30 and (pool.labels == -1).all()
    with pytest.raises(ConfigError, match="sum to 1"):
        bad = load_config(None, base + ["data.mix=[{fraction: 0.5}, {classes: unknown, fraction: 0.4}]"])
        labeled_lib.validate(bad.data)
    with pytest.raises(ConfigError, match=r"data.mix\[0\].fractoin"):
        labeled_lib.validate(load_config(None, base + ["data.mix=[{fractoin: 1.0}]"]).data)


@pytest.mark.ray
def test_unlabeled_ray_dataset_hides_labels(data_root, tmp_path, monkeypatch, ray_session):
    monkeypatch.setenv("REPLAB_CACHE_DIR", str(tmp_path))
    cfg = load_config(None, [f"data.root={data_root}", KNOWN, "data.labels_per_class=5",
                             "data.mix=[{classes: known, count: 40}, {dataset: tinyimagenet, split: val, count: 24}]"])
    td = pool_lib.build_unlabeled_dataset(cfg.data)
    assert td.num_rows == 64 and td.num_classes == 6
    rows = td.dataset.take_all()
    assert len(rows) == 64 and all(r["label"] == -1 for r in rows) and rows[0]["image"].shape == (32, 32, 3)


# ------------------------------------------------------------------------------------------ open-set evaluation


class _ColourEncoder(torch.nn.Module):
    """Mean colour of the image as a 3-d feature (enough to separate flat-coloured toy classes)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _flat_images(colours, n, rng):
    out = []
    for c in colours:
        base = np.asarray(c, np.float64)
        noise = rng.normal(0, 4, (n, 1, 1, 3))
        out.append(np.clip(base[None, None, None] + noise, 0, 255).repeat(8, 1).repeat(8, 2))
    return np.concatenate(out).astype(np.uint8)


def test_openset_evaluation_on_a_toy_encoder():
    rng = np.random.default_rng(0)
    known = [(250, 20, 20), (20, 250, 20)]
    unknown = [(20, 20, 250)]
    data = openset.OpenSetData(
        labeled_images=_flat_images(known, 10, rng), labeled_labels=np.repeat([0, 1], 10), known_classes=[3, 5],
        test_images=_flat_images(known + unknown, 20, rng), test_labels=np.repeat([3, 5, 1], 20),
        ood_images=_flat_images([(128, 128, 128)], 20, rng),
    )
    out = openset.evaluate_openset(_ColourEncoder(), data, 8, torch.device("cpu"))
    assert out["openset/snn_top1"] == 1.0 and out["openset/auroc"] > 0.99 and out["openset/ood_auroc"] > 0.99
    assert 0 <= out["openset/auroc_msp"] <= 1
    probs, max_sim = openset.snn_scores(torch.eye(2), torch.tensor([0, 1]), torch.tensor([[1.0, 0.0]]), 2)
    assert max_sim.item() == pytest.approx(1.0) and probs[0, 0] > 0.99
    assert openset.in_class_probability(torch.tensor([1.0, 0.0])).tolist() == pytest.approx([1.0, math.exp(-10)])
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    ft = openset.evaluate_finetune(enc, data, 8, torch.device("cpu"), epochs=2, batch_size=8)
    assert 0 <= ft["finetune/top1"] <= 1 and 0 <= ft["finetune/auroc_msp"] <= 1


# ------------------------------------------------------------------------------------------ methods


TINY = ["data.resolution=32", "model.backbone=resnet18", "model.width=0.25", "method.proj_hidden_dim=64",
        "method.proj_dim=32", "method.support_images_per_class=2", "method.n_local_crops=2",
        "train.batch_size=16", "train.log_every=1", "train.precision=fp32", "train.warmup_epochs=0",
        "train.epochs=1", "train.steps_per_epoch=3", "train.lr=1.0", "eval.knn=false", "eval.linear=false",
        "train.channels_last=false", KNOWN, "data.labels_per_class=6", "data.unlabeled_exclude_labeled=true",
        "data.ood_fraction=0.5", "data.unlabeled_size=48"]


def test_paws_never_reads_the_unlabeled_labels():
    from replab.methods.base import Support
    from replab.platform.data.augment import make_views
    from replab.platform.train.loop import build_method

    torch.manual_seed(0)
    method = build_method(load_config(None, TINY + ["method.name=paws"]))
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    views = make_views(images, method.views())
    support_images = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8)
    support = Support(make_views(support_images, list(method.support().views)), torch.arange(6).repeat_interleave(2))
    spec = method.support()
    assert spec.images_per_class == 2 and len(spec.views) == 2 and len(method.views()) == 4
    a = method(views, None, support=support).loss
    b = method(views, torch.randint(0, 10, (8,)), support=support).loss
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="support"):
        method(views, None)


class _Recorder:
    def __init__(self):
        self.rows = []

    def metrics(self, values, step):
        self.rows.append(dict(values))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paws", "ropaws"])
def test_short_run_on_cifar_does_not_collapse(name, data_root, tmp_path, monkeypatch, capsys):
    from replab.platform.train.loop import LocalEnv, train_worker

    monkeypatch.setenv("REPLAB_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = load_config(None, TINY + [f"method.name={name}", f"data.root={data_root}"])
    pool = pool_lib.load_unlabeled_arrays(cfg.data)
    assert (pool.labels == -1).all() and pool.in_class.mean() == pytest.approx(0.5)
    env = LocalEnv(pool.images, pool.labels, tmp_path / "ckpt")
    log = _Recorder()
    result = train_worker(cfg, env, num_rows=len(pool.images), logger=log)
    assert result.steps == 3
    steps = [r for r in log.rows if "train/loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["train/loss"]) for r in steps)
    assert all(r["train/embedding_std"] > 0.02 for r in steps)  # not collapsed
    if name == "paws":
        assert all(r["train/target_entropy"] < 0.97 * math.log(6) for r in steps)  # targets not uniform
    else:
        # RoPAWS starts cautious: at random init few images are close to a labeled one (p_in ~ 0.1), so most
        # targets carry the uniform out-of-class mass; they are still not uniform and the weights not zero.
        assert all(r["train/target_entropy"] < math.log(6) - 1e-3 for r in steps)
        assert all(0 < r["train/p_in"] <= 1 for r in steps)
    # `replab eval --openset` on the final checkpoint: the run's own labeled split and known classes
    from replab.cli import main

    capsys.readouterr()  # drop the training progress lines
    code = main(["eval", env.latest_checkpoint(), "--openset", "--ood-limit", "40", "--set", f"data.root={data_root}",
                 "--set", "eval.test_limit=120", "--set", "tracking.enabled=false"]
                + (["--finetune-epochs", "1"] if name == "paws" else []))
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["openset/labeled"] == 6 * 6  # TINY: 6 labels per known class
    for key in ("openset/snn_top1", "openset/auroc", "openset/ood_auroc", "openset/auroc_msp"):
        assert 0 <= out[key] <= 1, key
    assert (name == "paws") == ("finetune/top1" in out)
