"""Hyperparameter sweeps: Ray Tune over Ray Train (V2), ASHA, one MLflow parent run per sweep.

    run_sweep(cfg, sweep)  ->  summary {"trials": [...], "best": {...}, ...}

1. `prepare_sweep` (plan.py) checks everything before any trial starts.
2. A Tune trial is a *trial driver* (`tune.with_resources(fn, {"CPU": driver_cpus, ...})`)
   that fits its own run with `train.fit.fit_run` (the same sequence as a single run) and
   `TuneReportCallback`, so each epoch's `ray.train.report` reaches Tune and ASHA.
   ASHA counts epochs (`training_iteration`: one result per epoch end); its rungs all sit
   before a trial's last epoch, so a trial that trains all its epochs also runs its final
   test evaluation.
3. MLflow: one parent run per sweep, one nested child run per trial, which is that trial's
   training run; the parent gets the summary (report.py). Running the same sweep name (and
   storage path) again restores the Tuner and finds the same parent and child runs.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_dict, to_dict
from ..data import storage
from ..tasks import get_task, register
from ..train.cluster import init_ray, quiet_known_noise
from ..train.preflight import preflight
from ..train.tracking import finish_run, flatten, redact_uri, start_or_resume_run
from .config import VARIANT_AXIS, SweepConfig, is_distribution, trial_config, variant_label
from .plan import SweepPlan, check_snapshot, prepare_sweep
from .ray_workarounds import ReleaseStoppedTrials, ResumableASHA, release_ended_trials
from .report import collect_trials, finish_children, make_summary, publish_summary

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
    limits = [cluster.get("CPU", 0) / (plan.sweep.driver_cpus + run.max_workers * run.cpus_per_worker)]
    if run.use_gpu:
        limits.append(cluster.get("GPU", 0) / run.max_workers)
    limits += [cluster[k] / float(v) for k, v in plan.sweep.driver_resources.items()]
    return max(1, int(min(limits) + 1e-9))


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def make_trainable(plan: SweepPlan, parent_run_id: str):
    """The trial driver Tune runs per trial, with its resources."""
    from ray import tune

    setup = {"base": plan.base, "sweep": to_dict(plan.sweep), "parent_run_id": parent_run_id,
             "task": get_task(plan.cfg.task)}

    def avpea_trial(config: dict) -> None:
        run_trial(config, setup)

    return tune.with_resources(avpea_trial, trial_resources(plan))


def run_trial(point: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial: its TrainConfig, its nested MLflow run, and a TorchTrainer reporting to Tune.

    The Train run is named `<sweep>-<trial id>` in the sweep's storage path: a trial Tune
    restarts (or a restored sweep continues) resumes from its latest checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.fit import fit_run

    register(setup["task"])
    sweep = from_dict(SweepConfig, setup["sweep"], "sweep.")
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup["base"], sweep, point)
    checked = preflight(replace(cfg, run=replace(cfg.run, name=f"{sweep.name}-{trial_id}")))
    label = variant_label(sweep, checked.cfg, point)
    # A trial ASHA stops is ended mid-fit (its driver and Train workers are killed): the sweep
    # driver closes its run afterwards, as it does for trials that fail.
    fit_run(checked, mlflow_name=f"{trial_id} {label} r={cfg.model.reduction_factor} lr={cfg.optim.lr:.2g}",
            parent_run_id=setup["parent_run_id"], callbacks=[TuneReportCallback()],
            tags={"avpea.sweep": sweep.name, "avpea.trial_id": trial_id, "avpea.variant": label})


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
                                # 1: Tune's live table of trials only; its boxes of every
                                # trial's config and results with run.verbose (--verbose).
                                verbose=3 if plan.cfg.run.verbose else 1,
                                callbacks=[ReleaseStoppedTrials()])
    return tune.Tuner(trainable, param_space=param_space(plan.sweep), tune_config=tune_config,
                      run_config=run_config), False


def run_sweep(cfg: TrainConfig, sweep: SweepConfig) -> dict[str, Any]:
    """Run (or continue) a sweep to the end and return its summary."""
    import ray

    start = time.time()
    plan = prepare_sweep(cfg, sweep)
    print(f"sweep {sweep.name}: {plan.num_trials} trials ({sweep.search} search over "
          f"{', '.join(([VARIANT_AXIS] if sweep.variants else []) + list(sweep.space))}), "
          f"{plan.max_t} epochs each, {_scheduler_line(plan)}")
    print(f"  in {plan.path}; tracking {redact_uri(plan.tracking_uri)}")
    quiet_known_noise(cfg.run.verbose)
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
    release_ended_trials()  # the last stopped trials' (the cluster may live on)
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

