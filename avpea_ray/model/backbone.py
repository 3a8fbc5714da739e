"""The frozen timm ViT: created by name, with weights from timm's hub, a local file, or random.

`weights` is one of:
- "random": timm's initialisation (tests, tiny demo models);
- "timm": the pretrained weights timm names for the backbone (`vit_base_patch16_224.augreg_in21k`
  is what the paper used), from the local Hugging Face cache or the hub;
- a path to a `.safetensors`, `.pth`, `.pt` or `.bin` state dict.

Offline with no cached copy, "timm" fails within seconds with a message saying what to do,
instead of timm's minutes of hub retries.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..config import ConfigError
from ..hub import hub_reachable



class WeightsError(ConfigError):
    """Pretrained weights could not be loaded; the message says why and what to do."""


def create_backbone(name: str, weights: str = "random", **kwargs) -> nn.Module:
    """Create a timm ViT by name and load its weights.

    Args:
        name: a timm model name, e.g. "vit_base_patch16_224.augreg_in21k".
        weights: "random", "timm", or a path to a local state-dict file.
        **kwargs: passed to `timm.create_model` (e.g. depth=2, embed_dim=64, img_size=32 for
            the tiny test backbones).

    Returns:
        The model, with its classifier head removed (`num_classes=0`).

    Raises:
        WeightsError: unknown model name, missing/mismatched weights file, or no way to get
            the pretrained weights.
    """
    kwargs.setdefault("num_classes", 0)
    base_name = name.split(".")[0]
    if not timm.list_models(base_name):
        raise WeightsError(f"unknown timm model {name!r} (see timm.list_models('vit_*'))")
    if weights == "random":
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights == "timm":
        return _create_pretrained_from_timm(name, **kwargs)
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_weights_file(model, weights)
    return model


def load_weights_file(model: nn.Module, path: str) -> None:
    """Load a local state dict into `model` (classifier weights are ignored).

    Raises:
        WeightsError: the file is missing, unreadable, or does not fit the model.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsError(f"weights file {path!r} does not exist (expected a .safetensors, "
                           f".pth, .pt or .bin state dict, or 'timm' / 'random')")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means the same to the user
        raise WeightsError(f"could not read weights file {path!r}: {err}") from err
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
    # A pretrained classifier does not fit the head-less backbone: leave it out.
    model_keys = set(model.state_dict())
    state = {key: value for key, value in
             ((k.removeprefix("module."), v) for k, v in state.items())
             if key in model_keys or not key.startswith(("head.", "fc_norm."))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches are raised even with strict=False
        raise WeightsError(f"weights file {path!r} does not fit the backbone: "
                           f"{str(err).splitlines()[1].strip()[:300]}") from err
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path!r} does not fit the backbone: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}")


def _create_pretrained_from_timm(name: str, **kwargs) -> nn.Module:
    # Without this check timm retries the hub for 45 s+ per file before failing.
    import huggingface_hub.constants as hf_constants

    online = hub_reachable()
    if not online:
        hf_constants.HF_HUB_OFFLINE = True  # read at call time: use the local cache only
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # noqa: BLE001
        where = "the Hugging Face hub" if online else "the local cache (the hub is unreachable)"
        raise WeightsError(
            f"could not load pretrained weights for {name!r} from {where}: "
            f"{type(err).__name__}: {str(err)[:200]}. Pass a local file instead "
            f"(model.weights=/path/to/{name.split('.')[0]}.safetensors) or model.weights=random."
        ) from err


FRAME_STATS = ("timm", "imagenet")


def frame_normalization(backbone: nn.Module,
                        stats: str = "timm") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std that input frames in [0, 1] are normalised with.

    Args:
        backbone: the timm ViT.
        stats: "timm": what the backbone's pretrained config says its training images were
            normalised with ((0.5, 0.5, 0.5) / (0.5, 0.5, 0.5) for the augreg ViTs), ImageNet's
            when it says nothing; "imagenet": ImageNet's (0.485, 0.456, 0.406) /
            (0.229, 0.224, 0.225) whatever the config says (LAVISH's data loaders).

    Raises:
        ValueError: `stats` is not one of FRAME_STATS.
    """
    if stats == "imagenet":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if stats != "timm":
        raise ValueError(f"frame_stats must be one of {list(FRAME_STATS)}, got {stats!r}")
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
    return mean, std
