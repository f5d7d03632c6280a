"""``benchmarks/layer_probe.py``: kNN per ResNet stage, at the run's own random init and at the checkpoint's weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from replab.platform.train.loop import build_method
from replab.validate import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_probe.py"


def load_script():
    spec = importlib.util.spec_from_file_location("layer_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeded_method(data_root, *overrides):
    """The run's method at its seeded random init, as ``layer_probe.probe`` rebuilds it, and its config."""
    cfg = load_config(None, [f"data.root={data_root}", "eval.test_limit=100", *overrides])
    torch.manual_seed(cfg.train.seed)
    return build_method(cfg), cfg


def test_probe_rebuilds_the_seeded_init_and_reads_every_stage_of_the_checkpoint(data_root, tmp_path):
    layer_probe = load_script()
    method, cfg = seeded_method(data_root, "model.width=0.125", "model.cifar_stem=true", "eval.bank_limit=300",
                                "method.name=simclr")
    with torch.no_grad():  # "training" changed layer4 only: its output is now the same for every image
        for param in method.encoder.layer4.parameters():
            param.zero_()
    (tmp_path / "checkpoint_epoch_000001").mkdir()
    torch.save({"method": method.state_dict(), "config": cfg.to_dict(), "epoch": 1},
               tmp_path / "checkpoint_epoch_000001" / "state.pt")

    row = layer_probe.probe(tmp_path / "checkpoint_epoch_000001", str(data_root))

    assert set(row["init"]) == set(row["trained"]) == set(layer_probe.STAGES)
    for stage in ("stem", "layer1", "layer2", "layer3"):  # the same weights as the seeded init
        assert row["trained"][stage] == row["init"][stage]
    assert all(0.0 <= v <= 1.0 for v in row["init"].values())
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).numpy()
    assert layer_probe.stage_features(method.encoder, images)["layer4"].std(dim=0).max() == 0
    assert "layer4" in layer_probe.markdown([row])


def test_an_unreadable_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    assert load_script().main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_recalibrated_batchnorm_holds_the_statistics_of_the_images_it_saw():
    """One batch: bn1's running mean is then exactly the per-channel mean of conv1's output over those images."""
    from replab.models.backbones import build_backbone
    from replab.platform.data.augment import normalize, resize, to_float

    layer_probe = load_script()
    torch.manual_seed(0)
    encoder = build_backbone("resnet18", 32, width=0.125, cifar_stem=True)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8).numpy()
    layer_probe.recalibrate_batchnorm(encoder, images, batch_size=64)
    with torch.no_grad():
        conv = encoder.conv1(normalize(resize(to_float(torch.as_tensor(images)), 32)))
    assert torch.allclose(encoder.bn1.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not encoder.training


def test_a_vit_is_read_after_each_quarter_of_its_blocks_and_its_last_class_token_is_the_platforms(data_root, tmp_path):
    layer_probe = load_script()
    method, cfg = seeded_method(data_root, "model.backbone=vit_tiny", "model.width=0.25", "eval.bank_limit=200",
                                "method.name=mae")
    depth = len(method.encoder.encoder.layers)
    with torch.no_grad():  # "training" changed the last block only
        for param in method.encoder.encoder.layers[-1].parameters():
            param.add_(torch.randn_like(param))
    (tmp_path / "ckpt").mkdir()
    torch.save({"method": method.state_dict(), "config": cfg.to_dict(), "epoch": 1}, tmp_path / "ckpt" / "state.pt")

    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8).numpy()
    features = layer_probe.vit_block_features(method.encoder, images)
    marks = sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})
    assert set(features) == {f"block{i} {kind}" for i in marks for kind in ("cls", "mean")}
    from replab.platform.data.augment import normalize, resize, to_float
    with torch.no_grad():
        platform = method.encoder(normalize(resize(to_float(torch.as_tensor(images)), 32)))
    torch.testing.assert_close(features[f"block{depth} cls"], platform)

    row = layer_probe.probe(tmp_path / "ckpt", str(data_root))
    for i in marks[:-1]:  # the blocks before the changed one read as at init
        assert row["trained"][f"block{i} cls"] == row["init"][f"block{i} cls"]
    assert f"block{depth} mean" in layer_probe.markdown([row])
