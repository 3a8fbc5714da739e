"""The command line every training job shares: flags -> resolved TrainConfig, demo data.

    python jobs/avqa.py [--config FILE] [section.key=value ...] [--num-workers N] [--use-gpu]
                        [--storage-path PATH] [--run-name NAME] [--dry-run] [--summary-json PATH]

With no --config and no data paths, a job trains on a synthetic demo dataset (built on first
use, in the dataset's release layout) with a tiny random-weight ViT: the embedded default that
runs anywhere. AVQA's demo is MUSIC-AVQA-shaped; retrieval and captioning share a
VALOR-32K-shaped one with a tiny random text model and a tokenizer over its captions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config, to_dict
from .config import TrainConfig

DEMO_ROOT = Path("demo_data")

# A tiny ViT with random weights: nothing to download, trains in minutes on 2 CPU cores.
DEMO_AVQA: dict[str, Any] = {
    "task": "avqa",
    "model": {"backbone": "vit_base_patch16_224", "weights": "random",
              "backbone_kwargs": {"depth": 4, "embed_dim": 96, "num_heads": 3, "img_size": 64},
              "image_size": 64, "num_frames": 10},
    "head": {"hidden": 128},
    "data": {"train": str(DEMO_ROOT / "shards" / "train"), "val": str(DEMO_ROOT / "shards" / "val"),
             "test": str(DEMO_ROOT / "shards" / "test"), "batch_size": 8, "eval_batch_size": 16,
             "loader_workers": 1, "shuffle_buffer": 64},
    "optim": {"epochs": 8, "lr": 1e-3, "warmup_steps": 20},
    "run": {"name": "avqa-demo", "num_workers": 1, "cpus_per_worker": 1, "log_every_steps": 10},
}

VALOR_DEMO_ROOT = DEMO_ROOT / "valor"
_VALOR_DEMO_DATA = {"train": str(VALOR_DEMO_ROOT / "shards" / "train"),
                    "val": str(VALOR_DEMO_ROOT / "shards" / "val"),
                    "test": str(VALOR_DEMO_ROOT / "shards" / "test"),
                    "batch_size": 16, "eval_batch_size": 16, "loader_workers": 1, "shuffle_buffer": 64}

# sharding.valor's audio: ten 1 s windows (AVE's setting; VALOR-32K clips are 10 s).
_VALOR_DEMO_MODEL = DEMO_AVQA["model"] | {"audio": {"window_seconds": 1.0, "target_frames": 102}}

DEMO_AVR: dict[str, Any] = {
    "model": _VALOR_DEMO_MODEL,
    "task": "avr",
    "head": {"text_model": "random", "embed_dim": 128},
    "data": _VALOR_DEMO_DATA,
    "optim": {"epochs": 10, "lr": 1e-3, "warmup_steps": 10},
    "run": {"name": "avr-demo", "num_workers": 1, "cpus_per_worker": 1, "log_every_steps": 5},
}

DEMO_AVC: dict[str, Any] = {
    "model": _VALOR_DEMO_MODEL,
    "task": "avc",
    "head": {"text_model": "random", "hidden": 128, "layers": 2, "num_heads": 4},
    "data": _VALOR_DEMO_DATA,
    "optim": {"epochs": 12, "lr": 3e-3, "warmup_steps": 10},
    "run": {"name": "avc-demo", "num_workers": 1, "cpus_per_worker": 1, "log_every_steps": 5},
}


def parse_job_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. model.reduction_factor=16 optim.epochs=3")
    parser.add_argument("--config", help="JSON or YAML config file (configs/*.yaml)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--storage-path", help="checkpoints and results: local dir or s3://bucket/prefix")
    parser.add_argument("--run-name", help="stable run name: the same name again resumes the run")
    parser.add_argument("--dry-run", action="store_true",
                        help="one train and one eval batch end to end; checks storage and tracking")
    parser.add_argument("--summary-json", help="write the final metrics here")
    return parser.parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace, demo: dict[str, Any] | None) -> tuple[TrainConfig, bool]:
    """Defaults <- demo (without --config) <- file <- overrides <- flags.

    Returns:
        (config, whether it trains on the demo data).
    """
    # Flags are set as typed values, not as override text: no character in a path or a
    # name can change their meaning.
    flags = {"run.num_workers": args.num_workers, "run.storage_path": args.storage_path,
             "run.name": args.run_name, "run.use_gpu": True if args.use_gpu else None}
    cfg = load_config(TrainConfig, args.config, args.overrides, base=None if args.config else demo,
                      values={k: v for k, v in flags.items() if v is not None})
    uses_demo = bool(demo and "data" in demo) and cfg.data.train == demo["data"]["train"]
    return cfg, uses_demo


def ensure_demo_data(image_size: int, task: str = "avqa") -> None:
    """Build the task's synthetic demo dataset (release layout) and its shards if missing."""
    if task in ("avr", "avc"):
        return _ensure_valor_demo(image_size)
    from sharding import musicavqa, synth

    release = DEMO_ROOT / "release"
    if not (release / "avqa-test.json").exists():
        print(f"demo data: generating the synthetic MUSIC-AVQA-layout dataset in {release}")
        synth.main(["--out", str(release)])
    for split in ("train", "val", "test"):
        out = DEMO_ROOT / "shards" / split
        if (out / "shards.json").exists():
            continue
        print(f"demo data: sharding the {split} split into {out}")
        code = musicavqa.main(["--annotations", str(release), "--frames", str(release / "frames"),
                               "--audio", str(release / "audio"), "--out", str(out),
                               "--split", split, "--image-size", str(image_size),
                               "--max-shard-bytes", "16MiB", "--no-progress"])
        if code:
            raise SystemExit(f"demo data: sharding the {split} split failed (exit {code})")


def _ensure_valor_demo(image_size: int) -> None:
    from sharding import synth_valor, valor

    release = VALOR_DEMO_ROOT / "release"
    if not (release / "captions.json").exists():
        print(f"demo data: generating the synthetic VALOR-32K-layout dataset in {release}")
        synth_valor.main(["--out", str(release)])
    for split in ("train", "val", "test"):
        out = VALOR_DEMO_ROOT / "shards" / split
        if (out / "shards.json").exists():
            continue
        print(f"demo data: sharding the {split} split into {out}")
        code = valor.main(["--ids", str(release / f"ids_{split}.json"),
                           "--captions", str(release / "captions.json"),
                           "--frames", str(release / "frames"), "--audio", str(release / "audio"),
                           "--out", str(out), "--split", split, "--image-size", str(image_size),
                           "--max-shard-bytes", "16MiB", "--no-progress"])
        if code:
            raise SystemExit(f"demo data: sharding the {split} split failed (exit {code})")


def baseline_line(summary: dict) -> str | None:
    """The sentence comparing a run's result with its task's trivial baseline."""
    metrics = summary.get("metrics", {})
    if summary.get("majority_acc") is not None:
        return (f"overall accuracy {summary['overall_acc']:.2f}% vs. always answering the most "
                f"frequent train answer {summary['majority_acc']:.2f}%")
    if "t2v_R@1" in metrics and "chance_R@1" in metrics:
        return (f"text->video R@1/5/10 {metrics['t2v_R@1']:.1f}/{metrics['t2v_R@5']:.1f}/"
                f"{metrics['t2v_R@10']:.1f} vs. ranking at random {metrics['chance_R@1']:.1f}/"
                f"{metrics['chance_R@5']:.1f}/{metrics['chance_R@10']:.1f}")
    if "CIDEr" in metrics and "baseline_CIDEr" in metrics:
        return (f"CIDEr {metrics['CIDEr']:.2f} vs. {metrics['baseline_CIDEr']:.2f} for captions "
                f"of other clips (a fluent captioner that ignores the clip)")
    return None


def report(summary: dict, args: argparse.Namespace) -> None:
    """Print the run's result table (or the dry run's verdict) and write --summary-json."""
    from .launcher import format_summary

    if args.dry_run:
        print("dry run ok: one train and one eval batch ran end to end; storage and tracking are reachable")
        return
    print(format_summary(summary))
    line = baseline_line(summary)
    if line:
        print(line)
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
        print(f"summary written to {args.summary_json}")


DEMO_TRAIN_SHARDS = (DEMO_AVQA["data"]["train"], _VALOR_DEMO_DATA["train"])
DEMO_NOTICE = ("demo mode: synthetic {layout}-layout data, a tiny random-weight ViT, local Ray, "
               "local shards and a local MLflow store (pass --config for real runs)")
DEMO_LAYOUT = {"avqa": "MUSIC-AVQA", "avr": "VALOR-32K", "avc": "VALOR-32K"}


def run_job(task: str, description: str, argv: list[str] | None = None,
            demo: dict[str, Any] | None = None) -> int:
    """What every `jobs/<task>.py` does: parse flags, resolve the config (the demo without
    --config), build demo data if it is used, train or resume on Ray, report.

    Returns:
        The exit code: 0, or 2 for a user error (printed as one line naming the field).
    """
    from .launcher import run_training

    args = parse_job_args(description, argv)
    try:
        cfg, uses_demo = resolve_config(args, demo or {"task": task})
        if cfg.task != task:
            raise ConfigError(f"task: jobs/{task}.py trains task {task!r}, the config says {cfg.task!r}")
        if uses_demo:
            print(DEMO_NOTICE.format(layout=DEMO_LAYOUT[task]))
            ensure_demo_data(cfg.model.image_size, task)
        summary = run_training(cfg, dry_run=args.dry_run)
    except ConfigError as err:
        return fail(err)
    report(summary, args)
    return 0


def fail(err: Exception) -> int:
    """A user error: one clear line, no traceback."""
    print(f"error: {err}", file=sys.stderr)
    return 2


__all__ = ["ConfigError", "DEMO_AVC", "DEMO_AVQA", "DEMO_AVR", "DEMO_LAYOUT", "DEMO_NOTICE",
           "DEMO_TRAIN_SHARDS", "ensure_demo_data", "fail",
           "parse_job_args", "report", "resolve_config", "run_job", "to_dict"]
