"""DualStreamViT: one frozen timm ViT shared by a visual and an audio stream, with AV-PEA.

The two streams advance block by block in lockstep. In block l each stream computes

    Y = X + MSA(X) + B(X, X_other)        (eqs 3-4; B from the block inputs of both streams)
    X' = Y + FFN(Y)

with the frozen block's own norms, layer scales and drop paths. Audio spectrograms (time x mel)
go through the ViT's own patch embedding (the one input channel stands for the three RGB
channels the convolution expects) with the positional embedding resized to their patch grid
(2-D bicubic by default, or LAVISH's 1-D linear resampling of the sequence: `audio_pos_interp`).

How a block is executed (the same math each way; tests compare outputs and gradients):

- `fuse_streams` (default): both streams go through the shared frozen block in one call per
  row-wise layer: the LayerNorms, QKV, attention output projection and MLP run once over the
  concatenated token rows of both streams (bigger matrix products, half the calls);
  attention itself runs per stream (the streams' sequence lengths differ).
- `fused_attention` (default): attention by `F.scaled_dot_product_attention` (flash /
  memory-efficient kernels where the device has them) instead of the explicit
  `softmax(q k^T / sqrt(d)) v` of the research code.
- `activation_checkpointing` (off by default): each frozen block's activations are recomputed
  in the backward pass instead of kept (memory for compute). Only the frozen block is
  recomputed, never an adapter: recomputing an adapter would update its BatchNorm running
  statistics twice.
- `channels_last` (off by default): the patch embedding's convolution (the trunk's only one)
  gets its images and weight in channels-last memory layout (NHWC: what cuDNN's tensor-core
  convolutions want; the same values, laid out differently).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError

from .adapter import AVPEA, check_reduction_factor
from .backbone import FRAME_STATS, create_backbone, frame_normalization

ADAPTER_PLACEMENTS = ("both", "audio", "visual", "none")  # the paper's Table 4
AUDIO_POS_INTERPS = ("bicubic_2d", "linear_1d")


class DualStreamViT(nn.Module):
    """The AV-PEA trunk: frozen shared ViT + one adapter per block per stream.

    Args:
        backbone: a timm ViT module, or a timm model name (created with `weights`).
        reduction_factor: the adapters' bottleneck reduction r (D / r must be whole).
        adapters: "both", "audio", "visual" or "none": which streams carry adapters.
        cross_attention: False turns the adapters' CLS cross-attention off.
        gating: "learned" (paper) or "open" (gates fixed at 1).
        frame_stats: the mean/std `normalize_frames` uses: "timm" (the backbone's pretrained
            config) or "imagenet" (LAVISH's); see `frame_normalization`.
        audio_pos_interp: how the positional embedding is fitted to a spectrogram's tokens:
            "bicubic_2d" or "linear_1d" (LAVISH's); see `embed_audio`.
        weights: with a model name, "random", "timm" or a local file (see `create_backbone`).
        fuse_streams: both streams through each frozen block's row-wise layers in one call.
        fused_attention: the frozen blocks' attention by fused SDPA (else explicit softmax).
        activation_checkpointing: recompute the frozen blocks' activations in the backward.
        channels_last: the patch embedding's convolution in channels-last memory layout.
        **backbone_kwargs: with a model name, passed to `timm.create_model`.

    Attributes:
        adapters_visual, adapters_audio: `nn.ModuleList` of AVPEA, one per block (empty when a
            stream carries none). Everything trainable in the trunk lives under these two names.
    """

    adapter_prefixes = ("adapters_visual.", "adapters_audio.")

    def __init__(self, backbone: nn.Module | str, reduction_factor: int = 8, *,
                 adapters: str = "both", cross_attention: bool = True,
                 gating: str = "learned", frame_stats: str = "timm",
                 audio_pos_interp: str = "bicubic_2d", weights: str = "random",
                 fuse_streams: bool = True, fused_attention: bool = True,
                 activation_checkpointing: bool = False, channels_last: bool = False,
                 **backbone_kwargs):
        super().__init__()
        if isinstance(backbone, str):
            backbone = create_backbone(backbone, weights=weights, **backbone_kwargs)
        _check_supported(backbone)
        if adapters not in ADAPTER_PLACEMENTS:
            raise ValueError(f"adapters must be one of {ADAPTER_PLACEMENTS}, got {adapters!r}")
        if frame_stats not in FRAME_STATS:
            raise ValueError(f"frame_stats must be one of {FRAME_STATS}, got {frame_stats!r}")
        if audio_pos_interp not in AUDIO_POS_INTERPS:
            raise ValueError(f"audio_pos_interp must be one of {AUDIO_POS_INTERPS}, "
                             f"got {audio_pos_interp!r}")
        dim = backbone.embed_dim
        check_reduction_factor(dim, reduction_factor)

        self.backbone = backbone.requires_grad_(False).eval()
        self.dim = dim
        self.depth = len(backbone.blocks)
        self.adapter_placement = adapters
        self.frame_stats = frame_stats
        self.audio_pos_interp = audio_pos_interp
        # Streams are fused only through timm's own Attention, whose parts the fused block
        # calls one by one; any other attention runs per stream.
        self.fuse_streams = fuse_streams and all(_fusable(b.attn) for b in backbone.blocks)
        self.activation_checkpointing = activation_checkpointing
        self.channels_last = channels_last
        if channels_last:
            backbone.patch_embed.proj.to(memory_format=torch.channels_last)
        for block in backbone.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = fused_attention

        def make_adapters(enabled: bool) -> nn.ModuleList:
            return nn.ModuleList(
                AVPEA(dim, reduction_factor, cross_attention=cross_attention, gating=gating)
                for _ in range(self.depth if enabled else 0))

        self.adapters_visual = make_adapters(adapters in ("both", "visual"))
        self.adapters_audio = make_adapters(adapters in ("both", "audio"))
        mean, std = frame_normalization(backbone, frame_stats)
        self.register_buffer("frame_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("frame_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # -- what the trunk owns -------------------------------------------------------------
    def adapter_named_parameters(self):
        """(name, parameter) of every adapter parameter, names relative to this module."""
        return [(n, p) for n, p in self.named_parameters() if n.startswith(self.adapter_prefixes)]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter parameters and buffers (BatchNorm statistics), nothing of the backbone."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.adapter_prefixes)}

    def train(self, mode: bool = True) -> "DualStreamViT":
        """Train the adapters; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    # -- inputs --------------------------------------------------------------------------
    def normalize_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames `(B, 3, H, W)` in [0, 255] -> float `(x / 255 - mean) / std`, with
        the mean/std `frame_stats` chose (the backbone's pretrained config, or ImageNet's)."""
        return (frames.float() / 255.0 - self.frame_mean) / self.frame_std

    def _embed(self, images: torch.Tensor, pos_interp: str = "bicubic_2d") -> torch.Tensor:
        """Patch-embed `(B, 3, H, W)` images and add the positional embedding resized to their
        patch grid, by `pos_interp` (both the identity at the backbone's own image size)."""
        bb = self.backbone
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = bb.patch_embed.proj(images)  # no size assertion: spectrograms are not square
        grid = x.shape[-2:]
        x = bb.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = 0 if bb.no_embed_class else bb.num_prefix_tokens
        if pos_interp == "linear_1d":
            pos_embed = resample_pos_embed_linear_1d(bb.pos_embed, prefix + grid[0] * grid[1])
        else:
            pos_embed = resample_abs_pos_embed(bb.pos_embed, new_size=list(grid),
                                               old_size=bb.patch_embed.grid_size,
                                               num_prefix_tokens=prefix)
        cls = bb.cls_token.expand(x.shape[0], -1, -1)
        if bb.no_embed_class:
            x = torch.cat((cls, x + pos_embed), dim=1)
        else:
            x = torch.cat((cls, x), dim=1) + pos_embed
        return bb.norm_pre(bb.patch_drop(bb.pos_drop(x)))

    def embed_visual(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised frames `(B, 3, H, W)` -> tokens `(B, N+1, D)`; the positional embedding
        is resized 2-D bicubic (the identity at the backbone's own image size, the size of the
        shipped configs' frames), whatever `audio_pos_interp` says."""
        return self._embed(frames)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Spectrograms `(B, 1, time, mel)` -> tokens `(B, M+1, D)`.

        The patch embedding cuts the spectrogram into a `(time // p) x (mel // p)` grid of
        M patches (p the patch size; 102 x 128 -> 6 x 8 = 48 at p = 16), flattened time-major.
        The positional embedding is fitted to it as `audio_pos_interp` says:

        - "bicubic_2d": the patch part, as its `h x w` grid (14 x 14 for a 224/16 ViT), is
          resized 2-D bicubic to the spectrogram's grid; the CLS token keeps its own
          embedding (timm's `resample_abs_pos_embed`, as timm's `dynamic_img_size` does).
        - "linear_1d": the whole stored embedding, CLS slot included (1 + 196 = 197 for a
          224/16 ViT), is resampled as one sequence to the 1 + M tokens (see
          `resample_pos_embed_linear_1d`), as LAVISH does.
        """
        in_chans = self.backbone.patch_embed.proj.in_channels
        return self._embed(audio.expand(-1, in_chans, -1, -1), self.audio_pos_interp)

    # -- forward -------------------------------------------------------------------------
    def forward_features(self, frames: torch.Tensor,
                         audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run both streams through the frozen blocks with their adapters.

        Args:
            frames: normalised frames `(B, 3, H, W)`.
            audio: normalised spectrograms `(B, 1, time, mel)`, one per frame.

        Returns:
            `(visual_tokens (B, N+1, D), audio_tokens (B, M+1, D))`, after the final norm,
            as timm's `forward_features` returns them.
        """
        if frames.shape[0] != audio.shape[0]:
            raise ValueError(f"frames and audio must pair one to one: got {frames.shape[0]} "
                             f"frames and {audio.shape[0]} audio windows")
        visual, sound = self.embed_visual(frames), self.embed_audio(audio)
        run = _fused_block if self.fuse_streams else _separate_blocks
        for i, block in enumerate(self.backbone.blocks):
            visual_adapter = self.adapters_visual[i](visual, sound) if self.adapters_visual else None
            audio_adapter = self.adapters_audio[i](sound, visual) if self.adapters_audio else None
            if self.activation_checkpointing and torch.is_grad_enabled():
                visual, sound = checkpoint(run, block, visual, sound, visual_adapter, audio_adapter,
                                           use_reentrant=False)
            else:
                visual, sound = run(block, visual, sound, visual_adapter, audio_adapter)
        return self.backbone.norm(visual), self.backbone.norm(sound)


def resample_pos_embed_linear_1d(pos_embed: torch.Tensor, length: int) -> torch.Tensor:
    """A positional embedding `(1, L, D)` resampled along its token axis to `(1, length, D)`.

    LAVISH's audio positional embedding (GenjiB/LAVISH AVE/nets/my_vit.py, `forward_patch`):
    `F.interpolate` over the sequence, mode "linear", align_corners False, applied to the whole
    stored sequence when its length differs from the tokens', else the identity. The 2-D layout
    of the patch positions is not used, and with a CLS slot stored first (timm's standard ViT)
    the CLS token does not keep its own embedding: output i reads source position
    `(i + 0.5) * L / length - 0.5` (clamped at 0), so for 197 -> 49 tokens (a 102 x 128
    spectrogram) the CLS token gets 0.49 of patch 0's and 0.51 of patch 1's embedding.
    """
    if pos_embed.shape[1] == length:
        return pos_embed
    resized = F.interpolate(pos_embed.float().transpose(1, 2), size=length, mode="linear",
                            align_corners=False)
    return resized.transpose(1, 2).to(pos_embed.dtype)


def _separate_blocks(block: nn.Module, visual: torch.Tensor, sound: torch.Tensor,
                     visual_adapter: torch.Tensor | None,
                     audio_adapter: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block, each stream through it on its own (the research code's way)."""
    return (_block_with_adapter(block, visual, visual_adapter),
            _block_with_adapter(block, sound, audio_adapter))


def _fused_block(block: nn.Module, visual: torch.Tensor, sound: torch.Tensor,
                 visual_adapter: torch.Tensor | None,
                 audio_adapter: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_block_with_adapter` for both streams in one pass over their concatenated token rows.

    Every layer of the block but attention's core acts on each token row alone (LayerNorm,
    QKV, output projection, layer scale, MLP), so it runs once over the `(B N + B M, D)` rows of
    both streams; the core (`softmax(q k^T / sqrt(d)) v`) runs per stream. Drop paths are the
    identity: the frozen backbone is always in eval mode.
    """
    batch, visual_len, dim = visual.shape
    split = batch * visual_len
    rows = torch.cat((visual.reshape(split, dim), sound.reshape(-1, dim)))
    attn = block.attn
    qkv = attn.qkv(block.norm1(rows))
    core = torch.cat((_attention_core(attn, qkv[:split].view(batch, visual_len, -1)).reshape(split, -1),
                      _attention_core(attn, qkv[split:].view(sound.shape[0], sound.shape[1], -1)
                                      ).reshape(rows.shape[0] - split, -1)))
    y = rows + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(core)))))
    if visual_adapter is not None or audio_adapter is not None:
        adapters = [a if a is not None else torch.zeros_like(x)
                    for a, x in ((visual_adapter, visual), (audio_adapter, sound))]
        y = y + torch.cat((adapters[0].reshape(split, dim), adapters[1].reshape(-1, dim)))
    y = y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
    return y[:split].view(visual.shape), y[split:].view(sound.shape)


def _attention_core(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """timm `Attention.forward` between its QKV projection and its output norm: `(B, N, 3 D)`
    projections -> `(B, N, D)` attended values (fused SDPA or explicit, as `attn.fused_attn`)."""
    batch, length, _ = qkv.shape
    q, k, v = qkv.reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        x = attn.attn_drop((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    return x.transpose(1, 2).reshape(batch, length, -1)


def _fusable(attn: nn.Module) -> bool:
    """timm's standard Attention (the parts `_fused_block` calls, no gate, no extra inputs)."""
    from timm.models.vision_transformer import Attention

    return (type(attn) is Attention and getattr(attn, "gate", None) is None
            and all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop",
                                               "num_heads", "head_dim", "scale", "fused_attn")))


def _block_with_adapter(block: nn.Module, x: torch.Tensor,
                        adapter_out: torch.Tensor | None) -> torch.Tensor:
    """timm `Block.forward` with the adapter output added beside attention (eq 3)."""
    y = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    if adapter_out is not None:
        y = y + adapter_out
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def _check_supported(backbone: nn.Module) -> None:
    needed = ("patch_embed", "pos_embed", "cls_token", "blocks", "norm", "embed_dim")
    missing = [a for a in needed if getattr(backbone, a, None) is None]
    if missing:
        raise ConfigError(f"model.backbone: {type(backbone).__name__} is not a timm VisionTransformer "
                         f"with a CLS token (missing {missing}); AV-PEA queries with the CLS token")
    block_parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    for block in backbone.blocks:
        if not all(hasattr(block, a) for a in block_parts):
            raise ConfigError(f"model.backbone: unsupported block type {type(block).__name__}: AV-PEA needs "
                             f"timm's pre-norm Block ({', '.join(block_parts)})")
