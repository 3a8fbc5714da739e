"""AVPEAModel: the AV-PEA trunk plus one task head, and what of it trains.

The trunk (`DualStreamViT`) turns a batch of clips into token sequences; the head (AVQA, AVEL,
...) turns those into task outputs. Only the adapters and the head train: their names start
with `TRAINABLE_PREFIXES`, which is all that `trainable_state_dict()` saves.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .dual_stream import DualStreamViT


def _head_classes() -> dict[str, type[nn.Module]]:
    # Imported here so the trunk does not depend on every head's module.
    from ..heads.avc import AVCHead
    from ..heads.avel import AVELHead
    from ..heads.avqa import AVQAHead
    from ..heads.avr import AVRHead
    return {"avqa": AVQAHead, "avel": AVELHead, "avr": AVRHead, "avc": AVCHead}


TASKS = ("avqa", "avel", "avr", "avc")


class AVPEAModel(nn.Module):
    """Frozen dual-stream ViT with AV-PEA adapters, and a task head.

    Args:
        config: the trunk's settings (backbone, weights, adapters).
        task: "avqa", "avel", "avr" (retrieval) or "avc" (captioning).
        head_kwargs: the head's constructor arguments besides the width (e.g. vocab_size).
        backbone: an already built timm ViT to use instead of building one from `config`
            (it must be the one `config` names).
    """

    TRAINABLE_PREFIXES = ("trunk.adapters_visual.", "trunk.adapters_audio.", "head.")

    def __init__(self, config: ModelConfig, task: str, head_kwargs: dict[str, Any] | None = None,
                 backbone: nn.Module | None = None):
        super().__init__()
        heads = _head_classes()
        if task not in heads:
            raise ValueError(f"task must be one of {sorted(heads)}, got {task!r}")
        self.config = config
        self.task = task
        self.head_kwargs = dict(head_kwargs or {})
        self.trunk = DualStreamViT(
            backbone if backbone is not None else config.backbone,
            config.reduction_factor, adapters=config.adapters,
            cross_attention=config.cross_attention, gating=config.gating,
            weights=config.weights, **config.backbone_kwargs)
        self.head = heads[task](self.trunk.dim, **self.head_kwargs)

    # -- what trains ---------------------------------------------------------------------
    def is_trainable_name(self, name: str) -> bool:
        return name.startswith(self.TRAINABLE_PREFIXES)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Adapter and head parameters (everything the optimiser should see)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters + head, parameters and buffers; never the frozen backbone."""
        return {k: v for k, v in self.state_dict().items() if self.is_trainable_name(k)}

    # -- forward -------------------------------------------------------------------------
    def forward_features(self, frames: torch.Tensor,
                         fbank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips -> per-step token sequences.

        Args:
            frames: `(B, T, 3, H, W)` uint8 frames (or already normalised floats).
            fbank: `(B, T, 1, time, mel)` normalised spectrogram windows.

        Returns:
            `(visual (B, T, N+1, D), audio (B, T, M+1, D))`.
        """
        batch, steps = frames.shape[:2]
        flat_frames = frames.flatten(0, 1)
        if flat_frames.dtype == torch.uint8:
            flat_frames = self.trunk.normalize_frames(flat_frames)
        visual, audio = self.trunk.forward_features(flat_frames, fbank.flatten(0, 1))
        return visual.unflatten(0, (batch, steps)), audio.unflatten(0, (batch, steps))

    def forward(self, frames: torch.Tensor, fbank: torch.Tensor, **head_inputs) -> dict:
        """Clips (+ the head's own inputs, e.g. questions) -> the head's outputs."""
        visual, audio = self.forward_features(frames, fbank)
        return self.head(visual, audio, **head_inputs)
