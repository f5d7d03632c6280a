"""The ``replab`` command line.

    replab train CONFIG [--set section.key=value ...]   pre-train (resumes when re-run), evaluate, log to MLflow
    replab eval RUN_OR_CHECKPOINT [--knn] [--linear]    evaluate a run's final encoder or a checkpoint folder
    replab eval RUN_OR_CHECKPOINT --openset [...]       closed-set accuracy + AUROC known/unknown/OOD (+ fine-tune)
    replab eval RUN --transfer D1,D2 --few-labels 0.01,0.1 --cluster [--export F] [--register NAME]
                                                        the papers' protocols as tables; exported encoders
    replab methods                                      the registered methods, one line each
    replab data inspect SOURCE                          rows, classes, image sizes, unreadable files
    replab data download NAME [--archive PATH]          fetch (or take from disk) and convert a named dataset
    replab sweep CONFIG [--set ...] [--resume]          a grid (+ Optuna/ASHA per cell) of runs on Ray Tune
    replab report SWEEP [--metric M]                    scaling-law fits, compute frontier, plots of a sweep
    replab bench [--quick] [--out F] [--only S,...]     throughput of data, augmentation, step, Ray, GPU

A bad config or a missing dataset is one line on stderr and exit code 2, before any Ray work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from replab.config import ConfigError
from replab.validate import load_config


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's, Ray Train's and MLflow's own output (hidden by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replab", description="A representation-learning lab on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pre-train an encoder, evaluate it and log everything to MLflow")
    p.add_argument("config", nargs="?", help="experiment YAML (default: all defaults)")
    _add_set(p)
    _add_verbose(p)

    p = sub.add_parser("eval", help="evaluate a run's encoder (MLflow run id or name) or a checkpoint folder")
    p.add_argument("target", help="MLflow run id, replab run name, or checkpoint folder")
    p.add_argument("--knn", action="store_true", help="kNN only (default: both)")
    p.add_argument("--linear", action="store_true", help="linear probe only (default: both)")
    p.add_argument("--config", help="config whose eval/data/tracking sections to use")
    _add_set(p)
    _add_verbose(p)
    o = p.add_argument_group("open-set / few-label evaluation (--openset)")
    o.add_argument("--openset", action="store_true",
                   help="SNN top-1 on the known classes, AUROC known vs unknown test images and vs --ood-dataset")
    o.add_argument("--finetune-epochs", type=int, default=0, help="also fine-tune encoder + linear head (0: off)")
    o.add_argument("--labels-per-class", type=int, default=None, help="labeled set (default: the run's split)")
    o.add_argument("--label-fraction", type=float, default=None, help="labeled set as a fraction, e.g. 0.01")
    o.add_argument("--known-classes", default=None, help="comma list of known class ids (default: the run's)")
    o.add_argument("--ood-dataset", default="tinyimagenet", help="unseen dataset for the OOD AUROC ('' to skip)")
    o.add_argument("--ood-split", default="val")
    o.add_argument("--ood-limit", type=int, default=None, help="OOD images (default: all)")
    e = p.add_argument_group("the papers' protocols (printed as tables, logged as eval_cli/<protocol>/...)")
    e.add_argument("--transfer", default=None, metavar="D1,D2",
                   help="frozen kNN + linear probe on each dataset, e.g. cifar10,tinyimagenet,imagenette128 "
                        "(images resized to the run's resolution)")
    e.add_argument("--few-labels", default=None, metavar="F1,F2",
                   help="fine-tune end to end on these label fractions, e.g. 0.01,0.1 (SimCLR Table 7); "
                        "epochs: --finetune-epochs, default 60 up to 1%%, 30 above")
    e.add_argument("--cluster", nargs="?", const="", default=None, metavar="D1,D2",
                   help="k-means on frozen test features: NMI, ARI, cluster accuracy (default: the run's dataset)")
    e.add_argument("--seed", type=int, default=None, help="split / fine-tune / k-means seed (default: the run's)")
    e.add_argument("--export", default="", metavar="PATH", help="write the encoder's state_dict (+ PATH.json)")
    e.add_argument("--register", default="", metavar="NAME", help="log the encoder as an MLflow model named NAME")

    sub.add_parser("methods", help="list the registered methods")

    p = sub.add_parser("data", help="inspect or download datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("inspect", help="rows, classes, image sizes and unreadable files of a source")
    q.add_argument("source", help="named dataset, parquet file/folder, image folder or tar shards")
    q.add_argument("--root", default="", help="data root for named datasets")
    q.add_argument("--split", default="train")
    q.add_argument("--sample", type=int, default=2000, help="images decoded to measure sizes")
    q = data_sub.add_parser("download", help="download and convert a named dataset")
    q.add_argument("name")
    q.add_argument("--root", default="")
    q.add_argument("--archive", default=None, help="convert this archive already on disk (no network)")

    p = sub.add_parser("sweep", help="run (or resume) the grid / search of an experiment's sweep section")
    p.add_argument("config", help="experiment YAML with a sweep section")
    _add_set(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (re-running also does)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's, Tune's and MLflow's own output (the trials' epoch lines, Tune's table)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the grid, run nothing")
    p.add_argument("--no-report", action="store_true", help="skip the scaling report at the end")

    p = sub.add_parser("report", help="scaling laws, compute frontier and plots of a sweep")
    p.add_argument("sweep", help="parent run id, sweep name, or the sweep's YAML (with the same --set)")
    _add_set(p)
    p.add_argument("--metric", choices=["eval/knn_top1", "eval/linear_top1", "train/epoch_loss"],
                   help="error = 1 - top1, or the loss (default: the sweep's sweep.metric)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: sweep.bootstrap)")
    p.add_argument("--out", default=None, help="output folder (default: <sweep dir>/report)")
    p = sub.add_parser("bench", help="throughput of data, augmentation, training step (, Ray, GPU) side by side")
    p.add_argument("--quick", action="store_true", help="small sizes, no Ray (a CI smoke run, < 1 min)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--only", default="", help="comma list of data,augment,step,peer,gpu,epoch,ray (default: all)")
    p.add_argument("--root", default="", help="data root (default: $REPLAB_DATA_ROOT)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per case (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; quick: 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed epoch in the step / Ray sections (default 3, quick 2)")
    p.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda when available); --device cpu runs the gpu section on the CPU")
    p.add_argument("--models", default="", help="comma list of the gpu section's models (default: all)")
    return parser


def cmd_train(args) -> int:
    from replab.platform.train.ray_train import fit, quiet_logs

    cfg = load_config(args.config, args.overrides)
    quiet_logs(args.verbose)
    result = fit(cfg)
    print()
    if result.already_finished:
        print(f"run {result.run_name} had already finished: nothing to do (change train.name or a setting to "
              "train a new run)")
    else:
        print(f"run {result.run_name} finished")
    baseline = _random_init_baseline(result)
    for key in sorted(result.metrics):
        if key.startswith(("eval/", "train/epoch_loss", "data/")) and not key.startswith("eval/init_"):
            value = result.metrics[key]
            line = f"  {key} = {value:.4f}" if isinstance(value, float) else f"  {key} = {value}"
            init = baseline.get(key.replace("eval/", "eval/init_"))
            if init is not None and isinstance(value, float):
                line += f"   (random init {init:.4f}, {100 * (value - init):+.1f} points)"
            print(line)
    if result.run_id:
        from replab.platform.tracking import ui_hint

        print(f"MLflow run id: {result.run_id}")
        print(f"open the MLflow UI: {ui_hint(result.tracking_uri)}")
    return 0


def _random_init_baseline(result) -> dict[str, float]:
    """The run's ``eval/init_*`` metrics (its encoder before training), from MLflow; {} without a run."""
    if not result.run_id:
        return {}
    from replab.platform import tracking

    metrics = tracking.client(result.tracking_uri).get_run(result.run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith("eval/init_")}


def _eval_protocols(args, cfg) -> int:
    from replab.platform.evaluate.protocols import parse_fractions, parse_list
    from replab.platform.evaluate.target import evaluate_protocols_target

    transfer = parse_list(args.transfer, "--transfer") if args.transfer is not None else None
    few = parse_fractions(args.few_labels) if args.few_labels is not None else None
    cluster = None if args.cluster is None else [d.strip() for d in args.cluster.split(",") if d.strip()]
    knn, linear = (args.knn or not args.linear), (args.linear or not args.knn)
    results, table = evaluate_protocols_target(
        args.target, cfg, transfer=transfer, few_labels=few, cluster=cluster, export=args.export,
        register=args.register, knn=knn, linear=linear, finetune_epochs=args.finetune_epochs or None, seed=args.seed)
    print(table)
    return 0


def cmd_eval(args) -> int:
    from replab.platform.train.ray_train import quiet_logs

    cfg = load_config(args.config, args.overrides)
    quiet_logs(args.verbose)
    if any(v not in (None, "") for v in (args.transfer, args.few_labels, args.export, args.register)) \
            or args.cluster is not None:
        if args.openset:
            raise ConfigError("--openset: run it on its own, not with --transfer/--few-labels/--cluster/--export")
        return _eval_protocols(args, cfg)
    if args.openset:
        from replab.platform.evaluate.target import evaluate_openset_target

        known = None
        if args.known_classes:
            try:
                known = [int(c) for c in args.known_classes.split(",")]
            except ValueError:
                raise ConfigError(f"--known-classes: {args.known_classes!r} is not a comma list of class ids") from None
        results = evaluate_openset_target(
            args.target, cfg, finetune_epochs=args.finetune_epochs, labels_per_class=args.labels_per_class,
            label_fraction=args.label_fraction, known_classes=known, ood_dataset=args.ood_dataset,
            ood_split=args.ood_split, ood_limit=args.ood_limit)
    else:
        from replab.platform.evaluate.target import evaluate_target

        knn, linear = (args.knn or not args.linear), (args.linear or not args.knn)
        results = evaluate_target(args.target, cfg, knn=knn, linear=linear)
    print(json.dumps(results, indent=2))
    return 0


def cmd_methods(args) -> int:
    from replab.methods import registry

    methods = registry.available()
    width = max(len(n) for n in methods)
    for name, cls in methods.items():
        recipes = f"  [recipes: paper, {', '.join(cls.recipes)}]" if cls.recipes else ""
        print(f"{name:<{width}}  {cls.summary}{recipes}")
    return 0


def cmd_data(args) -> int:
    from replab.platform.data import catalog, datasets

    if args.data_command == "inspect":
        report = catalog.inspect(args.source, root=args.root, split=args.split, sample=args.sample)
        print(json.dumps(report, indent=2, default=str))
        return 0
    path = datasets.download(args.name, datasets.data_root(args.root), archive=args.archive)
    print(f"{args.name} is ready at {path}")
    return 0


def cmd_sweep(args) -> int:
    from replab.platform.sweep import driver, grid

    if args.dry_run:
        _raw, spec, cells = driver.plan_sweep(args.config, args.overrides)
        print(grid.describe(spec, cells))
        return 0
    result = driver.run_sweep(args.config, args.overrides, resume=args.resume, report=not args.no_report,
                              verbose=args.verbose)
    print(f"sweep {result.name}: {sum(t['status'] == 'FINISHED' for t in result.trials)} trials finished, "
          f"{result.failed} failed, wall {result.wall_time_s:.0f} s; MLflow parent run id: {result.parent_run_id}")
    return 130 if result.interrupted else (1 if result.failed else 0)


def cmd_report(args) -> int:
    from pathlib import Path

    from replab.platform.sweep import driver, report
    from replab.platform.tracking import resolve_tracking_uri

    name, bootstrap = args.sweep, args.bootstrap
    if Path(args.sweep).suffix in (".yaml", ".yml") and Path(args.sweep).is_file():
        raw, spec, cells = driver.plan_sweep(args.sweep, args.overrides)
        name, uri = spec.name, cells[0].config.tracking.uri
        bootstrap = spec.bootstrap if bootstrap is None else bootstrap
    else:
        uri = resolve_tracking_uri(load_config(None, args.overrides).tracking.uri)
    report.build_report(uri, name, metric=args.metric, bootstrap=bootstrap, out_dir=args.out)
    return 0


def cmd_bench(args) -> int:
    from replab.bench import runner as bench

    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    models = [m.strip() for m in args.models.split(",") if m.strip()] or None
    result = bench.run_bench(quick=args.quick, only=only, out=args.out, root=args.root, repeats=args.repeats,
                             threads=args.threads, steps=args.steps, device=args.device, models=models)
    print(bench.table(result))
    if args.out:
        print(f"results written to {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "methods": cmd_methods, "data": cmd_data, "sweep": cmd_sweep,
            "report": cmd_report, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from replab.platform.data.datasets import DataError
    from replab.platform.train.errors import CheckpointError, RunFailed, RunLocked

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as exc:
        print(f"replab: {exc}", file=sys.stderr)
        return 2
    except (RunFailed, RunLocked, CheckpointError) as exc:
        print(f"replab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        detail = str(exc) if str(exc) and not str(exc).startswith("signal ") else "interrupted; re-run the same command to resume"
        print(f"replab: {detail}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
