"""ModelConfig: the trunk's settings (which frozen ViT, its weights, the adapters on it).

What the clips look like (frames per clip, frame size, the spectrogram windows) is recorded
once, in the shard index that made them; the model reads it from there (`data.shards`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from .adapter import GATINGS
from .backbone import FRAME_STATS
from .dual_stream import ADAPTER_PLACEMENTS, AUDIO_POS_INTERPS


@dataclass
class ModelConfig:
    """The trunk: which frozen ViT, its weights, and the AV-PEA adapters on it.

    Attributes:
        backbone: timm model name.
        weights: "timm" (pretrained by name), "random", or a local state-dict file.
        backbone_kwargs: extra `timm.create_model` arguments (tiny test ViTs: depth, embed_dim,
            num_heads, img_size).
        reduction_factor: the adapter bottleneck's D / d (the paper: 8). Named apart from
            ASHA's own `reduction_factor` in sweeps as `model.reduction_factor`.
        adapters: which streams carry adapters: both, audio, visual, none (Table 4).
        cross_attention: the adapters' CLS cross-attention on/off.
        gating: "learned" scalar gates from 0 (paper) or "open" (fixed at 1).
        frame_stats: the mean/std uint8 frames are normalised with after scaling to [0, 1]:
            "timm" (default): the backbone's pretrained config ((0.5, 0.5, 0.5) /
            (0.5, 0.5, 0.5) for the augreg_in21k ViTs, what their weights were trained on);
            "imagenet": ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), what LAVISH's
            data loaders use with the same ViTs.
        audio_pos_interp: how the positional embedding is fitted to a spectrogram's patch
            grid (e.g. 6 x 8 for 102 x 128 at patch 16; the visual stream is not affected):
            "bicubic_2d" (default): the 14 x 14 patch grid resized 2-D bicubic to the
            spectrogram's grid, the CLS token keeping its own embedding (timm's
            dynamic-size path); "linear_1d": LAVISH's: the stored sequence, CLS slot
            included (197 for a 224/16 ViT), resampled 1-D linearly (align_corners False) to
            the 1 + M tokens, the identity when the lengths match
            (`dual_stream.resample_pos_embed_linear_1d`).
        fuse_streams: run both streams through each frozen block's row-wise layers (norms,
            QKV, projections, MLP) in one call over their concatenated tokens, attention per
            stream (default; the same math). False: each stream separately, as the research
            code.
        fused_attention: the frozen blocks' attention by fused `scaled_dot_product_attention`
            (default; the same math) instead of the explicit softmax.
        activation_checkpointing: keep no activations of the frozen blocks for the backward
            pass, recompute them (less memory, ~1/3 more compute; off by default).
        channels_last: the patch embedding's convolution (the trunk's only one) on
            channels-last (NHWC) images and weight (the same values; off by default).
        init_from: an adapter directory (another run's `best_adapters`, local or s3://) whose
            adapters and head start this run, e.g. AVQA's grounding stage for its QA stage;
            "" starts from the fresh initialisation. A resume restores its own checkpoint.
    """

    backbone: str = "vit_base_patch16_224.augreg_in21k"
    weights: str = "timm"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    reduction_factor: int = 8
    adapters: str = "both"
    cross_attention: bool = True
    gating: str = "learned"
    frame_stats: str = "timm"
    audio_pos_interp: str = "bicubic_2d"
    fuse_streams: bool = True
    fused_attention: bool = True
    activation_checkpointing: bool = False
    channels_last: bool = False
    init_from: str = ""

    def __post_init__(self):
        _check_choice("model.adapters", self.adapters, ADAPTER_PLACEMENTS)
        _check_choice("model.gating", self.gating, GATINGS)
        _check_choice("model.frame_stats", self.frame_stats, FRAME_STATS)
        _check_choice("model.audio_pos_interp", self.audio_pos_interp, AUDIO_POS_INTERPS)
        _check_positive("model.reduction_factor", self.reduction_factor)
        for name in self.EXECUTION_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name} must be true or false, got {getattr(self, name)!r}")

    # Fields that change the trained parameters' shapes or meaning: a resume or an adapter
    # load refuses a model that differs in any of them. The input conventions belong here: the
    # adapters were trained on tokens made with them, and the same weights on other inputs
    # would silently compute something else.
    ARCHITECTURE_FIELDS = ("backbone", "backbone_kwargs", "reduction_factor", "adapters",
                           "cross_attention", "gating", "frame_stats", "audio_pos_interp")

    # How the trunk is executed, not what it computes: a resume may change them.
    EXECUTION_FIELDS = ("fuse_streams", "fused_attention", "activation_checkpointing", "channels_last")

    def architecture(self) -> dict[str, Any]:
        """The fields that must match for saved adapters to fit."""
        return {name: getattr(self, name) for name in self.ARCHITECTURE_FIELDS}


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
