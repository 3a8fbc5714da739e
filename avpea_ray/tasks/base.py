"""What every task declares, and the pieces tasks share.

A task is one module under `avpea_ray/tasks/` with one class (and one line in the registry,
`avpea_ray/tasks/__init__.py`). The class declares:

    name            the `task:` value in a config, e.g. "avqa"
    dataset         what its shards must hold (`shards.json`'s "dataset")
    head_class      the head module, built as `head_class(trunk_width, **head_args)`
    head_config     a dataclass: the `head:` section of a config, typed and checked
    primary_metric  the validation metric that selects checkpoints (`val_score`), and its label
    demo_config     the file under configs/ its job runs without --config (None: no demo)
    reference_head_args  the data-derived head arguments of the real dataset (parameter reports)

and implements `from_config` (what it needs from the train split's index), `data_head_args`,
`make_batch`, `loss`, `evaluator`, and optionally `check`, `summary`, `baseline_line`, and
`selection` / `variant` for a task whose config picks another stage (AVQA's grounding stage).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .distributed import is_distributed

if TYPE_CHECKING:
    from ..data.shards import ShardIndex


@dataclass
class Batch:
    """A batch moved to the device, split into model inputs and targets."""

    frames: torch.Tensor
    fbank: torch.Tensor
    head_inputs: dict[str, torch.Tensor]
    targets: dict[str, Any]


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without stalling the host: to a GPU through pinned memory,
    asynchronously (a copy from pageable memory waits for the device's queue to drain)."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_device(raw: dict, device: torch.device, head_inputs: dict, targets: dict) -> Batch:
    """A reader batch's frames and spectrograms on `device`, with the task's inputs/targets."""
    return Batch(frames=raw["frames"].to(device, non_blocking=True),
                 fbank=raw["fbank"].to(device, non_blocking=True),
                 head_inputs=head_inputs, targets=targets)


class Task:
    """The base of every task (see the module docstring for what a task declares)."""

    name: ClassVar[str]
    dataset: ClassVar[str]
    head_class: ClassVar[type[nn.Module]]
    head_config: ClassVar[type]
    primary_metric: ClassVar[str]
    primary_metric_label: ClassVar[str] = ""  # what val_score means, for plots
    demo_config: ClassVar[str | None] = None
    # The data-derived head arguments of the real dataset, for parameter reports without data.
    reference_head_args: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def selection(cls, cfg: Any) -> tuple[str, str]:
        """The validation metric that selects checkpoints for this config, and its label."""
        return cls.primary_metric, cls.primary_metric_label

    @classmethod
    def variant(cls, cfg: Any) -> str:
        """A name for what this config trains when it is not the task's usual run (e.g.
        "grounding"), part of the default run name; "" otherwise."""
        return ""

    @classmethod
    def from_config(cls, cfg: Any, index: "ShardIndex") -> "Task":
        """The task for a resolved TrainConfig, with what it needs from the train index."""
        return cls(cfg)

    def data_head_args(self) -> dict[str, Any]:
        """Head arguments that come from the data (vocabulary sizes, class counts)."""
        return {}

    def head_args(self) -> dict[str, Any]:
        """Everything the head is built with besides the trunk width."""
        return self.data_head_args() | asdict(self.cfg.head)

    def adapter_files(self) -> dict[str, bytes]:
        """Files saved beside the adapters that using them needs besides the weights (a
        vocabulary, class names): name -> content."""
        return {}

    def check(self, model: nn.Module) -> None:
        """Checks of this task's settings against the built model (on the meta device) and the
        machine, before any worker starts; raise ConfigError naming the field."""

    def make_batch(self, raw: dict, device: torch.device, training: bool = True) -> Batch:
        raise NotImplementedError

    def loss(self, head: nn.Module, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluator(self, final: bool = False):
        """An object with `update(model, batch)` and `compute(device) -> metrics`."""
        raise NotImplementedError

    @classmethod
    def summary(cls, scores: dict[str, float]) -> dict[str, Any]:
        """Task-specific lines of a run's summary (besides the metrics)."""
        return {}

    @classmethod
    def baseline_line(cls, metrics: dict[str, float]) -> str | None:
        """A sentence comparing the result with the task's trivial baseline."""
        return None


class CountEvaluator:
    """Sums a count-metric task's `counts` over a split, then across ranks (one all-reduce)."""

    def __init__(self, task):
        self.task, self.counts = task, None

    def update(self, model, batch: Batch) -> None:
        outputs = model(batch.frames, batch.fbank, **batch.head_inputs)
        counts = self.task.counts(outputs, batch)
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self, device) -> dict[str, float]:
        # A rank that got no sample contributes zeros of the right shape.
        counts = self.task.empty_counts(device) if self.counts is None else self.counts.to(device)
        if is_distributed():
            torch.distributed.all_reduce(counts)
        return self.task.metrics(counts.cpu())


DAMAGE_KEYS = ("samples_lost", "damaged_shards")  # in the metrics with data.allow_damaged
