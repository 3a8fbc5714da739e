"""The tasks and their registry: a task is one module here and one entry in `TASKS`.

    task = make_task(cfg, train_index)            # what the run's data says (vocab, classes)
    model = build_model(cfg.model, cfg.task, task.head_args())
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..model.adapter_io import load_adapters, read_adapter_config, saved_model_config
from ..model.config import ModelConfig
from ..model.task_model import AVPEAModel
from .avc import AVCTask
from .avel import AVELTask
from .avqa import AVQATask
from .avqa_gen import AVQAGenTask
from .avr import AVRTask
from .base import Batch, Task

TASKS: dict[str, type[Task]] = {task.name: task for task in (AVQATask, AVELTask, AVRTask, AVCTask,
                                                                   AVQAGenTask)}


def register(task: type[Task]) -> type[Task]:
    """Add a task to the registry (usable as a class decorator)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


def make_task(cfg, train_index) -> Task:
    """The task object `cfg.task` names, with what it needs from the train split's index."""
    return get_task(cfg.task).from_config(cfg, train_index)


def build_model(config: ModelConfig, task: str, head_args: dict[str, Any],
                backbone: nn.Module | None = None, meta: bool = False) -> AVPEAModel:
    """The trunk `config` describes with the head of `task`, built with `head_args`.

    Args:
        backbone: an already built timm ViT (tests' tiny ones) instead of `config`'s.
        meta: shapes only, on the meta device: no memory, no weights, no download.
    """
    if meta:
        config = ModelConfig(**{**config.__dict__, "weights": "random"})
        with torch.device("meta"):
            return build_model(config, task, head_args, backbone)
    head = functools.partial(get_task(task).head_class, **head_args)  # built after the trunk
    return AVPEAModel(config, head, head_spec={"task": task, "args": dict(head_args)}, backbone=backbone)


def load_model(directory: str | Path, weights: str | None = None) -> AVPEAModel:
    """Build the model a saved adapter directory describes and load its adapters.

    Args:
        directory: the adapter directory (`save_adapters`' output, a checkpoint's best_adapters).
        weights: the frozen backbone's weights ("timm", "random" or a file); default: as saved.
    """
    saved = read_adapter_config(directory)
    config = saved_model_config(saved, **({"weights": weights} if weights is not None else {}))
    return load_adapters(build_model(config, saved["task"], saved["head"]), directory)


__all__ = ["TASKS", "Batch", "Task", "build_model", "get_task", "load_model", "make_task", "register"]
