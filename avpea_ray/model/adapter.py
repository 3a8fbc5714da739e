"""The AV-PEA adapter (paper section 3.3, equations 5-8, Algorithm 1).

`B = gate * f(CA || X_p)` with `CA = X_cls + q_gate * softmax(X_cls @ Y^T) @ Y`: the stream's
CLS token is the only query into all tokens of the other stream (no projections, no scaling),
the gated result replaces the CLS token, and the whole sequence goes through a bottleneck
LayerNorm -> 1x1 conv D->D/r (no bias) -> BatchNorm -> ReLU -> 1x1 conv D/r->D (no bias) ->
BatchNorm -> LayerNorm.

Algorithm 1's typos are fixed here: the gates are float tensors (an integer `torch.tensor(0)`
cannot require grad), `bn_before` is applied once, and, as in its code (its comments swap the
letters), `q_gate` scales the cross-attention (g in eqs 7-8) and `gate` scales the bottleneck
output (h in eqs 5-6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

GATINGS = ("learned", "open")


class AVPEA(nn.Module):
    """One AV-PEA adapter, parallel to a ViT block's attention.

    Args:
        dim: token width D of the backbone.
        reduction_factor: r; the bottleneck width is D / r. Must divide D.
        cross_attention: False drops the CLS cross-attention (the adapter becomes a plain
            gated bottleneck over this stream's own tokens).
        gating: "learned" (the paper: scalar gates initialised to 0, so the adapter starts as
            the identity of the frozen ViT) or "open" (gates fixed at 1, not trained).
    """

    def __init__(self, dim: int, reduction_factor: int = 8, *, cross_attention: bool = True,
                 gating: str = "learned"):
        super().__init__()
        check_reduction_factor(dim, reduction_factor)
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
        self.dim = dim
        self.reduction_factor = reduction_factor
        self.cross_attention = cross_attention
        self.gating = gating
        self.sampling_size = dim // reduction_factor

        if gating == "learned":
            self.gate = nn.Parameter(torch.zeros(()))
            if cross_attention:
                self.q_gate = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("gate", torch.ones(()))
            if cross_attention:
                self.register_buffer("q_gate", torch.ones(()))

        self.ln_before = nn.LayerNorm(dim)
        self.down_sampler = nn.Conv2d(dim, self.sampling_size, 1, bias=False)
        self.bn_before = nn.BatchNorm2d(self.sampling_size)
        self.activation = nn.ReLU(inplace=True)
        self.up_sampler = nn.Conv2d(self.sampling_size, dim, 1, bias=False)
        self.bn_after = nn.BatchNorm2d(dim)
        self.ln_after = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Adapter output B for this stream.

        Args:
            x: this stream's block input, `(B, N+1, D)`, CLS token first.
            y: the other stream's block input, `(B, M+1, D)`; unused (may be None) when
                cross-attention is off.

        Returns:
            `(B, N+1, D)`, to be added beside the block's attention output.
        """
        if self.cross_attention:
            if y is None:
                raise ValueError("AVPEA with cross_attention=True needs the other stream's tokens y")
            cls = x[:, :1]
            attended = cross_attention(cls, y)
            cls = cls + self.q_gate * attended.to(cls.dtype)
            x = torch.cat((cls, x[:, 1:]), dim=1)

        return self.gate * self._bottleneck(x)

    # Never traced by `torch.compile` (`run.compile`): with torch 2.10-2.11, the compiled
    # backward of a training-mode BatchNorm followed by a LayerNorm (bn_after -> ln_after) is
    # wrong (its decomposition; the forward is right): every adapter gradient below it came out
    # off by up to 100%. Eager here, the frozen blocks around it compiled (tests/test_speed.py
    # compares the compiled step's gradients with eager's).
    @torch.compiler.disable
    def _bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N+1, D) -> (B, D, N+1, 1): the 1x1 convs and BatchNorm2d of Algorithm 1 act per token.
        z = self.ln_before(x).transpose(1, 2).unsqueeze(-1)
        z = self.activation(self.bn_before(self.down_sampler(z)))
        z = self.bn_after(self.up_sampler(z))
        return self.ln_after(z.squeeze(-1).transpose(1, 2))


def cross_attention(cls: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Algorithm 1's CLS cross-attention: `softmax(cls @ y^T) @ y`.

    Computed in fp32 even under autocast: with no projections and no scaling the logits are raw
    dot products of ViT tokens (norms in the tens, logits in the thousands), which bf16's 8
    significant bits would round to a different distribution than the fp32 the paper ran.

    Args:
        cls: `(B, 1, D)` queries (a stream's CLS token).
        y: `(B, M+1, D)` the other stream's tokens.

    Returns:
        The attended tokens `(B, 1, D)`, fp32.
    """
    with torch.autocast(device_type=cls.device.type, enabled=False):
        cls, y = cls.float(), y.float()
        return torch.bmm(F.softmax(torch.bmm(cls, y.transpose(1, 2)), dim=-1), y)


def check_reduction_factor(dim: int, reduction_factor: int) -> None:
    """Refuse a reduction factor that does not divide the backbone width.

    Raises:
        ConfigError: naming the field, both numbers and the factors that would work.
    """
    if not isinstance(reduction_factor, int) or reduction_factor < 1 or dim % reduction_factor:
        divisors = [r for r in (1, 2, 4, 8, 16, 32, 64) if dim % r == 0]
        raise ConfigError(
            f"model.reduction_factor={reduction_factor!r} does not divide the backbone width "
            f"D={dim}; the bottleneck width D/r must be a whole number (try one of {divisors})")
