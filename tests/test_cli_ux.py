"""A newcomer's first ten minutes: offline data set-up, finding a run by name, one-line errors."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import _fake_cifar_tarball  # noqa: E402  (the fake CIFAR-10 archive of the download tests)

from replab.config import ConfigError  # noqa: E402
from replab.platform.data import datasets  # noqa: E402


def test_offline_download_says_what_to_do(tmp_path):
    missing = (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri()
    with pytest.raises(datasets.DataError) as err:
        datasets.download("cifar10", str(tmp_path / "root"), url=missing, log=lambda m: None)
    message = str(err.value)
    assert "\n" not in message
    assert "REPLAB_DATA_ROOT" in message and "replab data download cifar10 --archive PATH" in message


def test_download_from_an_archive_on_disk(tmp_path, capsys):
    from replab.cli import main

    archive = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar_tarball(archive)
    root = tmp_path / "root"
    # Not the published archive: the md5 check refuses it in one line, exit 2 ...
    assert main(["data", "download", "cifar10", "--root", str(root), "--archive", str(archive)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--archive" in err[0] and "md5" in err[0]
    assert main(["data", "download", "cifar10", "--root", str(root), "--archive", str(tmp_path / "no.tgz")]) == 2
    assert "no such file" in capsys.readouterr().err
    # ... and with its own md5 it is converted without any network.
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    out = datasets.download("cifar10", str(root), archive=str(archive), md5=md5, log=lambda m: None)
    assert sorted(p.name.split("-")[0] for p in Path(out).glob("*.parquet")) == ["test", "train"]


def test_eval_finds_a_run_name_in_any_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    from replab.platform import tracking
    from replab.platform.train.encoder_init import run_by_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    only = c.create_run(c.create_experiment("exp-a"), tags={tracking.RUN_TAG: "simclr-x"}).info.run_id
    assert run_by_name(uri, "replab", "simclr-x").info.run_id == only  # not in the default experiment
    assert run_by_name(uri, "replab", "nope") is None
    c.create_run(c.create_experiment("exp-b"), tags={tracking.RUN_TAG: "simclr-x"})
    with pytest.raises(ConfigError) as err:
        run_by_name(uri, "replab", "simclr-x")
    assert str(err.value) == ("simclr-x: a run of this name is in 2 experiments (exp-a, exp-b); choose one with "
                              "--set tracking.experiment=NAME or pass the MLflow run id")
    assert run_by_name(uri, "exp-b", "simclr-x").info.experiment_id != c.get_run(only).info.experiment_id


def test_eval_says_what_it_measures_on_how_many_images(data_root, tmp_path, capsys):
    import json

    from replab.cli import main
    from replab.platform.data.arrays import load_arrays
    from replab.platform.train.loop import LocalEnv, train_worker
    from replab.validate import load_config

    tiny = ["data.resolution=32", "model.width=0.125", "method.proj_hidden_dim=32", "method.proj_dim=16",
            "train.batch_size=32", "train.epochs=1", "eval.knn=false", "eval.linear=false", "train.precision=fp32"]
    images, labels = load_arrays("cifar10", str(data_root), "train", 32, limit=64, seed=0)
    env = LocalEnv(images, labels, tmp_path / "ckpt")
    train_worker(load_config(None, tiny + [f"data.root={data_root}"]), env, len(images))
    sets = ["--set", f"data.root={data_root}", "--set", "eval.bank_limit=96", "--set", "eval.test_limit=48",
            "--set", "tracking.enabled=false"]
    assert main(["eval", env.latest_checkpoint(), "--knn", *sets]) == 0
    out = capsys.readouterr().out
    assert "kNN (k=200) on 48 test images, with 96 training images as the bank" in out
    results = json.loads(out[out.index("{"):])
    assert results["test_images"] == 48 and results["bank_images"] == 96 and "eval/knn_top1" in results


def test_train_summary_shows_the_random_init_baseline(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from replab import cli
    from replab.platform import tracking
    from replab.platform.train import ray_train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri).create_run(tracking.experiment_id(uri, "replab"))
    for key, value in {"eval/init_knn_top1": 0.25, "eval/knn_top1": 0.33}.items():
        MlflowClient(uri).log_metric(run.info.run_id, key, value)
    result = ray_train.FitResult("r", run.info.run_id, uri, {"eval/knn_top1": 0.33, "train/epoch_loss": 4.5}, None)
    monkeypatch.setattr(ray_train, "fit", lambda cfg: result)
    assert cli.main(["train", "--set", f"tracking.uri={uri}"]) == 0
    out = capsys.readouterr().out
    assert "eval/knn_top1 = 0.3300   (random init 0.2500, +8.0 points)" in out


def test_progress_bars_only_on_a_terminal():
    from replab.platform.progress import bar

    progress = bar(total=3, desc="epoch 1/1")  # pytest captures stderr: not a terminal
    assert progress.disable
    progress.update(3)
    progress.close()


@pytest.mark.ray
@pytest.mark.slow
def test_train_prints_each_epoch_once_and_no_ray_chatter(data_root, tmp_path):
    import os
    import subprocess

    args = [sys.executable, "-m", "replab.cli", "train", "--set", f"data.root={data_root}", "--set", "data.limit=256",
            "--set", "model.width=0.125", "--set", "train.epochs=2", "--set", "train.batch_size=64",
            "--set", "train.num_workers=1", "--set", "train.cpus_per_worker=1", "--set", "eval.knn=false",
            "--set", "eval.linear=false", "--set", f"train.storage_path={tmp_path / 'runs'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")  # its own local instance, as a user's first command would start
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-2000:]
    for epoch in (1, 2):
        assert sum(f"epoch {epoch}/2  loss" in line for line in text.splitlines()) == 1, text
    for chatter in ("TrainingReport(", "Reporting training result", "Checkpoint successfully created",
                    "Started training worker group", "Execution plan of Dataset", "exclude_resources"):
        assert chatter not in text, chatter
