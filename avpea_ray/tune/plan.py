"""A checked sweep: every point of the space goes through the training preflight before any
trial starts (a ConfigError names the sweep field), and the sweep's config snapshot refuses a
continued sweep whose config changed."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, to_dict
from ..data import storage
from ..model.params import count_parameters
from ..tasks import build_model
from ..train.config import TrainConfig
from ..train.preflight import preflight
from ..train.tracking import flatten
from .config import SweepConfig, check_point, describe, discrete_points, is_distribution

SNAPSHOT = "avpea_sweep.json"  # the resolved config a sweep was started with


@dataclass
class SweepPlan:
    """A checked sweep: what the driver and every trial need."""

    cfg: TrainConfig                 # the base config (absolute paths, run.name = sweep name)
    sweep: SweepConfig
    path: str                        # <run.storage_path>/<sweep.name>: Tune's experiment dir
    tracking_uri: str
    head_args: dict[str, Any]
    max_t: int                       # epochs per trial (ASHA's max_t)
    num_trials: int
    counts: dict[str, dict] = field(default_factory=dict)  # architecture -> parameter counts

    @property
    def base(self) -> dict[str, Any]:
        return to_dict(self.cfg)


def prepare_sweep(cfg: TrainConfig, sweep: SweepConfig) -> SweepPlan:
    """Check the base config and every point of the space; no Ray needed.

    Raises:
        ConfigError: naming the field (sweep.space.model.reduction_factor=7: ..., data.train: ...).
    """
    sweep.check_not_empty()
    checked = preflight(replace(cfg, run=replace(cfg.run, name=sweep.name)))
    base = to_dict(checked.cfg)
    plan = SweepPlan(checked.cfg, sweep, storage.join(checked.cfg.run.storage_path, sweep.name),
                     checked.tracking_uri, checked.head_args, 0, count_trials(sweep))
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
    return json.dumps([cfg.model.architecture(), to_dict(cfg)["head"]], sort_keys=True)


def parameter_counts(plan: SweepPlan, cfg: TrainConfig) -> dict[str, int]:
    key = _architecture(cfg)
    if key not in plan.counts:
        counts = count_parameters(build_model(cfg.model, cfg.task, plan.head_args | to_dict(cfg)["head"], meta=True))
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

