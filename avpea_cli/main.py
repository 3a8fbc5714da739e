"""avpea-ray: train, sweep, shard and check AV-PEA runs from one command.

    avpea-ray train     [--config FILE] [section.key=value ...] [--num-workers N] [--use-gpu] ...
    avpea-ray sweep     [--config FILE] [section.key=value ...] [--name NAME] ...
    avpea-ray reproduce (--shards FILE --storage-path PATH | --demo) [--only table1,table4] ...
    avpea-ray shard     {musicavqa,ave,valor,demo,synth-musicavqa,synth-ave,synth-valor} ...
    avpea-ray validate  URL [--ranks R] [--loader-workers W]
    avpea-ray params    [--task TASK] [--backbone NAME] [--reduction-factor R] [head.key=value ...]
    avpea-ray predict   ADAPTERS (--video FILE ... | --frames DIR --audio FILE) [--question TEXT ...] ...
    avpea-ray infer     ADAPTERS (--shards URL | --videos LIST) --out URL [--format parquet|jsonl] ...

`avpea-ray <command> --help` shows each command's flags and examples. `jobs/<task>.py` and
`jobs/sweep.py` run the same code (the entry points for `ray job submit --working-dir .`).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

PROG = "avpea-ray"
# The configs ship with the repository (and the container image), beside this package.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TRAIN_HELP = """Train (or resume) one run; the task comes from the config.

examples:
  avpea-ray train                                  # the AVQA demo: synthetic data, tiny ViT, local Ray
  avpea-ray train --task avel --dry-run            # the AVE demo, one train + one eval batch
  avpea-ray train --config configs/avqa_grounding_vit_b16.yaml --num-workers 8 --use-gpu \\
      --storage-path s3://YOUR-BUCKET/avpea/runs --run-name avqa-grounding-vit-b16
  avpea-ray train --config configs/demo_avqa.yaml optim.epochs=2 model.reduction_factor=16

The same --run-name and --storage-path again resume the run where it stopped."""

SWEEP_HELP = """Sweep reduction factor, gating and learning rate with Ray Tune (ASHA), one MLflow
parent run with a child run per trial.

examples:
  avpea-ray sweep                                  # the demo sweep (configs/demo_sweep_avqa.yaml)
  avpea-ray sweep --config configs/sweep_avqa_vit_b16.yaml \\
      --storage-path s3://YOUR-BUCKET/avpea/runs --name avqa-b16-sweep

The same --name and --storage-path again continue the sweep (finished trials are not rerun)."""

REPRODUCE_HELP = """Reproduce the paper's Tables 1-4: every row a Ray Tune trial (MLflow child runs under
one parent), then paper_tables.md/.json/.png: published beside measured, with the gap.

examples:
  avpea-ray reproduce --demo --only table2 optim.epochs=1      # toy size, synthetic data
  avpea-ray reproduce --shards shards.yaml --storage-path s3://YOUR-BUCKET/avpea/runs \\
      run.num_workers=8 run.use_gpu=true --seeds 3
  avpea-ray reproduce --shards shards.yaml --storage-path s3://YOUR-BUCKET/avpea/runs --tables-only

shards.yaml: ave, musicavqa, valor32k, each {train: URL, val: URL, test: URL}.
The same --name and --storage-path again re-run nothing finished (see jobs/reproduce.py)."""

# `avpea-ray shard <dataset>` -> the tool's module; each takes its own flags (--help).
SHARDERS = {
    "musicavqa": ("sharding.musicavqa", "MUSIC-AVQA as released -> shards"),
    "ave": ("sharding.ave", "AVE as released -> shards (one sample per annotation row)"),
    "valor": ("sharding.valor", "VALOR-32K as released -> shards"),
    "demo": ("sharding.demo", "a task's synthetic demo data, released and sharded"),
    "synth-musicavqa": ("sharding.synth", "a synthetic release in MUSIC-AVQA's layout"),
    "synth-ave": ("sharding.synth_ave", "a synthetic release in AVE's layout"),
    "synth-valor": ("sharding.synth_valor", "a synthetic release in VALOR-32K's layout"),
}
SHARD_HELP = "Turn a dataset as released into shards (local folder or s3://).\n\n" + "\n".join(
    f"  {name:<16} {what}" for name, (_, what) in SHARDERS.items()) + """

examples:
  avpea-ray shard musicavqa --annotations MUSIC-AVQA/data/json --frames frames --audio audio \\
      --out s3://YOUR-BUCKET/avpea/musicavqa/train --split train
  avpea-ray shard ave --annotations AVE/Annotations.txt --splits AVE --videos AVE/videos \\
      --out shards/ave/train --split train
  avpea-ray shard demo --task avqa                  # what the demo builds on first use
  avpea-ray shard ave --help                        # a dataset's own flags"""

VALIDATE_HELP = """Check a sharded split before training on it (index, sizes, sha256, every sample).

examples:
  avpea-ray validate s3://YOUR-BUCKET/avpea/musicavqa/train --ranks 8 --loader-workers 4
  avpea-ray validate demo_data/shards/val"""

PARAMS_HELP = """Build a model on the meta device (no weights) and print its parameter counts.

examples:
  avpea-ray params --task avel --backbone vit_large_patch16_224
  avpea-ray params --task avqa --reduction-factor 16 head.hidden=256"""


def _train(argv: list[str]) -> int:
    from avpea_ray.cli import run_job
    from sharding.demo import ensure_demo_data

    return run_job(None, TRAIN_HELP, argv, configs=CONFIGS, build_demo_data=ensure_demo_data,
                   prog=f"{PROG} train")


def _sweep(argv: list[str]) -> int:
    from avpea_ray.cli import run_sweep_job
    from sharding.demo import ensure_demo_data

    return run_sweep_job(SWEEP_HELP, argv, demo_config=CONFIGS / "demo_sweep_avqa.yaml",
                         build_demo_data=ensure_demo_data, prog=f"{PROG} sweep")


def _reproduce(argv: list[str]) -> int:
    from avpea_ray.cli import run_reproduce_job
    from sharding.demo import ensure_demo_data

    return run_reproduce_job(REPRODUCE_HELP, argv, configs=CONFIGS, build_demo_data=ensure_demo_data,
                             prog=f"{PROG} reproduce")


def _shard(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SHARDERS:
        print(f"usage: {PROG} shard {{{','.join(SHARDERS)}}} ...\n\n{SHARD_HELP}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from sharding.common import run_main

    module = importlib.import_module(SHARDERS[argv[0]][0])
    prog = f"{PROG} shard {argv[0]}"
    # run_main turns the sharders' usage and storage errors into one line and an exit code.
    return _exit_code(lambda: run_main(lambda args: module.main(args, prog=prog), argv[1:]))


def _validate(argv: list[str]) -> int:
    from sharding import validate

    if argv[:1] in (["-h"], ["--help"]):
        print(VALIDATE_HELP + "\n")
    from sharding.common import run_main

    return _exit_code(lambda: run_main(lambda args: validate.main(args, prog=f"{PROG} validate"), argv))


def _params(argv: list[str]) -> int:
    from avpea_ray import __main__ as library_commands

    if argv[:1] in (["-h"], ["--help"]):
        print(PARAMS_HELP + "\n")
    return _exit_code(lambda: library_commands.main(["params", *argv], prog=PROG))


def _predict(argv: list[str]) -> int:
    from avpea_cli.predict import run_predict

    return run_predict(argv, prog=f"{PROG} predict")


def _infer(argv: list[str]) -> int:
    from avpea_cli.predict import run_infer

    return run_infer(argv, prog=f"{PROG} infer")


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train or resume one run (task from the config; no config: the demo)"),
    "sweep": (_sweep, "a Ray Tune sweep over reduction factor, gating and learning rate"),
    "reproduce": (_reproduce, "the paper's Tables 1-4 as Tune trials, written back beside the paper's"),
    "shard": (_shard, "datasets as released -> shards"),
    "validate": (_validate, "check a sharded split"),
    "params": (_params, "parameter counts of a model, no weights needed"),
    "predict": (_predict, "trained adapters applied to video files (answers, events, captions, ranks)"),
    "infer": (_infer, "batch inference on Ray Data over a split's shards or a list of videos"),
}


def _exit_code(run: Callable[[], int | None]) -> int:
    """Run a tool's `main`; SystemExit from its parser (--help, a usage error) becomes the
    exit code."""
    try:
        return run() or 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)


def usage() -> str:
    commands = "\n".join(f"  {name:<10} {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: {PROG} <command> [flags]\n\ncommands:\n{commands}\n\n{__doc__}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{PROG}: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](rest)
    except SystemExit as exit_:  # a parser's --help or usage error
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
