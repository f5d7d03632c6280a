"""``replab train``: one run on Ray Train, tracked in MLflow, resumable by re-running the same command.

The driver validates and resolves the config (absolute data root, storage path and tracking URI, since Ray
workers run in session folders), opens or re-opens the MLflow run, builds the Ray Data pipeline and runs a
``TorchTrainer`` over :func:`replab.platform.loop.train_worker`. Rank 0 logs metrics to the run by id.
Checkpoints go to ``<train.storage_path>/<run name>``; the run name is derived from the config, so the same
command finds the same folder and Ray Train resumes from the last checkpoint there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from replab.config import RunConfig
from replab.platform import tracking
from replab.platform.data import arrays, catalog, datasets, pipeline, skips, sources
from replab.platform.probes.frozen import EvalData
from replab.platform.train import checkpoints, encoder_init, runlock
from replab.platform.train.checkpoints import load_checkpoint
from replab.platform.train.errors import CheckpointError, RunFailed, RunInterrupted
from replab.platform.train.loop import WorkerEnv, train_worker
from replab.validate import check_fits_machine, from_dict


@dataclass
class FitResult:
    run_name: str
    run_id: str | None
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    already_finished: bool = False
    """The run had finished before this call: nothing was trained, ``metrics`` are its final ones."""


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make every local path absolute (Ray workers do not share the driver's working directory)."""
    data = replace(cfg.data, root=datasets.data_root(cfg.data.root))
    if not is_uri(cfg.data.dataset) and Path(cfg.data.dataset).exists():
        data = replace(data, dataset=str(Path(cfg.data.dataset).resolve()))
    if data.split_file and not is_uri(data.split_file):
        data = replace(data, split_file=str(Path(data.split_file).expanduser().resolve()))
    if data.mix:
        data = replace(data, mix=[{**m, "dataset": str(Path(m["dataset"]).resolve())}
                                  if "dataset" in m and not is_uri(str(m["dataset"])) and Path(str(m["dataset"])).exists()
                                  else m for m in data.mix])
    storage = cfg.train.storage_path
    if not is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    tracking_cfg = replace(cfg.tracking, uri=tracking.resolve_tracking_uri(cfg.tracking.uri))
    model = cfg.model
    if model.init and not is_uri(model.init) and Path(model.init).expanduser().exists():
        model = replace(model, init=str(Path(model.init).expanduser().resolve()))
    return replace(cfg, data=data, model=model, train=replace(cfg.train, storage_path=storage), tracking=tracking_cfg)


NAME_EXCLUDED = {
    "data.root": "where the named datasets live, not which data (the dataset and split are in the hash)",
    "data.download": "whether a missing dataset may be fetched; the data trained on is the same",
    "train.storage_path": "where checkpoints go",
    "method.recipe": "a recipe is the settings it applies, which are in the hash themselves",
    "train.name": "an explicit name replaces the derived one",
    "train.max_failures": "how often Ray restarts failed workers; a restart resumes the same run",
    "train.log_every": "how often train/loss is logged; the steps taken are the same",
    "tracking.uri": "where the run is logged",
    "tracking.experiment": "where the run is logged",
    "tracking.enabled": "whether the run is logged",
}
"""Keys left out of the run-name hash, and why: none of them changes what is trained or measured. Every other
key of data, model, method, train and eval is in the hash (eval: it changes what the run reports)."""


def run_name(cfg: RunConfig) -> str:
    """``train.name`` or ``<method>-<backbone>-<dataset>-<sha1 of every key but NAME_EXCLUDED>``."""
    if cfg.train.name:
        return cfg.train.name
    d = cfg.to_dict()
    defining = {section: {k: v for k, v in d[section].items() if f"{section}.{k}" not in NAME_EXCLUDED}
                for section in ("data", "model", "method", "train", "eval")}
    digest = hashlib.sha1(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:8]
    dataset = Path(cfg.data.dataset.rstrip("/")).name or "data"
    return f"{cfg.method.name}-{cfg.model.backbone}-{dataset}-{digest}"


def load_eval_data(cfg: RunConfig) -> EvalData | None:
    """The kNN bank (train split) and test split of ``eval.dataset`` (default: the training dataset)."""
    dataset = cfg.eval.dataset or cfg.data.dataset
    info = catalog.dataset_info(dataset, cfg.data.root)
    if not info.num_classes:
        return None
    test_split = cfg.eval.test_split or catalog.default_test_split(dataset, cfg.data.root)
    common = dict(root=cfg.data.root, resolution=cfg.data.resolution, seed=cfg.data.seed,
                  image_column=cfg.data.image_column, label_column=cfg.data.label_column)
    bank_images, bank_labels = arrays.load_arrays(dataset, split=cfg.eval.train_split, limit=cfg.eval.bank_limit, **common)
    test_images, test_labels = arrays.load_arrays(dataset, split=test_split, limit=cfg.eval.test_limit, **common)
    return EvalData(bank_images, bank_labels, test_images, test_labels, info.num_classes)


class RayEnv(WorkerEnv):
    """The loop's runtime inside a Ray Train worker."""

    def __init__(self, shuffle_buffer: int | None, skip_counter: str | None = None, resume_from: str | None = None,
                 shuffle_seed: int | None = None):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.shard = ray.train.get_dataset_shard("train")
        self.shuffle_buffer = shuffle_buffer
        self.skip_counter = skip_counter
        self.resume_from = resume_from
        self.shuffle_seed = shuffle_seed
        """Seed of the local shuffle buffer (None: unseeded); each epoch and worker draws from its own."""

    def batches(self, epoch, batch_size):
        yield from pipeline.torch_batches(self.shard, batch_size, shuffle_buffer=self.shuffle_buffer,
                                          shuffle_seed=self.shuffle_seed, epoch=epoch, rank=self.rank,
                                          pin_memory=self.device.type == "cuda")

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self):
        """Ray's latest checkpoint of this run (after a worker restart), else the one the driver chose."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return checkpoint.to_directory(tempfile.mkdtemp(prefix="replab-restore-"))
        return checkpoints.fetch(self.resume_from) if self.resume_from else None

    def skipped(self):
        return skips.skipped_count(self.skip_counter) if self.skip_counter else 0


def _quiet_worker_reports() -> None:
    """Keep Ray Train 2.60's per-report INFO lines (``Reporting training result N: TrainingReport(...)``) off the
    terminal. Its LoggingConfig level misses them: that module's logger is named by its file path, not
    ``ray.train.*``, so the level filter (``TrainLogLevelFilter``) lets them through."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def ray_train_fn(loop_config: dict[str, Any]) -> None:
    """The function each Ray Train worker runs."""
    if quiet():
        _quiet_worker_reports()
    cfg = from_dict(loop_config["config"])
    env = RayEnv(loop_config["shuffle_buffer"], loop_config.get("skip_counter"), loop_config.get("resume_from"),
                 cfg.train.seed if cfg.train.deterministic else None)
    logger = None
    if env.rank == 0 and loop_config.get("run_id"):
        logger = tracking.RunLogger(loop_config["tracking_uri"], loop_config["run_id"])
    train_worker(cfg, env, loop_config["num_rows"], eval_data_fn=lambda: load_eval_data(cfg), logger=logger)


QUIET_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.data", "mlflow", "alembic")


def quiet_logs(verbose: bool) -> None:
    """Ray's, Tune's and MLflow's own logging: errors only (``verbose``: all of it, as it comes). Ray's
    processes inherit the environment set here: no repeated-log dedup notices, no Tune/Train progress reports."""
    if verbose:
        return
    os.environ["REPLAB_QUIET"] = "1"  # read by :func:`train_logging_config` and :func:`fit`
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard/CSV/JSON loggers, no hint
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new output prints its tables even at verbose=0
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # Ray Data's plans and notices, in every process
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet() -> bool:
    """Whether :func:`quiet_logs` turned the libraries' chatter off for this process."""
    return os.environ.get("REPLAB_QUIET") == "1"


def train_logging_config():
    """Ray Train's own log level: its per-report ``TrainingReport(...)`` and checkpoint lines are INFO, shown only
    when not :func:`quiet`."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING" if quiet() else "INFO")


def ensure_ray(train_cpus: float = 0.0, quiet: bool = False, worker_output: bool | None = None) -> None:
    """Join the cluster of a ``ray job submit`` (or $RAY_ADDRESS), else start a quiet local instance.

    A local instance gets the machine's cores *plus* the train workers' CPU requests as logical CPUs, so
    Ray Data's decode tasks always have CPUs to run on (with only the cores, two train workers on a 2-core
    laptop would hold every CPU and the input pipeline would never be scheduled). It binds loopback wherever
    Ray 2.60 allows it (:func:`local_ray_kwargs`) and keeps token authentication on: its gRPC servers listen on
    every interface whatever the node address, so the token is what keeps other hosts out (README, "What a
    local run exposes"). ``quiet``: Ray's own logging from errors up, and (unless ``worker_output``) the workers' output not forwarded to
    this terminal (``replab sweep`` prints one line per trial; a trial's error reaches it through Tune).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train 2.60 tees a worker's print to stdout *and* to its logger when stdout is redirected (always, in a
    # worker): every epoch line would reach the terminal twice. Workers inherit this from the local instance.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs: dict[str, Any] = dict(logging_level=logging.ERROR if quiet else logging.WARNING,
                                  log_to_driver=not quiet if worker_output is None else worker_output,
                                  configure_logging=True)
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(local_ray_kwargs(train_cpus))
    ray.init(**kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def local_ray_kwargs(train_cpus: float = 0.0) -> dict[str, Any]:
    """``ray.init`` arguments of a local instance: CPUs, the dashboard on 127.0.0.1, and the node address on
    loopback; refuses ``RAY_AUTH_MODE=disabled`` (one line) since Ray's servers listen on every interface.

    Ray 2.60 rewrites a ``_node_ip_address`` of 127.0.0.1 to the routable address unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off (``services.resolve_ip_for_localhost``); turning it off for this
    process (and, through the environment, Ray's own) keeps the node address, the GCS address and the
    addresses workers and agents advertise on loopback. The gRPC servers still bind ``*``.
    """
    from ray._private import ray_constants

    from replab.config import ConfigError

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise ConfigError("RAY_AUTH_MODE=disabled: a local run keeps Ray's token authentication on (Ray's servers "
                          "listen on every interface); unset RAY_AUTH_MODE")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time by services.get_node_ip_address
    return {
        "num_cpus": int((os.cpu_count() or 1) + max(1, round(train_cpus))),
        "dashboard_host": "127.0.0.1",
        "_node_ip_address": "127.0.0.1",
        # Library deprecation notices from inside Ray's own actors are not the user's to act on.
        "runtime_env": {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}},
    }


def check_tracking_reachable(uri: str) -> None:
    """A SQLite store lives on one machine: refuse it when workers may run on other nodes."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1 and tracking.is_local_store(uri):
        raise ValueError(
            f"tracking.uri: {uri} is a local store but the Ray cluster has {len(alive)} nodes; "
            "start an MLflow server (see README, 'Run on a cluster') and set tracking.uri=http://<head>:5000"
        )


def fit(cfg: RunConfig, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> FitResult:
    """Run (or resume) one training run; returns its final metrics and MLflow run id.

    One process per run (:func:`runlock.run_lock`). A run whose MLflow run already FINISHED is not trained
    again: its metrics come back with ``already_finished``. Otherwise the run resumes from its newest
    readable checkpoint (unreadable newer ones set aside, see :func:`checkpoints.prepare_resume`). Any failure
    after the MLflow run is opened marks it FAILED (KILLED on SIGINT / SIGTERM).
    """
    import ray

    if not ray.is_initialized():
        check_fits_machine(cfg)  # a local instance: refuse what the machine cannot hold, before Ray starts
    cfg = resolve_paths(cfg)
    sources.resolve_config(cfg.data)  # a missing dataset fails here, clearly (or is downloaded if asked)
    encoder_init.resolve(cfg)  # a model.init that cannot be found fails here, before Ray work
    name = run_name(cfg)
    with runlock.run_lock(cfg.train.storage_path, name):
        return _fit_locked(cfg, name, parent_run_id, extra_tags)


def _fit_locked(cfg: RunConfig, name: str, parent_run_id: str | None, extra_tags: dict[str, str] | None) -> FitResult:
    uri, run_dir = cfg.tracking.uri, f"{cfg.train.storage_path.rstrip('/')}/{name}"
    if cfg.tracking.enabled:
        done = tracking.find_run(uri, cfg.tracking.experiment, name)
        if done is not None and done.info.status == "FINISHED":
            return FitResult(name, done.info.run_id, uri, dict(done.data.metrics), checkpoints.latest_checkpoint(run_dir),
                             already_finished=True)
    ensure_ray(cfg.train.num_workers * cfg.train.cpus_per_worker, quiet=quiet(), worker_output=True)
    if cfg.tracking.enabled:
        check_tracking_reachable(uri)
    resume = checkpoints.prepare_resume(run_dir)
    for line in resume.set_aside:
        print(f"replab: {line}", file=sys.stderr, flush=True)
    if resume.path:
        print(f"resuming {name} from epoch {resume.epoch} (step {resume.step}), checkpoint {resume.path}", flush=True)
        if not cfg.tracking.enabled and resume.epoch >= cfg.train.epochs:
            return FitResult(name, None, uri, {"epoch": resume.epoch, "step": resume.step}, resume.path,
                             already_finished=True)
    run_id, resumed = None, False
    if cfg.tracking.enabled:
        init_source = encoder_init.resolve(cfg)
        tags = {"method": cfg.method.name, "backbone": cfg.model.backbone, "dataset": cfg.data.dataset,
                **({encoder_init.INIT_TAG: init_source.lineage} if init_source else {}), **(extra_tags or {})}
        run_id, resumed = tracking.open_run(uri, cfg.tracking.experiment, name, cfg.flat(), tags, parent_run_id)
        tracking.RunLogger(uri, run_id).tag("replab.seed", seed_note(cfg))
    try:
        with terminate_as_interrupt():
            return _train(cfg, name, run_id, resumed, resume.path)
    except BaseException as exc:
        if run_id:
            interrupted = isinstance(exc, KeyboardInterrupt)
            tracking.RunLogger(uri, run_id).finish("KILLED" if interrupted else "FAILED")
        if isinstance(exc, KeyboardInterrupt):
            raise RunInterrupted(interrupted_message(run_dir)) from None
        if _is_training_failure(exc):
            raise RunFailed(f"run {name} failed: {root_cause(exc)}") from exc
        raise


def _train(cfg: RunConfig, name: str, run_id: str | None, resumed: bool, resume_from: str | None) -> FitResult:
    """Build the data and the trainer, train, log the outputs and finish the MLflow run (``resumed``: the
    MLflow run was re-opened, its config already logged; ``resume_from``: the checkpoint the workers load)."""
    import ray.train

    uri = cfg.tracking.uri
    logger = tracking.RunLogger(uri, run_id) if run_id else None
    if logger is not None and not resumed:
        logger.dict(cfg.to_dict(), "config.yaml")
        if cfg.source_file:
            logger.artifact(cfg.source_file, "config")
    train_data = build_train_data(cfg, logger)
    loop_config = {
        "config": cfg.to_dict(),
        "num_rows": train_data.num_rows,
        "shuffle_buffer": train_data.shuffle_buffer,
        "skip_counter": train_data.counter_name,
        "run_id": run_id,
        "tracking_uri": uri,
        "resume_from": resume_from,
    }
    trainer = trainer_class()(
        ray_train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=cfg.train.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=train_logging_config(),
        ),
        datasets={"train": train_data.dataset},
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"], execution_options=pipeline.ingest_options(cfg.train.deterministic)),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    checkpoint_path = result.checkpoint.path if result.checkpoint else None
    if logger is not None:
        log_outputs(logger, result, metrics)
        logger.finish("FINISHED")
    return FitResult(name, run_id, uri, metrics, checkpoint_path)


def _is_training_failure(exc: BaseException) -> bool:
    from ray.train import TrainingFailedError

    return isinstance(exc, TrainingFailedError)


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the error a Ray Train failure wraps (rank 0's, else the first worker's)."""
    failures = getattr(exc, "worker_failures", None) or {}
    inner = failures.get(0) or next(iter(failures.values()), None) or getattr(exc, "controller_failure", None) or exc
    cause = getattr(inner, "cause", None)  # RayTaskError wraps the worker's own exception
    inner = cause if isinstance(cause, BaseException) else inner
    lines = [line for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[-1].strip() if lines else ''}"[:400]


def interrupted_message(run_dir: str) -> str:
    """``interrupted; re-run the same command to resume from epoch N`` (N of the newest readable checkpoint)."""
    newest = checkpoints.latest_checkpoint(run_dir)
    try:
        epoch = checkpoints.verify_checkpoint(newest)["epoch"] if newest else 0
    except CheckpointError:
        epoch = None
    if not epoch:
        return "interrupted before the first checkpoint; re-run the same command to start again"
    return f"interrupted; re-run the same command to resume from epoch {epoch}"


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (so it ends like Ctrl-C, not with a C stack dump); main thread only.
    The SIGINT and SIGTERM handlers of before are restored on leaving (Ray Train leaves its own behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler), signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def trainer_class():
    """``TorchTrainer`` whose SIGINT / SIGTERM handler aborts the run through Ray Train's controller, then
    raises KeyboardInterrupt in the driver so the MLflow run is marked KILLED and the user told how to resume.
    (Ray 2.60's own SIGINT handler aborts too, but then ends the process silently with status 1.)"""
    import ray
    from ray.train.torch import TorchTrainer

    class InterruptibleTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller):
            def handler(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:  # the controller may already be gone: nothing left to abort
                    pass
                raise KeyboardInterrupt(f"signal {signum}")

            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)

    return InterruptibleTrainer


def seed_note(cfg: RunConfig) -> str:
    """What the seeds fix, as logged on the run (tag ``replab.seed``)."""
    note = (f"train.seed={cfg.train.seed} fixes the initialisation and the augmentation stream; "
            f"data.seed={cfg.data.seed} the subset (data.limit) and the read order")
    if cfg.train.deterministic:
        note += ("; train.deterministic=true: Ray Data keeps the block order and the shuffle buffer is seeded, "
                 "so one worker on one machine repeats the same losses")
        if cfg.train.num_workers > 1:
            note += " (with several workers the split of blocks between them may still vary)"
        if cfg.train.use_gpu:
            note += "; GPU: deterministic cuDNN/cuBLAS kernels"
    else:
        note += "; train.deterministic=false: the data order varies from run to run"
    return note


def build_train_data(cfg: RunConfig, logger: tracking.RunLogger | None = None) -> pipeline.TrainData:
    """The training stream: the dataset itself, or (semi-supervised / open-set) the mixed unlabeled pool,
    whose images reach the trainers with label -1; the labeled split file is written first, on the driver."""
    from replab.platform.data import labeled, pool

    if not labeled.uses_unlabeled_pool(cfg.data):
        return pipeline.build_train_dataset(cfg.data, deterministic=cfg.train.deterministic)
    if labeled.is_semisupervised(cfg.data):
        split = labeled.labeled_split(cfg.data)
        if logger is not None:
            logger.artifact(split.path, "splits")
    if logger is not None:
        logger.metrics(pool.pool_summary(pool.pool_manifest(cfg.data)), step=0)
    return pool.build_unlabeled_dataset(cfg.data)


def log_outputs(logger: tracking.RunLogger, result: Any, metrics: dict[str, Any]) -> None:
    """The final encoder (safetensors) and an eval summary as run artifacts."""
    from safetensors.torch import save_file

    summary = {k: v for k, v in metrics.items() if k.startswith(("eval/", "train/epoch", "data/")) or k == "epoch"}
    logger.dict(summary, "eval_summary.json")
    if result.checkpoint is None:
        return
    with result.checkpoint.as_directory() as folder:
        state = load_checkpoint(folder)
    encoder = {k[len("backbone."):]: v.contiguous() for k, v in state["method"].items() if k.startswith("backbone.")}
    out = Path(tempfile.mkdtemp(prefix="replab-encoder-")) / "encoder.safetensors"
    save_file(encoder, str(out), metadata={"backbone": json.dumps(state["config"]["model"])})
    logger.artifact(out, "model")
