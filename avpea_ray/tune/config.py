"""SweepConfig: the `sweep` section of a sweep file, and the checks that run before any trial.

A sweep file is a training config (task, model, head, data, optim, run: see
`avpea_ray.train.config`) plus a `sweep` section:

    sweep:
      name: avqa-b16-sweep            # same name + run.storage_path again = resume
      search: grid                    # grid | random
      num_samples: 1                  # grid: repeats of the grid; random: trials
      space:                          # TrainConfig key -> values
        model.reduction_factor: [4, 8, 16, 32]   # grid: one axis; random: a choice
        optim.lr: {loguniform: [1.0e-4, 1.0e-3]} # sampled (per grid point in grid mode)
      variants:                       # named bundles of overrides: one more axis
        learned: {}                   # the paper: learned scalar gates, cross-attention, both streams
        open-gates: {model.gating: open}
        no-cross-attention: {model.cross_attention: false}
      scheduler: {type: asha, metric: val_score, mode: max, max_t: 0, grace_period: 1,
                  asha_reduction_factor: 2}
      max_concurrent_trials: 0        # 0: from the cluster's resources
      driver_cpus: 0.25
      driver_resources: {on_demand: 0.01}

ASHA's own reduction factor is `sweep.scheduler.asha_reduction_factor` everywhere (config,
logs, MLflow); `model.reduction_factor` is always the adapter's bottleneck D / d.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import ConfigError, from_dict, load_config, merge
from ..train.config import TrainConfig

SEARCHES = ("grid", "random")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("loguniform", "uniform")
VARIANT_AXIS = "variant"  # the name of the variants axis in Tune's param space
# Keys a sweep sets itself, per trial.
RESERVED = ("run.name", "run.storage_path", "run.tracking_uri", "run.experiment")


@dataclass
class SchedulerConfig:
    """Early stopping.

    Attributes:
        type: "asha" (asynchronous successive halving) or "fifo" (every trial runs all epochs).
        metric: the reported validation metric ASHA compares; `val_score` is the task's primary
            one (AVQA overall accuracy, AVE accuracy, in %).
        mode: "max" or "min".
        max_t: the epochs a trial may run; 0 = `optim.epochs` (the only other value allowed).
        grace_period: epochs every trial runs before it can be stopped.
        asha_reduction_factor: ASHA's halving rate (rungs at grace_period x factor^k epochs
            before the last epoch; at each rung a trial below the top 1/factor so far stops).
            Not the adapter's `model.reduction_factor`.
    """

    type: str = "asha"
    metric: str = "val_score"
    mode: str = "max"
    max_t: int = 0
    grace_period: int = 1
    asha_reduction_factor: float = 2.0

    def __post_init__(self):
        if self.type not in SCHEDULERS:
            raise ConfigError(f"sweep.scheduler.type must be one of {list(SCHEDULERS)}, got {self.type!r}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"sweep.scheduler.mode must be 'max' or 'min', got {self.mode!r}")
        if not self.metric.startswith("val_"):
            raise ConfigError(f"sweep.scheduler.metric must be a validation metric (val_score, "
                              f"val_<metric>), got {self.metric!r}")
        if self.max_t < 0:
            raise ConfigError(f"sweep.scheduler.max_t must be >= 0 (0: optim.epochs), got {self.max_t!r}")
        if self.grace_period < 1:
            raise ConfigError(f"sweep.scheduler.grace_period must be >= 1, got {self.grace_period!r}")
        if not self.asha_reduction_factor > 1:
            raise ConfigError(f"sweep.scheduler.asha_reduction_factor must be > 1, "
                              f"got {self.asha_reduction_factor!r}")


@dataclass
class SweepConfig:
    """A hyperparameter sweep over training configs (Ray Tune over Ray Train).

    Attributes:
        name: the sweep's name; the sweep lives in `<run.storage_path>/<name>`, and running the
            same name again continues it. Default: `<task>-<backbone>-sweep`.
        search: "grid" (every combination of the list axes; distributions sampled per point)
            or "random" (`num_samples` trials, list axes sampled uniformly).
        num_samples: grid: how many times the grid is repeated; random: how many trials.
        seed: the random search's seed (the sampled configs are reproducible).
        space: dotted TrainConfig key -> list of values, or {"loguniform": [lo, hi]} /
            {"uniform": [lo, hi]}.
        variants: name -> overrides ({dotted key: value}) applied together: one more axis
            (the gating variants of the paper's ablations). Empty: no such axis.
        scheduler: early stopping (ASHA).
        max_concurrent_trials: trials at a time; 0 = as many as the cluster's CPUs/GPUs hold.
        driver_cpus: CPUs each trial's driver reserves (it only waits on its Train workers).
        driver_resources: extra resources each trial's driver asks for, e.g. {"on_demand":
            0.01} pins drivers to non-spot nodes (cluster.yaml gives them "on_demand").
    """

    name: str = ""
    search: str = "grid"
    num_samples: int = 1
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Any] = field(default_factory=dict)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent_trials: int = 0
    driver_cpus: float = 0.25
    driver_resources: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.search not in SEARCHES:
            raise ConfigError(f"sweep.search must be one of {list(SEARCHES)}, got {self.search!r}")
        if self.num_samples < 1:
            raise ConfigError(f"sweep.num_samples must be >= 1, got {self.num_samples!r}")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"sweep.max_concurrent_trials must be >= 0 (0: from the cluster's "
                              f"resources), got {self.max_concurrent_trials!r}")
        if self.driver_cpus < 0:
            raise ConfigError(f"sweep.driver_cpus must be >= 0, got {self.driver_cpus!r}")
        for key, amount in self.driver_resources.items():
            if key in ("CPU", "GPU"):
                raise ConfigError(f"sweep.driver_resources.{key}: use sweep.driver_cpus (drivers need no GPU)")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
                raise ConfigError(f"sweep.driver_resources.{key} must be a number > 0, got {amount!r}")
        if "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"sweep.name must be a plain name (no '/'), got {self.name!r}")
        self.space = flatten_space(self.space, "sweep.space")
        if not isinstance(self.variants, dict):
            raise ConfigError(f"sweep.variants must be a mapping name -> overrides, got {self.variants!r}")
        self.variants = {str(name): _flatten_overrides(v, f"sweep.variants.{name}")
                         for name, v in self.variants.items()}
        for name, overrides in self.variants.items():
            for key in overrides:
                if key in self.space:
                    raise ConfigError(f"sweep.variants.{name}.{key} is also an axis of sweep.space: "
                                      f"set it in one place")

    def check_not_empty(self) -> None:
        if not self.space and not self.variants:
            raise ConfigError("sweep.space is empty (and there are no sweep.variants): give at least "
                              "one axis, e.g. model.reduction_factor: [4, 8, 16, 32]")


@dataclass
class SweepFileConfig(TrainConfig):
    """A whole sweep file: the base training config plus its `sweep` section."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


def flatten_space(space: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """{"model": {"reduction_factor": [4, 8]}} or {"model.reduction_factor": [4, 8]} ->
    {"model.reduction_factor": [4, 8]}; each value checked (a non-empty list or a
    distribution)."""
    if not isinstance(space, dict):
        raise ConfigError(f"{where}{'.' + prefix.rstrip('.') if prefix else ''} must be a mapping of "
                          f"config keys to values, got {space!r}")
    out: dict[str, Any] = {}
    for sub, value in space.items():
        key = f"{prefix}{sub}"
        name = f"{where}.{key}"
        if isinstance(value, dict) and value and not any(k in DISTRIBUTIONS for k in value):
            out |= flatten_space(value, where, f"{key}.")
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                raise ConfigError(f"{name} is an empty list: give at least one value")
        elif is_distribution(value):
            kind, bounds = next(iter(value.items()))
            if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
                raise ConfigError(f"{name}.{kind} must be [low, high] numbers, got {bounds!r}")
            low, high = bounds
            if not low < high:
                raise ConfigError(f"{name}.{kind}: low {low!r} must be < high {high!r}")
            if kind == "loguniform" and not low > 0:
                raise ConfigError(f"{name}.loguniform: low must be > 0, got {low!r}")
        else:
            raise ConfigError(f"{name} must be a list of values or {{loguniform: [lo, hi]}} / "
                              f"{{uniform: [lo, hi]}}, got {value!r}")
        if key in RESERVED or key == VARIANT_AXIS:
            raise ConfigError(f"{name}: {key} is set by the sweep itself, it cannot be an axis")
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _flatten_overrides(overrides: Any, where: str, prefix: str = "") -> dict[str, Any]:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a mapping of config keys to values, got {overrides!r}")
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out |= _flatten_overrides(value, where, f"{prefix}{key}.")
        else:
            if f"{prefix}{key}" in RESERVED:
                raise ConfigError(f"{where}.{prefix}{key} is set by the sweep itself")
            out[f"{prefix}{key}"] = value
    return out


# -- loading -----------------------------------------------------------------------------------

def load_sweep_config(file: str | None, overrides: list[str] | tuple[str, ...] = (),
                      base: dict | None = None,
                      values: dict[str, Any] | None = None) -> tuple[TrainConfig, SweepConfig]:
    """The base training config and the sweep section: defaults <- base <- file <- overrides
    <- values (typed flags).

    Raises:
        ConfigError: an unknown key or bad value anywhere, naming the dotted field.
    """
    data = load_config(SweepFileConfig, file, overrides, base, values)
    sweep = data.sweep
    sweep.check_not_empty()
    train = TrainConfig(**{f.name: getattr(data, f.name) for f in fields(TrainConfig)})
    if not sweep.name:
        sweep.name = f"{train.task}-{train.model.backbone.split('.')[0]}-sweep"
    return train, sweep


# -- the trials' configs -----------------------------------------------------------------------

def trial_config(base: dict[str, Any], sweep: SweepConfig, point: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one point of the space: base <- its variant's overrides <- its axis
    values. `point` is Tune's config: {"variant": name, "model.reduction_factor": 8, ...}."""
    data = json.loads(json.dumps(base))
    overrides = dict(sweep.variants.get(point.get(VARIANT_AXIS), {}))
    overrides |= {k: v for k, v in point.items() if k != VARIANT_AXIS}
    for key, value in overrides.items():
        merge(data, key.split("."), value)
    return from_dict(TrainConfig, data)


def variant_label(sweep: SweepConfig, cfg: TrainConfig, point: dict[str, Any]) -> str:
    """The gating variant a trial belongs to (a line in the plot): its variant name, else what
    its gating, cross-attention and adapter placement make it."""
    if VARIANT_AXIS in point:
        return str(point[VARIANT_AXIS])
    label = cfg.model.gating
    if not cfg.model.cross_attention:
        label += ", no cross-attention"
    if cfg.model.adapters != "both":
        label += f", {cfg.model.adapters} only"
    return label


def discrete_points(sweep: SweepConfig, limit: int = 256) -> list[dict[str, Any]]:
    """Points that cover every value of the space for checking before any trial starts.

    Every combination of the list axes and variants (distributions at both ends); when that is
    more than `limit`, each value once against the base instead.
    """
    axes: dict[str, list] = {}
    if sweep.variants:
        axes[VARIANT_AXIS] = list(sweep.variants)
    for key, value in sweep.space.items():
        axes[key] = list(next(iter(value.values()))) if is_distribution(value) else list(value)
    sizes = [len(v) for v in axes.values()]
    total = 1
    for size in sizes:
        total *= size
    if total <= limit:
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    return [{key: value} for key, values in axes.items() for value in values]


def check_point(base: dict[str, Any], sweep: SweepConfig, point: dict[str, Any]) -> TrainConfig:
    """`trial_config`, with any error naming the sweep field it came from."""
    try:
        return trial_config(base, sweep, point)
    except ConfigError as err:
        raise ConfigError(f"{describe(sweep, point, str(err))}: {err}") from err


def describe(sweep: SweepConfig, point: dict[str, Any], message: str = "") -> str:
    """'sweep.space.model.reduction_factor=7' for the axis a message is about, else the whole
    point."""
    keys = {k: v for k, v in point.items() if k != VARIANT_AXIS}
    variant = sweep.variants.get(point.get(VARIANT_AXIS), {})
    for key, value in keys.items():
        if key in message:
            return f"sweep.space.{key}={json.dumps(value)}"
    for key, value in variant.items():
        if key in message:
            return f"sweep.variants.{point[VARIANT_AXIS]}.{key}={json.dumps(value)}"
    return "sweep point " + json.dumps(point)
