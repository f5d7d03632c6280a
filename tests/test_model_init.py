"""``model.init``: a run starts from another run's encoder (checkpoint folder, run folder, exported file);
mismatched backbones or shapes fail with one line naming the key and both shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replab.config import ConfigError
from replab.platform.train import encoder_init
from replab.platform.train.checkpoints import load_checkpoint
from replab.platform.train.loop import LocalEnv, build_method, build_worker, train_worker
from replab.validate import load_config

TINY = ["data.resolution=32", "model.backbone=resnet18", "model.width=0.25", "method.proj_hidden_dim=32",
        "method.proj_dim=16", "train.batch_size=16", "train.precision=fp32", "train.steps_per_epoch=2",
        "train.epochs=1", "eval.knn=false", "eval.linear=false", "train.log_every=1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny SimCLR run (2 steps on random images): its run folder and its checkpoint."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 32)
    env = LocalEnv(images, labels, root / "run")
    train_worker(load_config(None, TINY), env, num_rows=len(images))
    folder = env.latest_checkpoint()
    state = load_checkpoint(folder)
    encoder = {k[len("backbone."):]: v for k, v in state["method"].items() if k.startswith("backbone.")}
    return {"run": str(root / "run"), "checkpoint": folder, "encoder": encoder, "images": images, "labels": labels}


def _worker(overrides, tmp_path):
    cfg = load_config(None, TINY + overrides)
    env = LocalEnv(np.zeros((32, 32, 32, 3), np.uint8), np.zeros(32, np.int64), tmp_path / "new")
    worker, epoch, step = build_worker(cfg, env, num_rows=32)
    return worker, epoch, step


def _assert_same(backbone_state, encoder):
    assert set(backbone_state) == set(encoder)
    for key, value in encoder.items():
        assert torch.equal(backbone_state[key], value), key


def test_init_from_checkpoint_and_run_folder_gives_the_encoder_at_step_0(source, tmp_path):
    for i, target in enumerate((source["checkpoint"], source["run"])):
        worker, epoch, step = _worker(["method.name=byol", f"model.init={target}"],
                                      tmp_path / str(i))
        assert (epoch, step) == (0, 0)
        _assert_same(worker.method.backbone.state_dict(), source["encoder"])
        # momentum copies of the backbone start from the loaded weights too
        _assert_same(worker.method.teacher_backbone.state_dict(), source["encoder"])
    fresh, _, _ = _worker(["method.name=byol"], tmp_path / "fresh")
    assert not torch.equal(fresh.method.backbone.state_dict()["conv1.weight"], source["encoder"]["conv1.weight"])


def test_init_from_exported_files(source, tmp_path):
    from safetensors.torch import save_file

    st = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source["encoder"].items()}, str(st))
    pt = tmp_path / "encoder.pt"
    torch.save({f"backbone.{k}": v for k, v in source["encoder"].items()}, pt)
    for target in (st, pt):
        worker, _, _ = _worker([f"model.init={target}"], tmp_path / target.suffix[1:])
        _assert_same(worker.method.backbone.state_dict(), source["encoder"])


def test_resumed_run_keeps_its_own_weights(source, tmp_path):
    cfg = load_config(None, TINY + [f"model.init={source['checkpoint']}"])
    env = LocalEnv(source["images"], source["labels"], tmp_path / "own")
    train_worker(cfg, env, num_rows=32)
    own = {k[9:]: v for k, v in load_checkpoint(env.latest_checkpoint())["method"].items() if k.startswith("backbone.")}
    cfg2 = load_config(None, TINY + [f"model.init={source['checkpoint']}", "train.epochs=2"])
    worker, epoch, _ = build_worker(cfg2, LocalEnv(source["images"], source["labels"], tmp_path / "own"), 32)
    assert epoch == 1
    _assert_same(worker.method.backbone.state_dict(), own)


def test_mismatches_fail_in_one_line(source, tmp_path):
    with pytest.raises(ConfigError, match=r"model.init: .* is a resnet18 encoder; this run builds resnet34") as e:
        build_method(load_config(None, TINY + ["model.backbone=resnet34", f"model.init={source['checkpoint']}"]),
                     init_encoder=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model.init: 'conv1.weight' is \(16, 3, 3, 3\) in .* but \(32, 3, 3, 3\)"):
        build_method(load_config(None, TINY + ["model.width=0.5", f"model.init={source['checkpoint']}"]),
                     init_encoder=True)
    pt = tmp_path / "partial.pt"
    torch.save({k: v for k, v in source["encoder"].items() if not k.startswith("layer4")}, pt)
    with pytest.raises(ConfigError, match=r"model.init: .* has no 'layer4"):
        build_method(load_config(None, TINY + [f"model.init={pt}"]), init_encoder=True)
    with pytest.raises(ConfigError, match=r"model.init: .*nowhere.* not a checkpoint folder"):
        encoder_init.resolve(load_config(None, TINY + [f"model.init={tmp_path}/nowhere",
                                                       f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
    with pytest.raises(ConfigError, match="model.init"):
        load_config(None, TINY + ["model.init=''"])
