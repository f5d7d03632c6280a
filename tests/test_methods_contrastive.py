"""MoCo v2/v3, SimSiam, Barlow Twins, VICReg, SwAV and DINO: their losses against the papers' formulas
computed directly, the losses' known limits, the same value and gradient on 2 workers as on 1 worker with the
same global batch, and a few training steps of each method on real CIFAR-10 images (the loss falls, the
embeddings do not collapse, a checkpoint round-trips)."""

from __future__ import annotations

import copy
import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import losses, registry
from replab.methods.base import Progress
from replab.models.backbones import build_backbone
from replab.platform.data.augment import make_views

# ------------------------------------------------------------------------------------------------------
# Direct computations from the papers' formulas (float64 numpy, explicit loops)
# ------------------------------------------------------------------------------------------------------


def unit(x: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax_row(v: np.ndarray) -> np.ndarray:
    m = v.max()
    return v - m - math.log(sum(math.exp(a - m) for a in v))


def direct_infonce(q, k, t):
    q, k = unit(q), unit(k)
    n = len(q)
    total = 0.0
    for i in range(n):
        denom = sum(math.exp(q[i] @ k[j] / t) for j in range(n))
        total -= math.log(math.exp(q[i] @ k[i] / t) / denom)
    return total / n


def direct_moco_queue(q, k, queue, t):
    q, k, negatives = unit(q), unit(k), unit(queue)
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(q[i] @ k[i] / t)
        total -= math.log(pos / (pos + sum(math.exp(q[i] @ n / t) for n in negatives)))
    return total / len(q)


def direct_barlow(z1, z2, lam):
    a, b = z1.double().numpy(), z2.double().numpy()
    n, d = a.shape
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    b = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[s, i] * b[s, j] for s in range(n)) / n
            total += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return total


def direct_vicreg(z1, z2, inv_w, var_w, cov_w):
    a, b = z1.double().numpy(), z2.double().numpy()
    n, d = a.shape
    invariance = sum(((a[s] - b[s]) ** 2).sum() for s in range(n)) / (n * d)

    def variance(z):
        return sum(max(0.0, 1 - math.sqrt(z[:, j].var(ddof=1) + 1e-4)) for j in range(d)) / d

    def covariance(z):
        zc = z - z.mean(0)
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    total += (sum(zc[s, i] * zc[s, j] for s in range(n)) / (n - 1)) ** 2
        return total / d

    return inv_w * invariance + var_w * (variance(a) + variance(b)) / 2 + cov_w * (covariance(a) + covariance(b))


def direct_sinkhorn(scores, eps, iterations):
    q = np.exp(scores.double().numpy() / eps).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for r in range(k):
            q[r] /= q[r].sum() * k
        for c in range(b):
            q[:, c] /= q[:, c].sum() * b
    return (q * b).T


def direct_cross_entropy_pairs(targets, logits_list, temp, skip_same=True):
    """1/|pairs| sum_{s, t != s} 1/B sum_b -sum_k targets[s][b,k] log softmax(logits[t][b] / temp)[k]."""
    total, pairs = 0.0, 0
    for s, q in enumerate(targets):
        for t, logits in enumerate(logits_list):
            if skip_same and s == t:
                continue
            x = logits.double().numpy() / temp
            total += sum(-(q[b] * log_softmax_row(x[b])).sum() for b in range(len(x))) / len(x)
            pairs += 1
    return total / pairs


def softmax_np(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def whitened(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n x d with zero-mean, orthogonal columns of biased variance 1: its correlation matrix is the identity."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    return (q * math.sqrt(n)).float()


# ------------------------------------------------------------------------------------------------------
# Losses: formula and limits
# ------------------------------------------------------------------------------------------------------


def test_infonce_matches_formula_and_limit():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert abs(losses.infonce(q, k, 0.3).item() - direct_infonce(q, k, 0.3)) < 1e-5
    # Orthonormal queries equal to their keys: positives at 1/t, negatives at 0.
    e = torch.eye(6)
    assert abs(losses.infonce(e, 2 * e, 0.2).item() - math.log(1 + 5 * math.exp(-5))) < 1e-6
    # The key side is a stop-gradient target.
    q.requires_grad_(True)
    kk = k.clone().requires_grad_(True)
    losses.infonce(q, kk, 0.3).backward()
    assert kk.grad is None and q.grad is not None


def test_moco_queue_infonce_matches_formula_and_limit():
    g = torch.Generator().manual_seed(1)
    q, k, queue = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(9, 4, generator=g)
    assert abs(losses.moco_queue_infonce(q, k, queue, 0.2).item() - direct_moco_queue(q, k, queue, 0.2)) < 1e-5
    # q = k, queue orthogonal to every q: L = log(1 + K exp(-1/t)).
    e = torch.eye(8)
    value = losses.moco_queue_infonce(e[:3], e[:3], e[3:], 0.2).item()
    assert abs(value - math.log(1 + 5 * math.exp(-5))) < 1e-6


def test_barlow_twins_matches_formula():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    assert abs(losses.barlow_twins(z1, z2, 0.0051).item() - direct_barlow(z1, z2, 0.0051)) < 1e-4


def test_barlow_twins_minimum_is_identical_decorrelated_views():
    z = whitened(64, 8)
    assert losses.barlow_twins(z, z, 0.0051).item() < 1e-6
    assert losses.barlow_twins(z, 3 * z + 1, 0.0051).item() < 1e-6  # invariant to per-dim affine maps
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    assert losses.barlow_twins(z, z + noise, 0.0051).item() > 0.3  # correlations ~ 1/sqrt(2) on the diagonal
    # Identical but correlated views pay lambda * sum of squared off-diagonal correlations.
    x = torch.randn(64, 4)
    x[:, 1] = x[:, 0] + 0.3 * x[:, 1]
    corr = np.corrcoef(x.double().numpy().T)
    expected = 0.0051 * (corr**2).sum() - 0.0051 * 4
    assert abs(losses.barlow_twins(x, x, 0.0051).item() - expected) < 1e-4


def test_vicreg_matches_formula():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(9, 5, generator=g) * 0.7, torch.randn(9, 5, generator=g)
    value = losses.vicreg(z1, z2, 25.0, 25.0, 1.0).item()
    assert abs(value - direct_vicreg(z1, z2, 25.0, 25.0, 1.0)) < 1e-4


def test_vicreg_limits():
    z = whitened(32, 6)  # unbiased std sqrt(32/31) > 1, covariances 0
    assert losses.vicreg(z, z).item() < 1e-6
    collapsed = torch.ones(32, 6)
    assert abs(losses.vicreg(collapsed, collapsed).item() - 25.0 * (1 - math.sqrt(1e-4))) < 1e-4
    noise = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    assert losses.vicreg(z, z + 0.1 * noise).item() > 0.1  # 25 * 0.01 of invariance alone


def test_sinkhorn_matches_algorithm_and_has_the_right_marginals():
    g = torch.Generator().manual_seed(4)
    z, c = F.normalize(torch.randn(12, 8, generator=g), dim=1), F.normalize(torch.randn(5, 8, generator=g), dim=1)
    scores = z @ c.T  # B = 12 samples, K = 5 prototypes
    codes = losses.sinkhorn(scores, 0.05, 3)
    assert np.allclose(codes.double().numpy(), direct_sinkhorn(scores, 0.05, 3), rtol=1e-4, atol=1e-7)
    # Each sample's codes sum to 1 (the last step normalises samples).
    assert torch.allclose(codes.sum(dim=1), torch.ones(12), atol=1e-5)
    # Each prototype gets B/K of the mass: after 3 iterations close, at convergence exact.
    many = losses.sinkhorn(scores, 0.05, 500)
    assert torch.allclose(many.sum(dim=0), torch.full((5,), 12 / 5), rtol=1e-3)
    uniform_gap = lambda q: (q.sum(dim=0) - 12 / 5).abs().max().item()
    assert uniform_gap(codes) < uniform_gap(F.softmax(scores / 0.05, dim=1))
    # Invariant to a constant shift of the scores, which would overflow exp without the max subtraction.
    assert torch.allclose(losses.sinkhorn(scores + 10, 0.05, 3), codes, atol=1e-5)


def test_swav_matches_formula_and_equal_distributions_give_the_entropy():
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(6, 7, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    codes = [F.softmax(torch.randn(6, 7, generator=g), dim=1) for _ in range(2)]
    value = losses.swav(scores, codes, 0.1).item()
    expected = direct_cross_entropy_pairs([c.double().numpy() for c in codes], scores, 0.1)
    assert abs(value - expected) < 1e-4
    # Every crop predicts exactly the codes: the loss is the codes' entropy.
    s = torch.randn(6, 7, generator=g)
    p = F.softmax(s / 0.1, dim=1)
    entropy = -(p * F.log_softmax(s / 0.1, dim=1)).sum(dim=1).mean().item()
    assert abs(losses.swav([s, s, s], [p, p], 0.1).item() - entropy) < 1e-5


def test_dino_matches_formula_and_equal_distributions_give_the_entropy():
    g = torch.Generator().manual_seed(6)
    student = [torch.randn(5, 8, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(5, 8, generator=g) for _ in range(2)]
    center = torch.randn(1, 8, generator=g)
    value = losses.dino(student, teacher, center, 0.1, 0.04).item()
    targets = [softmax_np((t - center).double().numpy() / 0.04) for t in teacher]
    assert abs(value - direct_cross_entropy_pairs(targets, student, 0.1)) < 1e-4
    # Student distribution = centred, sharpened teacher distribution on every crop: the loss is its entropy.
    t = center + 0.05 * torch.randn(5, 8, generator=g)
    s = (t - center) * (0.1 / 0.04) + 3.0  # softmax(s / 0.1) = softmax((t - c) / 0.04)
    p = F.softmax((t - center) / 0.04, dim=1)
    entropy = -(p * F.log_softmax((t - center) / 0.04, dim=1)).sum(dim=1).mean().item()
    assert entropy > 0.5
    assert abs(losses.dino([s, s, s], [t, t], center, 0.1, 0.04).item() - entropy) < 1e-4
    # And any other student pays the KL divergence on top.
    assert losses.dino([s + torch.randn_like(s)] * 3, [t, t], center, 0.1, 0.04).item() > entropy
    # The centre moves towards the mean teacher output with momentum m.
    batch = torch.randn(10, 8, generator=g)
    new = losses.dino_center(center, batch, 0.9)
    assert torch.allclose(new, 0.9 * center + 0.1 * batch.mean(dim=0, keepdim=True), atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo workers with half the batch each == 1 worker with the whole batch
# ------------------------------------------------------------------------------------------------------

D_IN, D_OUT, BATCH = 6, 5, 8


class Shared(nn.Module):
    """One linear layer applied to several inputs: the parameters whose gradient DDP averages."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_OUT)

    def forward(self, *xs):
        return [self.lin(x) for x in xs]


def run_cases(model: nn.Module, data: dict, rows: slice) -> dict:
    """Every loss on this worker's ``rows`` of the global batch: value, parameter gradient, extras."""
    x = [t[rows] for t in data["x"]]
    teacher = [t[rows] for t in data["teacher"]]

    def swav_loss(outs):
        scores = [F.normalize(o, dim=1) @ data["prototypes"].T for o in outs]
        codes = [losses.sinkhorn(scores[s].detach(), 0.05, 3) for s in range(2)]
        return losses.swav(scores, codes, 0.1), {"codes": torch.cat(codes, dim=1)}

    cases = {
        "nt_xent": lambda o: (losses.nt_xent(o[0], o[1], 0.5), {}),
        "barlow_twins": lambda o: (losses.barlow_twins(o[0], o[1], 0.0051), {}),
        "vicreg": lambda o: (losses.vicreg(o[0], o[1]), {}),
        "infonce": lambda o: (losses.infonce(o[0], o[1], 0.2) + losses.infonce(o[1], o[0], 0.2), {}),
        "moco_queue": lambda o: (losses.moco_queue_infonce(o[0], o[1], data["queue"], 0.2), {}),
        "swav": swav_loss,
        "dino": lambda o: (
            losses.dino(o, teacher, data["center"], 0.1, 0.04),
            {"center": losses.dino_center(data["center"], torch.cat(teacher), 0.9)},
        ),
    }
    results = {}
    for name, fn in cases.items():
        model.zero_grad(set_to_none=True)
        loss, extras = fn(model(*x))
        loss.backward()
        net = model.module if hasattr(model, "module") else model
        results[name] = {
            "loss": loss.detach().clone(),
            "grad": torch.cat([net.lin.weight.grad.flatten(), net.lin.bias.grad]).clone(),
            **extras,
        }
    return results


class TinyBackbone(nn.Module):
    """A BN-free encoder: its outputs do not depend on which other images share the batch."""

    out_dim = 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 16))

    def forward(self, x):
        return self.net(x)


def run_mocov2(data: dict, rows: slice, wrap=lambda m: m) -> dict:
    """One MoCo v2 step (shuffling BN across workers when distributed) and its queue update."""
    from replab.methods.mocov2 import MoCoV2, MoCoV2Params

    torch.manual_seed(0)
    method = MoCoV2(TinyBackbone(), MoCoV2Params(queue_size=12, proj_hidden_dim=32, proj_dim=8), 8)
    model = wrap(method)  # keep the DDP wrapper alive through backward (its hooks all-reduce the gradients)
    out = model([v[rows] for v in data["images"]])
    out.loss.backward()
    method.update_teacher()
    with torch.no_grad():
        keys = method.key_projector(method.key_backbone(data["images"][1][rows]))
    return {"loss": out.loss.detach(), "grad": method.projector[0].weight.grad.clone(), "keys": keys,
            "queue": method.queue.clone(), "queue_ptr": method.queue_ptr.clone()}


def distributed_worker(rank: int, world: int, init_file: str, state: dict, data: dict, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = Shared()
        net.load_state_dict(state)
        model = DDP(net)
        n = BATCH // world
        results = run_cases(model, data, slice(rank * n, (rank + 1) * n))
        results["mocov2"] = run_mocov2(data, slice(rank * n, (rank + 1) * n), wrap=DDP)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_match_one_worker(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(7)
    data = {
        "x": [torch.randn(BATCH, D_IN, generator=g) for _ in range(3)],
        "teacher": [torch.randn(BATCH, D_OUT, generator=g) for _ in range(2)],
        "queue": torch.randn(11, D_OUT, generator=g),
        "prototypes": F.normalize(torch.randn(4, D_OUT, generator=g), dim=1),
        "center": torch.randn(1, D_OUT, generator=g),
        "images": [torch.randn(BATCH, 3, 8, 8, generator=g) for _ in range(2)],
    }
    torch.manual_seed(0)
    net = Shared()
    reference = run_cases(net, data, slice(0, BATCH))
    reference["mocov2"] = run_mocov2(data, slice(0, BATCH))
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), net.state_dict(), data, str(tmp_path)), nprocs=2)
    workers = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    half = BATCH // 2
    for name, ref in reference.items():
        for rank, got in enumerate(w[name] for w in workers):
            assert torch.allclose(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6), (name, rank, "value")
            # DDP averaged the workers' gradients: equal to one worker's gradient with the whole batch.
            assert torch.allclose(got["grad"], ref["grad"], rtol=1e-4, atol=1e-6), (name, rank, "gradient")
        if name == "swav":  # distributed Sinkhorn: each worker's codes are its rows of the global codes
            got_codes = torch.cat([w[name]["codes"] for w in workers])
            assert torch.allclose(got_codes, ref["codes"], rtol=1e-4, atol=1e-6)
            # ... which differ from Sinkhorn on the worker's half alone: the all-reduced sums matter.
            with torch.no_grad():
                local_scores = F.normalize(net.lin(data["x"][0][:half]), dim=1) @ data["prototypes"].T
            local_codes = losses.sinkhorn(local_scores, 0.05, 3)
            assert not torch.allclose(local_codes, ref["codes"][:half, : local_scores.shape[1]], atol=1e-3)
        if name == "dino":  # the centre uses the teacher outputs of the global batch
            for w in workers:
                assert torch.allclose(w[name]["center"], ref["center"], atol=1e-6)
        if name == "mocov2":  # shuffled keys come back in order; both workers enqueue the global batch
            assert torch.allclose(torch.cat([w[name]["keys"] for w in workers]), ref["keys"], atol=1e-6)
            assert torch.allclose(ref["queue"][:BATCH], F.normalize(ref["keys"], dim=1), atol=1e-6)
            assert ref["queue_ptr"].item() == BATCH
            for w in workers:
                assert torch.allclose(w[name]["queue"], ref["queue"], atol=1e-6)
                assert w[name]["queue_ptr"].item() == BATCH


# ------------------------------------------------------------------------------------------------------
# Methods: a few steps on real CIFAR-10 images
# ------------------------------------------------------------------------------------------------------


def cifar_parquet() -> Path:
    root = os.environ.get("REPLAB_DATA_ROOT")
    base = Path(root) if root else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    return base / "cifar10" / "train-00000-of-00005.parquet"


def load_cifar(n: int) -> torch.Tensor:
    """The first ``n`` training images of CIFAR-10 as uint8 ``[n, 32, 32, 3]``."""
    import pyarrow.parquet as pq
    from PIL import Image

    path = cifar_parquet()
    assert path.is_file(), f"CIFAR-10 parquet not found at {path}; set REPLAB_DATA_ROOT"
    batch = next(pq.ParquetFile(path).iter_batches(batch_size=n, columns=["image"]))
    rows = batch.column("image").to_pylist()
    images = [np.asarray(Image.open(io.BytesIO(row["bytes"])).convert("RGB")) for row in rows]
    return torch.from_numpy(np.stack(images))


@pytest.fixture(scope="module")
def cifar() -> torch.Tensor:
    return load_cifar(256)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is many times faster than contended threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = {
    "mocov2": dict(proj_hidden_dim=256, queue_size=128),
    "mocov3": dict(proj_hidden_dim=256, proj_dim=64, pred_hidden_dim=256),
    "simsiam": dict(proj_hidden_dim=256, proj_dim=256, pred_hidden_dim=64),
    "barlow_twins": dict(proj_hidden_dim=256, proj_dim=256),
    "vicreg": dict(proj_hidden_dim=256, proj_dim=256),
    "swav": dict(num_prototypes=64, proj_hidden_dim=256, proj_dim=32, n_local_crops=2),
    "dino": dict(out_dim=256, hidden_dim=256, bottleneck_dim=64, n_local_crops=2),
}
LR = {"mocov2": 0.1, "mocov3": 0.1, "simsiam": 0.1, "barlow_twins": 0.01, "vicreg": 0.01, "swav": 0.03, "dino": 0.1}
STEPS, BATCH_SIZE, WARMUP = 30, 32, 4


def build(name: str):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 32, width=0.25, cifar_stem=False)
    return registry.build(name, SMALL[name], backbone, 32)


def embedding_spread(z: torch.Tensor) -> float:
    """Mean over dimensions of the std across the batch of the L2-normalised embeddings, times sqrt(D)
    (about 1 for embeddings spread uniformly on the sphere, 0 for a collapse to one point)."""
    u = F.normalize(z.float(), dim=1)
    return (u.std(dim=0).mean() * math.sqrt(u.shape[1])).item()


@pytest.mark.parametrize("name", list(SMALL))
def test_method_trains_without_collapse_and_round_trips(name, cifar):
    method = build(name)
    method.train()
    g = torch.Generator().manual_seed(1)
    probe = make_views(cifar[:64], method.views(), generator=g)

    def probe_loss():
        """The loss on fixed views, on a copy (no trace in queues or centres) at fixed schedules. For DINO
        the part that training lowers: the loss is H(P_t) + KL(P_t || P_s) and the teacher's entropy rises
        at first, as the centre removes what the random teacher's outputs have in common."""
        probe_method = copy.deepcopy(method)
        probe_method.progress = Progress()
        with torch.no_grad():
            out = probe_method(probe)
        return out.metrics.get("kl", out.loss).item(), embedding_spread(out.embeddings)

    for _ in range(WARMUP):  # fill queues / centres with real keys before measuring (no optimizer step)
        with torch.no_grad():
            idx = torch.randint(0, len(cifar), (BATCH_SIZE,), generator=g)
            method(make_views(cifar[idx], method.views(), generator=g))
        method.update_teacher()
    before, spread_before = probe_loss()
    opt = torch.optim.SGD(method.parameter_groups(1e-5), lr=LR[name], momentum=0.9)
    for step in range(STEPS):
        # Two "epochs": SwAV's prototypes and DINO's last layer are frozen during the first.
        method.progress.step, method.progress.total_steps = step, STEPS
        method.progress.epoch, method.progress.epochs = step * 2 // STEPS, 2
        idx = torch.randint(0, len(cifar), (BATCH_SIZE,), generator=g)
        out = method(make_views(cifar[idx], method.views(), generator=g))
        assert torch.isfinite(out.loss)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        method.update_teacher()
    after, spread_after = probe_loss()
    print(f"{name}: probe loss {before:.4f} -> {after:.4f}, spread {spread_before:.3f} -> {spread_after:.3f}")
    assert after < before, f"{name}: loss did not fall ({before:.4f} -> {after:.4f})"
    assert spread_after > 0.1, f"{name}: embeddings collapsed (spread {spread_after:.3f})"

    # Checkpoint round trip: a fresh instance with the saved state computes the same thing.
    state = copy.deepcopy(method.state_dict())
    fresh = registry.build(name, SMALL[name], build_backbone("resnet18", 32, width=0.25, cifar_stem=False), 32)
    fresh.load_state_dict(state)
    fresh.progress = copy.copy(method.progress)
    method.eval(), fresh.eval()
    with torch.no_grad():
        a, b = method(probe), fresh(probe)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.embeddings, b.embeddings)
    assert torch.equal(method.encoder(probe[0]), fresh.encoder(probe[0]))


def test_swav_queue_fills_then_joins_the_sinkhorn_batch():
    from replab.methods.swav import SwAV, SwAVParams

    torch.manual_seed(0)
    params = SwAVParams(num_prototypes=10, proj_hidden_dim=32, proj_dim=8, n_local_crops=1, queue_length=12,
                        queue_start_epoch=1)
    method = SwAV(TinyBackbone(), params, 8)
    batches = [[torch.randn(4, 3, 8, 8) for _ in range(3)] for _ in range(4)]
    method(batches[0])
    method.update_teacher()
    assert method.queue is None  # before queue_start_epoch
    method.progress.epoch = 1
    for views in batches[1:]:
        out = method(views)
        method.update_teacher()
    assert method._queued == 12
    with torch.no_grad():
        newest = F.normalize(method.projector(method.backbone(torch.cat(batches[-1][:2]))), dim=1).view(2, 4, -1)
        assert torch.allclose(method.queue[:, :4], newest, atol=1e-5)  # newest first
        assert torch.allclose(method.prototypes.weight.norm(dim=1), torch.ones(10), atol=1e-5)
        scores = newest[0] @ method.prototypes.weight.T
        queued = method.queue[0] @ method.prototypes.weight.T
        with_queue = losses.sinkhorn(torch.cat([queued, scores]), 0.05, 3)[-4:]
        assert torch.allclose(method._codes(scores, 0), with_queue, atol=1e-6)
        assert not torch.allclose(with_queue, losses.sinkhorn(scores, 0.05, 3), atol=1e-3)
    assert torch.isfinite(out.loss)


def test_model_width_scales_a_vit_token_width_and_keeps_depth_and_heads():
    """``model.width`` reaches ViTs too (it was silently ignored): 3 heads of 32 at width 0.5 for ViT-Tiny."""
    half, full = build_backbone("vit_tiny", 32, width=0.5), build_backbone("vit_tiny", 32)
    assert (half.out_dim, full.out_dim) == (96, 192)
    block = half.encoder.layers[0]
    assert block.self_attention.num_heads == 3 and block.mlp[0].out_features == 384
    assert len(half.encoder.layers) == len(full.encoder.layers) == 12
    assert half(torch.zeros(2, 3, 32, 32)).shape == (2, 96)
    params = [sum(p.numel() for p in build_backbone("vit_tiny", 32, width=w).parameters()) for w in (0.5, 0.75, 1)]
    assert params[0] < params[1] < params[2]


def test_vit_recipes_mocov3_and_dino():
    """MoCo v3 picks its ViT recipe from the backbone; DINO's local crops run through a ViT."""
    vit = build_backbone("vit_tiny", 32)
    method = registry.build("mocov3", {"proj_hidden_dim": 64, "pred_hidden_dim": 64}, vit, 32)
    assert method.optimizer.name == "adamw" and method.temperature == 0.2 and method.crop_min == 0.08
    assert sum(isinstance(m, nn.Linear) for m in method.projector) == 3
    assert not any(p.requires_grad for p in method.backbone.conv_proj.parameters())
    resnet = registry.build("mocov3", {}, build_backbone("resnet18", 32, width=0.25), 32)
    assert resnet.optimizer.name == "lars" and resnet.temperature == 1.0
    assert sum(isinstance(m, nn.Linear) for m in resnet.projector) == 2

    torch.manual_seed(0)
    dino = registry.build("dino", {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "n_local_crops": 2},
                          build_backbone("vit_tiny", 32), 32)
    views = make_views(load_cifar(4), dino.views(), generator=torch.Generator().manual_seed(0))
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]
    out = dino(views)
    out.loss.backward()
    assert torch.isfinite(out.loss) and dino.backbone.conv_proj.weight.grad is not None
    assert dino.head.last_layer.weight.grad.abs().max() == 0  # frozen during the first epoch


def test_dino_schedules():
    """tau_t rises linearly from 0.04 to 0.07 over the first 10% of training; the EMA momentum goes 0.996 -> 1."""
    from replab.methods.dino import DINO, DINOParams

    dino = DINO(TinyBackbone(), DINOParams(out_dim=16, hidden_dim=16, bottleneck_dim=8, n_local_crops=0), 8)
    temps, taus = [], []
    for step in (0, 5, 10, 100):
        dino.progress = Progress(step=step, total_steps=100)
        temps.append(dino.teacher_temp)
        taus.append(dino.tau)
    assert np.allclose(temps, [0.04, 0.055, 0.07, 0.07])
    assert taus[0] == pytest.approx(0.996) and taus[-1] == pytest.approx(1.0) and taus == sorted(taus)
    assert dino.encoder is dino.teacher_backbone  # the teacher's features are evaluated, as in the paper


def test_swav_colour_jitter_strength_scales_the_official_jitter():
    from replab.methods.swav import swav_views

    official, half = swav_views(32, 2), swav_views(32, 0, jitter=0.5)
    assert len(official) == 4 and len(half) == 2
    assert (official[0].brightness, official[0].hue) == (0.8, 0.2)
    assert (half[0].brightness, half[0].contrast, half[0].saturation, half[0].hue) == (0.4, 0.4, 0.4, 0.1)
