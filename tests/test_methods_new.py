"""CPC v2, DeepCluster(-v2), PIRL, split-brain and FixMatch: their building blocks against direct
computations, and a few steps of each on real CIFAR-10 images (tiny width) that lower its loss."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from replab.methods import registry
from replab.methods.base import Support
from replab.models.backbones import build_backbone
from replab.platform.data.augment import make_views

NEW = ["cpc_v2", "deepcluster", "pirl", "split_brain", "fixmatch"]
SMALL = {  # the documented CPU variants, smaller still
    "cpc_v2": dict(prediction_steps=2, context_layers=1),
    "deepcluster": dict(num_heads=2, num_prototypes=16, proj_hidden_dim=128, memory_size=4096),
    "pirl": dict(num_negatives=1024, memory_size=4096),
    "split_brain": dict(head_dim=32),
    "fixmatch": dict(support_images_per_class=2, threshold=0.5),
}
BATCH = {"cpc_v2": 16}  # 49 patches per image


@pytest.fixture(scope="module")
def cifar() -> tuple[torch.Tensor, torch.Tensor]:
    """128 CIFAR-10 training images (uint8 [128, 32, 32, 3]) and labels: 13 of each class (12 of the last two),
    interleaved so that any 32 consecutive images span several classes (the parquet shards are sorted by label)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from conftest import real_data_root

    images, labels = [], []
    for shard in range(5):
        path = real_data_root() / "cifar10" / f"train-{shard:05d}-of-00005.parquet"
        assert path.is_file(), f"CIFAR-10 parquet not found at {path}; set REPLAB_DATA_ROOT"
        table = pq.read_table(path, columns=["image", "label"])
        shard_labels = np.asarray(table.column("label").to_pylist())
        for c in np.unique(shard_labels):
            rows = np.flatnonzero(shard_labels == c)[:13]
            for r in rows:
                images.append(np.asarray(Image.open(io.BytesIO(table.column("image")[int(r)]["bytes"].as_py())).convert("RGB")))
                labels.append(int(c))
    order = np.argsort(np.arange(len(labels)) % 13, kind="stable")[:128]  # round-robin over the classes
    return torch.from_numpy(np.stack(images)[order]), torch.tensor(labels)[order]


def build(name: str, **params):
    torch.manual_seed(0)
    return registry.build(name, {**SMALL[name], **params}, build_backbone("resnet18", 32, width=0.125), 32)


def test_registered_and_listed():
    assert set(NEW) <= set(registry.available())
    for name in NEW:
        assert registry.get(name).summary


def test_cpc_patch_grid_and_causal_context():
    from replab.methods.cpc_v2 import RowCausalBlock, patch_grid

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    patches, g = patch_grid(x, 8)
    assert g == 7 and patches.shape == (2, 49, 3, 8, 8)
    assert torch.equal(patches[1, 7 * 2 + 3], x[1, :, 8:16, 12:20])  # row 2, column 3: stride 4
    block = RowCausalBlock(4, 5)
    z = torch.randn(1, 4, 7, 7)
    changed = z.clone()
    changed[:, :, 4:] += 1  # rows 4.. change: context rows 0..3 must not
    assert torch.allclose(block(z)[:, :, :4], block(changed)[:, :, :4])
    assert not torch.allclose(block(z)[:, :, 4], block(changed)[:, :, 4])


def test_spherical_kmeans_recovers_separated_clusters():
    from replab.methods.deepcluster import spherical_kmeans

    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    truth = torch.arange(4).repeat_interleave(50)
    x = torch.nn.functional.normalize(centres[truth] + 0.05 * torch.randn(200, 16), dim=1)
    best = 0.0
    for seed in range(3):
        c, a = spherical_kmeans(x, 4, 10, torch.Generator().manual_seed(seed))
        assert torch.allclose(c.norm(dim=1), torch.ones(4))
        # purity: every found cluster holds one true cluster
        best = max(best, sum(torch.bincount(truth[a == k], minlength=4).max().item() for k in range(4)) / 200)
    assert best == 1.0


def test_pirl_nce_matches_formula():
    from replab.methods.pirl import pirl_nce

    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    tau, c, z = 0.1, 5 / 100, 37.0

    def h(a, b):
        e = math.exp(float(a @ b) / tau) / z
        return e / (e + c)

    expected = np.mean([-math.log(h(u[i], v[i])) - sum(math.log(1 - h(neg[j], v[i])) for j in range(5))
                        for i in range(3)])
    assert pirl_nce(u, v, neg, tau, c, math.log(z)).item() == pytest.approx(expected, rel=1e-5)


def test_pirl_info_nce_is_the_softmax_of_the_positive_and_needs_no_partition_function():
    """VISSL's ``loss_type: cross_entropy``: -log(e^{s_+} / (e^{s_+} + sum_n e^{s_n})), s = u . v / tau; Z unused."""
    from replab.methods.pirl import pirl_info_nce

    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    tau = 0.1
    expected = np.mean([-float(u[i] @ v[i]) / tau + math.log(math.exp(float(u[i] @ v[i]) / tau) + sum(
        math.exp(float(neg[j] @ v[i]) / tau) for j in range(5))) for i in range(3)])
    assert pirl_info_nce(u, v, neg, tau).item() == pytest.approx(expected, rel=1e-5)
    method = build("pirl", loss="cross_entropy")
    n = method.params.num_negatives
    views = make_views(torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8), method.views(),
                       generator=torch.Generator().manual_seed(0))
    out = method(views)
    assert torch.isnan(method.log_z)  # never estimated
    assert abs(out.loss.item() - math.log(n + 1)) < 1.0  # a random bank: the positive at chance among N + 1


def test_pirl_fixes_its_partition_function_at_the_first_step_and_starts_near_log_n():
    """Z = |D| x mean exp(s) over the first step's scores (VISSL's NCEAverage), kept after and checkpointed: the
    first loss is then ~ log(N + 1) + 1 (positive at chance among N noise draws, negatives' term ~1), not N x 14."""
    from replab.methods.pirl import log_partition, nce_scores

    method = build("pirl")
    n, size = method.params.num_negatives, method.params.memory_size
    g = torch.Generator().manual_seed(0)
    views = make_views(torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8), method.views(), generator=g)
    assert torch.isnan(method.log_z)
    out = method(views)
    first = float(method.log_z)
    assert math.isfinite(first) and "log_z" in method.state_dict()
    assert math.log(n + 1) < out.loss.item() < math.log(n + 1) + 3
    out.loss.backward()
    method.update_teacher()
    method(views)
    assert float(method.log_z) == first  # fixed after the first step
    pos, neg = nce_scores(torch.eye(4), torch.eye(4), torch.eye(4), 1.0)
    expected = math.log(size * (torch.cat([pos, neg.flatten()]).exp().mean().item()))
    assert log_partition(pos, neg, size).item() == pytest.approx(expected, rel=1e-6)


def test_fixmatch_cutout_and_threshold():
    from replab.methods.fixmatch import cutout

    x = torch.ones(4, 3, 32, 32)
    out = cutout(x, 0.5)
    zeros = (out == 0).all(dim=1).sum(dim=(1, 2))
    assert (zeros > 0).all() and (zeros <= 16 * 16).all()
    assert torch.equal(cutout(x, 0.0), x)


def test_split_brain_encoder_concatenates_halves():
    method = build("split_brain")
    encoder = method.encoder.eval()
    x = make_views(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8), [method.views()[0]])[0]
    from replab.platform.data.augment import normalize

    feats = encoder(normalize(x))
    assert feats.shape == (2, 2 * method.backbone.out_dim) and encoder.out_dim == feats.shape[1]
    assert len({id(p) for p in method.parameters()}) == len(list(method.parameters()))


def _step_inputs(method, batch, labeled, g, classes=10):
    """The views of ``batch`` and, for semi-supervised methods, a class-balanced support from ``labeled``
    (images, labels) over classes 0..classes-1."""
    views = make_views(batch, method.views(), generator=g)
    extra = {}
    spec = method.support()
    if spec is not None:
        images, labels = labeled
        picks = torch.cat([torch.nonzero(labels == c)[: spec.images_per_class, 0] for c in range(classes)])
        s_views = make_views(images[picks], list(spec.views), generator=g)
        extra["support"] = Support(s_views, labels[picks])
    return views, extra


def _seeded(method, views, extra):
    torch.manual_seed(123)  # the method's own randomness (tiles, negatives, cutout) fixed
    return method(views, None, **extra)


PIRL_RISES = ("with the reference partition function Z the image term rises over the first steps as every f(v_I) "
              "and the bank rows it updates align (the image embeddings start nearly identical); docs/RESULTS.md")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=PIRL_RISES))
                                  if n == "pirl" else n for n in NEW])
def test_a_few_steps_on_cifar_lower_the_loss(name, cifar):
    images = cifar[0]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    method = build(name)
    method.train()
    g = torch.Generator().manual_seed(1)
    n = BATCH.get(name, 32)
    if name == "deepcluster":
        # One epoch of 4 steps over 128 images fills the bank (k-means half-way through it), then epoch 1's
        # first step clusters the whole bank: the losses below are on fixed pseudo-labels.
        method.progress.total_steps, method.progress.epochs = 8, 2
        with torch.no_grad():
            for step in range(4):
                method.progress.step = step
                method(_step_inputs(method, images[32 * step:32 * step + 32], cifar, g)[0])
                method.update_teacher()
        method.progress.step, method.progress.epoch = 4, 1
    views, extra = _step_inputs(method, images[:n], cifar, g)
    with torch.no_grad():
        before = _seeded(method, views, extra)
    if name == "deepcluster":
        assert before.metrics["kmeans_gflops"] > 0 and before.metrics["kmeans_seconds"] > 0
        assert int(method.clustered_epoch) == 1 and (method.assignments >= 0).any()
    opt = torch.optim.AdamW(method.parameter_groups(1e-4), lr=1e-3)
    for _ in range(4):
        out = _seeded(method, views, extra)
        assert torch.isfinite(out.loss)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        method.update_teacher()
    with torch.no_grad():
        after = _seeded(method, views, extra).loss.item()
    print(f"{name}: loss {before.loss.item():.4f} -> {after:.4f}")
    assert after < before.loss.item(), f"{name}: loss did not fall ({before.loss.item():.4f} -> {after:.4f})"


def test_fixmatch_needs_support_and_enough_classes(cifar):
    images, labels = cifar
    method = build("fixmatch")
    views, extra = _step_inputs(method, images[:8], cifar, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="support"):
        method(views, None)
    small = registry.build("fixmatch", dict(num_classes=5), build_backbone("resnet18", 32, width=0.125), 32)
    with pytest.raises(ValueError, match="method.num_classes"):
        small(views, None, **extra)
