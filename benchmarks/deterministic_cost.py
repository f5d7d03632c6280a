"""Throughput with train.deterministic on vs off: interleaved repeats, median epoch-2 images/s."""
import json, statistics, tempfile
from replab.validate import load_config
from replab.platform.train.ray_train import fit, ensure_ray
from mlflow.tracking import MlflowClient

BASE = ["data.limit=2048", "data.cache=off", "model.width=0.25", "method.proj_hidden_dim=64", "method.proj_dim=32",
        "train.batch_size=64", "train.epochs=2", "train.log_every=4", "train.warmup_epochs=0",
        "eval.knn=false", "eval.linear=false", "eval.before_training=false", "train.precision=fp32"]
tmp = tempfile.mkdtemp()
uri = f"sqlite:///{tmp}/mlflow.db"
ensure_ray(1)
out = {"true": [], "false": []}
losses = {"true": [], "false": []}
for rep in range(3):
    for det in ("true", "false"):
        cfg = load_config(None, BASE + [f"train.deterministic={det}", f"train.name=d{det}-{rep}",
                                        f"train.storage_path={tmp}/runs", f"tracking.uri={uri}"])
        r = fit(cfg)
        c = MlflowClient(uri)
        ips = [m.value for m in c.get_metric_history(r.run_id, "train/epoch_images_per_sec")]
        out[det].append(ips[-1])
        losses[det].append([m.value for m in sorted(c.get_metric_history(r.run_id, "train/loss"), key=lambda m: m.step)][:5])
        print(det, rep, ips, flush=True)
print(json.dumps({"median_images_per_sec": {k: statistics.median(v) for k, v in out.items()}, "all": out,
                  "first_losses": losses}, indent=1))
