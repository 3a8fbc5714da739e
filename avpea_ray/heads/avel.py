"""AVE event localisation heads and the CMBS prediction rule.

Two heads, chosen by `head.architecture` (`build_avel_head`):

- "cmbs" (the paper configs): CMBS's supervised model, heads/cmbs.py `CMBSHead`.
- "compact": a small head for demos and tests, in the style of CMBS but much shallower:

  1. takes the audio CLS token as the second's audio feature, and builds the visual feature
     from the visual CLS token plus an audio-guided attention over the patch tokens (CMBS
     steers its visual features with the audio the same way, over a CNN feature map);
  2. models time with one bidirectional LSTM per modality;
  3. lets each modality attend to the other across the T seconds (residual + LayerNorm);
  4. applies CMBS's cross-modal background suppression: a per-second gate computed from one
     modality scales the other one's features up, `x * (1 + alpha * gate)`, so a second that
     one modality deems an event is emphasised in the other;
  5. averages the two streams and predicts, per second, event vs background and, per clip
     (max over time), the event category.

  Left out from CMBS: its guided attention's self-attention and channel branches, its
  transformer encoder/decoder depth (one attention layer per direction here), its
  class-activation top-k scores and its gate supervision.

Both return "event_logits" (B, T) and "class_logits" (B, num_classes), which `avel_predict`
turns into per-second labels. Labels are per second with background index `num_classes` (28
for AVE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cmbs import CMBSHead, clip_cross_entropy, event_targets


class CrossModalAttention(nn.Module):
    """One modality's seconds attend over the other's: MHA + residual + LayerNorm.

    Args:
        hidden: feature width.
        num_heads: attention heads (must divide hidden).
        dropout: attention and residual dropout.
    """

    def __init__(self, hidden: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Args: query, memory (B, T, hidden). Returns: (B, T, hidden)."""
        attended = self.attn(query, memory, memory, need_weights=False)[0]
        return self.norm(query + self.dropout(attended))


class CompactAVELHead(nn.Module):
    """A small CMBS-style audio-visual event localisation head over the trunk's tokens.

    Args:
        dim: trunk token width D.
        num_classes: event categories (28 in AVE); the background label is num_classes.
        hidden: head width (CMBS's d_model, 256); must be even (bidirectional LSTM halves)
            and divisible by num_heads.
        num_heads: heads of the cross-modal attention.
        alpha: strength of the cross-modal gating (CMBS uses 0.1).
        dropout: dropout on the projected features and inside attention.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int = 28,
        hidden: int = 256,
        num_heads: int = 4,
        alpha: float = 0.1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden % 2 or hidden % num_heads:
            raise ValueError(f"hidden={hidden} must be even and divisible by num_heads={num_heads}")
        self.num_classes = num_classes
        self.alpha = alpha
        self.audio_proj = nn.Linear(dim, hidden)
        self.visual_proj = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.audio_rnn = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.visual_rnn = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.audio_to_visual = CrossModalAttention(hidden, num_heads, dropout)
        self.visual_to_audio = CrossModalAttention(hidden, num_heads, dropout)
        self.audio_gate = nn.Linear(hidden, 1)
        self.visual_gate = nn.Linear(hidden, 1)
        self.event_classifier = nn.Linear(hidden, 1)
        self.class_classifier = nn.Linear(hidden, num_classes)

    def forward(
        self, visual_tokens: torch.Tensor, audio_tokens: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Score every second of every clip.

        Args:
            visual_tokens: (B, T, N+1, D) frame tokens, CLS first (N >= 1 patches).
            audio_tokens: (B, T, M+1, D) audio-window tokens, CLS first.

        Returns:
            {"event_logits": (B, T) event-vs-background logit per second,
             "class_logits": (B, num_classes) the clip's event category}.
        """
        if audio_tokens.shape[:2] != visual_tokens.shape[:2]:
            raise ValueError(
                f"visual tokens {tuple(visual_tokens.shape)} and audio tokens "
                f"{tuple(audio_tokens.shape)} disagree on (B, T)"
            )
        audio = self.dropout(F.relu(self.audio_proj(audio_tokens[:, :, 0])))  # (B, T, h)
        visual_all = self.visual_proj(visual_tokens)  # (B, T, N+1, h)
        cls, patches = visual_all[:, :, 0], visual_all[:, :, 1:]
        # Audio-guided spatial attention: the sounding region's patches get the weight.
        scale = patches.shape[-1] ** -0.5
        weights = (torch.einsum("btnh,bth->btn", patches, audio) * scale).softmax(dim=-1)
        visual = cls + torch.einsum("btn,btnh->bth", weights, patches)
        visual = self.dropout(F.relu(visual))

        audio, _ = self.audio_rnn(audio)
        visual, _ = self.visual_rnn(visual)
        audio_ctx = self.visual_to_audio(audio, visual)
        visual_ctx = self.audio_to_visual(visual, audio)

        # Background suppression: each modality's event gate reweights the other's seconds.
        audio_gate = torch.sigmoid(self.audio_gate(audio_ctx))  # (B, T, 1)
        visual_gate = torch.sigmoid(self.visual_gate(visual_ctx))
        visual_ctx = visual_ctx * (1 + self.alpha * audio_gate)
        audio_ctx = audio_ctx * (1 + self.alpha * visual_gate)

        fused = (audio_ctx + visual_ctx) / 2
        return {
            "event_logits": self.event_classifier(fused).squeeze(-1),
            "class_logits": self.class_classifier(fused.max(dim=1).values),
        }

    def loss(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BCE-with-logits on event vs background per second + CE on the clip's category.

        The clip's category is its non-background label (AVE clips hold one). Clips whose
        seconds are all background add no class loss; if the whole batch is background the
        class term is zero times the logits, so every parameter still gets a gradient (DDP).

        Args:
            outputs: what `forward` returned.
            labels: (B, T) long per-second labels in 0..num_classes, num_classes = background.

        Returns:
            (total loss, {"event_loss": detached, "class_loss": detached}).
        """
        event_logits, class_logits = outputs["event_logits"], outputs["class_logits"]
        if labels.shape != event_logits.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match (B, T) {tuple(event_logits.shape)}")
        is_event, has_event, category = event_targets(labels, self.num_classes)
        event_loss = F.binary_cross_entropy_with_logits(event_logits, is_event.to(event_logits.dtype))
        class_loss = clip_cross_entropy(class_logits, category, has_event)
        total = event_loss + class_loss
        return total, {"event_loss": event_loss.detach(), "class_loss": class_loss.detach()}


def avel_predict(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-second labels by the CMBS rule (supv_main.py compute_accuracy_supervised).

    A second is an event when sigmoid(event_logit) > 0.5 (strictly: a logit of exactly 0 is
    background); event seconds take the clip's single predicted category (argmax of
    class_logits), the others the background index num_classes.

    Args:
        outputs: {"event_logits": (B, T), "class_logits": (B, num_classes)}.

    Returns:
        (B, T) long predicted labels in 0..num_classes.
    """
    event_logits, class_logits = outputs["event_logits"], outputs["class_logits"]
    is_event = torch.sigmoid(event_logits) > 0.5
    category = class_logits.argmax(dim=-1, keepdim=True).expand_as(is_event)
    background = torch.full_like(category, class_logits.shape[-1])
    return torch.where(is_event, category, background)


ARCHITECTURES = ("cmbs", "compact")
# The settings only CMBSHead takes; the compact head is built without them.
CMBS_ONLY_SETTINGS = ("gamma", "beta", "feedforward", "visual_width", "audio_width", "attention_width",
                      "top_k")


def build_avel_head(dim: int, num_classes: int = 28, architecture: str = "cmbs", **settings) -> nn.Module:
    """The AVE head `architecture` names, for trunk width `dim`.

    Args:
        dim: trunk token width D.
        num_classes: event categories; the background label is num_classes.
        architecture: "cmbs" (CMBSHead, the paper's) or "compact" (CompactAVELHead).
        settings: the head's keyword arguments (the `head:` config section); for "compact" the
            CMBS-only ones (CMBS_ONLY_SETTINGS) are dropped.
    """
    if architecture == "cmbs":
        return CMBSHead(dim, num_classes, **settings)
    if architecture == "compact":
        settings = {k: v for k, v in settings.items() if k not in CMBS_ONLY_SETTINGS}
        return CompactAVELHead(dim, num_classes, **settings)
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
