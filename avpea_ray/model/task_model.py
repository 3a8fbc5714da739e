"""AVPEAModel: the AV-PEA trunk plus a task head, and what of it trains.

The trunk (`DualStreamViT`) turns a batch of clips into token sequences; the head it is given
(timm-style: the model takes its head, it imports none) turns those into task outputs. What
trains is what has `requires_grad`: the adapters and the head (minus any part a head freezes,
e.g. a frozen text encoder). The optimiser, the parameter counts and the saved state all use
that one definition.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .dual_stream import DualStreamViT


class AVPEAModel(nn.Module):
    """Frozen dual-stream ViT with AV-PEA adapters, and a task head.

    Args:
        config: the trunk's settings (backbone, weights, adapters).
        head: the task head, `head(visual, audio, **inputs) -> dict`, or a function of the trunk's
            width D that builds it (called after the trunk is built, so the head's random
            initialisation follows the trunk's).
        head_spec: how to build the head again (`{"task": name, "args": {...}}`), saved beside
            the adapters so a saved model can be rebuilt; the model does not interpret it.
        backbone: an already built timm ViT to use instead of building one from `config`
            (it must be the one `config` names).
    """

    def __init__(self, config: ModelConfig, head: nn.Module | Callable[[int], nn.Module],
                 head_spec: dict[str, Any] | None = None, backbone: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.head_spec = dict(head_spec or {})
        self.trunk = DualStreamViT(
            backbone if backbone is not None else config.backbone,
            config.reduction_factor, adapters=config.adapters,
            cross_attention=config.cross_attention, gating=config.gating,
            frame_stats=config.frame_stats, audio_pos_interp=config.audio_pos_interp,
            weights=config.weights, fuse_streams=config.fuse_streams,
            fused_attention=config.fused_attention,
            activation_checkpointing=config.activation_checkpointing,
            channels_last=config.channels_last, **config.backbone_kwargs)
        self.head = head if isinstance(head, nn.Module) else head(self.trunk.dim)

    @property
    def task(self) -> str | None:
        return self.head_spec.get("task")

    # -- what trains: requires_grad, one definition ---------------------------------------
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Everything the optimiser should see: the parameters with `requires_grad`."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state a checkpoint or an adapter file keeps: every module that owns a trainable
        parameter, with its parameters and persistent buffers (a BatchNorm's running
        statistics); never the frozen backbone or a frozen text encoder."""
        owners = {name.rpartition(".")[0] for name, _ in self.trainable_named_parameters()}
        return {k: v for k, v in self.state_dict().items() if k.rpartition(".")[0] in owners}

    def compile_trunk(self) -> None:
        """`torch.compile` the trunk's forward (`run.compile`); the head stays eager.

        The trunk holds all but a sliver of the step's FLOPs; a head's question LSTM (packed
        sequences), per-clip gathers and text decoding only break the graph, each break one more
        graph to compile (the AVQA model whole: 15 graphs and twice the compile time) for nothing
        they would gain."""
        self.trunk.forward_features = torch.compile(self.trunk.forward_features)

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
