"""Faults that must lose or mix nothing, injected into real runs: a corrupt checkpoint, two processes on one
run, an evaluation error, a truncated shard, failures before training, a finished run re-run, SIGINT / SIGTERM,
a non-finite loss. Each ends with one line naming what went wrong and the MLflow run in the right state."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from replab.platform.train import checkpoints
from replab.platform.train.loop import LocalEnv, train_worker
from replab.validate import load_config

REPO = Path(__file__).resolve().parents[1]
LOOP = ["data.resolution=32", "model.width=0.25", "method.proj_hidden_dim=64", "method.proj_dim=32",
        "train.batch_size=32", "train.log_every=100", "train.precision=fp32", "train.warmup_epochs=0"]
RAY_TINY = ["data.limit=512", "model.width=0.25", "method.proj_hidden_dim=64", "method.proj_dim=32",
            "train.batch_size=64", "train.log_every=100", "train.warmup_epochs=0", "eval.bank_limit=256",
            "eval.test_limit=128", "eval.knn_k=20", "eval.linear=false", "eval.before_training=false",
            "data.cache=on", "train.checkpoint_every=1"]


@pytest.fixture(scope="module")
def cifar(data_root):
    from replab.platform.data.arrays import load_arrays

    return load_arrays("cifar10", str(data_root), "train", 32, limit=128, seed=0)


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def driver_lines(text: str) -> str:
    """The driver's own stderr, without the log lines Ray forwards from its actors."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("\x1b[36m("))[-3000:]


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("replab: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


# --- the per-worker loop, no Ray ----------------------------------------------------------------------------


def test_evaluation_error_keeps_the_epoch_and_a_nan_loss_stops(cifar, tmp_path, monkeypatch):
    images, labels = cifar
    from replab.platform.probes.frozen import EvalData

    eval_data = EvalData(images[:64], labels[:64], images[64:], labels[64:], 10)
    cfg = load_config(None, LOOP + ["train.epochs=2", "train.checkpoint_every=0", "eval.every=1",
                                    "eval.before_training=false", "eval.linear=false", "eval.knn_k=10"])

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr("replab.platform.train.loop.evaluate_encoder", broken)
    env = LocalEnv(images, labels, tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train_worker(cfg, env, len(images), eval_data_fn=lambda: eval_data)
    # Epoch 1 had no checkpoint due (checkpoint_every=0), yet its training is kept and reported.
    assert [r["epoch"] for r in env.reports] == [1]
    assert checkpoints.load_checkpoint(env.latest_checkpoint())["epoch"] == 1
    monkeypatch.undo()
    resumed = LocalEnv(images, labels, tmp_path / "ckpt")
    train_worker(cfg, resumed, len(images), eval_data_fn=lambda: eval_data)
    assert [r["epoch"] for r in resumed.reports] == [2] and "eval/knn_top1" in resumed.reports[-1]

    # A non-finite loss between logging steps (log_every > steps) still stops the run, before any checkpoint.
    nan_cfg = load_config(None, LOOP + ["train.epochs=2", "train.lr=1e30", "eval.knn=false", "eval.linear=false"])
    nan_env = LocalEnv(images, labels, tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"train/loss became (nan|inf) in epoch 1"):
        train_worker(nan_cfg, nan_env, len(images))
    assert nan_env.reports == [] and nan_env.latest_checkpoint() is None


def test_corrupt_checkpoints_are_set_aside_and_ray_snapshot_trimmed(tmp_path):
    """Unit view of what the Ray test below exercises end to end: garbage and truncated files are named,
    moved aside, the newest readable checkpoint wins, and Ray's list of checkpoints keeps only what exists."""
    import json

    run = tmp_path / "run"
    for epoch in (1, 2, 3):
        folder = run / f"checkpoint_{epoch}"
        folder.mkdir(parents=True)
        torch.save({"epoch": epoch, "step": 4 * epoch, "method": {"w": torch.randn(256)}}, folder / "state.pt")
        os.utime(folder / "state.pt", (epoch, epoch))
    data = (run / "checkpoint_3" / "state.pt").read_bytes()
    (run / "checkpoint_3" / "state.pt").write_bytes(data[: len(data) // 2])  # truncated
    (run / "checkpoint_2" / "state.pt").write_bytes(os.urandom(len(data)))  # garbage
    os.utime(run / "checkpoint_3" / "state.pt", (3, 3))
    os.utime(run / "checkpoint_2" / "state.pt", (2, 2))
    entries = [{"checkpoint_dir_name": f"checkpoint_{e}", "metrics": {"epoch": e}} for e in (1, 2, 3)]
    (run / checkpoints.RAY_SNAPSHOT).write_text(json.dumps({
        "ray_version": "x", "checkpoint_results": entries, "checkpoint_report_indices": [0, 1, 2],
        "latest_checkpoint_result": entries[2], "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": 3, "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))

    resume = checkpoints.prepare_resume(str(run))
    assert (resume.path, resume.epoch, resume.step) == (str(run / "checkpoint_1"), 1, 4)
    assert len(resume.set_aside) == 2
    for line, name in zip(resume.set_aside, ("checkpoint_3", "checkpoint_2")):
        assert str(run / name / "state.pt") in line and "weights_only" not in line and "\n" not in line
        assert (run / f"corrupt_{name}").is_dir() and not (run / name).exists()
    snapshot = json.loads((run / checkpoints.RAY_SNAPSHOT).read_text())
    assert [e["checkpoint_dir_name"] for e in snapshot["checkpoint_results"]] == ["checkpoint_1"]
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_1"
    with pytest.raises(checkpoints.CheckpointError, match="corrupt_checkpoint_2/state.pt") as err:
        checkpoints.load_checkpoint(run / "corrupt_checkpoint_2")
    assert "weights_only" not in str(err.value)


def test_second_process_on_a_run_is_refused_until_the_first_dies(data_root, tmp_path, capsys):
    from replab.cli import main
    from replab.platform.train.runlock import run_lock

    storage = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from replab.platform.train.runlock import run_lock\n"
         f"with run_lock({str(storage)!r}, 'shared'):\n    print('held', flush=True); time.sleep(300)"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["train", "--set", f"data.root={data_root}", "--set", f"train.storage_path={storage}",
                   "--set", "train.name=shared", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
        line = one_line(capsys.readouterr().err)
        assert rc == 1 and f"pid {holder.pid}" in line and "already being trained" in line
        assert mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "replab") == []  # no MLflow run was opened
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the lock itself dies with the process
        holder.wait()
    assert (storage / "shared" / ".replab.lock").exists()
    with run_lock(str(storage), "shared") as path:
        assert f"pid {os.getpid()}" in path.read_text()


# --- real Ray runs --------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_failures_before_and_during_training_end_the_mlflow_run(ray_session, data_root, tmp_path, capsys):
    """A truncated shard, a missing test split and a non-finite loss: one line each, exit != 0, run FAILED;
    then a finished run re-run trains nothing and opens no new MLflow run."""
    from replab.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shards = tmp_path / "shards"
    shards.mkdir()
    good = sorted((data_root / "cifar10").glob("train-*.parquet"))[0]
    shutil.copy(good, shards / "train-0.parquet")
    (shards / "train-1.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 3])

    def train(name: str, *extra: str) -> tuple[int, str, str]:
        argv = ["train"]
        for item in RAY_TINY + [f"data.root={data_root}", "train.epochs=1", f"train.storage_path={tmp_path / 'runs'}",
                                f"tracking.uri={uri}", "tracking.experiment=faults", f"train.name={name}", *extra]:
            argv += ["--set", item]
        rc = main(argv)
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, _, err = train("shard", f"data.dataset={shards}", "eval.knn=false")
    assert rc == 2 and re.search(r"train-1\.parquet: not a readable parquet file", one_line(err)), err[-2000:]
    rc, _, err = train("split", "eval.test_split=nosuchsplit")
    assert rc != 0 and "nosuchsplit" in one_line(err), err[-2000:]
    rc, _, err = train("nan", "train.lr=1e30", "eval.knn=false")
    assert rc == 1 and re.search(r"run nan failed: FloatingPointError: train/loss became (nan|inf)", one_line(err))
    status = {r.info.run_name: r.info.status for r in mlflow_runs(uri, "faults")}
    assert status == {"shard": "FAILED", "split": "FAILED", "nan": "FAILED"}

    rc, out, _ = train("done", "eval.knn=false")
    assert rc == 0 and "run done finished" in out
    run_id = next(r.info.run_id for r in mlflow_runs(uri, "faults") if r.info.run_name == "done")
    rc, out, _ = train("done", "eval.knn=false")
    assert rc == 0 and "run done had already finished: nothing to do" in out
    assert f"MLflow run id: {run_id}" in out and "train/epoch_loss" in out
    assert len(mlflow_runs(uri, "faults")) == 4


@pytest.mark.ray
@pytest.mark.slow
def test_signals_and_a_corrupt_checkpoint_lose_nothing(ray_session, data_root, tmp_path):
    """SIGTERM then SIGINT end `replab train` with one line and MLflow KILLED; the newest checkpoint is then
    truncated: the re-run names it, sets it aside (Ray accepts the run without it), says where it resumes
    from, and finishes the same MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "sig"
    args = [sys.executable, "-m", "replab.cli", "train"]
    for item in RAY_TINY + [f"data.root={data_root}", "train.epochs=5", f"train.storage_path={tmp_path / 'runs'}",
                            f"tracking.uri={uri}", "tracking.experiment=signals", "train.name=sig"]:
        args += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}

    def interrupt(sig: int, checkpoints_wanted: int, expect_out: str = "") -> tuple[str, str]:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        before = set(run_dir.glob("checkpoint_*"))
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if len({p.parent for p in run_dir.glob("checkpoint_*/state.pt")} - before) >= checkpoints_wanted:
                time.sleep(2)  # let Ray Train record the checkpoint it has just uploaded
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, driver_lines(err)
        assert expect_out in out, out[-2000:]
        assert "Fatal" not in err and "*** SIG" not in err and "stack trace" not in err.lower(), err[-3000:]
        assert [r.info.status for r in mlflow_runs(uri, "signals")] == ["KILLED"]
        return out, err

    _, err = interrupt(signal.SIGTERM, 2)
    assert re.fullmatch(r"replab: interrupted; re-run the same command to resume from epoch [2-4]", one_line(err))

    newest = checkpoints.latest_checkpoint(str(run_dir))
    epoch = checkpoints.verify_checkpoint(newest)["epoch"]
    state = Path(newest) / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    out, err = interrupt(signal.SIGINT, 1, expect_out="resuming sig from epoch")
    assert f"{state}: unreadable checkpoint" in err and "weights_only" not in err
    assert re.search(rf"resuming sig from epoch {epoch - 1} \(step {8 * (epoch - 1)}\), checkpoint {run_dir}/checkpoint_",
                     out), out[-2000:]
    assert (run_dir / f"corrupt_{Path(newest).name}").is_dir()

    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming sig from epoch" in done.stdout and "run sig finished" in done.stdout
    runs = mlflow_runs(uri, "signals")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert checkpoints.verify_checkpoint(checkpoints.latest_checkpoint(str(run_dir)))["epoch"] == 5
