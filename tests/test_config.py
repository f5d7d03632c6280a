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


# -- bad values that used to pass validation (issue 18) -------------------------------------------------------
BAD_VALUES = [
    ("train.lr=nan", "train.lr: 'nan' is not valid; expected a finite number"),
    ("train.lr=.inf", "train.lr: inf is not valid; expected a finite number"),
    ("train.warmup_epochs=-.inf", "train.warmup_epochs: -inf is not valid; expected a finite number"),
    ("eval.knn_temperature=nan", "eval.knn_temperature: 'nan' is not valid; expected a finite number"),
    ("method.temperature=nan", "method.temperature: 'nan' is not valid; expected a finite number"),
    ("method.temperature=0", "method.temperature: 0.0 is not valid; expected a positive number"),
    ("method.proj_dim=0", "method.proj_dim: 0 is not valid; expected a number >= 1"),
    ("train.log_every=0", "train.log_every: 0 is not valid; expected a number >= 1"),
    ("eval.batch_size=0", "eval.batch_size: 0 is not valid; expected a number >= 1"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch: 0 is not valid; expected a number >= 1"),
    ("train.steps_per_epoch=-3", "train.steps_per_epoch: -3 is not valid; expected a number >= 1"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker: 0.0 is not valid; expected a positive number"),
    ("train.cpus_per_worker=-1", "train.cpus_per_worker: -1.0 is not valid; expected a positive number"),
    ("data.resolution=4", "data.resolution: 4 is not valid; expected a number in [8, 4096]"),
    ("model.width=0", "model.width: 0.0 is not valid; expected a number in [0.0625, 4]"),
    ("model.width=100", "model.width: 100.0 is not valid; expected a number in [0.0625, 4]"),
    ("data.limit=-5", "data.limit: -5 is not valid; expected a positive number"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer: -1 is not valid; expected a non-negative number"),
    ("data.decode_batch_size=0", "data.decode_batch_size: 0 is not valid; expected a number >= 1"),
    ("eval.bank_limit=-1", "eval.bank_limit: -1 is not valid; expected a number >= 1"),
    ("eval.test_limit=0", "eval.test_limit: 0 is not valid; expected a number >= 1"),
    ("train.seed=-1", "train.seed: -1 is not valid; expected a non-negative number"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio: 2.0 is not valid; expected a number in [0, 1]"),
    ("train.storage_path=", "train.storage_path: '' is not valid; expected a folder or a URI"),
    ("tracking.uri=htp://localhost:5000", "tracking.uri: 'htp://localhost:5000' is not valid; use a path"),
    ("tracking.uri=sqlite://mlflow.db", "tracking.uri: 'sqlite://mlflow.db' is not valid; use a path"),
    ("tracking.uri=bogus:thing", "tracking.uri: 'bogus:thing' is not valid; use a path"),
    ("model.backbone=vit_tiny", "data.resolution: 30 is not valid for vit_tiny; it must be a multiple of model.patch_size=4"),
    ("model.patch_size=64", "data.resolution: 32 is not valid for vit_tiny; it must be a multiple of model.patch_size=64"),
    ("train.epochs.x=1", "train.epochs: {'x': 1} is not valid; expected an integer"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_bad_values_are_refused_in_one_line(override, message):
    extra = {"model.backbone=vit_tiny": ["data.resolution=30"],
             "model.patch_size=64": ["model.backbone=vit_tiny"]}.get(override, [])
    with pytest.raises(ConfigError) as err:
        load_config(None, [override, *extra])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["tracking.uri=", "tracking.uri=mlruns/mlflow.db", "tracking.uri=/abs/db",
                                      "tracking.uri=sqlite:////tmp/x.db", "tracking.uri=http://h:5000",
                                      "tracking.uri=https://h", "tracking.uri=file:/tmp/mlruns",
                                      "tracking.uri=databricks", "tracking.uri=postgresql://u@h/db",
                                      "model.width=0.125", "method.temperature=0.05",
                                      "train.steps_per_epoch=null", "data.shuffle_buffer=0"])
def test_good_values_pass(override):
    load_config(None, [override])


def test_every_method_accepts_its_own_defaults():
    import dataclasses

    from replab.methods import registry

    for name, cls in registry.available().items():
        if dataclasses.is_dataclass(cls.Params):
            registry.validate_params(name, {f.name: f.default for f in dataclasses.fields(cls.Params)})


def test_a_recipe_applies_under_the_config(tmp_path):
    """``method.recipe: cpu`` fills what the config leaves unset; what the config sets (flat or under
    ``method.params``, in YAML or --set) wins; ``paper`` is the defaults."""
    paper = load_config(None, ["method.name=byol"])
    assert paper.method.recipe == "paper" and paper.train.optimizer == "auto"
    assert paper.method.params["proj_hidden_dim"] == 4096
    cpu = load_config(None, ["method.name=byol", "method.recipe=cpu"])
    assert (cpu.train.optimizer, cpu.train.lr, cpu.train.weight_decay) == ("sgd", 0.12, 5e-4)
    assert cpu.method.params["proj_hidden_dim"] == 512 and cpu.method.params["pred_hidden_dim"] == 512
    assert cpu.flat()["method.recipe"] == "cpu"
    path = write(tmp_path, "method: {name: byol, recipe: cpu, proj_hidden_dim: 1024, params: {pred_hidden_dim: 256}}\n"
                           "train: {lr: 0.3}\n")
    mine = load_config(path, ["train.weight_decay=1e-4"])
    assert mine.method.params["proj_hidden_dim"] == 1024 and mine.method.params["pred_hidden_dim"] == 256
    assert (mine.train.optimizer, mine.train.lr, mine.train.weight_decay) == ("sgd", 0.3, 1e-4)
    # a re-read of the resolved config (a sweep cell, a resumed run) changes nothing
    from replab.platform.sweep.grid import cell_raw
    from replab.validate import from_dict

    assert from_dict(cell_raw(mine)).to_dict() == mine.to_dict()


def test_an_unknown_recipe_is_one_line_with_the_choices():
    with pytest.raises(ConfigError, match=r"^method.recipe: 'gpu' is not a recipe of byol; choose one of: paper, cpu$"):
        load_config(None, ["method.name=byol", "method.recipe=gpu"])
    with pytest.raises(ConfigError, match="not a recipe of paws; choose one of: paper$"):
        load_config(None, ["method.name=paws", "method.recipe=cpu"])


def test_every_recipe_validates_and_every_unlabeled_method_has_a_cpu_recipe():
    from replab.methods import registry

    for name, cls in registry.available().items():
        for recipe in cls.recipes:
            load_config(None, [f"method.name={name}", f"method.recipe={recipe}"])
    needs_labels = {"paws", "ropaws"}  # semi-supervised with a labeled support set per step: no reference-budget row
    assert [n for n, cls in registry.available().items() if "cpu" not in cls.recipes] == sorted(needs_labels)


def test_set_under_a_non_mapping_is_one_line(tmp_path):
    scalar = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping of sections, not list"):
        load_config(scalar, ["train.epochs=2"])
    nested = write(tmp_path, "data: {limit: 5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(nested, ["data.limit.x=1"])
    assert str(err.value) == "--set data.limit.x: data.limit is 5, not a mapping; cannot set a key under it"
    empty_section = write(tmp_path, "data:\ntrain:\n")
    assert load_config(empty_section, ["train.epochs=2"]).train.epochs == 2


def test_local_run_must_fit_the_machine(monkeypatch):
    from replab.validate import check_fits_machine

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, ["train.num_workers=64"])
    with pytest.raises(ConfigError, match=r"^train.num_workers: 64 workers x 1 CPUs = 64 CPUs do not fit this "
                                          r"machine's 2 cores; lower"):
        check_fits_machine(cfg, cpus=2, available_gib=20)
    frac = load_config(None, ["train.num_workers=2", "train.cpus_per_worker=1.5"])
    with pytest.raises(ConfigError, match="3 CPUs do not fit this machine's 2 cores"):
        check_fits_machine(frac, cpus=2, available_gib=20)
    with pytest.raises(ConfigError, match="2 workers need about 2 GiB but 1.5 GiB is available"):
        check_fits_machine(load_config(None, ["train.num_workers=2"]), cpus=8, available_gib=1.5)
    with pytest.raises(ConfigError, match="1 GPU workers but this machine has 0 GPUs"):
        check_fits_machine(load_config(None, ["train.use_gpu=true"]), cpus=8, available_gib=20, gpus=0)
    check_fits_machine(load_config(None, ["train.num_workers=2"]), cpus=2, available_gib=20)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster schedules its own workers
    check_fits_machine(cfg, cpus=2, available_gib=1)


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--set", "train.lr=nan"], "train.lr: 'nan' is not valid; expected a finite number"),
    (["train", "--set", "method.temperature=0"], "method.temperature: 0.0 is not valid; expected a positive number"),
    (["eval", "some-run", "--set", "eval.batch_size=0"], "eval.batch_size: 0 is not valid"),
])
def test_cli_main_exits_2(argv, fragment, capsys, tmp_path, monkeypatch):
    from replab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_too_many_local_workers_exit_2_before_ray(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "replab.cli", "train", "--set", "train.num_workers=64"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.num_workers: 64 workers" in lines[0] and "do not fit" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_run_name_hash_covers_every_defining_key():
    """Changing any key outside NAME_EXCLUDED must change the derived run name."""
    import dataclasses

    from replab.platform.train.ray_train import NAME_EXCLUDED, run_name

    def bump(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value + 1
        if isinstance(value, str):
            return value + "x"
        if isinstance(value, list):
            return [*value, {"x": 1}]
        return 1  # None

    base = load_config(None, [])
    name = run_name(base)
    unchanged = []
    for key, value in base.flat().items():
        section, field = key.split(".", 1)
        if key == "train.name":  # an explicit name replaces the derived one
            continue
        if section == "method":
            if field == "name":
                continue
            if field == "recipe":  # a recipe's settings are in the hash themselves; the name is not
                changed = dataclasses.replace(base, method=dataclasses.replace(base.method, recipe="cpu"))
                if run_name(changed) != name:
                    unchanged.append(key)
                continue
            changed = dataclasses.replace(base, method=dataclasses.replace(
                base.method, params={**base.method.params, field: bump(value)}))
        else:
            part = getattr(base, section)
            changed = dataclasses.replace(base, **{section: dataclasses.replace(part, **{field: bump(value)})})
        if (run_name(changed) == name) != (key in NAME_EXCLUDED):
            unchanged.append(key)
    assert not unchanged, f"run name ignores (or wrongly covers) {unchanged}"
