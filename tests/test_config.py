import subprocess
import sys

import pytest

from replab.config import ConfigError
from replab.validate import load_config


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "data: {dataset: cifar10, limit: 500}\nmethod: {name: simclr, temperature: 0.2}\n")
    cfg = load_config(path, ["train.epochs=3", "train.use_gpu=false", "method.proj_dim=64", "data.limit=null"])
    assert cfg.train.epochs == 3 and cfg.train.use_gpu is False
    assert cfg.method.name == "simclr" and cfg.method.params["temperature"] == 0.2
    assert cfg.method.params["proj_dim"] == 64
    assert cfg.data.limit is None
    flat = cfg.flat()
    assert flat["method.temperature"] == 0.2 and flat["train.epochs"] == 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epoch=3", "train.epoch: unknown key; valid keys: epochs"),
        ("trian.epochs=3", "trian: unknown section; valid sections: data"),
        ("train.optimizer=adam", "train.optimizer: 'adam' is not valid; choose one of: auto, sgd, lars, adamw"),
        ("train.epochs=many", "train.epochs: 'many' is not valid; expected an integer"),
        ("train.epochs=0", "train.epochs: 0 is not valid; expected a positive number"),
        ("method.name=simclrr", "method.name: 'simclrr' is not valid; choose one of:"),
        ("method.temprature=0.1", "method.temprature: unknown key for method 'simclr'; valid keys: name, temperature"),
        ("model.backbone=resnet7", "model.backbone: 'resnet7' is not valid; choose one of: resnet18"),
        ("train.batch_size=255", "train.batch_size: 255 is not divisible by train.num_workers=2"),
    ],
)
def test_bad_values_name_the_key_and_choices(override, fragment):
    overrides = [override] + (["train.num_workers=2"] if "divisible" in fragment else [])
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))


def test_cli_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "replab.cli", "train", "--set", "train.optimizer=adam"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.optimizer" in lines[0] and "sgd, lars, adamw" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # nothing started before validation


def test_every_experiment_file_validates():
    from pathlib import Path

    experiments = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
    assert experiments, "no experiment specs"
    for path in experiments:
        load_config(path)
