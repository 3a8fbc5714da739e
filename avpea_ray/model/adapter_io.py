"""Adapter files, PEFT-style: `adapter_config.json` beside `adapter_model.safetensors`.

Only the adapters and the head are saved (a few MB); the frozen backbone comes from its own
weights when loading (`avpea_ray.tasks.load_model` rebuilds the whole model from such a
directory). Loading refuses a model whose architecture differs from the saved one and
names the fields that differ.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..config import from_dict, to_dict
from .config import ModelConfig
from .task_model import AVPEAModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "avpea-adapter/1"


class AdapterMismatchError(ValueError):
    """Saved adapters do not fit the model they are loaded into."""


def adapter_config(model: AVPEAModel) -> dict[str, Any]:
    """What `adapter_config.json` holds for `model`."""
    return {
        "format": FORMAT,
        "task": model.task,
        "model": to_dict(model.config),
        "head": model.head_spec.get("args", {}),
        "trainable_parameters": sum(p.numel() for _, p in model.trainable_named_parameters()),
    }


def save_adapters(model: AVPEAModel, directory: str | Path,
                  extra: dict[str, Any] | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapters + head of `model` into `directory` (created if needed).

    Each file is written to a temporary name and renamed, so a crash leaves the previous files
    whole.

    Args:
        model: the model to save.
        directory: where `adapter_config.json` and `adapter_model.safetensors` go.
        extra: more JSON-able metadata for the config file (e.g. the metric it was chosen on).
        tensors: save this trainable state (e.g. the best epoch's) instead of the model's current
            one; it must have the same names.

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model) | ({"extra": extra} if extra else {})
    tensors = {k: v.detach().contiguous().cpu()
               for k, v in (tensors if tensors is not None else model.trainable_state_dict()).items()}
    atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": FORMAT}))
    atomic_write(directory / CONFIG_NAME,
            lambda path: Path(path).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The saved `adapter_config.json`, checked for its format."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}: not an adapter directory")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise AdapterMismatchError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def saved_model_config(saved: dict[str, Any], **changes: Any) -> ModelConfig:
    """The ModelConfig an adapter config records (fields older versions also recorded there,
    the clips' frame and audio settings, now live in the shard index and are skipped)."""
    known = {f.name for f in fields(ModelConfig)}
    return from_dict(ModelConfig, {k: v for k, v in saved["model"].items() if k in known} | changes)


# Head arguments that change how a head trains, not what its tensors mean: a run may start
# from adapters saved with other values (AVQA's grounding stage initialising its QA stage).
TRAINING_ONLY_HEAD_ARGS = frozenset({"stage", "match_weight"})


def initialise_from(model: AVPEAModel, saved: dict[str, Any], tensors: dict[str, torch.Tensor],
                    source: str, check_only: bool = False) -> tuple[list[str], list[str]]:
    """Start a model from saved adapters + head (another run's `best_adapters`).

    Every saved tensor goes into the model's tensor of the same name; the model's trainable
    tensors the source does not have (e.g. the QA modules after a grounding stage) keep their
    fresh initialisation.

    Args:
        saved: the source's `adapter_config.json`; tensors: its weights.
        source: where they came from, for messages.
        check_only: check the fit without copying (a model on the meta device).

    Returns:
        (the names loaded, the model's trainable names left fresh).

    Raises:
        AdapterMismatchError: another task, architecture field or head argument (other than
            TRAINING_ONLY_HEAD_ARGS), or a saved tensor with no place of its shape in the model;
            the message names each.
    """
    differences = [f"task: saved {saved['task']!r}, model {model.task!r}"] if saved["task"] != model.task else []
    for name, value in saved_model_config(saved).architecture().items():
        if getattr(model.config, name) != value:
            differences.append(f"model.{name}: saved {value!r}, model {getattr(model.config, name)!r}")
    head_args = model.head_spec.get("args", {})
    for name in sorted((set(saved["head"]) | set(head_args)) - TRAINING_ONLY_HEAD_ARGS):
        if saved["head"].get(name) != head_args.get(name):
            differences.append(f"head.{name}: saved {saved['head'].get(name)!r}, model {head_args.get(name)!r}")
    expected = model.trainable_state_dict()
    differences += [f"tensor {k}: not trainable in this model" for k in sorted(set(tensors) - set(expected))][:4]
    differences += [f"tensor {k}: saved {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
                    for k in sorted(set(tensors) & set(expected)) if tensors[k].shape != expected[k].shape][:4]
    if differences:
        raise AdapterMismatchError(f"model.init_from: {source!r} does not fit this model: " + "; ".join(differences))
    if not check_only:
        model.load_state_dict(tensors, strict=False)
    return sorted(tensors), sorted(set(expected) - set(tensors))


def load_adapters(model: AVPEAModel, directory: str | Path) -> AVPEAModel:
    """Load saved adapters + head into `model`, refusing a mismatched architecture.

    Raises:
        AdapterMismatchError: the task, an architecture field of the model config, a head
            argument, or the tensors' names/shapes differ; the message names each difference.
    """
    saved = read_adapter_config(directory)
    saved_model = saved_model_config(saved)
    differences = [f"task: saved {saved['task']!r}, model {model.task!r}"] if saved["task"] != model.task else []
    for name, value in saved_model.architecture().items():
        current = getattr(model.config, name)
        if current != value:
            differences.append(f"model.{name}: saved {value!r}, model {current!r}")
    head_args = model.head_spec.get("args", {})
    for name in sorted(set(saved["head"]) | set(head_args)):
        if saved["head"].get(name) != head_args.get(name):
            differences.append(f"head.{name}: saved {saved['head'].get(name)!r}, "
                               f"model {head_args.get(name)!r}")
    if differences:
        raise AdapterMismatchError(f"adapters in {str(directory)!r} do not fit this model: "
                                   + "; ".join(differences))

    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    expected = model.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong_shape = [k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape]
    if missing or unexpected or wrong_shape:
        raise AdapterMismatchError(
            f"adapter weights in {str(directory)!r} do not fit: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, wrong shape {sorted(wrong_shape)[:4]}")
    model.load_state_dict(tensors, strict=False)
    return model
