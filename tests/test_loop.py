"""The plain-PyTorch loop without Ray: steps, schedules, checkpoints, resume, evaluation."""

import math

import pytest
import torch

from replab.platform.data.arrays import load_arrays
from replab.platform.probes.frozen import EvalData, knn_predict, linear_probe_top1
from replab.platform.train import optim
from replab.platform.train.checkpoints import load_checkpoint
from replab.platform.train.loop import LocalEnv, train_worker
from replab.validate import load_config

TINY = ["data.resolution=32", "model.backbone=resnet18", "model.width=0.25", "method.proj_hidden_dim=64",
        "method.proj_dim=32", "train.batch_size=32", "train.log_every=2", "train.precision=fp32"]


@pytest.fixture(scope="module")
def cifar(data_root):
    images, labels = load_arrays("cifar10", str(data_root), "train", 32, limit=128, seed=0)
    return images, labels


class Recorder:
    def __init__(self):
        self.rows = []

    def metrics(self, values, step):
        self.rows.append((step, dict(values)))


def test_lr_schedule_warmup_then_cosine():
    lrs = [optim.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_lars_trust_ratio_step():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = optim.LARS([{"params": [w], "weight_decay": 0.0}], lr=1.0, momentum=0.0, eta=0.1)
    w.grad = torch.tensor([0.0, 10.0])
    opt.step()
    # trust = 0.1 * 5 / 10 = 0.05 -> update = 0.05 * grad
    assert torch.allclose(w.detach(), torch.tensor([3.0, 3.5]))


def test_knn_and_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(40)
    feats = centers[labels] + torch.randn(120, 8, generator=g)
    preds = knn_predict(feats[::2], labels[::2], feats[1::2], 3, k=5)
    assert (preds == labels[1::2]).float().mean() > 0.95
    assert linear_probe_top1(feats[::2], labels[::2], feats[1::2], labels[1::2], 3, epochs=20) > 0.95


def test_direct_loop_trains_checkpoints_and_resumes(cifar, tmp_path):
    images, labels = cifar
    eval_data = EvalData(images[:64], labels[:64], images[64:], labels[64:], 10)
    cfg = load_config(None, TINY + ["train.epochs=2", "eval.knn_k=10", "eval.linear_epochs=2"])
    env = LocalEnv(images, labels, tmp_path / "ckpt")
    log = Recorder()
    result = train_worker(cfg, env, num_rows=len(images), eval_data_fn=lambda: eval_data, logger=log)
    assert result.steps == 2 * (128 // 32)
    assert [r["epoch"] for r in env.reports] == [1, 2]
    assert 0 <= env.reports[-1]["eval/knn_top1"] <= 1
    logged = {k for _, row in log.rows for k in row}
    assert {"train/loss", "train/lr", "train/images_per_sec", "eval/knn_top1", "eval/init_knn_top1"} <= logged
    assert all(math.isfinite(r["train/epoch_loss"]) for r in env.reports)
    state = load_checkpoint(env.latest_checkpoint())
    assert state["epoch"] == 2 and state["step"] == result.steps

    # Resume: a longer run continues from epoch 2 instead of starting over.
    cfg4 = load_config(None, TINY + ["train.epochs=3", "eval.knn=false", "eval.linear=false"])
    env2 = LocalEnv(images, labels, tmp_path / "ckpt")
    result2 = train_worker(cfg4, env2, num_rows=len(images))
    assert [r["epoch"] for r in env2.reports] == [3]
    assert result2.steps == 3 * 4


@pytest.mark.parametrize("method", ["simclr", "byol", "rotnet"])
def test_foundation_methods_lower_their_loss(cifar, method, tmp_path):
    images, labels = cifar
    extra = [] if method != "rotnet" else []
    overrides = [o for o in TINY if not o.startswith("method.")] + [f"method.name={method}", "train.epochs=4",
                 "train.warmup_epochs=0", "eval.knn=false", "eval.linear=false", "train.lr=0.05"] + extra
    if method == "byol":
        overrides += ["method.proj_hidden_dim=64", "method.pred_hidden_dim=64", "method.proj_dim=32", "train.optimizer=sgd"]
    cfg = load_config(None, overrides)
    env = LocalEnv(images, labels, tmp_path / method)
    train_worker(cfg, env, num_rows=len(images))
    losses = [r["train/epoch_loss"] for r in env.reports]
    assert losses[-1] < losses[0], losses


def _numbered(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"shard {i} unreadable")
        yield {"image": torch.full((2, 4, 4, 3), i, dtype=torch.uint8), "label": torch.tensor([i, i])}


def test_prefetched_batches_keep_order_and_reraise_errors():
    from replab.platform.train.loop import prefetched

    got = [int(b["label"][0]) for b in prefetched(_numbered(7), depth=2)]
    assert got == list(range(7))
    seen = []
    with pytest.raises(OSError, match="shard 3 unreadable"):
        for b in prefetched(_numbered(7, fail_at=3), depth=2):
            seen.append(int(b["label"][0]))
    assert seen == [0, 1, 2]


def test_prefetch_thread_stops_when_the_loop_leaves_early():
    import threading

    from replab.platform.train.loop import prefetched

    stream = prefetched(_numbered(1000), depth=2)
    assert int(next(stream)["label"][0]) == 0
    stream.close()  # what `break` out of the epoch does
    assert not [t for t in threading.enumerate() if t.name == "replab-prefetch"]


def test_prefetching_env_trains_the_same_steps(cifar, tmp_path):
    images, labels = cifar
    cfg = load_config(None, TINY + ["train.epochs=1", "train.steps_per_epoch=3", "eval.knn=false",
                                    "eval.linear=false"])
    losses = {}
    for depth in (0, 2):
        env = LocalEnv(images, labels, tmp_path / f"p{depth}", prefetch=depth)
        train_worker(cfg, env, num_rows=len(images))
        losses[depth] = env.reports[-1]["train/epoch_loss"]
    assert losses[2] == losses[0]  # same batches in the same order, only gathered ahead
