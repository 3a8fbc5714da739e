"""What a finished sweep reports: one line per trial (from Tune's experiment state), the
summary, the trials' MLflow child runs closed, and the CSV / PNG / JSON summary files."""
from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ..data import storage
from ..tasks import get_task
from ..train.tracking import finish_run, redact_uri
from .config import VARIANT_AXIS, trial_config, variant_label
from .plan import SweepPlan, parameter_counts

def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def collect_trials(plan: SweepPlan, grid) -> list[dict[str, Any]]:
    """The summary's trial lines, from the experiment's trials (their config and status are
    known even for a trial that failed before reporting) and reported histories."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    errors = {result.path: result.error for result in grid}
    frames = analysis.trial_dataframes
    rows = [trial_row(plan, trial.trial_id, dict(trial.config), trial.status, dict(trial.last_result),
                      frames.get(trial.trial_id), errors.get(trial.path)) for trial in analysis.trials]
    return sorted(rows, key=lambda row: row["trial_id"])


def trial_row(plan: SweepPlan, trial_id: str, point: dict, status: str, metrics: dict, frame,
              error) -> dict[str, Any]:
    """One trial's line: Tune's status, last result and reported history (`frame`)."""
    cfg = trial_config(plan.base, plan.sweep, point)
    records = frame.to_dict("records") if frame is not None else []
    metric = plan.sweep.scheduler.metric
    scores = [s for s in (_number(r.get(metric)) for r in records) if s is not None]
    epochs = {int(r["epoch"]) for r in records
              if _number(r.get("val_score")) is not None and _number(r.get("best_epoch")) is None}
    completed = _number(metrics.get("best_epoch")) is not None  # the report after training
    checkpoint = f"{metrics['checkpoint_path']}/best_adapters" if metrics.get("checkpoint_path") else None
    if checkpoint and storage.is_local(checkpoint) and not Path(checkpoint).exists():
        checkpoint = None
    best = (max if plan.sweep.scheduler.mode == "max" else min)(scores) if scores else None
    # TERMINATED without the final report: the scheduler stopped it. PENDING/RUNNING/PAUSED
    # after fit() returned: the sweep was interrupted (Ctrl+C); a rerun continues it.
    status = ("error" if status == "ERROR" else "unfinished" if status != "TERMINATED"
              else "completed" if completed else "stopped early")
    return {
        "trial_id": trial_id, "variant": variant_label(plan.sweep, cfg, point),
        "reduction_factor": cfg.model.reduction_factor, "gating": cfg.model.gating,
        "cross_attention": cfg.model.cross_attention, "adapters": cfg.model.adapters, "lr": cfg.optim.lr,
        "trainable_params": parameter_counts(plan, cfg)["trainable"],
        "adapter_params": parameter_counts(plan, cfg)["adapter"], f"best_{metric}": best,
        "epochs_run": len(epochs), "stopped_early": status == "stopped early", "status": status,
        "checkpoint": checkpoint, "config": point,
        "final_metrics": {k: v for k, v in metrics.items() if k.startswith(("test_", "val_"))} if completed else {},
        "error": _error_line(error) if status == "error" else None,
    }


def _error_line(error) -> str:
    lines = [line for line in str(error or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def make_summary(plan: SweepPlan, trials: list[dict], parent_id: str, restored: bool,
                 seconds: float) -> dict[str, Any]:
    key = f"best_{plan.sweep.scheduler.metric}"
    scored = [t for t in trials if t[key] is not None]
    best = (max if plan.sweep.scheduler.mode == "max" else min)(scored, key=lambda t: t[key]) if scored else None
    primary, label = get_task(plan.cfg.task).selection(plan.cfg)
    return {"sweep": plan.sweep.name, "path": plan.path, "task": plan.cfg.task, "metric": plan.sweep.scheduler.metric,
            "primary_metric": primary, "primary_metric_label": label,
            "mode": plan.sweep.scheduler.mode, "restored": restored, "seconds": round(seconds, 1),
            "mlflow_tracking_uri": redact_uri(plan.tracking_uri), "mlflow_parent_run_id": parent_id,
            "num_trials": len(trials), "planned_trials": plan.num_trials,
            "num_stopped_early": sum(t["stopped_early"] for t in trials),
            "num_errors": sum(t["status"] == "error" for t in trials),
            "num_unfinished": sum(t["status"] == "unfinished" for t in trials), "trials": trials, "best": best}


def finish_children(plan: SweepPlan, parent_id: str, trials: list[dict]) -> None:
    """Each trial's child run gets its sweep outcome; runs of trials ASHA stopped (their
    driver was ended mid-training) are closed here."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.tracking_uri)
    experiment = client.get_experiment_by_name(plan.cfg.run.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=5000)
    by_trial = {r.data.tags.get("avpea.trial_id"): r for r in runs}
    key, now = f"best_{plan.sweep.scheduler.metric}", int(time.time() * 1000)
    for trial in trials:
        run = by_trial.get(trial["trial_id"])
        if run is None or trial["status"] == "unfinished":
            continue
        trial["mlflow_run_id"] = run.info.run_id
        values = {key: trial[key], "epochs_run": trial["epochs_run"], "stopped_early": float(trial["stopped_early"])}
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()
                                                   if v is not None])
        client.set_tag(run.info.run_id, "avpea.trial_status", trial["status"])
        status = "FAILED" if trial["status"] == "error" else "FINISHED"
        if run.info.status != status:
            client.set_terminated(run.info.run_id, status)


SUMMARY_FILES = {"csv": "sweep_trials.csv", "png": "sweep_metric_vs_reduction_factor.png",
                 "json": "sweep_summary.json"}


def publish_summary(plan: SweepPlan, parent_id: str, summary: dict) -> None:
    """The CSV, PNG and JSON into `<sweep path>/summary/` (local or object storage) and onto the
    MLflow parent run, which then ends with the sweep's metrics."""
    out = storage.join(plan.path, "summary")
    summary["files"] = {kind: storage.join(out, name) for kind, name in SUMMARY_FILES.items()}
    if storage.is_local(out):
        Path(storage.local_path(out)).mkdir(parents=True, exist_ok=True)
    key = f"best_{summary['metric']}"
    metrics = {"trials": summary["num_trials"], "trials_stopped_early": summary["num_stopped_early"],
               "trials_failed": summary["num_errors"], "sweep_seconds": summary["seconds"]}
    if summary["best"]:
        metrics[key] = summary["best"][key]
    with tempfile.TemporaryDirectory() as folder:
        files = {kind: Path(folder) / name for kind, name in SUMMARY_FILES.items()}
        files["csv"].write_text(trials_csv(summary))
        plot_metric(summary, files["png"])
        files["json"].write_text(json.dumps(summary, indent=2, default=str))
        for kind, file in files.items():
            storage.upload_file(str(file), summary["files"][kind])
        finish_run(plan.tracking_uri, parent_id, [(str(f), None) for f in files.values()], metrics,
                   status="FAILED" if summary["num_errors"] else "KILLED" if summary["num_unfinished"]
                   else "FINISHED")


COLUMNS = ("trial_id", "variant", "reduction_factor", "gating", "cross_attention", "adapters", "lr",
           "trainable_params", "adapter_params", "best", "test", "epochs_run", "stopped_early", "status",
           "checkpoint")


def _test_key(summary: dict) -> str:
    """The test split's primary metric of the trials that finished (e.g. AVQA's test_avg)."""
    return f"test_{summary['primary_metric']}"


def _columns(summary: dict) -> list[str]:
    named = {"best": f"best_{summary['metric']}", "test": _test_key(summary)}
    extra = sorted({k for t in summary["trials"] for k in t["config"]} -
                   {VARIANT_AXIS, "model.reduction_factor", "model.gating", "model.cross_attention",
                    "model.adapters", "optim.lr"})
    return [named.get(c, c) for c in COLUMNS] + extra


def trials_csv(summary: dict) -> str:
    columns, test_key = _columns(summary), _test_key(summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for trial in summary["trials"]:
        writer.writerow(trial | {k: v for k, v in trial["config"].items() if k in columns}
                        | {test_key: trial["final_metrics"].get(test_key)})
    return buffer.getvalue()


def format_table(summary: dict) -> str:
    """The trials table the job prints."""
    key, test_key = f"best_{summary['metric']}", _test_key(summary)
    head = f"{'trial':<13}{'variant':<18}{'r':>4}  {'gating':<8}{'lr':>9}{'trainable':>11}{key:>16}" \
           f"{test_key:>14}{'epochs':>8}  {'stopped early':<14}"
    lines = [head, "-" * len(head)]
    for t in summary["trials"]:
        score = f"{t[key]:.2f}" if t[key] is not None else "-"
        test = t["final_metrics"].get(test_key)
        test = f"{test:.2f}" if test is not None else "-"
        lines.append(f"{str(t['trial_id']):<13}{t['variant'][:17]:<18}{t['reduction_factor']:>4}  {t['gating']:<8}"
                     f"{t['lr']:>9.2e}{t['trainable_params']:>11,}{score:>16}{test:>14}{t['epochs_run']:>8}  "
                     f"{'yes' if t['stopped_early'] else 'no':<14}" + (" ERROR" if t["status"] == "error" else ""))
    return "\n".join(lines)


def plot_metric(summary: dict, path: Path) -> Path:
    """The metric against the adapter reduction factor, one line per gating variant (best
    trial per point; hollow markers: trials ASHA stopped early)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"best_{summary['metric']}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    variants = list(dict.fromkeys(t["variant"] for t in summary["trials"]))
    for i, variant in enumerate(variants):
        color = f"C{i % 10}"
        trials = [t for t in summary["trials"] if t["variant"] == variant and t[key] is not None]
        best: dict[int, float] = {}
        for t in trials:
            r = t["reduction_factor"]
            best[r] = t[key] if r not in best else (max if summary["mode"] == "max" else min)(best[r], t[key])
        xs = sorted(best)
        ax.plot(xs, [best[x] for x in xs], "-", color=color, label=variant)
        for t in trials:
            ax.scatter(t["reduction_factor"], t[key], s=36, edgecolors=color,
                       facecolors="none" if t["stopped_early"] else color, zorder=3)
    factors = sorted({t["reduction_factor"] for t in summary["trials"]})
    if factors:
        ax.set_xscale("log", base=2)
        ax.set_xticks(factors, [str(f) for f in factors])
    ax.set_xlabel("adapter reduction factor r (model.reduction_factor; bottleneck D / r)")
    primary = summary["primary_metric_label"]
    ax.set_ylabel(f"best {summary['metric']}" + (f" ({primary})" if summary["metric"] == "val_score" else ""))
    ax.set_title(f"sweep {summary['sweep']} ({summary['num_trials']} trials; hollow: stopped early by ASHA)",
                 fontsize=10)
    if variants:
        ax.legend(title="gating variant", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_sweep(summary: dict) -> None:
    """Print the trials table and the best trial."""
    key = f"best_{summary['metric']}"
    print(format_table(summary))
    best = summary["best"]
    if best:
        print(f"\nbest trial {best['trial_id']}: {best['variant']}, model.reduction_factor={best['reduction_factor']}, "
              f"optim.lr={best['lr']:.2e}: {key} {best[key]:.2f} after {best['epochs_run']} epochs")
        test_metric = _test_key(summary)
        if best["final_metrics"].get(test_metric) is not None:
            print(f"  its {test_metric} {best['final_metrics'][test_metric]:.2f}")
        print(f"  best adapters: {best['checkpoint']}")
    started = "" if summary["num_trials"] >= summary["planned_trials"] else f" ({summary['planned_trials']} planned)"
    print(f"{summary['num_stopped_early']} of {summary['num_trials']} trials{started} stopped early by ASHA, "
          f"{summary['num_errors']} failed; summary files: {', '.join(summary['files'].values())}")
    print(f"MLflow parent run {summary['mlflow_parent_run_id']} at {summary['mlflow_tracking_uri']}")
    print(f"took {summary['seconds']:.0f} s" + (" (continued a restored sweep)" if summary["restored"] else ""))
    if summary["num_unfinished"]:
        print(f"the sweep was interrupted with {summary['num_unfinished']} trial(s) unfinished: run the same "
              f"command again to continue it")
