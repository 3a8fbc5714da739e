"""AVR head: text-to-audio-visual retrieval over the AV-PEA features (VALOR-style).

A clip's embedding is built from the trunk's CLS tokens: the visual and the audio CLS token of
each time step, averaged over time, concatenated, normalised and projected. A caption's
embedding is its text encoder's first token ([CLS]) projected to the same width. Both are
L2-normalised; their dot product times a learnable temperature (CLIP's `logit_scale`, capped
at 100) gives the logits of a symmetric InfoNCE loss (text->video and video->text).

The loss takes whatever batch it is given: the training task passes embeddings gathered
from every DDP rank, so each rank's clips see every other rank's captions as negatives.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .text import build_text_encoder

MAX_LOGIT_SCALE = math.log(100.0)


class AVRHead(nn.Module):
    """Audio-visual and text embeddings in one space, with a learnable temperature.

    Args:
        dim: the trunk's width.
        vocab_size: the tokenizer's size.
        embed_dim: width of the shared embedding space.
        text_model: "random", a local directory or a Hugging Face name (see `heads.text`).
        text_config: sizes of the "random" text model.
        freeze_text: keep the text encoder's weights fixed (only its projection trains).
        init_temperature: the softmax temperature the learnable scale starts at (CLIP: 0.07).
    """

    def __init__(self, dim: int, vocab_size: int, embed_dim: int = 256, text_model: str = "random",
                 text_config: dict | None = None, freeze_text: bool = False,
                 init_temperature: float = 0.07) -> None:
        super().__init__()
        # On the meta device (shape-only builds in the driver) a named model's config suffices.
        pretrained = torch.empty(0).device.type != "meta"
        self.text_encoder = build_text_encoder(text_model, vocab_size, text_config, pretrained)
        self.text_encoder.requires_grad_(not freeze_text)
        text_width = self.text_encoder.config.hidden_size
        self.video_norm = nn.LayerNorm(2 * dim)
        self.video_proj = nn.Linear(2 * dim, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def encode_video(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """`(B, T, N+1, D)` visual and `(B, T, M+1, D)` audio tokens -> `(B, E)` unit vectors."""
        pooled = torch.cat([visual[:, :, 0].mean(1), audio[:, :, 0].mean(1)], dim=-1)
        return F.normalize(self.video_proj(self.video_norm(pooled)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`(C, L)` token ids and attention mask -> `(C, E)` unit vectors."""
        hidden = self.text_encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, caption_tokens: torch.Tensor,
                caption_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """One caption per clip (row i describes clip i).

        Returns:
            {"video_embedding": (B, E), "text_embedding": (B, E), "logit_scale": scalar}.
        """
        return {"video_embedding": self.encode_video(visual, audio),
                "text_embedding": self.encode_text(caption_tokens, caption_mask),
                "logit_scale": self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()}

    @staticmethod
    def loss(video_embedding: torch.Tensor, text_embedding: torch.Tensor,
             logit_scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Symmetric InfoNCE: caption i and clip i are the positives, all other pairs negatives.

        Returns:
            (loss, {"t2v_loss", "v2t_loss"}).
        """
        logits = logit_scale * text_embedding @ video_embedding.t()
        target = torch.arange(len(logits), device=logits.device)
        t2v = F.cross_entropy(logits, target)
        v2t = F.cross_entropy(logits.t(), target)
        return (t2v + v2t) / 2, {"t2v_loss": t2v.item(), "v2t_loss": v2t.item()}
