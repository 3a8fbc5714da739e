"""What a finished run reports: its summary (dict and printed table) and the accuracy plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tasks import get_task
from .preflight import Preflight
from .tracking import redact_uri


def storage_url(storage_path: str, path: str) -> str:
    """Ray reports object-store checkpoint paths without their scheme: put it back."""
    scheme = storage_path.split("://")[0] if "://" in storage_path else ""
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def summarize(checked: Preflight, metrics: dict, run_id: str | None, checkpoint, seconds: float,
              dry_run: bool = False) -> dict[str, Any]:
    """A finished run's summary from its last reported metrics."""
    cfg = checked.cfg
    split = "test" if any(k.startswith("test_") for k in metrics) else "val"
    scores = {k.removeprefix(f"{split}_"): v for k, v in metrics.items()
              if k.startswith(f"{split}_") and k != "val_score"}
    primary, label = get_task(cfg.task).selection(cfg)
    summary: dict[str, Any] = {
        "task": cfg.task, "run_name": cfg.run.name, "primary_metric": primary, "primary_metric_label": label, "dry_run": dry_run, "evaluated_on": split,
        "best_epoch": metrics.get("best_epoch"), "best_val_score": metrics.get("val_score"),
        "metrics": scores, "mlflow_run_id": run_id, "mlflow_tracking_uri": redact_uri(checked.tracking_uri),
        "run_folder": None if dry_run else storage_url(cfg.run.storage_path, checked.run_url),
        "checkpoint": storage_url(cfg.run.storage_path, f"{checkpoint.path}/best_adapters")
        if checkpoint and not dry_run else None,
        "parameters": checked.parameter_counts, "seconds": round(seconds, 1),
    }
    if cfg.data.allow_damaged:  # what the run went on without
        summary["data_damage"] = {k: metrics.get(k) for k in (
            "train_samples_lost", "train_damaged_shards", f"{split}_samples_lost", f"{split}_damaged_shards")}
    return summary | get_task(cfg.task).summary(scores)


def baseline_line(summary: dict) -> str | None:
    """The sentence comparing a run's result with its task's trivial baseline."""
    return get_task(summary["task"]).baseline_line(summary.get("metrics", {}))


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
        ax.axhline(summary["majority_acc"], color="#C44E52", linestyle="--", label="majority answer (all questions)")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"{summary['evaluated_on']} accuracy (%)")
    ax.set_ylim(0, 100)
    primary = summary["primary_metric"]
    ax.set_title(f"{summary['run_name']}: {primary} {summary['metrics'].get(primary) or 0.0:.1f}%")
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
        lines.append(f"best adapters:  {summary.get('best_adapters') or summary['checkpoint']}")
    if summary.get("mlflow_run_id"):
        lines.append(f"MLflow run:     {summary['mlflow_run_id']} at {summary['mlflow_tracking_uri']}")
    lines.append(f"took {summary['seconds']:.0f} s")
    return "\n".join(lines)
