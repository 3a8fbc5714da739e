"""Hyperparameter sweeps: Ray Tune over Ray Train (V2), ASHA, one MLflow parent run per sweep.

    run_sweep(cfg, sweep)  ->  summary {"trials": [...], "best": {...}, ...}

1. `prepare_sweep` checks everything before any trial starts (ConfigError naming the field):
   every point of the space becomes a TrainConfig and goes through the training preflight
   (shards, a `model.reduction_factor` that divides the backbone width, storage, tracking).
2. A Tune trial is a *trial driver* (`tune.with_resources(fn, {"CPU": driver_cpus, ...})`)
   that builds and fits its own `TorchTrainer` (`launcher.build_trainer`) with
   `TuneReportCallback`, so each epoch's `ray.train.report` reaches Tune and ASHA.
   ASHA counts epochs (`training_iteration`: one result per epoch end); its rungs all sit
   before a trial's last epoch, so a trial that trains all its epochs also runs its final
   test evaluation.
3. MLflow: one parent run per sweep, one nested child run per trial, which is that trial's
   training run (rank 0 logs epoch metrics into it); the parent gets the summary (CSV, PNG,
   JSON). Running the same sweep name (and storage path) again restores the Tuner and finds
   the same parent and child runs.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from ..config import ConfigError, from_dict, to_dict
from ..data import storage
from ..model.params import build_without_weights, count_parameters
from ..train.config import TrainConfig
from ..train.launcher import init_ray, preflight
from ..train.tasks import TASKS
from ..train.tracking import flatten, redact_uri
from .config import (VARIANT_AXIS, SweepConfig, check_point, describe, discrete_points,
                     is_distribution, trial_config, variant_label)

SNAPSHOT = "avpea_sweep.json"  # the resolved config a sweep was started with


@dataclass
class SweepPlan:
    """A checked sweep: what the driver and every trial need."""

    cfg: TrainConfig                 # the base config (absolute paths, run.name = sweep name)
    sweep: SweepConfig
    path: str                        # <run.storage_path>/<sweep.name>: Tune's experiment dir
    tracking_uri: str
    head_kwargs: dict[str, Any]
    max_t: int                       # epochs per trial (ASHA's max_t)
    num_trials: int
    counts: dict[str, dict] = field(default_factory=dict)  # architecture -> parameter counts

    @property
    def base(self) -> dict[str, Any]:
        return to_dict(self.cfg)


# -- 1. checks -------------------------------------------------------------------------------

def prepare_sweep(cfg: TrainConfig, sweep: SweepConfig) -> SweepPlan:
    """Check the base config and every point of the space; no Ray needed.

    Raises:
        ConfigError: naming the field (sweep.space.model.reduction_factor=7: ..., data.train: ...).
    """
    sweep.check_not_empty()
    checked = preflight(replace(cfg, run=replace(cfg.run, name=sweep.name)))
    base = to_dict(checked.cfg)
    plan = SweepPlan(checked.cfg, sweep, storage.join(checked.cfg.run.storage_path, sweep.name),
                     checked.tracking_uri, checked.head_kwargs, 0, count_trials(sweep))
    epochs, seen = set(), set()
    for point in discrete_points(sweep):
        trial = check_point(base, sweep, point)
        epochs.add(trial.optim.epochs)
        if sweep.scheduler.type == "asha" and trial.run.checkpoint_every_steps:
            raise ConfigError(f"run.checkpoint_every_steps must be 0 in an ASHA sweep (ASHA counts one "
                              f"report per epoch), got {trial.run.checkpoint_every_steps}")
        # The optimiser's values are checked by the config itself; preflight the rest once.
        key = json.dumps(to_dict(trial) | {"optim": None}, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            trial_checked = preflight(trial)
        except ConfigError as err:
            raise ConfigError(f"{describe(sweep, point, str(err))}: {err}") from err
        plan.counts[_architecture(trial)] = trial_checked.parameter_counts
    plan.max_t = sweep.scheduler.max_t or max(epochs)
    if plan.max_t not in (max(epochs), 0):
        raise ConfigError(f"sweep.scheduler.max_t={sweep.scheduler.max_t} must be 0 or optim.epochs "
                          f"({max(epochs)}): trials train optim.epochs epochs")
    if sweep.scheduler.type == "asha" and sweep.scheduler.grace_period >= plan.max_t:
        raise ConfigError(f"sweep.scheduler.grace_period={sweep.scheduler.grace_period} must be < max_t "
                          f"({plan.max_t} epochs): ASHA can only stop a trial before its last epoch")
    return plan


def count_trials(sweep: SweepConfig) -> int:
    if sweep.search == "random":
        return sweep.num_samples
    total = len(sweep.variants) or 1
    for value in sweep.space.values():
        total *= 1 if is_distribution(value) else len(value)
    return total * sweep.num_samples


def _architecture(cfg: TrainConfig) -> str:
    return json.dumps([cfg.model.architecture(), cfg.head], sort_keys=True)


def parameter_counts(plan: SweepPlan, cfg: TrainConfig) -> dict[str, int]:
    key = _architecture(cfg)
    if key not in plan.counts:
        counts = count_parameters(build_without_weights(cfg.model, cfg.task, plan.head_kwargs | cfg.head))
        plan.counts[key] = {"adapter": counts.adapter, "trainable": counts.trainable}
    return plan.counts[key]


def check_snapshot(plan: SweepPlan) -> bool:
    """Refuse to continue a sweep under a different config; save it on first start.

    Returns:
        Whether the sweep was started before.
    """
    url = storage.join(plan.path, SNAPSHOT)
    current = {"config": plan.base, "sweep": to_dict(plan.sweep)}
    if storage.exists(url):
        saved = json.loads(storage.read_bytes(url))
        before, now = flatten(saved), flatten(json.loads(json.dumps(current)))
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            diff = ", ".join(f"{k}: {json.dumps(before.get(k))} -> {json.dumps(now.get(k))}" for k in changed[:5])
            raise ConfigError(f"sweep.name {plan.sweep.name!r} in {plan.path} was started with a different "
                              f"config ({diff}); continue it with the same config or pick a new sweep.name")
        return True
    if storage.is_local(plan.path):
        Path(storage.local_path(plan.path)).mkdir(parents=True, exist_ok=True)
    storage.atomic_write_bytes(url, json.dumps(current, indent=2).encode())
    return False


# -- 2. Tune ---------------------------------------------------------------------------------

def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param space: list axes -> grid_search (grid) or choice (random), distributions
    sampled; the variants axis first (grid order: the first axis varies fastest)."""
    from ray import tune

    def axis(values: list):
        return tune.grid_search(values) if sweep.search == "grid" else tune.choice(values)

    space: dict[str, Any] = {VARIANT_AXIS: axis(list(sweep.variants))} if sweep.variants else {}
    for key, value in sweep.space.items():
        if is_distribution(value):
            kind, (low, high) = next(iter(value.items()))
            space[key] = tune.loguniform(low, high) if kind == "loguniform" else tune.uniform(low, high)
        else:
            space[key] = axis(list(value))
    return space


def trial_resources(plan: SweepPlan) -> dict[str, float]:
    """What one trial's driver reserves (its Train workers reserve their own)."""
    return {"CPU": plan.sweep.driver_cpus, **{k: float(v) for k, v in plan.sweep.driver_resources.items()}}


def max_concurrent_trials(plan: SweepPlan, cluster: dict[str, float]) -> int:
    """`sweep.max_concurrent_trials`, or (0) as many trials as the cluster's resources hold:
    a trial = its driver + run.num_workers x (run.cpus_per_worker CPUs [+ 1 GPU])."""
    for key in plan.sweep.driver_resources:
        if cluster.get(key, 0) <= 0:
            raise ConfigError(f"sweep.driver_resources.{key}: the cluster has no resource {key!r} "
                              f"(cluster.yaml gives it to the head and the on-demand nodes)")
    if plan.sweep.max_concurrent_trials:
        return plan.sweep.max_concurrent_trials
    run = plan.cfg.run
    limits = [cluster.get("CPU", 0) / (plan.sweep.driver_cpus + run.num_workers * run.cpus_per_worker)]
    if run.use_gpu:
        limits.append(cluster.get("GPU", 0) / run.num_workers)
    limits += [cluster[k] / float(v) for k, v in plan.sweep.driver_resources.items()]
    return max(1, int(min(limits) + 1e-9))


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive a restored sweep.

    `Tuner.restore` brings the scheduler back as it was created, with empty rungs: restored
    trials would never be compared with those that already ran (and so never stopped). This
    one keeps its rungs in `state_url` (JSON, local or object storage), rewritten whenever a
    trial is recorded at a rung, and reads them back on first use. (It reads ASHA's brackets,
    `_brackets[i]._rungs` = [(milestone, {trial_id: score})], as in Ray 2.60.)
    """

    def __init__(self, state_url: str, **kwargs):
        super().__init__(**kwargs)
        self._state_url, self._loaded = state_url, False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if storage.exists(self._state_url):
            saved = json.loads(storage.read_bytes(self._state_url))
            for bracket, rungs in zip(self._brackets, saved["brackets"]):
                for (_, recorded), (_, values) in zip(bracket._rungs, rungs):
                    recorded.update(values)

    def _recorded(self) -> int:
        return sum(len(recorded) for bracket in self._brackets for _, recorded in bracket._rungs)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        before = self._recorded()
        action = super().on_trial_result(tune_controller, trial, result)
        if self._recorded() != before:
            brackets = [[[milestone, recorded] for milestone, recorded in b._rungs] for b in self._brackets]
            storage.atomic_write_bytes(self._state_url, json.dumps({"brackets": brackets}).encode())
        return action


def remove_orphaned_placement_groups() -> int:
    """Release the Train workers' resources of trials that ended without their Train controller
    shutting down: what ASHA stopping a trial does (Tune kills the trial driver, and with it
    the controller), so that the trials after it can start.

    Ray keeps a placement group whose creator actor died until the whole job ends; Ray Train
    V2 removes its workers' one from a detached "PlacementGroupCleaner" actor, which finds the
    cluster through the state API and fails whenever that cannot: no dashboard (local Ray as
    in the tests), several local Ray instances or a stale /tmp/ray/ray_current_cluster, or
    RAY_ADDRESS=local. Measured here: 3 stopped trials' worker groups left the 2-CPU demo
    sweep waiting forever. This removes, in this job only, every live placement group whose
    creator was an actor that is now dead (the driver's own groups, e.g. Tune's per-trial
    ones, have no creator actor and are left alone). It reads the GCS placement-group table
    through Ray's internal GlobalState accessor (as in Ray 2.60).

    Returns:
        How many placement groups were removed.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (info.state == gcs_pb2.PlacementGroupTableData.REMOVED or info.is_detached
                or not info.creator_actor_dead or info.creator_job_id.hex() != job
                or ray.ActorID(info.creator_actor_id).is_nil()):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
        removed += 1
    return removed


class ReleaseStoppedTrials(Callback):
    """Tune callback: `remove_orphaned_placement_groups` every few seconds of the sweep (at the
    end of Tune's control-loop steps)."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s, self._last = interval_s, 0.0

    def on_step_end(self, iteration: int, trials: list, **info):
        if time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            try:
                removed = remove_orphaned_placement_groups()
            except Exception as err:  # noqa: BLE001 - never fail a sweep over the clean-up
                print(f"sweep: could not check for orphaned placement groups: {err}")
                return
            if removed:
                print(f"sweep: released the Train workers' resources of {removed} stopped trial(s)")


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def make_trainable(plan: SweepPlan, parent_run_id: str):
    """The trial driver Tune runs per trial, with its resources."""
    from ray import tune

    setup = {"base": plan.base, "sweep": to_dict(plan.sweep), "parent_run_id": parent_run_id}

    def avpea_trial(config: dict) -> None:
        run_trial(config, setup)

    return tune.with_resources(avpea_trial, trial_resources(plan))


def run_trial(point: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial: its TrainConfig, its nested MLflow run, and a TorchTrainer reporting to Tune.

    The Train run is named `<sweep>-<trial id>` in the sweep's storage path: a trial Tune
    restarts (or a restored sweep continues) resumes from its latest checkpoint."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.launcher import build_trainer, finish_tracking, start_tracking, summarize
    from ..train.resume import claim_run_folder

    start = time.time()
    sweep = from_dict(SweepConfig, setup["sweep"], "sweep.")
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup["base"], sweep, point)
    checked = preflight(replace(cfg, run=replace(cfg.run, name=f"{sweep.name}-{trial_id}")))
    claim_run_folder(checked.run_url, to_dict(checked.cfg), checked.data_ids)
    label = variant_label(sweep, checked.cfg, point)
    run_id, _ = start_tracking(
        checked, run_name=f"{trial_id} {label} r={cfg.model.reduction_factor} lr={cfg.optim.lr:.2g}",
        parent_run_id=setup["parent_run_id"])
    client = MlflowClient(checked.tracking_uri)
    for key, value in {"avpea.sweep": sweep.name, "avpea.trial_id": trial_id, "avpea.variant": label}.items():
        client.set_tag(run_id, key, value)
    trainer = build_trainer(checked, run_id=run_id, callbacks=[TuneReportCallback()])
    # A trial ASHA stops is ended mid-fit (its driver and Train workers are killed): the sweep
    # driver closes its run afterwards, as it does for trials that fail.
    result = trainer.fit()
    summary = summarize(checked, dict(result.metrics or {}), run_id, result.checkpoint, time.time() - start)
    finish_tracking(checked.tracking_uri, run_id, checked.cfg, summary, result.checkpoint)


def make_scheduler(sweep: SweepConfig, epochs: int, state_url: str) -> ResumableASHA | None:
    """ASHA over epochs (None for "fifo"), its rungs at grace_period x asha_reduction_factor^k
    epochs, all before the last epoch: ASHA's own max_t is one epoch less (a trial that trained
    all its epochs is never cut before its test evaluation), and stop_last_trials=False lets
    trials past it finish."""
    sched = sweep.scheduler
    if sched.type != "asha":
        return None
    return ResumableASHA(state_url, time_attr="training_iteration", metric=sched.metric, mode=sched.mode,
                         max_t=epochs - 1, grace_period=sched.grace_period,
                         reduction_factor=sched.asha_reduction_factor, stop_last_trials=False)


def build_tuner(plan: SweepPlan, parent_run_id: str, concurrency: int):
    """A new Tuner, or the sweep's own restored one (same storage path + name)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = make_trainable(plan, parent_run_id)
    if tune.Tuner.can_restore(plan.path):
        return tune.Tuner.restore(plan.path, trainable=trainable, resume_errored=True), True
    sched = plan.sweep.scheduler
    # Beside Tune's experiment dir, not in it: Tune syncs its own (stale) copy of that dir back
    # over files written there while it runs.
    scheduler = make_scheduler(plan.sweep, plan.max_t, storage.join(
        plan.cfg.run.storage_path, f"{plan.sweep.name}-asha-rungs.json"))
    tune_config = tune.TuneConfig(
        # The variant generator limits concurrency itself (Tune ignores max_concurrent_trials
        # with a generator); its seed makes the sampled configs reproducible.
        scheduler=scheduler,
        search_alg=BasicVariantGenerator(max_concurrent=concurrency, random_state=plan.sweep.seed),
        num_samples=plan.sweep.num_samples, reuse_actors=False,
        trial_dirname_creator=_trial_dirname,
        **({} if scheduler else {"metric": sched.metric, "mode": sched.mode}))
    run_config = tune.RunConfig(name=plan.sweep.name, storage_path=plan.cfg.run.storage_path,
                                failure_config=tune.FailureConfig(max_failures=0),
                                callbacks=[ReleaseStoppedTrials()])
    return tune.Tuner(trainable, param_space=param_space(plan.sweep), tune_config=tune_config,
                      run_config=run_config), False


# -- 3. the whole sweep ----------------------------------------------------------------------

def run_sweep(cfg: TrainConfig, sweep: SweepConfig) -> dict[str, Any]:
    """Run (or continue) a sweep to the end and return its summary."""
    import ray

    from ..train.tracking import finish_run

    start = time.time()
    plan = prepare_sweep(cfg, sweep)
    print(f"sweep {sweep.name}: {plan.num_trials} trials ({sweep.search} search over "
          f"{', '.join(([VARIANT_AXIS] if sweep.variants else []) + list(sweep.space))}), "
          f"{plan.max_t} epochs each, {_scheduler_line(plan)}")
    print(f"  in {plan.path}; tracking {redact_uri(plan.tracking_uri)}")
    print(init_ray())
    concurrency = max_concurrent_trials(plan, ray.cluster_resources())
    resumed = check_snapshot(plan)
    parent_id = start_parent(plan)
    print(f"  {concurrency} trial(s) at a time, each driver reserving {trial_resources(plan)}; "
          f"MLflow parent run {parent_id}" + ("; continuing the sweep" if resumed else ""))
    tuner, restored = build_tuner(plan, parent_id, concurrency)
    try:
        grid = tuner.fit()
    except Exception:
        finish_run(plan.tracking_uri, parent_id, [], status="FAILED")
        raise
    remove_orphaned_placement_groups()  # the last stopped trials' (the cluster may live on)
    trials = collect_trials(plan, grid)
    summary = make_summary(plan, trials, parent_id, restored, time.time() - start)
    finish_children(plan, parent_id, trials)
    publish_summary(plan, parent_id, summary)
    return summary


def _scheduler_line(plan: SweepPlan) -> str:
    s = plan.sweep.scheduler
    if s.type != "asha":
        return "no early stopping"
    return (f"ASHA on {s.metric} ({s.mode}; grace_period {s.grace_period} epochs, "
            f"asha_reduction_factor {s.asha_reduction_factor:g}, max_t {plan.max_t})")


def start_parent(plan: SweepPlan) -> str:
    """Find or create the sweep's MLflow parent run (params: the sweep section and the base
    config's keys the sweep does not set)."""
    from ..train.tracking import start_or_resume_run

    swept = set(plan.sweep.space) | {k for v in plan.sweep.variants.values() for k in v}
    params = {k: v for k, v in flatten(plan.base).items() if k not in swept and k != "run.name"}
    params |= {f"sweep.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
               for k, v in flatten(to_dict(plan.sweep)).items()}
    local = storage.is_local(plan.cfg.run.storage_path) and plan.tracking_uri.startswith("sqlite")
    run_id, _ = start_or_resume_run(plan.tracking_uri, plan.cfg.run.experiment, f"sweep:{plan.path}",
                                    plan.sweep.name, params,
                                    str(Path(plan.cfg.run.storage_path) / "mlflow-artifacts") if local else None)
    from mlflow.tracking import MlflowClient
    MlflowClient(plan.tracking_uri).set_tag(run_id, "avpea.sweep", plan.sweep.name)
    return run_id


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
    return {"sweep": plan.sweep.name, "path": plan.path, "task": plan.cfg.task, "metric": plan.sweep.scheduler.metric,
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
    from ..train.tracking import finish_run

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


# -- summary files -----------------------------------------------------------------------------

COLUMNS = ("trial_id", "variant", "reduction_factor", "gating", "cross_attention", "adapters", "lr",
           "trainable_params", "adapter_params", "best", "epochs_run", "stopped_early", "status", "checkpoint")


def _columns(summary: dict) -> list[str]:
    key = f"best_{summary['metric']}"
    extra = sorted({k for t in summary["trials"] for k in t["config"]} -
                   {VARIANT_AXIS, "model.reduction_factor", "model.gating", "model.cross_attention",
                    "model.adapters", "optim.lr"})
    return [key if c == "best" else c for c in COLUMNS] + extra


def trials_csv(summary: dict) -> str:
    columns = _columns(summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for trial in summary["trials"]:
        writer.writerow(trial | {k: v for k, v in trial["config"].items() if k in columns})
    return buffer.getvalue()


def format_table(summary: dict) -> str:
    """The trials table the job prints."""
    key = f"best_{summary['metric']}"
    head = f"{'trial':<13}{'variant':<18}{'r':>4}  {'gating':<8}{'lr':>9}{'trainable':>11}{key:>16}" \
           f"{'epochs':>8}  {'stopped early':<14}"
    lines = [head, "-" * len(head)]
    for t in summary["trials"]:
        score = f"{t[key]:.2f}" if t[key] is not None else "-"
        lines.append(f"{str(t['trial_id']):<13}{t['variant'][:17]:<18}{t['reduction_factor']:>4}  {t['gating']:<8}"
                     f"{t['lr']:>9.2e}{t['trainable_params']:>11,}{score:>16}{t['epochs_run']:>8}  "
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
    primary = {"avqa": "AVQA overall accuracy, %", "avel": "AVE accuracy, %",
               "avr": "text->video R@1+R@5+R@10", "avc": "CIDEr"}.get(summary["task"], "")
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


# -- the job's command line --------------------------------------------------------------------

def parse_sweep_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. optim.epochs=3 sweep.num_samples=8")
    parser.add_argument("--config", help="sweep file: a training config plus a `sweep` section")
    parser.add_argument("--name", help="sweep name (sweep.name): the same name again continues the sweep")
    parser.add_argument("--storage-path", help="where the sweep lives: local dir or s3://bucket/prefix")
    parser.add_argument("--max-concurrent-trials", type=int,
                        help="trials at a time (sweep.max_concurrent_trials; 0: from the cluster)")
    parser.add_argument("--summary-json", help="also write the sweep summary here")
    return parser.parse_intermixed_args(argv)


def sweep_flags(args: argparse.Namespace) -> dict[str, object]:
    """The flags as typed config values (dotted key -> value; they win over overrides).
    Set as values, not as override text, so that no character in a name or path is parsed."""
    flags = {"sweep.name": args.name, "run.storage_path": args.storage_path,
             "sweep.max_concurrent_trials": args.max_concurrent_trials}
    return {k: v for k, v in flags.items() if v is not None}


def report_sweep(summary: dict, summary_json: str | None = None) -> None:
    """Print the trials table and the best trial; write --summary-json."""
    key = f"best_{summary['metric']}"
    print(format_table(summary))
    best = summary["best"]
    if best:
        print(f"\nbest trial {best['trial_id']}: {best['variant']}, model.reduction_factor={best['reduction_factor']}, "
              f"optim.lr={best['lr']:.2e}: {key} {best[key]:.2f} after {best['epochs_run']} epochs")
        test_metric = f"test_{TASKS[summary['task']].primary_metric}"
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
    if summary_json:
        Path(summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_json).write_text(json.dumps(summary, indent=2, default=str))
        print(f"summary written to {summary_json}")
