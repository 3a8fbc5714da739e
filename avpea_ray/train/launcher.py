"""Driver side of a training run: check everything, start Ray, fit, summarise, track.

`run_training(cfg)` is what `jobs/avqa.py` and `jobs/avel.py` call. Every user error (bad
shards, storage, tracking URI, a reduction factor that does not fit the backbone) is raised as
a `ConfigError` naming the field before any Ray worker starts.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, to_dict
from ..data import storage
from ..data import shards
from ..data.reader import check_shards_present, plan_epoch
from ..data.shards import ShardIndexError, read_index
from ..model.params import build_without_weights, count_parameters
from ..model.text import TextModelError
from .config import RunConfig, TrainConfig
from .tasks import TASKS, make_task
from .resume import claim_run_folder, tidy_run_folder
from .tracking import (TrackingError, check_reachable, finish_run, flatten, redact_uri,
                       resolve_tracking_uri, start_or_resume_run)


@dataclass
class Preflight:
    """What the driver learned before starting workers."""

    cfg: TrainConfig
    head_kwargs: dict[str, Any]
    parameter_counts: dict[str, int]
    tracking_uri: str
    split_sizes: dict[str, int] = field(default_factory=dict)
    data_ids: dict[str, str] = field(default_factory=dict)  # split -> shard index identity
    storage_defaulted: bool = False  # no storage path was given

    @property
    def run_url(self) -> str:
        """The run's folder: checkpoints, the saved config, the ledger."""
        return storage.join(self.cfg.run.storage_path, self.cfg.run.name)


def default_run_name(cfg: TrainConfig) -> str:
    """A stable name, so running the same command again resumes the same run."""
    backbone = cfg.model.backbone.split(".")[0]
    return f"{cfg.task}-{backbone}-r{cfg.model.reduction_factor}-{cfg.model.adapters}"


def preflight(cfg: TrainConfig) -> Preflight:
    """Check shards, model, storage and tracking; resolve the run name and storage path.

    Raises:
        ConfigError: naming the field (data.train, model.reduction_factor, run.storage_path,
            run.tracking_uri, ...) and what was expected.
    """
    # Ray workers run in their own working directories: local paths must be absolute.
    run, data = cfg.run, cfg.data
    local_paths = {name: _absolute(getattr(data, name)) for name in ("train", "val", "test", "vocab")}
    weights = cfg.model.weights
    if weights not in ("random", "timm"):
        if not Path(weights).is_file():
            raise ConfigError(f"model.weights: {weights!r} is not a file (expected 'timm', 'random' "
                              f"or a local .safetensors/.pth state dict)")
        weights = _absolute(weights)
    cfg = replace(cfg, model=replace(cfg.model, weights=weights),
                  data=replace(data, **local_paths),
                  run=replace(run, name=run.name or default_run_name(cfg),
                              storage_path=_absolute(default_storage_path(run.storage_path))))

    indexes = {}
    for split in ("train", "val", "test"):
        url = getattr(cfg.data, split)
        if not url:
            if split == "test":
                continue
            raise ConfigError(f"data.{split} is empty: give the {split} shards' directory or URL")
        try:
            indexes[split] = read_index(url)
        except (ShardIndexError, FileNotFoundError, OSError) as err:
            raise ConfigError(f"data.{split}: {err}") from err
    for split, index in indexes.items():
        if index.dataset != TASKS[cfg.task].dataset:
            raise ConfigError(f"data.{split}: shards hold dataset {index.dataset!r}, not what "
                              f"task {cfg.task!r} trains on")
        if index.num_frames != cfg.model.num_frames:
            raise ConfigError(f"model.num_frames={cfg.model.num_frames} but the {split} shards hold "
                              f"{index.num_frames} frames per clip")
        for key, value in asdict(cfg.model.audio).items():
            if index.audio.get(key) != value:  # the spectrograms were computed when sharding
                raise ConfigError(f"model.audio.{key}={value!r} but the {split} shards were made "
                                  f"with {key}={index.audio.get(key)!r}")
    for split, index in indexes.items():
        try:
            problems = check_shards_present(index)
        except storage.StorageAccessError as err:
            raise ConfigError(f"data.{split}: {err}") from err
        if problems and not cfg.data.allow_damaged:
            raise ConfigError(f"data.{split}: {len(problems)} of {len(index.shards)} shards are missing "
                              f"or not the size the index lists ({'; '.join(problems[:5])}"
                              f"{'; ...' if len(problems) > 5 else ''}); re-shard the split, or set "
                              f"data.allow_damaged=true to go on without them")
    slots = cfg.run.num_workers * max(cfg.data.loader_workers, 1)
    try:
        plan_epoch([s.samples for s in indexes["train"].shards], slots=slots,
                   batch_size=cfg.data.batch_size, training=True, seed=cfg.data.seed, epoch=0)
    except ValueError as err:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: {err} (run.num_workers="
                          f"{cfg.run.num_workers} x data.loader_workers={cfg.data.loader_workers})") from err
    try:
        task = make_task(cfg, indexes["train"])
    except TextModelError as err:
        raise ConfigError(str(err)) from err
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise ConfigError(f"data.vocab: {err}") from err
    head_kwargs = task.head_kwargs() | cfg.head
    if cfg.task == "avc" and cfg.evaluation.meteor != "never" and shutil.which("java") is None:
        raise ConfigError("evaluation.meteor: METEOR runs the COCO caption toolkit's Java jar and "
                          "there is no `java` on PATH: install a JRE or set evaluation.meteor=never")
    try:
        model = build_without_weights(cfg.model, cfg.task, head_kwargs)
    except TextModelError as err:
        raise ConfigError(str(err)) from err
    except TypeError as err:  # an unknown head.* key
        raise ConfigError(f"head: {err}") from err
    except ValueError as err:
        field_name = "model.reduction_factor" if "reduction_factor" in str(err) else "model/head"
        raise ConfigError(f"{field_name}: {err}") from err
    except RuntimeError as err:
        raise ConfigError(f"model.backbone: {err}") from err
    counts = count_parameters(model)
    text_positions = getattr(getattr(getattr(model.head, "text_encoder", None), "config", None),
                             "max_position_embeddings", None)
    if text_positions is not None and cfg.data.max_caption_tokens > text_positions:
        raise ConfigError(f"data.max_caption_tokens={cfg.data.max_caption_tokens} but the text model "
                          f"has only {text_positions} positions (head.text_config.max_position_embeddings "
                          f"for a random one): lower data.max_caption_tokens")

    _check_storage(cfg.run.storage_path)
    uri = resolve_tracking_uri(cfg.run.tracking_uri, cfg.run.storage_path)
    try:
        check_reachable(uri)
    except TrackingError as err:
        raise ConfigError(f"run.tracking_uri: {err}") from err
    return Preflight(cfg, head_kwargs,
                     {"adapter": counts.adapter, "head": counts.head, "backbone": counts.backbone,
                      "trainable": counts.trainable, "total": counts.total},
                     uri, {k: v.total_samples for k, v in indexes.items()},
                     {k: shards.index_id(v) for k, v in indexes.items()},
                     storage_defaulted=run.storage_path == RunConfig().storage_path)


def default_storage_path(path: str) -> str:
    """Where results go when no storage path is given.

    A relative path is kept, except inside `ray job submit --working-dir`: there the working
    directory is Ray's temporary copy, deleted with the Ray session, so results go to
    ~/avpea-runs on the node running the job instead.
    """
    if "://" in path or Path(path).is_absolute() or "runtime_resources" not in Path.cwd().parts:
        return path
    return str(Path.home() / "avpea-runs" / path)


def _url(storage_path: str, path: str) -> str:
    """Ray reports object-store checkpoint paths without their scheme: put it back."""
    scheme = storage_path.split("://")[0] if "://" in storage_path else ""
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def _absolute(path: str) -> str:
    return path if not path or "://" in path else str(Path(path).resolve())


def _check_storage(path: str) -> None:
    probe = storage.join(path, f".avpea-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        if "://" not in path:
            Path(path).mkdir(parents=True, exist_ok=True)
        storage.atomic_write_bytes(probe, b"ok")
        storage.remove(probe)
    except Exception as err:  # noqa: BLE001 - any failure means the same to the user
        raise ConfigError(f"run.storage_path {path!r} is not writable: {type(err).__name__}: {err}") from err


def init_ray() -> str:
    """Connect to the cluster named by RAY_ADDRESS (set inside `ray job submit`), else start a
    fresh local Ray in this process. Returns a line saying which."""
    import ray
    if ray.is_initialized():
        return "Ray: already initialised"
    address = os.environ.get("RAY_ADDRESS")
    # "local": a fresh in-process Ray even if some other Ray runs on this machine (set
    # RAY_ADDRESS=auto to join that one instead).
    ray.init(address=address or "local", log_to_driver=True)
    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = ray.cluster_resources().get("GPU", 0)
    where = f"cluster at {address}" if address else "a local Ray started in this process"
    return f"Ray: {where} ({cpus:g} CPUs, {gpus:g} GPUs)"


def alive_nodes() -> int:
    import ray
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_storage_shared(storage_path: str, defaulted: bool, nodes: int) -> None:
    """Refuse the default local storage path on a multi-node cluster: workers on other nodes
    would write checkpoints where the driver never looks. A path given explicitly may be a
    shared filesystem (Ray checks it can write there)."""
    if nodes > 1 and defaulted and storage.is_local(storage_path):
        raise ConfigError(f"run.storage_path: the cluster has {nodes} nodes and no --storage-path was given "
                          f"(the default {storage_path} is local to this node); give --storage-path "
                          f"s3://bucket/prefix or a filesystem every node shares")


def build_trainer(checked: Preflight, *, run_id: str | None, name: str | None = None,
                  dry_run: bool = False, callbacks: list | None = None):
    """The `TorchTrainer` of a checked config (also what a sweep trial fits).

    Args:
        checked: `preflight`'s result.
        run_id: the MLflow run rank 0 logs into (None: no logging).
        name: Ray Train run name (default `run.name`); resuming needs the same one.
        dry_run: one train and one eval batch, no retries.
        callbacks: extra Ray Train callbacks (e.g. Tune's `TuneReportCallback`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .loop import train_loop_per_worker

    cfg = checked.cfg
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "dry_run": dry_run,
                           "mlflow": {"uri": checked.tracking_uri, "run_id": run_id}},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
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
    params = flatten(to_dict(cfg)) | {f"params.{k}": v for k, v in checked.parameter_counts.items()}
    return start_or_resume_run(checked.tracking_uri, cfg.run.experiment,
                               f"{cfg.run.storage_path}/{cfg.run.name}", run_name or cfg.run.name,
                               params, artifact_root, parent_run_id=parent_run_id)


def run_training(cfg: TrainConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Train (or resume) a run to the end and return its summary.

    Args:
        cfg: the resolved config.
        dry_run: one train and one eval batch end to end, under a throw-away run name, with
            no MLflow run and no checkpoint kept.

    Returns:
        The summary: test (or best validation) metrics, majority baseline, MLflow run id,
        the best adapters' path, timings.
    """
    start = time.time()
    checked = preflight(cfg)
    cfg = checked.cfg
    folder = None if dry_run else claim_run_folder(checked.run_url, to_dict(cfg), checked.data_ids)
    print(f"run: {cfg.run.name}  results: {checked.run_url}  tracking: {redact_uri(checked.tracking_uri)}")
    print("shards: " + ", ".join(f"{k} {v} clips" for k, v in checked.split_sizes.items()))
    print(f"parameters: adapters {checked.parameter_counts['adapter']:,}, head "
          f"{checked.parameter_counts['head']:,}, frozen backbone {checked.parameter_counts['backbone']:,}")
    if folder and folder.changes:
        print("resuming with changed settings: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in folder.changes.items()))
    print(init_ray())
    check_storage_shared(cfg.run.storage_path, checked.storage_defaulted, alive_nodes())

    run_id = None
    if not dry_run:
        run_id, resumed = start_tracking(checked)
        print(f"MLflow run {run_id} ({'continued' if resumed else 'new'})")
        record_changes(checked.tracking_uri, run_id, folder.changes)
    name = f"{cfg.run.name}-dry-run-{uuid.uuid4().hex[:6]}" if dry_run else None
    trainer = build_trainer(checked, run_id=run_id, name=name, dry_run=dry_run)
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
    if run_id:
        finish_tracking(checked.tracking_uri, run_id, cfg, summary, result.checkpoint)
    return summary


def record_changes(uri: str, run_id: str, changes: dict) -> None:
    """A resume's allowed config changes, as tags on the MLflow run (params cannot change)."""
    if not changes:
        return
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    for key, (old, new) in changes.items():
        client.set_tag(run_id, f"avpea.changed.{key}", f"{old!r} -> {new!r}"[:5000])


DAMAGE_KEYS = ("samples_lost", "damaged_shards")  # in the metrics with data.allow_damaged


def summarize(checked: Preflight, metrics: dict, run_id: str | None, checkpoint, seconds: float,
              dry_run: bool = False) -> dict[str, Any]:
    """A finished run's summary from its last reported metrics."""
    cfg = checked.cfg
    split = "test" if any(k.startswith("test_") for k in metrics) else "val"
    scores = {k.removeprefix(f"{split}_"): v for k, v in metrics.items()
              if k.startswith(f"{split}_") and k != "val_score"}
    summary: dict[str, Any] = {
        "task": cfg.task, "run_name": cfg.run.name, "dry_run": dry_run, "evaluated_on": split,
        "best_epoch": metrics.get("best_epoch"), "best_val_score": metrics.get("val_score"),
        "metrics": scores, "mlflow_run_id": run_id, "mlflow_tracking_uri": redact_uri(checked.tracking_uri),
        "run_folder": None if dry_run else _url(cfg.run.storage_path, checked.run_url),
        "checkpoint": _url(cfg.run.storage_path, f"{checkpoint.path}/best_adapters")
        if checkpoint and not dry_run else None,
        "parameters": checked.parameter_counts, "seconds": round(seconds, 1),
    }
    if cfg.data.allow_damaged:  # what the run went on without
        summary["data_damage"] = {k: metrics.get(k) for k in (
            "train_samples_lost", "train_damaged_shards", f"{split}_samples_lost", f"{split}_damaged_shards")}
    if cfg.task == "avqa":
        summary["overall_acc"] = scores.get("overall")
        summary["majority_acc"] = scores.get("majority_acc")
        summary["accuracies"] = {k: v for k, v in scores.items()
                                 if k not in ("overall", "majority_acc", *DAMAGE_KEYS)}
    elif cfg.task == "avel":
        summary["accuracy"] = scores.get("accuracy")
        summary["accuracies"] = {k: v for k, v in scores.items() if k not in ("accuracy", *DAMAGE_KEYS)}
    return summary


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


def accuracy_plot(summary: dict, path: Path) -> Path | None:
    """A bar chart of the accuracy per question type (AVQA) or per class (AVE), with the
    majority-answer baseline where there is one."""
    accuracies = summary.get("accuracies")
    if not accuracies:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(accuracies)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    ax.bar(range(len(names)), [accuracies[n] for n in names], color="#4C72B0")
    if summary.get("majority_acc") is not None:
        ax.axhline(summary["majority_acc"], color="#C44E52", linestyle="--", label="majority answer")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"{summary['evaluated_on']} accuracy (%)")
    ax.set_ylim(0, 100)
    overall = summary.get("overall_acc", summary.get("accuracy")) or 0.0
    ax.set_title(f"{summary['run_name']}: overall {overall:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_summary(summary: dict) -> str:
    """The table a job prints at the end."""
    lines = [f"{'metric':<28}{summary['evaluated_on']:>10}"]
    lines += [f"{k:<28}{v:>10.2f}" for k, v in summary["metrics"].items()]
    lines.append("")
    damage = summary.get("data_damage")
    if damage:
        lines.append("data.allow_damaged: " + ", ".join(f"{k} {v:.0f}" for k, v in damage.items() if v is not None))
    if summary.get("run_folder"):
        lines.append(f"run folder:     {summary['run_folder']}")
    if summary.get("checkpoint"):
        lines.append(f"best adapters:  {summary['checkpoint']}")
    if summary.get("mlflow_run_id"):
        lines.append(f"MLflow run:     {summary['mlflow_run_id']} at {summary['mlflow_tracking_uri']}")
    lines.append(f"took {summary['seconds']:.0f} s")
    return "\n".join(lines)
