"""``replab eval`` protocols: transfer, few labels, top-5, clustering, exported / registered encoders.

One tiny SimCLR run (plain loop, no Ray) is trained once for the module; its checkpoint is attached to an MLflow
run in a SQLite store under tmp, so the CLI's metrics can be read back from MLflow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from replab.cli import main
from replab.platform import tracking
from replab.platform.probes.cluster import ari, cluster_accuracy, cluster_metrics, contingency, kmeans, nmi
from replab.platform.probes.frozen import frozen_metrics, topk_accuracy

TINY = ["data.resolution=32", "model.backbone=resnet18", "model.width=0.25", "method.proj_hidden_dim=64",
        "method.proj_dim=32", "train.batch_size=32", "train.log_every=2", "train.precision=fp32",
        "eval.knn=false", "eval.linear=false", "train.epochs=1"]


# ------------------------------------------------------------------------------------------------ formulas


def test_nmi_ari_on_hand_computed_cases():
    # identical up to renaming
    assert nmi([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert ari([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    # independent: I = 0; ARI = (0 - 2/3) / (2 - 2/3) = -1/2
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)
    assert ari([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # sklearn's docstring example: adjusted_rand_score([0, 0, 1, 1], [0, 0, 1, 2]) = 4/7 (0.57...);
    # by hand: sum C(n_ij, 2) = 1, sum C(a_i, 2) = 2, sum C(b_j, 2) = 1, E = 2 * 1 / C(4, 2) = 1/3
    assert ari([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    # NMI: I = log 2, H(Y) = log 2, H(C) = 1.5 log 2 -> I / ((1 + 1.5) / 2 log 2) = 0.8
    assert nmi([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    # sum C(n_ij,2) = 2, sum C(a_i,2) = 6, sum C(b_j,2) = 3, E = 18/15 -> (2 - 1.2) / (4.5 - 1.2)
    assert ari([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    # one cluster for everything: both entropies 0 -> 1, as sklearn defines it
    assert nmi([3, 3, 3], [7, 7, 7]) == 1.0 and ari([3, 3, 3], [7, 7, 7]) == 1.0
    assert contingency([0, 1, 1], [5, 5, 9]).tolist() == [[1, 0], [1, 1]]


def test_cluster_accuracy_is_the_best_one_to_one_matching():
    # clusters 2 -> class 0 (3 right), 0 -> class 1 (2 right); cluster 1 left with class 2 (0 right)
    assert cluster_accuracy([0, 0, 0, 1, 1, 1], [2, 2, 2, 0, 0, 1]) == pytest.approx(5 / 6)
    # a many-to-one map would score 1; the one-to-one matching cannot
    assert cluster_accuracy([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(0.5)


def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 10
    labels = torch.arange(4).repeat_interleave(30)
    feats = centers[labels] + 0.1 * torch.randn(120, 16, generator=g)
    assign, cents, inertia = kmeans(feats, 4, seed=1)
    assert cents.shape == (4, 16) and inertia >= 0
    out = cluster_metrics(feats, labels, 4)
    assert out["cluster/acc"] == 1.0 and out["cluster/nmi"] == pytest.approx(1.0) and out["cluster/ari"] == 1.0
    noise = cluster_metrics(torch.randn(120, 16, generator=g), labels, 4)
    assert noise["cluster/acc"] < 0.6 and abs(noise["cluster/ari"]) < 0.2


def test_top5_only_above_ten_classes():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.0, 0.0, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    labels = torch.tensor([1, 0])
    assert topk_accuracy(scores, labels, 1) == 0.0
    assert topk_accuracy(scores, labels, 2) == 0.5  # row 0's label is second
    assert topk_accuracy(scores, labels, 5) == 0.5  # row 1's label is last of 7
    g = torch.Generator().manual_seed(0)
    for classes in (10, 12):
        y = torch.arange(classes).repeat(6)
        feats = torch.nn.functional.one_hot(y, classes).float() + 0.05 * torch.randn(len(y), classes, generator=g)
        out = frozen_metrics(feats, y, feats, y, classes, k=5, linear_epochs=60)
        assert out["eval/knn_top1"] == 1.0 and out["eval/linear_top1"] > 0.9
        assert ("eval/knn_top5" in out) == ("eval/linear_top5" in out) == (classes > 10)


# ------------------------------------------------------------------------------------------------ the tiny run


@pytest.fixture(scope="module")
def tiny_run(data_root, tmp_path_factory):
    """(MLflow run id, tracking URI, checkpoint folder, CLI --set overrides) of a one-epoch SimCLR run."""
    from replab.platform.data.arrays import load_arrays
    from replab.platform.train.loop import LocalEnv, train_worker
    from replab.validate import load_config

    tmp = tmp_path_factory.mktemp("evalrun")
    mp = pytest.MonkeyPatch()
    mp.setenv("REPLAB_CACHE_DIR", str(tmp / "cache"))
    torch.manual_seed(0)
    cfg = load_config(None, TINY + [f"data.root={data_root}"])
    images, labels = load_arrays("cifar10", str(data_root), "train", 32, limit=64, seed=0)
    env = LocalEnv(images, labels, tmp / "runs" / "tiny")
    train_worker(cfg, env, num_rows=len(images))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "evaltest", "tiny", {"train.storage_path": str(tmp / "runs")}, {})
    sets = [f"data.root={data_root}", f"tracking.uri={uri}", "tracking.experiment=evaltest", "eval.bank_limit=100",
            "eval.test_limit=60", "eval.knn_k=10", "eval.linear_epochs=2", "eval.batch_size=64"]
    yield run_id, uri, env.latest_checkpoint(), [a for s in sets for a in ("--set", s)], tmp
    mp.undo()


def _logged(uri: str, run_id: str) -> dict[str, float]:
    return tracking.client(uri).get_run(run_id).data.metrics


def test_transfer_table_and_mlflow(tiny_run, capsys):
    run_id, uri, _, sets, _ = tiny_run
    assert main(["eval", run_id, "--transfer", "cifar10,tinyimagenet,imagenette128", *sets]) == 0
    out = capsys.readouterr().out
    assert "transfer/tinyimagenet" in out and "knn_top5" in out and "resized to the run's resolution, 32 px" in out
    logged = _logged(uri, run_id)
    for ds in ("cifar10", "tinyimagenet", "imagenette128"):
        for m in ("knn_top1", "linear_top1"):
            assert 0 <= logged[f"eval_cli/transfer/{ds}/{m}"] <= 1
    assert 0 <= logged["eval_cli/transfer/tinyimagenet/knn_top5"] <= 1
    assert logged["eval_cli/transfer/tinyimagenet/knn_top5"] >= logged["eval_cli/transfer/tinyimagenet/knn_top1"]
    assert "eval_cli/transfer/cifar10/knn_top5" not in logged  # 10 classes: top-1 only


def test_few_labels_reuses_its_seeded_split_files(tiny_run, capsys):
    run_id, uri, _, sets, tmp = tiny_run
    args = ["eval", run_id, "--few-labels", "0.002,0.004", "--finetune-epochs", "1", *sets]
    assert main(args) == 0
    assert "few_labels/0.2pct" in capsys.readouterr().out
    logged = _logged(uri, run_id)
    assert logged["eval_cli/few_labels/0.2pct/labeled"] == 100 and logged["eval_cli/few_labels/0.4pct/labeled"] == 200
    first = logged["eval_cli/few_labels/0.2pct/top1"]
    assert 0 <= first <= 1
    files = sorted((tmp / "cache" / "splits").glob("cifar10-train-f0.002-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    assert main(args[:3] + ["0.002"] + args[4:]) == 0  # same seed: the split file is read back, same result
    assert files[0].stat().st_mtime_ns == mtime
    history = tracking.client(uri).get_metric_history(run_id, "eval_cli/few_labels/0.2pct/top1")
    assert [m.value for m in history] == [first, first]


def test_cluster_table_and_mlflow(tiny_run, capsys):
    run_id, uri, _, sets, _ = tiny_run
    assert main(["eval", run_id, "--cluster", *sets]) == 0
    out = capsys.readouterr().out
    assert "cluster/cifar10" in out and "nmi" in out
    logged = _logged(uri, run_id)
    assert 0 <= logged["eval_cli/cluster/cifar10/nmi"] <= 1 and 0.1 <= logged["eval_cli/cluster/cifar10/acc"] <= 1
    assert -1 <= logged["eval_cli/cluster/cifar10/ari"] <= 1


def test_bad_protocol_arguments_are_one_line(tiny_run, capsys):
    run_id, _, _, sets, _ = tiny_run
    assert main(["eval", run_id, "--few-labels", "0.01,2", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--few-labels: 2" in err


# ------------------------------------------------------------------------------------------------ exports


def test_standard_resnet18_exports_to_torchvision_strictly(tmp_path):
    import torchvision

    from replab.models.backbones import build_backbone
    from replab.platform.evaluate.export import export_encoder

    enc = build_backbone("resnet18", 224, width=1.0).eval()
    doc = export_encoder(enc, "resnet18", 224, tmp_path / "r18.pt")
    assert doc["format"] == "torchvision"
    model = torchvision.models.resnet18(num_classes=512)
    model.load_state_dict(torch.load(tmp_path / "r18.pt", weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), enc(x), atol=1e-5)


def test_export_and_register_the_tiny_run(tiny_run, capsys):
    import mlflow
    import mlflow.pytorch

    from replab.platform.evaluate.export import load_exported
    from replab.platform.train.checkpoints import load_checkpoint
    from replab.platform.train.loop import build_method
    from replab.validate import from_dict

    run_id, uri, ckpt, sets, tmp = tiny_run
    path = tmp / "export" / "tiny.pt"
    assert main(["eval", run_id, "--export", str(path), "--register", "tiny-encoder", *sets]) == 0
    out = capsys.readouterr().out
    assert "not a torchvision architecture" in out and "CIFAR stem" in out and "models:/tiny-encoder/1" in out
    state = load_checkpoint(ckpt)
    method = build_method(from_dict(state["config"]))
    method.load_state_dict(state["method"])
    enc = method.encoder.eval()
    x = torch.randn(3, 3, 32, 32)
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pytorch.load_model("models:/tiny-encoder/1")
    finally:
        mlflow.set_tracking_uri(None)
    with torch.no_grad():
        want = enc(x)
        assert torch.allclose(load_exported(path)(x), want, atol=1e-5)
        assert torch.allclose(loaded.eval()(x), want, atol=1e-5)
    assert math.isfinite(float(np.asarray(want).sum()))


def test_openset_and_finetune_report_top5_above_ten_classes():
    from replab.platform.probes import openset

    rng = np.random.default_rng(0)
    classes = 12
    colours = [(int(c), 255 - int(c), (37 * i) % 256) for i, c in enumerate(np.linspace(0, 255, classes))]

    def flat(n):
        base = np.repeat(np.asarray(colours, np.float64), n, axis=0)[:, None, None]
        return np.clip(base + rng.normal(0, 2, (len(base), 1, 1, 3)), 0, 255).repeat(8, 1).repeat(8, 2).astype(np.uint8)

    data = openset.OpenSetData(flat(4), np.repeat(np.arange(classes), 4), list(range(classes)), flat(3),
                               np.repeat(np.arange(classes), 3))

    class Colour(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    out = openset.evaluate_openset(Colour(), data, 8, torch.device("cpu"))
    assert out["openset/snn_top5"] >= out["openset/snn_top1"] and out["openset/snn_top5"] == 1.0
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    ft = openset.evaluate_finetune(enc, data, 8, torch.device("cpu"), epochs=1, batch_size=16)
    assert 0 <= ft["finetune/top1"] <= ft["finetune/top5"] <= 1
