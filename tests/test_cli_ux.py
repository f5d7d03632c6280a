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
