"""One seed, one machine: two runs of one command give the same losses (train.deterministic, on by default)."""

import pytest

from replab.validate import load_config

TINY = ["data.limit=384", "data.cache=off", "data.decode_batch_size=32", "data.shuffle_buffer=128",
        "model.width=0.0625", "method.proj_hidden_dim=32", "method.proj_dim=16", "train.batch_size=32",
        "train.epochs=2", "train.steps_per_epoch=6", "train.log_every=1", "train.warmup_epochs=0",
        "train.precision=fp32", "eval.knn=false", "eval.linear=false", "eval.before_training=false"]


@pytest.mark.ray
@pytest.mark.slow
def test_same_seed_same_loss_history(ray_session, data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from replab.platform.train.ray_train import fit

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    histories = []
    for name in ("first", "second"):  # the name does not change what is trained (NAME_EXCLUDED)
        cfg = load_config(None, TINY + [f"data.root={data_root}", f"train.name={name}", f"tracking.uri={uri}",
                                        f"train.storage_path={tmp_path / 'runs'}", "tracking.experiment=repro"])
        result = fit(cfg)
        client = MlflowClient(uri)
        steps = sorted(client.get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)
        histories.append([m.value for m in steps])
        assert "train.deterministic=true" in client.get_run(result.run_id).data.tags["replab.seed"]
    first, second = histories
    assert len(first) == 12
    assert first == pytest.approx(second, abs=1e-6, rel=0)
