"""CMBS's supervised AVE model (Xia & Zhao, CVPR 2022) as a head over the AV-PEA trunk.

A re-implementation of `supv_main_model` in marmot-xy/CMBS (model/main_model.py, its layers in
model/models.py, its losses and accuracy in supv_main.py, its settings in configs/main.json),
component for component; only the inputs change, because the frozen ViT replaces CMBS's two
feature extractors (AV-PEA sec. 4: "replacing its pre-trained visual and audio encoders by the
frozen ViT transformer").

Components, here -> CMBS:

    visual_fc               supv_main_model.v_fc + ReLU + dropout 0.2 ("optional FC to make the
                            model adaptive to different visual features"): every patch token
                            D -> 512, the width of CMBS's VGG-19 pool5 map
    audio_fc                (new) audio CLS token D -> 128, the width of CMBS's VGGish feature
    guided_attention        models.New_Audio_Guided_Attention (beta 0.4): self-attention over the
                            spatial map, a global-average-guided spatial pooling, audio-guided
                            channel attention, audio-guided spatial attention
    audio_lstm, visual_lstm supv_main_model.audio_visual_rnn_layer (RNNEncoder): BiLSTMs, audio
                            128 -> 2 x d/2, visual 512 -> 2 x d
    visual_encoder,         InternalTemporalRelationModule: linear to d, 2 post-norm
    audio_encoder           self-attention layers (models.EncoderLayer: 4 heads, FFN 1024,
                            dropout 0.1)
    audio_decoder,          CrossModalRelationAttModule: linear to d, 1 layer in which the query
    visual_decoder          attends over [other modality's encoding; itself] (models.DecoderLayer)
    audio_gate, visual_gate audio_gated / video_gated: the background-suppression gates;
                            x <- x + alpha * gate_other * x (alpha 0.1)
    audio_cas, visual_cas   audio_cas / video_cas: class-activation scores per second, top-4
                            mean over time, averaged over the modalities (`cas_logits`)
    visual_audio_inter,     AVInter / VAInter (AudioVideoInter): the product of the two streams
    audio_visual_inter      attends over both (4 heads, attention dropout 0.2), residual + LN
    event_classifier,       SupvLocalizeModule.classifier / .event_classifier: event vs
    class_classifier        background per second; the clip's category from the max over time,
                            plus gamma * cas_logits (gamma 0.3)

Input mapping. CMBS reads per second a 7x7x512 VGG-19 map and a 128-d VGGish vector. Here the
visual map is the ViT's patch grid (14x14 for 224 px at patch 16; the attention modules pool
over however many positions there are) through CMBS's own v_fc, so CMBS's audio-guided
attention looks for the sounding region among the ViT patches as it does in the VGG map. The
visual CLS token is not read: CMBS has no global visual input (its self-attention branch forms
its own average), and the adapters' cross-modal signal reaches the patches through the ViT
blocks. The audio feature is the audio CLS token, the ViT's one summary of the window (and
what AV-PEA's cross-attention exchanges), projected to CMBS's 128 by `audio_fc` (no
activation, as DG-SCT does when it feeds CMBS from transformer encoders); everything after
that is CMBS's at CMBS's widths. So the head reads the trunk width D in exactly two layers,
640 weights per input dimension.

Parameter count (d_model 256, `cmbs_parameter_count` below): 9,429,977 with ViT-B/16 (D=768),
9,593,817 with ViT-L/16 (D=1024). AV-PEA's Table 1 implies 17.8M - 3.7M = 14.1M and
27.2M - 12.9M = 14.3M. Most of the gap is CMBS's own bookkeeping: its code allocates 4,344,064
parameters that its forward never uses (`CMBS_UNUSED_PARAMETERS`: the template Encoder/
DecoderLayer each of the four transformer modules keeps beside the deep copies it runs, the
decoder layers' self-attention, New_Audio_Guided_Attention.ave_bottleneck and
supv_main_model.video_norm / audio_norm), and `model.parameters()` counts them. They are not
built here: DDP requires a gradient for every trainable parameter. Counted CMBS's way the head
is 13,774,041 (B/16) and 13,937,881 (L/16): 2.3% and 2.5% under Table 1's 14.1M / 14.3M. The
difference between the two widths, 163,840 = 256 x 640, is Table 1's (27.2M - 17.8M) -
(12,890,208 - 3,654,192) = 0.16M, so the layers that read D match the paper's; what remains
is the same at both widths, 17.8M - 3,654,192 - 13,774,041 = 371,767 and 27.2M - 12,890,208 -
13,937,881 = 371,911, and CMBS's public code does not account for it (Table 1's own CMBS row,
14.4M, is likewise above the 13,544,537 CMBS's code counts at its VGG/VGGish widths).

Checked once against CMBS's code (not vendored here, so not in the tests): with its weights
copied in, a 512-wide trunk standing in for the VGG map and `audio_fc` as the identity on 128
dimensions, the four outputs agree with supv_main_model's in float64 to 1e-14.

Losses (supv_main.py train_epoch, all weights 1):
    BCE-with-logits(event_logits, is-event per second)
  + BCE-with-logits(av_gate, is-event per second)   CMBS feeds the product of its two sigmoid
                                                      gates, a probability, to BCEWithLogitsLoss
                                                      as if it were a logit; kept as is
  + CE(class_logits, clip category) + CE(cas_logits, clip category)
CMBS's clip category is the largest foreground index over the seconds, 0 for a clip without
events (every AVE clip has one); such clips add no class terms here. Prediction
(compute_accuracy_supervised): a second is an event when sigmoid(event_logit) > 0.5 and then
takes argmax(class_logits), else background: `avel_predict` in heads/avel.py.

CMBS trains in float64 on pre-extracted features; this head runs in the trunk's precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# CMBS's constants that configs/main.json does not expose.
LAYER_DROPOUT = 0.1      # models.EncoderLayer / DecoderLayer default; AudioVideoInter's residual
INTER_ATTN_DROPOUT = 0.2  # AudioVideoInter(head_dropout=0.2) in supv_main_model
QUERY_KEY_REDUCTION = 4   # New_Audio_Guided_Attention.latent_dim: query/key width = map width / 4


def event_targets(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-second event targets and each clip's category, as CMBS derives them.

    Args:
        labels: (B, T) long per-second labels in 0..num_classes, num_classes = background.
        num_classes: the number of event categories.

    Returns:
        (is_event (B, T) bool, has_event (B,) bool, category (B,) long): the clip's category is
        its largest foreground label (AVE clips hold one), -1 for a clip without events.

    Raises:
        ValueError: a label outside 0..num_classes.
    """
    if labels.numel() and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes} (background = {num_classes})")
    is_event = labels != num_classes
    # Background seconds become -1 so the max over time picks the event label.
    category = torch.where(is_event, labels, torch.full_like(labels, -1)).max(dim=1).values
    return is_event, is_event.any(dim=1), category


def clip_cross_entropy(logits: torch.Tensor, category: torch.Tensor, has_event: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the clips that hold an event; zero times the logits when none does,
    so every parameter behind `logits` still gets a (zero) gradient and DDP does not stall."""
    if has_event.any():
        return F.cross_entropy(logits[has_event], category[has_event])
    return logits.sum() * 0.0


def top_k_mean(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, C) per-second scores -> (B, C) mean of each class's k largest (all if T < k)."""
    return scores.topk(min(k, scores.shape[1]), dim=1).values.mean(dim=1)


class AudioGuidedVisualAttention(nn.Module):
    """CMBS's audio-guided visual attention (New_Audio_Guided_Attention): one second's spatial
    map and audio feature -> one visual feature.

    Args:
        visual_width: channels of the spatial map (CMBS: 512).
        audio_width: width of the audio feature (CMBS: 128).
        hidden: width of the attention projections (CMBS: 256).
        beta: weight of the self-attention branch (CMBS: 0.4).
        dropout: dropout on the self-attention output (CMBS: 0.2).
    """

    def __init__(self, visual_width: int = 512, audio_width: int = 128, hidden: int = 256,
                 beta: float = 0.4, dropout: float = 0.2) -> None:
        super().__init__()
        self.beta = beta
        reduced = visual_width // QUERY_KEY_REDUCTION
        # Self-attention over the map's positions.
        self.query = nn.Linear(visual_width, reduced)
        self.key = nn.Linear(visual_width, reduced)
        self.value = nn.Linear(visual_width, visual_width)
        self.self_norm = nn.LayerNorm(visual_width)
        self.dropout = nn.Dropout(dropout)
        # Spatial pooling guided by the map's own average.
        self.average_proj = nn.Linear(visual_width, hidden)
        self.position_proj = nn.Linear(visual_width, hidden)
        self.self_score = nn.Linear(hidden, 1)
        # Audio-guided channel attention.
        self.channel_visual = nn.Linear(visual_width, visual_width)
        self.channel_audio = nn.Linear(audio_width, visual_width)
        self.channel_bottleneck = nn.Linear(visual_width, hidden)
        self.channel_out = nn.Linear(hidden, visual_width)
        # Audio-guided spatial attention.
        self.spatial_visual = nn.Linear(visual_width, hidden)
        self.spatial_audio = nn.Linear(audio_width, hidden)
        self.spatial_score = nn.Linear(hidden, 1)

    def forward(self, visual_map: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Args: visual_map (B, T, N, visual_width); audio (B, T, audio_width).
        Returns: (B, T, visual_width)."""
        # CMBS scales neither energy by 1/sqrt(width).
        energy = self.query(visual_map) @ self.key(visual_map).transpose(-1, -2)  # (B, T, N, N)
        attended = self.self_norm(visual_map + self.dropout(energy.softmax(dim=-1) @ self.value(visual_map)))

        average = F.relu(self.average_proj(attended.mean(dim=2))).unsqueeze(2)  # (B, T, 1, h)
        self_scores = torch.tanh(self.self_score(F.relu(self.position_proj(attended)) * average))
        self_pooled = (self_scores.softmax(dim=2) * attended).sum(dim=2)  # (B, T, v)

        # Channel weights from the audio and the self-attended map scale the raw map.
        audio_channels = F.relu(self.channel_audio(audio)).unsqueeze(2)
        joint = (audio_channels * F.relu(self.channel_visual(attended))).mean(dim=2)
        channel_weights = torch.sigmoid(self.channel_out(F.relu(self.channel_bottleneck(joint))))
        channel_map = visual_map * (channel_weights.unsqueeze(2) + 1)

        # The audio picks the positions of the channel-attended map.
        spatial_scores = torch.tanh(self.spatial_score(
            F.relu(self.spatial_visual(channel_map)) * F.relu(self.spatial_audio(audio)).unsqueeze(2)))
        pooled = (spatial_scores.softmax(dim=2) * channel_map).sum(dim=2)  # (B, T, v)
        return pooled + self.beta * torch.sigmoid(self_pooled) * pooled


class CrossModalDecoderLayer(nn.Module):
    """CMBS's DecoderLayer as its forward runs it: the query attends over [memory; itself]
    (no self-attention sublayer), residual + LayerNorm, then a ReLU FFN, residual + LayerNorm.

    Args:
        width: feature width d.
        num_heads: attention heads.
        feedforward: FFN width.
        dropout: attention, FFN and residual dropout.
    """

    def __init__(self, width: int, num_heads: int, feedforward: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, feedforward)
        self.linear2 = nn.Linear(feedforward, width)
        self.norm2 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Args: query (B, T, d); memory (B, S, d). Returns: (B, T, d)."""
        keys = torch.cat([memory, query], dim=1)
        query = self.norm1(query + self.dropout1(self.attention(query, keys, keys, need_weights=False)[0]))
        return self.norm2(query + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(query))))))


class TemporalEncoder(nn.Module):
    """CMBS's InternalTemporalRelationModule: a linear map to d, then post-norm self-attention
    layers over the seconds (CMBS's EncoderLayer is torch's TransformerEncoderLayer with ReLU).

    Args:
        input_width: width of the incoming sequence.
        width: d (CMBS's d_model).
        num_heads, feedforward, layers: of the self-attention layers (CMBS: 4, 1024, 2).
        dropout: inside the layers (CMBS: 0.1).
    """

    def __init__(self, input_width: int, width: int, num_heads: int, feedforward: int,
                 layers: int = 2, dropout: float = LAYER_DROPOUT) -> None:
        super().__init__()
        self.affine = nn.Linear(input_width, width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, num_heads, feedforward, dropout, batch_first=True)
            for _ in range(layers))

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        """Args: sequence (B, T, input_width). Returns: (B, T, width)."""
        hidden = self.affine(sequence)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class CrossModalDecoder(nn.Module):
    """CMBS's CrossModalRelationAttModule: a linear map to d, then one cross-modal decoder layer.

    Args: as TemporalEncoder (CMBS: one layer).
    """

    def __init__(self, input_width: int, width: int, num_heads: int, feedforward: int,
                 dropout: float = LAYER_DROPOUT) -> None:
        super().__init__()
        self.affine = nn.Linear(input_width, width)
        self.layer = CrossModalDecoderLayer(width, num_heads, feedforward, dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Args: query (B, T, input_width); memory (B, S, width). Returns: (B, T, width)."""
        return self.layer(self.affine(query), memory)


class AudioVisualInteraction(nn.Module):
    """CMBS's AudioVideoInter: the product of the two streams attends over both, residual +
    LayerNorm.

    Args:
        width: d.
        num_heads: attention heads (CMBS: 4).
        attention_dropout: CMBS: 0.2.
        dropout: on the residual branch (CMBS: 0.1).
    """

    def __init__(self, width: int, num_heads: int, attention_dropout: float = INTER_ATTN_DROPOUT,
                 dropout: float = LAYER_DROPOUT) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, stream: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Args: stream, other (B, T, d). Returns: (B, T, d)."""
        joint = stream * other
        memory = torch.cat([other, stream], dim=1)
        return self.norm(joint + self.dropout(self.attention(joint, memory, memory, need_weights=False)[0]))


class CMBSHead(nn.Module):
    """CMBS's supervised AVE model over the trunk's tokens (see the module docstring).

    Args:
        dim: trunk token width D.
        num_classes: event categories (AVE: 28); the background label is num_classes.
        hidden: CMBS's d_model (256); even (the audio BiLSTM halves it) and divisible by
            num_heads.
        num_heads: heads of every attention over time (CMBS: 4).
        alpha: background-suppression gate weight (CMBS: 0.1).
        gamma: weight of the CAS scores added to the clip's class logits (CMBS: 0.3).
        beta: weight of the self-attention branch of the guided attention (CMBS: 0.4).
        dropout: after visual_fc and in the guided attention (CMBS: 0.2).
        feedforward: FFN width of the encoder and decoder layers (CMBS: 1024).
        visual_width: channels of the visual map (CMBS: 512, VGG-19 pool5).
        audio_width: width of the audio feature (CMBS: 128, VGGish).
        attention_width: width of the guided attention's projections (CMBS: 256).
        top_k: seconds averaged per class for the CAS scores (CMBS: 4).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int = 28,
        hidden: int = 256,
        num_heads: int = 4,
        alpha: float = 0.1,
        gamma: float = 0.3,
        beta: float = 0.4,
        dropout: float = 0.2,
        feedforward: int = 1024,
        visual_width: int = 512,
        audio_width: int = 128,
        attention_width: int = 256,
        top_k: int = 4,
    ) -> None:
        super().__init__()
        if hidden % 2 or hidden % num_heads:
            raise ValueError(f"hidden={hidden} must be even and divisible by num_heads={num_heads}")
        if visual_width % QUERY_KEY_REDUCTION:
            raise ValueError(f"visual_width={visual_width} must be divisible by {QUERY_KEY_REDUCTION}")
        self.num_classes, self.alpha, self.gamma, self.top_k = num_classes, alpha, gamma, top_k
        # What CMBS's own parameter count adds on top of this head's (parameter reports).
        self.reference_unused_parameters = cmbs_unused_parameter_count(hidden, feedforward, visual_width,
                                                                       attention_width)

        self.visual_fc = nn.Linear(dim, visual_width)
        self.audio_fc = nn.Linear(dim, audio_width)
        self.dropout = nn.Dropout(dropout)
        self.guided_attention = AudioGuidedVisualAttention(visual_width, audio_width, attention_width, beta,
                                                           dropout)
        self.audio_lstm = nn.LSTM(audio_width, hidden // 2, batch_first=True, bidirectional=True)
        self.visual_lstm = nn.LSTM(visual_width, hidden, batch_first=True, bidirectional=True)
        self.visual_encoder = TemporalEncoder(2 * hidden, hidden, num_heads, feedforward)
        self.audio_encoder = TemporalEncoder(hidden, hidden, num_heads, feedforward)
        self.visual_decoder = CrossModalDecoder(2 * hidden, hidden, num_heads, feedforward)
        self.audio_decoder = CrossModalDecoder(hidden, hidden, num_heads, feedforward)
        self.audio_gate = nn.Linear(hidden, 1)
        self.visual_gate = nn.Linear(hidden, 1)
        self.audio_cas = nn.Linear(hidden, num_classes)
        self.visual_cas = nn.Linear(hidden, num_classes)
        self.visual_audio_inter = AudioVisualInteraction(hidden, num_heads)
        self.audio_visual_inter = AudioVisualInteraction(hidden, num_heads)
        self.event_classifier = nn.Linear(hidden, 1)
        self.class_classifier = nn.Linear(hidden, num_classes)

    def forward(self, visual_tokens: torch.Tensor, audio_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score every second of every clip.

        Args:
            visual_tokens: (B, T, N+1, D) frame tokens, CLS first (N >= 1 patches).
            audio_tokens: (B, T, M+1, D) audio-window tokens, CLS first.

        Returns:
            {"event_logits": (B, T) event vs background per second (CMBS's is_event_scores),
             "class_logits": (B, num_classes) the clip's category, CAS included (event_scores),
             "cas_logits": (B, num_classes) the class-activation scores (av_score),
             "av_gate": (B, T) the product of the two suppression gates (audio_visual_gate)}.
        """
        if audio_tokens.shape[:2] != visual_tokens.shape[:2]:
            raise ValueError(f"visual tokens {tuple(visual_tokens.shape)} and audio tokens "
                             f"{tuple(audio_tokens.shape)} disagree on (B, T)")
        if visual_tokens.shape[2] < 2:
            raise ValueError(f"visual tokens {tuple(visual_tokens.shape)} hold no patch token")
        visual_map = self.dropout(F.relu(self.visual_fc(visual_tokens[:, :, 1:])))  # (B, T, N, v)
        audio = self.audio_fc(audio_tokens[:, :, 0])  # (B, T, a)
        visual = self.guided_attention(visual_map, audio)

        audio_seq, _ = self.audio_lstm(audio)  # (B, T, d)
        visual_seq, _ = self.visual_lstm(visual)  # (B, T, 2d)
        visual_memory = self.visual_encoder(visual_seq)
        audio_query = self.audio_decoder(audio_seq, visual_memory)
        audio_memory = self.audio_encoder(audio_seq)
        visual_query = self.visual_decoder(visual_seq, audio_memory)

        # Background suppression at the time level: each modality's gate scales the other.
        audio_gate = torch.sigmoid(self.audio_gate(audio_memory))  # (B, T, 1)
        visual_gate = torch.sigmoid(self.visual_gate(visual_memory))
        visual_query = visual_query + self.alpha * audio_gate * visual_query
        audio_query = audio_query + self.alpha * visual_gate * audio_query

        # ... and at the event level: class scores both modalities agree on.
        cas = (top_k_mean(self.visual_cas(visual_query), self.top_k)
               + top_k_mean(self.audio_cas(audio_query), self.top_k)) / 2

        # CMBS updates the visual stream first and lets the audio one see the updated visual.
        visual_query = self.visual_audio_inter(visual_query, audio_query)
        audio_query = self.audio_visual_inter(audio_query, visual_query)
        fused = (visual_query + audio_query) / 2
        return {
            "event_logits": self.event_classifier(fused).squeeze(-1),
            "class_logits": self.class_classifier(fused.max(dim=1).values) + self.gamma * cas,
            "cas_logits": cas,
            "av_gate": (audio_gate * visual_gate).squeeze(-1),
        }

    def loss(self, outputs: dict[str, torch.Tensor],
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CMBS's supervised loss: two per-second BCE terms and two per-clip CE terms, summed.

        Clips whose seconds are all background add no class terms; if the whole batch is
        background those terms are zero times their logits, so every parameter still gets a
        gradient (DDP).

        Args:
            outputs: what `forward` returned.
            labels: (B, T) long per-second labels in 0..num_classes, num_classes = background.

        Returns:
            (total, {"event_loss", "gate_loss", "class_loss", "cas_loss"}: detached terms).
        """
        event_logits = outputs["event_logits"]
        if labels.shape != event_logits.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match (B, T) {tuple(event_logits.shape)}")
        is_event, has_event, category = event_targets(labels, self.num_classes)
        target = is_event.to(event_logits.dtype)
        parts = {
            "event_loss": F.binary_cross_entropy_with_logits(event_logits, target),
            # CMBS's BCEWithLogitsLoss on the gate product, a probability (see module docstring).
            "gate_loss": F.binary_cross_entropy_with_logits(outputs["av_gate"], target),
            "class_loss": clip_cross_entropy(outputs["class_logits"], category, has_event),
            "cas_loss": clip_cross_entropy(outputs["cas_logits"], category, has_event),
        }
        return sum(parts.values()), {name: term.detach() for name, term in parts.items()}


def _linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def _lstm(inputs: int, hidden: int) -> int:
    """A one-layer bidirectional LSTM: per direction 4 gates of input and recurrent weights and
    two biases."""
    return 2 * 4 * (hidden * inputs + hidden * hidden + 2 * hidden)


def _attention_layer(width: int, feedforward: int, attentions: int = 1) -> int:
    """Attention sublayers (in/out projections) + ReLU FFN + one LayerNorm per sublayer."""
    attention = _linear(width, 3 * width) + _linear(width, width)
    return attentions * attention + _linear(width, feedforward) + _linear(feedforward, width) + 2 * 2 * width


def cmbs_parameter_count(dim: int, num_classes: int = 28, hidden: int = 256, feedforward: int = 1024,
                         visual_width: int = 512, audio_width: int = 128, attention_width: int = 256) -> int:
    """CMBSHead's parameter count, layer by layer from CMBS's architecture (for checks without
    building it)."""
    v, a, h, d = visual_width, audio_width, attention_width, hidden
    inputs = _linear(dim, v) + _linear(dim, a)
    guided = (2 * _linear(v, v // QUERY_KEY_REDUCTION) + _linear(v, v) + 2 * v       # self-attention
              + 2 * _linear(v, h) + _linear(h, 1)                                     # average-guided pooling
              + _linear(v, v) + _linear(a, v) + _linear(v, h) + _linear(h, v)         # channel attention
              + _linear(v, h) + _linear(a, h) + _linear(h, 1))                        # spatial attention
    lstms = _lstm(a, d // 2) + _lstm(v, d)
    layer = _attention_layer(d, feedforward)
    encoders = _linear(2 * d, d) + _linear(d, d) + 2 * 2 * layer
    decoders = _linear(2 * d, d) + _linear(d, d) + 2 * layer
    gates_and_cas = 2 * _linear(d, 1) + 2 * _linear(d, num_classes)
    interactions = 2 * (_linear(d, 3 * d) + _linear(d, d) + 2 * d)
    classifiers = _linear(d, 1) + _linear(d, num_classes)
    return inputs + guided + lstms + encoders + decoders + gates_and_cas + interactions + classifiers


def cmbs_unused_parameter_count(hidden: int = 256, feedforward: int = 1024, visual_width: int = 512,
                                attention_width: int = 256) -> int:
    """Parameters CMBS's code allocates and its forward never uses (not built by CMBSHead):
    the template EncoderLayer of its two InternalTemporalRelationModules and the template
    DecoderLayer of its two CrossModalRelationAttModules (each kept as an attribute beside the
    deep copies that run), the unused self-attention of the two decoder layers that run,
    New_Audio_Guided_Attention.ave_bottleneck, and supv_main_model.video_norm / audio_norm."""
    d = hidden
    self_attention = _linear(d, 3 * d) + _linear(d, d)
    encoder_templates = 2 * _attention_layer(d, feedforward)
    decoder_templates = 2 * _attention_layer(d, feedforward, attentions=2)
    return (encoder_templates + decoder_templates + 2 * self_attention
            + _linear(visual_width, attention_width) + 2 * 2 * d)


CMBS_UNUSED_PARAMETERS = cmbs_unused_parameter_count()  # 4,344,064 at CMBS's settings
