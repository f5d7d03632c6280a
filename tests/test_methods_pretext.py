"""MAE, Jigsaw, relative patch location, colorization, context encoder, Exemplar and counting: their losses
against the papers' formulas computed directly and at their known limits, the building blocks (Lab
conversion, the Hamming permutation set, masking, tiling, image ids), and a few training steps of each
method on real CIFAR-10 images (the loss falls, the embeddings do not collapse, a checkpoint round-trips)."""

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

from replab.methods import losses, registry
from replab.methods._pretext import crop_tiles, grid_corners
from replab.models.backbones import build_backbone
from replab.platform.data.augment import make_views

# ------------------------------------------------------------------------------------------------------
# Losses against direct computations (float64 numpy, explicit loops)
# ------------------------------------------------------------------------------------------------------


def test_mae_loss_matches_formula_and_perfect_prediction_is_zero():
    torch.manual_seed(0)
    b, n, d = 3, 10, 12
    pred, target = torch.randn(b, n, d), torch.randn(b, n, d) * 2 + 1
    mask = (torch.rand(b, n) < 0.75).float()
    for norm_pix in (False, True):
        p, t, m = pred.double().numpy(), target.double().numpy(), mask.double().numpy()
        total, count = 0.0, 0.0
        for i in range(b):
            for j in range(n):
                x = t[i, j]
                if norm_pix:
                    x = (x - x.mean()) / math.sqrt(x.var(ddof=1) + 1e-6)
                total += m[i, j] * ((p[i, j] - x) ** 2).mean()
                count += m[i, j]
        assert losses.mae(pred, target, mask, norm_pix).item() == pytest.approx(total / count, rel=1e-5)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert losses.mae(normalised, target, mask, True).item() == pytest.approx(0.0, abs=1e-10)
    assert losses.mae(target, target, mask, False).item() == 0.0
    # Visible patches do not count: errors only there give 0.
    assert losses.mae(target + 5 * (1 - mask).unsqueeze(-1), target, mask, False).item() == 0.0


def test_colorization_weights_follow_eq4():
    prior = torch.tensor([0.5, 0.3, 0.15, 0.05])
    w = losses.colorization_weights(prior, 0.5)
    expected = 1 / (0.5 * prior.double().numpy() + 0.5 / 4)
    expected /= (prior.double().numpy() * expected).sum()
    np.testing.assert_allclose(w.double().numpy(), expected, rtol=1e-6)
    assert (prior * w).sum().item() == pytest.approx(1.0, rel=1e-6)
    assert w[3] > w[0]  # rare colours weigh more
    assert torch.allclose(losses.colorization_weights(prior, 1.0), torch.ones(4))


def test_colorization_loss_matches_formula_hard_and_soft():
    torch.manual_seed(0)
    b, q, h, w = 2, 6, 3, 4
    logits = torch.randn(b, q, h, w)
    weights = torch.rand(q) + 0.5
    hard = torch.randint(q, (b, h, w))
    soft = torch.softmax(torch.randn(b, q, h, w) * 3, dim=1)
    lg, wt = logits.double().numpy(), weights.double().numpy()
    for target in (hard, soft):
        total = 0.0
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    v = lg[i, :, y, x]
                    log_p = v - v.max() - math.log(np.exp(v - v.max()).sum())
                    z = np.eye(q)[int(target[i, y, x])] if target is hard else target[i, :, y, x].double().numpy()
                    total -= wt[z.argmax()] * (z * log_p).sum()
        expected = total / (b * h * w)
        assert losses.colorization(logits, target, weights).item() == pytest.approx(expected, rel=1e-5)


def test_inpainting_loss_matches_formula_and_perfect_fill_is_zero():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[:, :, 1:5, 1:5] = 10.0
    mask[:, :, 2:4, 2:4] = 1.0
    p, t, m = pred.double().numpy(), target.double().numpy(), mask.double().numpy()
    total, region = 0.0, 0
    for i in range(2):
        for y in range(6):
            for x in range(6):
                if m[i, 0, y, x] > 0:
                    region += 1
                    total += m[i, 0, y, x] * ((p[i, :, y, x] - t[i, :, y, x]) ** 2).sum()
    assert losses.inpainting(pred, target, mask).item() == pytest.approx(total / (3 * region), rel=1e-5)
    filled = torch.where(mask > 0, target, pred)  # wrong only outside the region
    assert losses.inpainting(filled, target, mask).item() == 0.0


def test_counting_loss_matches_formula_and_limits():
    torch.manual_seed(0)
    image, tiles, other = torch.rand(4, 7), torch.rand(4, 7), torch.rand(4, 7)
    a, t, o = image.double().numpy(), tiles.double().numpy(), other.double().numpy()
    expected = np.mean([((a[i] - t[i]) ** 2).sum() + max(0.0, 10 - ((o[i] - t[i]) ** 2).sum()) for i in range(4)])
    assert losses.counting(image, tiles, other, 10.0).item() == pytest.approx(expected, rel=1e-5)
    # Tiles add up to the image and the other image is farther than sqrt(M): zero.
    assert losses.counting(tiles, tiles, tiles + 2.0, 10.0).item() == 0.0
    # The trivial all-zero counting vector costs the margin.
    zeros = torch.zeros(4, 7)
    assert losses.counting(zeros, zeros, zeros, 10.0).item() == pytest.approx(10.0)


def test_instance_discrimination_matches_formula_and_limit():
    torch.manual_seed(0)
    f, memory = torch.randn(5, 8), F.normalize(torch.randn(20, 8), dim=1)
    ids = torch.tensor([3, 0, 19, 7, 3])
    u, v = f.double().numpy(), memory.double().numpy()
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    expected = 0.0
    for i in range(5):
        s = v @ u[i] / 0.07
        expected -= s[ids[i]] - s.max() - math.log(np.exp(s - s.max()).sum())
    assert losses.instance_discrimination(f, memory, ids, 0.07).item() == pytest.approx(expected / 5, rel=1e-5)
    # Features equal to their own orthonormal prototypes, a low temperature: the loss vanishes.
    basis = torch.eye(8)
    assert losses.instance_discrimination(basis[[1, 4]] * 3, basis, torch.tensor([1, 4]), 0.01).item() < 1e-12


# ------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------


def test_lab_conversion_known_values_and_round_trip():
    from replab.methods.colorization import ab_gamut_bins, lab_to_rgb, rgb_to_lab

    colours = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    lab = rgb_to_lab(colours.T.reshape(1, 3, 5, 1))[0, :, :, 0].T
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032],
                             [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602]])
    torch.testing.assert_close(lab, expected, atol=0.02, rtol=0)
    rgb = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-4, rtol=0)
    bins = ab_gamut_bins(10.0)
    assert 250 <= len(bins) <= 320 and bins.abs().max() <= 110
    assert len(torch.unique(bins, dim=0)) == len(bins) and torch.all(bins % 10 == 0)


def test_hamming_permutation_set():
    from replab.methods.jigsaw import _hamming_set, hamming_permutations

    perms = hamming_permutations(100, 0)
    assert perms.shape == (100, 9)
    assert torch.all(perms.sort(dim=1).values == torch.arange(9))  # each row a permutation
    assert len({tuple(p) for p in perms.tolist()}) == 100
    _hamming_set.cache_clear()
    assert torch.equal(hamming_permutations(30, 0), perms[:30])  # deterministic (recomputed), greedy prefix
    assert not torch.equal(hamming_permutations(30, 1), perms[:30])  # the seed picks the first permutation

    def min_distance(p: torch.Tensor) -> int:
        d = (p[:, None, :] != p[None, :, :]).sum(-1)
        return int(d[~torch.eye(len(p), dtype=torch.bool)].min())

    def mean_distance(p: torch.Tensor) -> float:
        d = (p[:, None, :] != p[None, :, :]).sum(-1).float()
        return float(d[~torch.eye(len(p), dtype=torch.bool)].mean())

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        random_set = torch.stack([torch.randperm(9, generator=g) for _ in range(100)])
        assert min_distance(perms) >= min_distance(random_set)
        assert mean_distance(perms) >= mean_distance(random_set)
    assert min_distance(perms) >= 5


def test_grid_tiles_are_the_right_pixels_and_never_overlap():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    corners = grid_corners(4, 32, 8, 5, x.device)  # jitter capped to the cell
    tiles = crop_tiles(x, corners, 8)
    assert tiles.shape == (4, 9, 3, 8, 8)
    for b in range(4):
        occupied = torch.zeros(32, 32)
        for k in range(9):
            r, c = corners[b, k].tolist()
            assert torch.equal(tiles[b, k], x[b, :, r:r + 8, c:c + 8])
            assert 10 * (k // 3) + 1 <= r and r + 8 <= 10 * (k // 3) + 11  # inside its cell (margin 1)
            occupied[r:r + 8, c:c + 8] += 1
        assert occupied.max() == 1


def test_mae_masking_and_patch_order():
    from replab.methods.mae import patchify

    method = registry.build("mae", dict(decoder_depth=1, decoder_dim=32, decoder_heads=2),
                            build_backbone("vit_tiny", 32, patch_size=4), 32)
    keep, restore, mask = method.random_masking(6, "cpu")
    assert keep.shape == (6, 16) and mask.shape == (6, 64)
    assert torch.all(mask.sum(1) == 48)
    assert torch.all(mask.gather(1, keep) == 0)
    x = torch.randn(2, 3, 32, 32)
    patches = patchify(x, 4)
    r, c = 3, 5
    assert torch.equal(patches[1, r * 8 + c], x[1, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(1, 2, 0).flatten())
    with pytest.raises(ValueError, match="model.backbone.*vit_tiny"):
        registry.build("mae", {}, build_backbone("resnet18", 32), 32)


def test_exemplar_hue_reaches_its_view_and_is_range_checked():
    from replab.config import ConfigError
    from replab.validate import load_config

    backbone = build_backbone("resnet18", 32, width=0.125)
    assert registry.build("exemplar", dict(hue=0.1), backbone, 32).views()[0].hue == 0.1
    assert registry.build("exemplar", {}, backbone, 32).views()[0].hue == 0.4  # Wu et al.'s CIFAR code
    with pytest.raises(ConfigError, match=r"^method.hue: 0.7 is not valid; expected a number in \[0, 0.5\]$"):
        load_config(None, ["method.name=exemplar", "method.hue=0.7"])


@pytest.mark.parametrize("name, tile_of", [("jigsaw", lambda m: m.tile), ("relative_patch", lambda m: m.patch),
                                           ("counting", lambda m: m.views()[0].size // 2)])
def test_view_scale_enlarges_the_tiles_and_is_range_checked(name, tile_of):
    from replab.config import ConfigError
    from replab.validate import load_config

    backbone = build_backbone("resnet18", 32, width=0.125)
    plain, doubled = (registry.build(name, dict(view_scale=s), backbone, 32) for s in (1.0, 2.0))
    assert plain.views()[0].size == 32 and doubled.views()[0].size == 64
    assert tile_of(doubled) >= 2 * tile_of(plain)  # 8 -> 17 px tiles, 7 -> 14, 16 -> 32
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    views = make_views(images, doubled.views(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(doubled(views).loss)  # the enlarged view goes through the whole forward pass
    with pytest.raises(ConfigError, match=r"^method.view_scale: 0.5 is not valid; expected a number in \[1, 4\]$"):
        load_config(None, [f"method.name={name}", "method.view_scale=0.5"])


def test_exemplar_ids_are_stable_and_spread(cifar):
    method = registry.build("exemplar", dict(memory_size=50000), build_backbone("resnet18", 32, width=0.25), 32)
    g = torch.Generator().manual_seed(0)
    ids_a = method.image_ids(make_views(cifar, method.views(), generator=g)[1])
    ids_b = method.image_ids(make_views(cifar.flip(0), method.views(), generator=g)[1]).flip(0)
    assert torch.equal(ids_a, ids_b)  # the same image gets the same slot whatever the batch and augmentation
    assert len(torch.unique(ids_a)) >= len(cifar) - 3  # 256 images in 50k slots: collisions are rare

    # The memory update v <- normalize(m v + (1 - m) f) happens after the step, for the batch's ids.
    before = method.memory.clone()
    out = method(make_views(cifar[:8], method.views(), generator=g))
    ids = method._pending[0]
    method.update_teacher()
    expected = F.normalize(0.5 * before[ids] + 0.5 * out.embeddings, dim=1)
    torch.testing.assert_close(method.memory[ids], expected)


def test_inpainting_adversarial_term_trains_both_players_separately():
    torch.manual_seed(0)
    method = registry.build("inpainting", dict(decoder_dim=32, adversarial_weight=1.0, discriminator_dim=8),
                            build_backbone("resnet18", 32, width=0.25), 32)
    x = make_views(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), method.views())

    def grads(weight: float):
        method.params.adversarial_weight = weight
        method.zero_grad()
        method(x).loss.backward()
        d = [p.grad.clone() for p in method.discriminator.parameters()]
        g = [p.grad.clone() for p in method.decoder.parameters()]
        return d, g

    d0, g0 = grads(0.0)
    d1, g1 = grads(1.0)
    for a, b in zip(d0, d1):  # the generator term does not move D
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1))  # but it does move the generator
    assert all(a.abs().sum() > 0 for a in d0)  # and the critic term trains D


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
    return torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows]))


@pytest.fixture(scope="module")
def cifar() -> torch.Tensor:
    return load_cifar(256)


SMALL = {
    "mae": dict(decoder_depth=2, decoder_dim=64, decoder_heads=4),
    "jigsaw": dict(tile_dim=64, hidden_dim=256),
    "relative_patch": dict(patch_dim=64, hidden_dim=128),
    "colorization": dict(head_dim=64),
    "inpainting": dict(decoder_dim=64),
    "exemplar": dict(memory_size=4096),
    "counting": dict(count_dim=128),
}
LR, STEPS, BATCH_SIZE = 1e-3, 5, 16
DATA_STATISTICS = {"exemplar", "colorization"}  # methods whose buffers estimate something from the data


def new_backbone(name: str):
    if name == "mae":
        return build_backbone("vit_tiny", 32, patch_size=4)
    return build_backbone("resnet18", 32, width=0.25)  # CIFAR stem at 32 px: 4x4 feature maps


def build(name: str):
    torch.manual_seed(0)
    return registry.build(name, SMALL[name], new_backbone(name), 32)


def embedding_spread(z: torch.Tensor) -> float:
    """Mean over dimensions of the std across the batch of the L2-normalised embeddings, times sqrt(D)
    (about 1 for embeddings spread uniformly on the sphere, 0 for a collapse to one point)."""
    u = F.normalize(z.float(), dim=1)
    return (u.std(dim=0).mean() * math.sqrt(u.shape[1])).item()


def seeded(module, views):
    """The method on ``views`` with its internal randomness (masks, permutations, neighbours, filters) fixed."""
    torch.manual_seed(123)
    return module(views)


def test_all_pretext_methods_are_registered():
    assert set(SMALL) <= set(registry.available())


@pytest.mark.parametrize("name", list(SMALL))
def test_method_trains_without_collapse_and_round_trips(name, cifar):
    method = build(name)
    method.train()
    g = torch.Generator().manual_seed(1)
    specs = method.views()
    if name in DATA_STATISTICS:
        # A pass over 64 images without gradients first: the Exemplar memory and the colorization bin
        # statistics start from data, so the losses before and after training compare.
        with torch.no_grad():
            method(make_views(cifar[:64], specs, generator=g))
            method.update_teacher()
    # Pretext tasks start at chance (e.g. ln 100 for Jigsaw) and a few steps on fresh batches do not beat
    # it yet; what a few steps must do is fit one batch of real images with its task held fixed.
    batch = make_views(cifar[64:64 + BATCH_SIZE], specs, generator=g)
    with torch.no_grad():
        before = seeded(method, batch).loss.item()
    opt = torch.optim.AdamW(method.parameter_groups(1e-4), lr=LR)
    for step in range(STEPS):
        method.progress.step, method.progress.total_steps = step, STEPS
        out = seeded(method, batch)
        assert torch.isfinite(out.loss)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        method.update_teacher()
    held_out = make_views(cifar[128:128 + BATCH_SIZE], specs, generator=g)
    with torch.no_grad():
        after = seeded(method, batch).loss.item()
        spread = embedding_spread(seeded(method, held_out).embeddings)
    method.update_teacher()
    print(f"{name}: loss {before:.4f} -> {after:.4f}, held-out spread {spread:.3f}")
    assert after < before, f"{name}: loss did not fall ({before:.4f} -> {after:.4f})"
    assert spread > 0.1, f"{name}: embeddings collapsed (spread {spread:.3f})"

    # Checkpoint round trip: a fresh instance with the saved state computes the same thing.
    state = copy.deepcopy(method.state_dict())
    fresh = registry.build(name, SMALL[name], new_backbone(name), 32)
    fresh.load_state_dict(state)
    method.eval(), fresh.eval()
    with torch.no_grad():
        a, b = seeded(method, held_out), seeded(fresh, held_out)
        assert torch.equal(a.loss, b.loss)
        assert torch.equal(a.embeddings, b.embeddings)
        assert torch.equal(method.encoder(held_out[0]), fresh.encoder(held_out[0]))
