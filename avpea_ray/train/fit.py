"""Fit one run: the sequence a single run and a sweep trial share.

    checks (preflight) -> run folder -> tracking -> TorchTrainer.fit -> summary -> tracking

`run_training(cfg)` is what `jobs/<task>.py` calls; a sweep trial calls `fit_run` with its
own MLflow parent, tags and Tune callback.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..data import storage
from ..tasks import get_task
from .cluster import alive_nodes, init_ray, nodes_not_seeing, quiet_known_noise
from .config import TrainConfig
from .preflight import Preflight, check_storage_shared, preflight
from .report import accuracy_plot, summarize
from .resume import claim_run_folder, tidy_run_folder
from .tracking import changes_as_tags, finish_run, flatten, redact_uri, set_tags, start_or_resume_run


def run_training(cfg: TrainConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Train (or resume) a run to the end and return its summary.

    Args:
        cfg: the resolved config.
        dry_run: one train and one eval batch end to end, under a throw-away run name, with
            no MLflow run and no checkpoint kept.

    Returns:
        The summary: test (or best validation) metrics, the task's baseline, MLflow run id,
        the best adapters' path, timings.
    """
    start = time.time()
    return fit_run(preflight(cfg), dry_run=dry_run, start=start)


def fit_run(checked: Preflight, *, dry_run: bool = False, mlflow_name: str | None = None,
            parent_run_id: str | None = None, tags: dict[str, str] | None = None,
            callbacks: list | None = None, start: float | None = None) -> dict[str, Any]:
    """Claim the run folder, find or create the MLflow run, fit, summarise, track.

    Args:
        checked: `preflight`'s result.
        dry_run: see `run_training`.
        mlflow_name: the MLflow run's display name (default `run.name`).
        parent_run_id: nest the MLflow run under this one (a sweep's parent run).
        tags: more MLflow tags (a sweep trial's id and variant).
        callbacks: Ray Train callbacks (a sweep's `TuneReportCallback`).
    """
    start = start or time.time()
    cfg = checked.cfg
    folder = None if dry_run else claim_run_folder(checked.run_url, to_dict(cfg), checked.data_ids)
    print(f"run: {cfg.run.name}  results: {checked.run_url}  tracking: {redact_uri(checked.tracking_uri)}")
    print("shards: " + ", ".join(f"{k} {v} clips" for k, v in checked.split_sizes.items()))
    counts = checked.parameter_counts
    print(f"parameters: adapters {counts['adapter']:,}, head {counts['head']:,}, frozen backbone "
          f"{counts['backbone']:,}")
    print(peft_line(counts))
    quiet_known_noise(cfg.run.verbose)
    print(init_ray())
    check_storage_shared(cfg.run.storage_path, checked.storage_defaulted, alive_nodes(), nodes_not_seeing)
    run_id = None
    if not dry_run:
        if folder.changes:
            print("resuming with changed settings: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in folder.changes.items()))
        run_id, resumed = start_tracking(checked, mlflow_name, parent_run_id)
        print(f"MLflow run {run_id} ({'continued' if resumed else 'new'})")
        set_tags(checked.tracking_uri, run_id, (tags or {}) | changes_as_tags(folder.changes))
    name = f"{cfg.run.name}-dry-run-{uuid.uuid4().hex[:6]}" if dry_run else None
    trainer = build_trainer(checked, run_id=run_id, name=name, dry_run=dry_run, callbacks=callbacks)
    try:
        result = trainer.fit()
    except Exception:
        if run_id:
            finish_run(checked.tracking_uri, run_id, [], status="FAILED")
        raise
    if not dry_run:
        tidy_run_folder(checked.run_url)  # a partial upload of a restarted worker group
    summary = summarize(checked, dict(result.metrics or {}), run_id, result.checkpoint,
                        time.time() - start, dry_run)
    if not dry_run and result.checkpoint is not None:
        summary["best_adapters"] = publish_best_adapters(result.checkpoint, checked.run_url)
    if run_id:
        finish_tracking(checked.tracking_uri, run_id, cfg, summary, result.checkpoint)
    return summary


def peft_line(counts: dict[str, int]) -> str:
    """PEFT's `print_trainable_parameters` line, which users compare across methods."""
    return (f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
            f"trainable%: {100 * counts['trainable'] / counts['total']:.4f}")


def publish_best_adapters(checkpoint, run_url: str) -> str | None:
    """Copy the final checkpoint's best adapters to `<run folder>/best_adapters`, a path that
    does not change between runs (another run's `model.init_from`, scripts). The weights go
    first, the config last, each file atomically."""
    from ..model.adapter_io import CONFIG_NAME

    target = storage.join(run_url, "best_adapters")
    with checkpoint.as_directory() as directory:
        best = Path(directory) / "best_adapters"
        if not (best / CONFIG_NAME).is_file():
            return None
        files = sorted(p.relative_to(best).as_posix() for p in best.rglob("*") if p.is_file())
        for name in sorted(files, key=lambda name: name == CONFIG_NAME):  # the config last
            if storage.is_local(target):
                Path(storage.local_path(storage.join(target, name))).parent.mkdir(parents=True, exist_ok=True)
            storage.upload_file(str(best / name), storage.join(target, name))
    return target


def build_trainer(checked: Preflight, *, run_id: str | None, name: str | None = None,
                  dry_run: bool = False, callbacks: list | None = None):
    """The `TorchTrainer` of a checked config.

    Args:
        run_id: the MLflow run rank 0 logs into (None: no logging).
        name: Ray Train run name (default `run.name`); resuming needs the same one.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .entry import train_loop_config, train_loop_per_worker

    cfg = checked.cfg
    return TorchTrainer(
        train_loop_per_worker,
        # The task class travels with the run: a task registered in the driver (a user's own
        # module, a test) needs no import in the workers.
        train_loop_config=train_loop_config(
            to_dict(cfg), get_task(cfg.task), dry_run=dry_run,
            mlflow={"uri": checked.tracking_uri, "run_id": run_id},
            # A bar redrawn in place is for a person at a terminal, not a log file.
            progress=cfg.run.progress and sys.stdout.isatty()),
        scaling_config=ScalingConfig(num_workers=cfg.run.scaling_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=RunConfig(
            name=name or cfg.run.name, storage_path=cfg.run.storage_path, callbacks=callbacks,
            # The newest N are kept (not the best N): each one carries the best adapters so
            # far, and a resume needs the one before the newest if the newest is damaged.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=0 if dry_run else cfg.run.max_failures)),
    )


def start_tracking(checked: Preflight, run_name: str | None = None,
                   parent_run_id: str | None = None) -> tuple[str, bool]:
    """Find or create the MLflow run of a checked config and log its params.

    Returns:
        (run id, whether it existed already: a resumed run).
    """
    cfg = checked.cfg
    local_store = checked.tracking_uri.startswith("sqlite") and "://" not in cfg.run.storage_path
    artifact_root = str(Path(cfg.run.storage_path) / "mlflow-artifacts") if local_store else None
    counts = checked.parameter_counts
    params = flatten(to_dict(cfg)) | {f"params.{k}": v for k, v in counts.items()} | {
        "params.trainable_percent": f"{100 * counts['trainable'] / counts['total']:.4f}"}
    return start_or_resume_run(checked.tracking_uri, cfg.run.experiment,
                               f"{cfg.run.storage_path}/{cfg.run.name}", run_name or cfg.run.name,
                               params, artifact_root, parent_run_id=parent_run_id)


def finish_tracking(uri: str, run_id: str, cfg: TrainConfig, summary: dict, checkpoint) -> None:
    """Artifacts: resolved config, summary, per-type accuracy plot, the best adapter files."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        artifacts = [(str(folder / "config.json"), None), (str(folder / "summary.json"), None)]
        plot = accuracy_plot(summary, folder / "accuracy_per_type.png")
        if plot:
            artifacts.append((str(plot), None))
        final_metrics = {f"final_{k}": v for k, v in summary["metrics"].items()}
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                best = Path(directory) / "best_adapters"
                if best.exists():
                    artifacts.append((str(best), "adapters"))
                finish_run(uri, run_id, artifacts, final_metrics)
        else:
            finish_run(uri, run_id, artifacts, final_metrics)
