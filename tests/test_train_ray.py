"""Real Ray Train runs: 2 workers on CIFAR-10 images, logged to a temporary MLflow store; kill and resume."""

import os
import signal
import subprocess
import sys
import time

import pytest

from replab.validate import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = ["data.limit=256", "model.width=0.25", "method.proj_hidden_dim=64", "method.proj_dim=32",
        "train.batch_size=64", "train.log_every=1", "train.warmup_epochs=0", "eval.bank_limit=256",
        "eval.test_limit=128", "eval.knn_k=20", "eval.linear_epochs=3", "data.cache=on"]


def mlflow_runs(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_two_worker_ray_train_run_logs_to_mlflow(ray_session, data_root, tmp_path):
    from replab.platform.train.ray_train import fit

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, TINY + [
        f"data.root={data_root}", "train.epochs=2", "train.num_workers=2", f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={uri}", "tracking.experiment=ray-test",
    ])
    result = fit(cfg)
    assert result.metrics["epoch"] == 2
    client, runs = mlflow_runs(uri, "ray-test")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == result.run_id
    assert run.data.params["train.num_workers"] == "2" and run.data.params["method.name"] == "simclr"
    assert run.data.tags["method"] == "simclr" and run.data.tags["backbone"] == "resnet18"
    for key in ("train/loss", "train/lr", "train/images_per_sec", "eval/knn_top1", "eval/linear_top1", "data/skipped"):
        assert key in run.data.metrics, key
    assert 0.0 <= run.data.metrics["eval/knn_top1"] <= 1.0
    history = client.get_metric_history(run.info.run_id, "eval/knn_top1")
    assert len(history) == 2  # before training (the baseline) and at the end
    loss_steps = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(loss_steps) == 2 * (256 // 64)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval_summary.json", "config.yaml", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/encoder.safetensors"]


def test_killed_run_resumes_from_its_checkpoint(ray_session, data_root, tmp_path):
    """Kill `replab train` after its first checkpoint; the same command finishes the same MLflow run.

    Both drivers join the shared Ray instance (``RAY_ADDRESS``) instead of starting one each: the resume
    logic under test is replab's (checkpoint folder + MLflow run lookup), not Ray's start-up."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "runs"
    args = [sys.executable, "-m", "replab.cli", "train", "--set", f"data.root={data_root}"]
    for item in TINY + ["train.epochs=3", "train.checkpoint_every=1", f"train.storage_path={storage}",
                        f"tracking.uri={uri}", "tracking.experiment=resume-test", "train.name=resume-me",
                        "eval.before_training=false", "eval.linear=false", "data.limit=512"]:
        args += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and first.poll() is None:
            if list((storage / "resume-me").glob("checkpoint_*/state.pt")):
                time.sleep(3)  # let Ray Train record the checkpoint it has just uploaded
                break
            time.sleep(0.5)
        assert first.poll() is None, "the first run ended before it could be killed"
        assert list((storage / "resume-me").glob("checkpoint_*/state.pt")), "no checkpoint appeared"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "MLflow run id" in second.stdout and "mlflow ui" in second.stdout
    client, runs = mlflow_runs(uri, "resume-test")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    epochs = [m.value for m in client.get_metric_history(runs[0].info.run_id, "epoch")]
    assert epochs[-1] == 3
    assert 1 in epochs and epochs.count(1) == 1  # epoch 1 was not trained again after the restart
    from replab.platform.train.checkpoints import latest_checkpoint, load_checkpoint

    assert load_checkpoint(latest_checkpoint(str(storage / "resume-me")))["epoch"] == 3


def test_two_worker_queue_method_under_ray(ray_session, data_root, tmp_path):
    """MoCo v2 (momentum encoder + a queue of keys gathered over workers, shuffle-BN) on 2 Ray workers."""
    from replab.platform.train.checkpoints import latest_checkpoint, load_checkpoint
    from replab.platform.train.ray_train import fit

    cfg = load_config(None, TINY + [
        f"data.root={data_root}", "method.name=mocov2", "method.queue_size=384", "train.epochs=2",
        "train.num_workers=2", f"train.storage_path={tmp_path / 'runs'}", "tracking.enabled=false",
        "eval.before_training=false", "eval.linear=false",
    ])
    result = fit(cfg)
    assert result.metrics["epoch"] == 2
    state = load_checkpoint(latest_checkpoint(str(tmp_path / "runs" / result.run_name)))
    assert state["method"]["queue"].shape[0] == 384
    # 2 epochs x 4 steps x 64 keys gathered from both workers = 512 enqueued: the pointer wrapped to 128
    # (it would stand at 256 had each worker enqueued only its own 32 keys per step).
    assert int(state["method"]["queue_ptr"]) == 512 % 384
