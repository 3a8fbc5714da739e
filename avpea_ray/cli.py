"""The command line the jobs share: one parser, config resolution, the result printed.

    python jobs/<task>.py [--config FILE] [section.key=value ...] [--num-workers N] [--use-gpu]
                          [--storage-path PATH] [--run-name NAME] [--dry-run] [--summary-json PATH]
    python jobs/sweep.py  [--config FILE] [section.key=value ...] [--name NAME]
                          [--storage-path PATH] [--max-concurrent-trials N] [--summary-json PATH]
    python jobs/reproduce.py (--shards FILE --storage-path PATH | --demo) [--name NAME]
                          [--only table1,table4] [--seeds N] [--dry-run] [--tables-only] ...

Without --config a job runs its task's demo config (`configs/demo_<task>.yaml`); a config whose
shards lie under demo_data/ gets its synthetic data built first, by the `build_demo_data`
the job passes in (the library itself never imports the dataset tools).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, load_config
from .tasks import TASKS, get_task
from .train.config import TrainConfig

DEMO_DATA = "demo_data"
DEMO_NOTICE = ("demo mode: synthetic data in {data}, a tiny random-weight ViT ({config}), local Ray, "
               "local shards and a local MLflow store (pass --config for real runs)")


def parse_job_args(description: str, argv: list[str] | None = None, sweep: bool = False,
                   prog: str | None = None, task_flag: bool = False) -> argparse.Namespace:
    """The jobs' flags. `task_flag`: a `--task` that picks the demo when there is no --config
    (`avpea-ray train`; each `jobs/<task>.py` knows its task)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. model.reduction_factor=16 optim.epochs=3")
    parser.add_argument("--config", help="YAML or JSON config file (configs/*.yaml)" +
                        ("; a training config plus a `sweep` section" if sweep else ""))
    parser.add_argument("--storage-path", help="checkpoints and results: local dir or s3://bucket/prefix")
    parser.add_argument("--summary-json", help="also write the summary here")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own result dumps: Ray Train's per-report lines" +
                        (", Tune's per-trial config and result boxes" if sweep else "") + " (run.verbose)")
    if sweep:
        parser.add_argument("--name", help="sweep name (sweep.name): the same name again continues the sweep")
        parser.add_argument("--max-concurrent-trials", type=int,
                            help="trials at a time (sweep.max_concurrent_trials; 0: from the cluster)")
    else:
        parser.add_argument("--num-workers", type=worker_count, metavar="N|MIN-MAX",
                            help="Ray Train workers (DDP ranks): N, or MIN-MAX for elastic training "
                                 "(run.num_workers)")
        parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
        parser.add_argument("--run-name", help="stable run name: the same name again resumes the run")
        parser.add_argument("--no-progress", action="store_true",
                            help="no progress bar (run.progress=false; off anyway when not a terminal)")
        parser.add_argument("--dry-run", action="store_true",
                            help="one train and one eval batch end to end; checks storage and tracking")
        if task_flag:
            parser.add_argument("--task", choices=sorted(TASKS), default="avqa",
                                help="without --config: whose demo config to run (default avqa); "
                                     "with --config the config's `task` decides")
    return parser.parse_intermixed_args(argv)


def worker_count(text: str) -> int | list[int]:
    """`--num-workers`: "8" -> 8, "2-8" -> [2, 8] (elastic)."""
    low, dash, high = text.partition("-")
    try:
        value = [int(low), int(high)] if dash else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX (e.g. 8 or 2-8), got {text!r}") from None
    if (min(value) if dash else value) < 1 or (dash and value[0] > value[1]):
        raise argparse.ArgumentTypeError(f"expected N >= 1 or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return value


def flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The flags as typed config values (dotted key -> value; they win over overrides). Set as
    values, not as override text, so that no character in a path or name is parsed."""
    flags = {"run.storage_path": args.storage_path,
             "run.num_workers": getattr(args, "num_workers", None),
             "run.name": getattr(args, "run_name", None),
             "run.use_gpu": True if getattr(args, "use_gpu", False) else None,
             "run.verbose": True if getattr(args, "verbose", False) else None,
             "run.progress": False if getattr(args, "no_progress", False) else None,
             "sweep.name": getattr(args, "name", None),
             "sweep.max_concurrent_trials": getattr(args, "max_concurrent_trials", None)}
    return {k: v for k, v in flags.items() if v is not None}


def resolve_config(args: argparse.Namespace, demo_config: str | Path | None) -> tuple[TrainConfig, bool]:
    """Defaults <- file (--config, else the demo config) <- overrides <- flags.

    Returns:
        (config, whether it trains on the demo data).
    """
    cfg = load_config(TrainConfig, args.config or demo_config, args.overrides, values=flag_values(args))
    return cfg, uses_demo_data(cfg.data.train)


def uses_demo_data(train: str) -> bool:
    return "://" not in train and Path(train).parts[:1] == (DEMO_DATA,)


def run_job(task: str | None, description: str, argv: list[str] | None = None,
            configs: str | Path | None = None,
            build_demo_data: Callable[[str], object] | None = None, prog: str | None = None) -> int:
    """What every `jobs/<task>.py` and `avpea-ray train` do: parse flags, resolve the config
    (the task's demo config from `configs` without --config), build demo data if it is used,
    train or resume, report.

    Args:
        task: the task the job trains; None: the config's (`avpea-ray train`; its `--task`
            picks the demo without --config).

    Returns:
        The exit code: 0, or 2 for a user error (printed as one line naming the field).
    """
    from .train.fit import run_training
    from .train.report import baseline_line, format_summary

    args = parse_job_args(description, argv, prog=prog, task_flag=task is None)
    try:
        demo_task = task or args.task
        demo = get_task(demo_task).demo_config
        demo_config = Path(configs) / demo if configs and demo and not args.config else None
        if demo_config is not None and not demo_config.is_file():
            raise ConfigError(f"--config: no config given and the demo config {demo_config} is not there "
                              f"(the demo configs ship with the repository's configs/)")
        cfg, uses_demo = resolve_config(args, demo_config)
        if task is not None and cfg.task != task:
            raise ConfigError(f"task: jobs/{task}.py trains task {task!r}, the config says {cfg.task!r}")
        prepare_demo(cfg, uses_demo, demo_config, build_demo_data)
        summary = run_training(cfg, dry_run=args.dry_run)
    except ConfigError as err:
        return fail(err)
    if args.dry_run:
        print("dry run ok: one train and one eval batch ran end to end; storage and tracking are reachable")
        return 0
    print(format_summary(summary))
    line = baseline_line(summary)
    if line:
        print(line)
    write_summary(summary, args.summary_json)
    return 0


def run_sweep_job(description: str, argv: list[str] | None = None, demo_config: str | Path | None = None,
                  build_demo_data: Callable[[str], object] | None = None, prog: str | None = None) -> int:
    """What `jobs/sweep.py` does: the sweep file (the demo sweep without --config), demo data
    if used, the sweep, its report. Exit 1 when a trial failed or the sweep was interrupted."""
    from .tune.config import load_sweep_config
    from .tune.report import report_sweep
    from .tune.sweep import run_sweep

    args = parse_job_args(description, argv, sweep=True, prog=prog)
    try:
        cfg, sweep = load_sweep_config(args.config or demo_config, args.overrides, values=flag_values(args))
        prepare_demo(cfg, uses_demo_data(cfg.data.train), None if args.config else demo_config, build_demo_data)
        summary = run_sweep(cfg, sweep)
    except ConfigError as err:
        return fail(err)
    report_sweep(summary)
    write_summary(summary, args.summary_json)
    return 1 if summary["num_errors"] or summary["num_unfinished"] else 0


def prepare_demo(cfg: TrainConfig, uses_demo: bool, demo_config, build_demo_data) -> None:
    if not uses_demo:
        return
    print(DEMO_NOTICE.format(data=Path(cfg.data.train).parent, config=demo_config or "--config"))
    if build_demo_data is not None:
        build_demo_data(cfg.task)


def write_summary(summary: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2, default=str))
        print(f"summary written to {path}")


def fail(err: Exception) -> int:
    """A user error: one clear line, no traceback."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def parse_reproduce_args(description: str, argv: list[str] | None = None,
                         prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides for every trial, e.g. optim.epochs=1 run.num_workers=8")
    parser.add_argument("--shards", help="shard locations: a YAML with ave, musicavqa and valor32k, "
                        "each with train/val/test URLs")
    parser.add_argument("--storage-path", help="trials, their records and the tables: local dir or s3://")
    parser.add_argument("--name", default="avpea-paper",
                        help="the reproduction's name: the same name again re-runs nothing finished")
    parser.add_argument("--only", default="", help="comma-separated tables or rows, e.g. table1,table4 or "
                        "table4_none (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row (data.seed 0..N-1): mean and spread")
    parser.add_argument("--dry-run", action="store_true", help="one train and one eval batch per trial")
    parser.add_argument("--demo", action="store_true",
                        help="every row at toy size: the tasks' demo configs (tiny ViT) on synthetic data")
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: write the tables from the trials finished so far")
    parser.add_argument("--max-concurrent-trials", type=int, default=0,
                        help="trials at a time (0: as many as the cluster holds)")
    parser.add_argument("--summary-json", help="also write the summary here")
    return parser.parse_intermixed_args(argv)


def run_reproduce_job(description: str, argv: list[str] | None = None, configs: str | Path | None = None,
                      build_demo_data: Callable[[str], object] | None = None, prog: str | None = None) -> int:
    """What `jobs/reproduce.py` and `avpea-ray reproduce` do: plan every row (all checks before
    any worker starts), run what is not finished as Tune trials, write the tables. Exit 1 when a
    trial failed."""
    from .reproduce.run import ReproRequest, demo_tasks, plan_reproduction, run_reproduction

    args = parse_reproduce_args(description, argv, prog=prog)
    request = ReproRequest(
        configs=Path(configs or "configs"), name=args.name, shards=args.shards,
        storage_path=args.storage_path or ("runs" if args.demo else ""),
        only=[t.strip() for t in args.only.split(",") if t.strip()], seeds=args.seeds, demo=args.demo,
        dry_run=args.dry_run, overrides=list(args.overrides), max_concurrent_trials=args.max_concurrent_trials)
    try:
        if args.demo and not args.shards:
            print(DEMO_NOTICE.format(data=DEMO_DATA, config="each task's configs/demo_<task>.yaml"))
            if build_demo_data is not None:
                for task in dict.fromkeys(demo_tasks(request)):
                    build_demo_data(task)
        plan = plan_reproduction(request)
        summary = run_reproduction(plan, tables_only=args.tables_only)
    except ConfigError as err:
        return fail(err)
    if summary.get("files"):
        print(f"tables: {', '.join(summary['files'].values())}")
        holds = summary["ordering_holds"]
        print("Table 4 ordering (both > visual > audio > none): " +
              {True: "holds", False: "FAILS", None: "not checked (rows missing)"}[holds])
    if args.dry_run:
        print(f"dry run ok: {len(summary['ran'])} trial(s) ran one batch each" if not summary["failed"]
              else f"dry run: {len(summary['failed'])} trial(s) failed: {', '.join(summary['failed'])}")
    write_summary(summary, args.summary_json)
    return 1 if summary["failed"] else 0
