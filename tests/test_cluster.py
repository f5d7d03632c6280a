"""Running on a cluster: the launcher config, the KubeRay manifest, and a real two-node Ray cluster on this
machine (``ray start`` head + a second ``ray start`` node, token authentication on) with a real MLflow
server, driven exactly as the README says: ``ray job submit --working-dir . -- replab train ...``.

The cluster tests never call ``ray.init`` in this process: the cluster is started with ``ray start``
subprocesses in its own temp dir (so other Ray instances on this machine neither join it nor are joined),
jobs go through the Jobs API, and everything is checked through the dashboard's state API and MLflow's
REST API. Teardown kills exactly the processes of this cluster (those whose command line names its temp
dir) and the MLflow server; never ``ray stop``, which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = ["data.limit=256", "model.width=0.25", "method.proj_hidden_dim=64", "method.proj_dim=32",
        "train.batch_size=64", "train.log_every=1", "train.warmup_epochs=0", "eval.bank_limit=256",
        "eval.test_limit=128", "eval.knn_k=20", "eval.linear=false", "train.num_workers=2",
        "train.cpus_per_worker=2"]
STEPS_PER_EPOCH = 256 // 64


# ---------------------------------------------------------------- static configs (no cluster needed)


def test_cluster_yaml_passes_ray_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and "GPU" not in types["head"]["resources"]
    gpu_instances = {types[t]["node_config"]["InstanceType"] for t in types if t != "head"}
    assert {"g5.2xlarge", "p4d.24xlarge"} <= gpu_instances  # single- and 8-GPU workers
    assert all(types[t]["max_workers"] > types[t]["min_workers"] == 0 for t in types if t != "head")
    assert any("pip install" in c and "replab" in c for c in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in (REPO / "cluster.yaml").read_text().split("head_start_ray_commands")[1]
    # No launcher-created security group (it opens SSH to 0.0.0.0/0): every node type uses the given one.
    assert "security_group" not in config["provider"]
    assert all(types[t]["node_config"].get("SecurityGroupIds") for t in types)


def test_kuberay_rayjob_manifest():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay-rayjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].split()[:2] == ["replab", "train"]
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://")
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            for g in cluster["workerGroupSpecs"]]
    assert sorted(gpus) == ["1", "8"]


# ---------------------------------------------------------------- a real two-node cluster on this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, token: str | None = None, timeout: float = 30) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


class Cluster:
    def __init__(self, temp_dir: str, gcs_port: int, dashboard_port: int, mlflow_port: int, env: dict, token: str):
        self.temp_dir, self.gcs_port, self.dashboard_port = temp_dir, gcs_port, dashboard_port
        self.mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.env, self.token = env, token
        self.storage = Path(temp_dir) / "runs"

    # --- Ray
    def nodes(self) -> list[dict]:
        out = http_json(f"{self.address}/api/v0/nodes?limit=100", token=self.token)
        return out["data"]["result"]["result"]

    def train_workers(self, alive_only: bool = False) -> list[dict]:
        query = "filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker&limit=1000&detail=1"
        if alive_only:
            query += "&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
        out = http_json(f"{self.address}/api/v0/actors?{query}", token=self.token)
        return out["data"]["result"]["result"]

    def job_cmd(self, data_root: Path, replab_args: list[str], *extra: str) -> list[str]:
        """The README's command: ray job submit --working-dir . [extra] -- replab <replab_args>"""
        runtime_env = {"env_vars": {"REPLAB_DATA_ROOT": str(data_root), "MLFLOW_TRACKING_URI": self.mlflow_uri}}
        return ["ray", "job", "submit", "--address", self.address, "--working-dir", str(REPO),
                "--runtime-env-json", json.dumps(runtime_env), *extra, "--", "replab", *replab_args]

    def submit_cmd(self, data_root: Path, overrides: list[str], *extra: str) -> list[str]:
        """``replab train`` on the tiny settings, submitted as the README says."""
        sets = [f"--set={item}" for item in
                [*TINY, f"train.storage_path={self.storage}", "tracking.experiment=cluster", *overrides]]
        return self.job_cmd(data_root, ["train", *sets], *extra)

    # --- MLflow REST API
    def mlflow(self, endpoint: str, body: dict | None = None, **params) -> dict:
        url = f"{self.mlflow_uri}/api/2.0/mlflow/{endpoint}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return http_json(url, body)

    def runs(self, run_name: str) -> list[dict]:
        exp = self.mlflow("experiments/get-by-name", experiment_name="cluster")["experiment"]
        out = self.mlflow("runs/search", {"experiment_ids": [exp["experiment_id"]],
                                           "filter": f"tags.`replab.run` = '{run_name}'"})
        return out.get("runs", [])

    def history(self, run_id: str, key: str) -> list[dict]:
        return self.mlflow("metrics/get-history", run_id=run_id, metric_key=key, max_results=10000).get("metrics", [])


def _cluster_pids(marker: str) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                pids.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return [p for p in pids if p != os.getpid()]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except urllib.error.HTTPError:
            return  # the server answers (auth errors included)
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster():
    """A head (3 CPUs, dashboard on, token auth) + a second node (3 CPUs, resource node2) + an MLflow server.

    Each node has 3 logical CPUs and each train worker asks for 2, so two workers cannot share a node: the
    2-worker TorchTrainer spans both nodes, and each node keeps one CPU for Ray Data's decode tasks.
    """
    import psutil

    try:
        import ray.dashboard.optional_deps  # noqa: F401  (the dashboard, hence the Jobs API)
    except ImportError as exc:
        pytest.fail(f"the Ray dashboard needs ray[default] (pip install 'ray[default]'): {exc}")
    temp_dir = tempfile.mkdtemp(prefix="raycl", dir="/tmp")  # short: Unix socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update(RAY_AUTH_MODE="token", RAY_TRAIN_V2_ENABLED="1", RAY_USAGE_STATS_ENABLED="0")
    token = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    env["RAY_AUTH_TOKEN"] = token
    gcs_port, dashboard_port, mlflow_port = free_port(), free_port(), free_port()
    mlflow_proc = None
    try:
        mlflow_proc = subprocess.Popen(
            ["mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{temp_dir}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", f"{temp_dir}/mlartifacts"],
            env=env, stdout=open(f"{temp_dir}/mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        common = ["--num-cpus=3", "--object-store-memory=200000000", "--disable-usage-stats"]
        subprocess.run(
            ["ray", "start", "--head", f"--port={gcs_port}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--metrics-export-port={free_port()}", *common],
            env=env, check=True, capture_output=True, text=True, timeout=240,
        )
        subprocess.run(
            ["ray", "start", f"--address=127.0.0.1:{gcs_port}", "--resources", json.dumps({"node2": 1}),
             f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}", *common],
            env=env, check=True, capture_output=True, text=True, timeout=240,
        )
        c = Cluster(temp_dir, gcs_port, dashboard_port, mlflow_port, env, token)
        _wait_http(f"{c.mlflow_uri}/health", 120)
        _wait_http(f"{c.address}/api/version", 120)
        deadline = time.time() + 120
        while len([n for n in c.nodes() if n["state"] == "ALIVE"]) < 2:
            assert time.time() < deadline, "the second node did not join"
            time.sleep(2)
        yield c
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"{exc.cmd[:3]} failed: {exc.stdout}\n{exc.stderr}")
    finally:
        if mlflow_proc is not None:
            try:
                os.killpg(mlflow_proc.pid, signal.SIGTERM)
                mlflow_proc.wait(timeout=20)
            except Exception:
                try:
                    os.killpg(mlflow_proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # only this cluster's processes: they name its temp dir
            for pid in _cluster_pids(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            psutil.wait_procs([psutil.Process(p) for p in _cluster_pids(temp_dir) if psutil.pid_exists(p)],
                              timeout=15)
        shutil.rmtree(temp_dir, ignore_errors=True)



def finished_run(cluster: Cluster, name: str, epochs: int) -> dict:
    runs = cluster.runs(name)
    assert len(runs) == 1, [r["info"] for r in runs]  # one MLflow run, even across worker-group restarts
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
    assert metrics["epoch"] == epochs
    return run


@pytest.mark.ray
@pytest.mark.slow
def test_job_trains_across_two_nodes_and_survives_a_killed_worker(cluster, data_root):
    """``ray job submit -- replab train`` with token auth: the 2-worker group spans both nodes; a train worker
    SIGKILLed after the first checkpoint is restarted by Ray Train from it, and the run finishes all epochs as
    one MLflow run with every step logged (steps after the checkpoint logged twice, at most one epoch)."""
    # Token authentication is on: the Jobs API refuses a client without the token.
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=30)
    assert denied.value.code in (401, 403)
    no_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["HOME"] = tempfile.mkdtemp()  # no ~/.ray/auth_token either
    refused = subprocess.run(["ray", "job", "list", "--address", cluster.address], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0

    name, epochs = "cluster-train", 3
    cmd = cluster.submit_cmd(data_root, [f"train.name={name}", f"train.epochs={epochs}", "train.max_failures=2"])
    start = time.time()
    out_path = Path(cluster.temp_dir) / "train-job.log"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            placement: set[str] = set()
            killed_at = None
            deadline = time.time() + 480
            while killed_at is None:
                assert proc.poll() is None, "the job ended before a worker could be killed:\n" + out_path.read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint within the time limit"
                if list((cluster.storage / name).glob("checkpoint_*/state.pt")):
                    alive = cluster.train_workers(alive_only=True)
                    if len(alive) == 2:
                        placement = {w["node_id"] for w in alive}
                        victim = max(alive, key=lambda w: w.get("pid") or 0)
                        os.kill(int(victim["pid"]), signal.SIGKILL)
                        killed_at = time.time()
                time.sleep(0.2)
            proc.wait(timeout=540)
        finally:
            if proc.poll() is None:
                proc.kill()
    wall = time.time() - start
    log = out_path.read_text()
    assert proc.returncode == 0, log[-5000:]
    assert f"run {name} finished" in log
    assert len(placement) == 2, "the two train workers did not run on the two nodes"

    run = finished_run(cluster, name, epochs)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.num_workers"] == "2"
    losses = cluster.history(run["info"]["run_id"], "train/loss")
    steps = [m["step"] for m in losses]
    assert set(steps) == set(range(1, epochs * STEPS_PER_EPOCH + 1))
    steps_lost = len(steps) - len(set(steps))  # steps trained twice: after the checkpoint, before the kill
    assert steps_lost <= STEPS_PER_EPOCH
    first_step_ms = min(m["timestamp"] for m in losses)
    print(f"\n[cluster] {epochs}-epoch job, submit to first logged step {first_step_ms / 1000 - start:.1f} s, "
          f"a worker SIGKILLed {killed_at - start:.1f} s after submit: wall {wall:.1f} s, steps re-done {steps_lost}")


@pytest.mark.ray
@pytest.mark.slow
def test_job_killed_mid_sweep_and_resubmitted_does_not_rerun_finished_trials(cluster, data_root):
    """``ray job submit -- replab sweep``; ``ray job stop`` once the first trial has finished; the same
    command submitted again finishes the sweep without training the finished trial again."""
    name = "cluster-sweep"
    raw = {
        "data": {"dataset": "cifar10", "resolution": 32},
        "model": {"backbone": "resnet18"},
        "method": {"name": "simclr", "proj_hidden_dim": 64, "proj_dim": 32},
        "train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "num_workers": 1, "cpus_per_worker": 1,
                  "storage_path": str(cluster.storage)},
        "eval": {"linear": False, "bank_limit": 128, "test_limit": 64, "knn_k": 10, "before_training": False},
        "tracking": {"experiment": "cluster"},
        "sweep": {"name": name, "max_concurrent": 1, "save_encoders": False,
                  "axes": {"model_size": [0.125, 0.25], "data_size": [64]}},
    }
    config = Path(cluster.temp_dir) / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    trials = cluster.storage / "sweeps" / name / "trials"
    job_id = "replab-sweep-first"
    first = subprocess.run(cluster.job_cmd(data_root, ["sweep", str(config), "--no-report"], "--no-wait",
                                           "--submission-id", job_id),
                           env=cluster.env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    deadline = time.time() + 480
    done_before: list[str] = []
    while not done_before:
        status = http_json(f"{cluster.address}/api/jobs/{job_id}", token=cluster.token)["status"]
        assert status in ("PENDING", "RUNNING"), f"job {status} before a trial finished: " + \
            subprocess.run(["ray", "job", "logs", "--address", cluster.address, job_id], env=cluster.env,
                           capture_output=True, text=True).stdout[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        done_before = sorted(p.parent.name for p in trials.glob("*/done.json"))
        time.sleep(0.5)
    subprocess.run(["ray", "job", "stop", "--address", cluster.address, job_id], env=cluster.env,
                   capture_output=True, text=True, timeout=120, check=True)
    assert http_json(f"{cluster.address}/api/jobs/{job_id}", token=cluster.token)["status"] == "STOPPED"
    unfinished = [p.name for p in trials.iterdir() if not (p / "done.json").exists()] if trials.exists() else []
    assert len(done_before) < 2, "the sweep finished before the job could be stopped"

    resubmitted = time.time()
    again = subprocess.run(cluster.job_cmd(data_root, ["sweep", str(config), "--no-report"]),
                           env=cluster.env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    names = sorted(p.name for p in trials.iterdir())
    assert len(names) == 2 and all((trials / n / "done.json").exists() for n in names)
    for n in done_before:  # finished before the kill: trained exactly once
        assert len((trials / n / "starts.log").read_text().splitlines()) == 1, f"{n} trained again"
    # One MLflow child run per trial on the shared server, all FINISHED (a trial cut off by the kill resumed
    # into its own child run), and one parent.
    exp = cluster.mlflow("experiments/get-by-name", experiment_name="cluster")["experiment"]
    runs = cluster.mlflow("runs/search", {"experiment_ids": [exp["experiment_id"]],
                                          "filter": f"tags.`replab.sweep` = '{name}'"}).get("runs", [])
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    children = [(t.get("replab.trial"), r["info"]["status"]) for t, r in zip(tags, runs) if t.get("replab.role") == "trial"]
    assert sorted(children) == sorted((n, "FINISHED") for n in names), children
    assert sum(t.get("replab.role") == "sweep" for t in tags) == 1
    print(f"\n[cluster] sweep job stopped after {len(done_before)} finished trial(s) ({len(unfinished)} unfinished); "
          f"the re-submitted job finished the rest in {time.time() - resubmitted:.1f} s without re-running them")
