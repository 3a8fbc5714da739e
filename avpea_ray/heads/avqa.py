"""AVQA head in the style of AVST (Li et al. 2022, MUSIC-AVQA) and its metrics.

The head reads the trunk's final token sequences of each time step (one frame and its audio
window) and answers questions about the clip:

1. Question encoder: word embedding -> LSTM -> (hidden, cell) -> tanh -> linear, as AVST.
2. Per clip and time step: audio feature from the audio CLS token (`audio_pooling="cls"`) or
   the mean of the audio patch tokens (`"mean"`, as LAVISH, whose Swin has no CLS token);
   visual features from the patch tokens. Audio-guided spatial grounding: cosine similarity of the audio feature with
   every patch, softmax over patches, attended patch feature; fused with the mean-pooled
   visual feature (concat -> tanh -> linear). Like AVST, which has no CLS token, the head
   does not read the visual CLS token; the adapters' cross-modal signal reaches the patch
   tokens through the ViT blocks anyway.
3. Per question: the question feature queries the T audio features and the T grounded
   visual features with multi-head attention (residual MLP + LayerNorm), each summary is
   added to its temporal mean, and the two are fused, multiplied by the question feature,
   passed through tanh and classified into one of the answers.
4. Audio-visual match task (AVST's positive/negative grounding): a small classifier tells
   whether one second's audio and a grounded frame come from the same video. As AVST's data
   loader, the negative of second t of clip b is a frame of ANOTHER video, at a random
   second: clip (b + k) mod B for k drawn from 1..B-1 (a batch holds B different videos).
   In eval mode the draw comes from a fixed seed, so validation scores repeat.

Two stages, as AVST (`stage`): "grounding" trains only the match task (audio projection,
visual projection, grounding fusion and match classifier; the question-answering modules are
frozen, so they are neither trained nor saved), and its weights initialise the "qa" stage
(`model.init_from`), which trains answers + 0.5 x match.

The backbone runs once per video and a video has several questions, so steps 1-2 and 4 run
per clip and step 3 gathers each question's clip by `question_video_index`.

The metrics are count-based so that ranks can all-reduce one integer tensor and compute
accuracies afterwards.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

QUESTION_TYPES: tuple[str, ...] = (
    "Audio-Counting",
    "Audio-Comparative",
    "Visual-Counting",
    "Visual-Location",
    "Audio-Visual-Existential",
    "Audio-Visual-Counting",
    "Audio-Visual-Location",
    "Audio-Visual-Comparative",
    "Audio-Visual-Temporal",
)
GROUPS: tuple[str, ...] = ("Audio", "Visual", "Audio-Visual")
# A type's group is everything before its last dash ("Audio-Visual-Counting" -> "Audio-Visual").
TYPE_GROUP: dict[str, str] = {t: t.rsplit("-", 1)[0] for t in QUESTION_TYPES}
_TYPE_INDEX: dict[str, int] = {t: i for i, t in enumerate(QUESTION_TYPES)}


class QuestionEncoder(nn.Module):
    """Word embedding -> LSTM -> linear over the final (hidden, cell) state, as AVST.

    Questions are right-padded with index 0. The LSTM runs on packed sequences, so a
    question's feature does not depend on how much padding its batch needed.

    Args:
        vocab_size: number of question words, including the pad index 0.
        hidden: embedding, LSTM and output width.
    """

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.fc = nn.Linear(2 * hidden, hidden)

    def forward(self, tokens: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        """Encode questions.

        Args:
            tokens: (Q, L) long word indices, right-padded with 0.
            lengths: each question's `question_lengths(tokens)`, computed on the host before
                `tokens` went to the device; without them they are read back from the device
                (a host synchronisation).

        Returns:
            (Q, hidden) question features.
        """
        if lengths is None:
            lengths = question_lengths(tokens)
        words = torch.tanh(self.embed(tokens))
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        _, (h, c) = self.lstm(packed)
        state = torch.cat([h[-1], c[-1]], dim=-1)
        return self.fc(torch.tanh(state))


def question_lengths(tokens: torch.Tensor) -> list[int]:
    """The words of each right-padded question `(Q, L)`, at least 1 (an all-padding question
    still needs one step for `pack_padded_sequence`)."""
    return (tokens != 0).sum(dim=1).clamp(min=1).tolist()


class TemporalGrounding(nn.Module):
    """Question-queried multi-head attention over T steps + residual MLP + LayerNorm (AVST).

    Args:
        hidden: feature width.
        num_heads: attention heads (must divide hidden).
        dropout: dropout inside attention and the MLP.
    """

    def __init__(self, hidden: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden, num_heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, query: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Summarise the steps a question attends to.

        Args:
            query: (Q, hidden) question features.
            steps: (Q, T, hidden) per-step features of each question's clip.

        Returns:
            (Q, hidden) summary.
        """
        attended = self.attn(query.unsqueeze(1), steps, steps, need_weights=False)[0].squeeze(1)
        return self.norm(attended + self.dropout(self.mlp(attended)))


class AVQAHead(nn.Module):
    """AVST-style audio-visual question answering head over the trunk's tokens.

    Args:
        dim: trunk token width D.
        vocab_size: question vocabulary size, pad index 0 included.
        num_answers: answer classes (42 in MUSIC-AVQA).
        hidden: head width (512 in AVST).
        num_heads: heads of the temporal-grounding attention; must divide hidden.
        match_weight: weight of the audio-visual match loss (0.5 in AVST).
        stage: "qa" (answers + match) or "grounding" (the match task only; AVST's first stage).
        audio_pooling: the per-second audio feature: "cls" (the audio CLS token) or "mean"
            (the mean of the audio patch tokens, as LAVISH).
    """

    STAGES = ("qa", "grounding")
    AUDIO_POOLINGS = ("cls", "mean")

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        num_answers: int = 42,
        hidden: int = 512,
        num_heads: int = 4,
        match_weight: float = 0.5,
        stage: str = "qa",
        audio_pooling: str = "cls",
    ) -> None:
        super().__init__()
        if stage not in self.STAGES or audio_pooling not in self.AUDIO_POOLINGS:
            raise ValueError(f"stage must be one of {self.STAGES} (got {stage!r}) and audio_pooling "
                             f"one of {self.AUDIO_POOLINGS} (got {audio_pooling!r})")
        if hidden % num_heads:
            raise ValueError(f"hidden={hidden} must be divisible by num_heads={num_heads}")
        if hidden < 4:
            raise ValueError(f"hidden={hidden} must be at least 4 (the match MLP narrows it by 4)")
        self.match_weight, self.stage, self.audio_pooling = match_weight, stage, audio_pooling
        self.question_encoder = QuestionEncoder(vocab_size, hidden)
        self.audio_proj = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.visual_proj = nn.Linear(dim, hidden)
        self.grounding_fuse = nn.Linear(2 * hidden, hidden)
        # AVST's 1024-512-256-128-2 match classifier, scaled to the head width.
        self.match_classifier = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, hidden // 4), nn.ReLU(),
            nn.Linear(hidden // 4, 2),
        )
        self.audio_temporal = TemporalGrounding(hidden, num_heads)
        self.visual_temporal = TemporalGrounding(hidden, num_heads)
        self.fusion = nn.Linear(2 * hidden, hidden)
        self.answer_classifier = nn.Linear(hidden, num_answers)
        if stage == "grounding":  # requires_grad is what trains and what is saved
            for module in self.question_answering_modules():
                module.requires_grad_(False)

    def question_answering_modules(self) -> list[nn.Module]:
        """The modules only the QA stage trains (the grounding stage leaves them frozen)."""
        return [self.question_encoder, self.audio_temporal, self.visual_temporal, self.fusion,
                self.answer_classifier]

    def _ground(self, audio: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Audio-guided spatial grounding of one set of frames.

        Args:
            audio: (B, T, hidden) audio features.
            patches: (B, T, N, hidden) projected visual patch features.

        Returns:
            (B, T, hidden) grounded visual features.
        """
        pooled = patches.mean(dim=2)
        # Cosine similarity, as AVST: without a temperature the weights stay soft.
        patches_n = F.normalize(patches, dim=-1)
        scores = torch.einsum("btnh,bth->btn", patches_n, F.normalize(audio, dim=-1))
        attended = torch.einsum("btn,btnh->bth", scores.softmax(dim=-1), patches_n)
        return self.grounding_fuse(torch.tanh(torch.cat([pooled, attended], dim=-1)))

    def _negative_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """For every (clip b, second t), the patches of another clip at a random second.

        Args:
            patches: (B, T, N, hidden) with B >= 2 clips of different videos.

        Returns:
            (B, T, N, hidden): entry (b, t) is patches[(b + k) % B, t'] for k in 1..B-1 and t'
            in 0..T-1 drawn uniformly (from a fixed seed in eval mode).
        """
        batch, steps = patches.shape[:2]
        generator = None
        if not self.training:
            generator = torch.Generator(device=patches.device).manual_seed(0)
        shift = torch.randint(1, batch, (batch, steps), generator=generator, device=patches.device)
        other = (torch.arange(batch, device=patches.device).unsqueeze(1) + shift) % batch
        second = torch.randint(0, steps, (batch, steps), generator=generator, device=patches.device)
        return patches[other, second]

    def forward(
        self,
        visual_tokens: torch.Tensor,
        audio_tokens: torch.Tensor,
        question_tokens: torch.Tensor | None = None,
        question_video_index: torch.Tensor | None = None,
        question_lengths: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Answer every question about the clips of a batch.

        Args:
            visual_tokens: (B, T, N+1, D) frame tokens, CLS first (N >= 1 patches).
            audio_tokens: (B, T, M+1, D) spectrogram-window tokens, CLS first.
            question_tokens: (Q, L) long word indices, right-padded with 0.
            question_video_index: (Q,) long, the clip (0..B-1) each question is about.
                Neither is needed (nor read) in the grounding stage.
            question_lengths: optional, the questions' lengths as `question_lengths` counts
                them, computed on the host (a list, which DDP leaves where it is).

        Returns:
            dict with
            - "answer_logits": (Q, num_answers); None in the grounding stage;
            - "match_logits": (2*B*T, 2) audio-visual match logits, the B*T positive pairs
              (each second's audio with its own frame, flattened over (B, T)) first, then
              the B*T negatives (its audio with a frame of another clip of the batch, at a
              random second); None when B == 1, where no other video exists to draw
              negatives from;
            - "match_labels": (2*B*T,) long, 1 = same clip, 0 = other clip; None when B == 1.
        """
        batch, steps = visual_tokens.shape[:2]
        if audio_tokens.shape[:2] != (batch, steps):
            raise ValueError(
                f"visual tokens {tuple(visual_tokens.shape)} and audio tokens "
                f"{tuple(audio_tokens.shape)} disagree on (B, T)"
            )
        pooled_audio = audio_tokens[:, :, 0] if self.audio_pooling == "cls" else audio_tokens[:, :, 1:].mean(2)
        audio = self.audio_proj(pooled_audio)  # (B, T, h)
        patches = self.visual_proj(visual_tokens[:, :, 1:])  # (B, T, N, h)
        visual = self._ground(audio, patches)  # (B, T, h)

        match_logits = match_labels = None
        if batch > 1:
            negative = self._ground(audio, self._negative_patches(patches))
            pairs = torch.cat(
                [torch.cat([audio, visual], dim=-1), torch.cat([audio, negative], dim=-1)]
            )
            match_logits = self.match_classifier(pairs).reshape(2 * batch * steps, 2)
            match_labels = torch.cat(
                [
                    torch.ones(batch * steps, dtype=torch.long, device=audio.device),
                    torch.zeros(batch * steps, dtype=torch.long, device=audio.device),
                ]
            )

        if self.stage == "grounding":
            return {"answer_logits": None, "match_logits": match_logits, "match_labels": match_labels}
        question = self.question_encoder(question_tokens, question_lengths)  # (Q, h)
        q_audio = audio[question_video_index]  # (Q, T, h)
        q_visual = visual[question_video_index]
        audio_summary = self.audio_temporal(question, q_audio) + q_audio.mean(dim=1)
        visual_summary = self.visual_temporal(question, q_visual) + q_visual.mean(dim=1)
        fused = self.fusion(torch.tanh(torch.cat([audio_summary, visual_summary], dim=-1)))
        answer_logits = self.answer_classifier(torch.tanh(fused * question))
        return {
            "answer_logits": answer_logits,
            "match_logits": match_logits,
            "match_labels": match_labels,
        }

    def loss(
        self, outputs: dict[str, torch.Tensor | None], answer_index: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE(answer) + match_weight * CE(audio-visual match), as AVST.

        When the batch had one clip (no match logits) the match term is skipped. It is then
        replaced by zero times the match classifier's parameters, so those parameters still
        receive a (zero) gradient and DDP without `find_unused_parameters` does not stall.

        Args:
            outputs: what `forward` returned.
            answer_index: (Q,) long target answer of each question.

        Returns:
            (total loss, {"answer_loss": detached, "match_loss": detached, 0 when skipped}).
        """
        if self.stage == "grounding":
            return self.match_loss(outputs)
        answer_loss = F.cross_entropy(outputs["answer_logits"], answer_index)
        if outputs["match_logits"] is None:
            match_loss = sum(p.sum() for p in self.match_classifier.parameters()) * 0.0
        else:
            match_loss = F.cross_entropy(outputs["match_logits"], outputs["match_labels"])
        total = answer_loss + self.match_weight * match_loss
        return total, {"answer_loss": answer_loss.detach(), "match_loss": match_loss.detach()}

    def match_loss(self, outputs: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The grounding stage's loss: CE(audio-visual match), as AVST's grounding_gen.

        Raises:
            ValueError: the batch had one clip, so there was no other video to draw negatives
                from (training batches are whole, so data.batch_size >= 2 avoids this).
        """
        if outputs["match_logits"] is None:
            raise ValueError("the grounding stage needs at least 2 clips per batch (negatives are "
                             "frames of other videos): set data.batch_size >= 2")
        loss = F.cross_entropy(outputs["match_logits"], outputs["match_labels"])
        return loss, {"match_loss": loss.detach()}


def avqa_counts(
    pred: torch.Tensor, target: torch.Tensor, question_types: Sequence[str]
) -> torch.Tensor:
    """Correct and total answers per question type, ready for an all-reduce (SUM).

    Args:
        pred: (Q,) predicted answer indices.
        target: (Q,) true answer indices.
        question_types: Q names from QUESTION_TYPES.

    Returns:
        (len(QUESTION_TYPES), 2) int64 tensor on pred's device; row i is
        [correct, total] for QUESTION_TYPES[i].
    """
    if not (pred.shape == target.shape == (len(question_types),)):
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and "
            f"{len(question_types)} question types must all have length Q"
        )
    unknown = sorted({t for t in question_types if t not in _TYPE_INDEX})
    if unknown:
        raise ValueError(f"unknown question types {unknown}; known: {', '.join(QUESTION_TYPES)}")
    rows = torch.tensor([_TYPE_INDEX[t] for t in question_types], dtype=torch.long, device=pred.device)
    correct = (pred == target).long()
    counts = torch.zeros(len(QUESTION_TYPES), 2, dtype=torch.long, device=pred.device)
    counts[:, 0].index_add_(0, rows, correct)
    counts[:, 1].index_add_(0, rows, torch.ones_like(correct))
    return counts


def avqa_accuracies(counts: torch.Tensor) -> dict[str, float]:
    """Per-type, per-group, group-mean and overall accuracy in percent from summed counts.

    A group's accuracy is a micro-average (correct / questions in the group), as MUSIC-AVQA
    reports it, not a mean of its types' accuracies. "avg" is the AV-PEA paper's headline
    (its Table 2 "Avg"): the plain mean of the Audio, Visual and Audio-Visual accuracies, so
    each group weighs the same whatever its number of questions. "overall" is the micro
    accuracy over all questions. A type or group with no questions is omitted rather than
    reported as 0 or NaN, and "avg" is then the mean of the groups that have questions.

    Args:
        counts: (len(QUESTION_TYPES), 2) [correct, total] rows from `avqa_counts`
            (summed over batches and ranks).

    Returns:
        {type name: acc, group name: acc, "avg": acc, "overall": acc} for the non-empty ones.
    """
    counts = counts.detach().cpu().long()
    if counts.shape != (len(QUESTION_TYPES), 2):
        raise ValueError(f"counts must have shape ({len(QUESTION_TYPES)}, 2), got {tuple(counts.shape)}")
    per_type = {t: (int(counts[i, 0]), int(counts[i, 1])) for i, t in enumerate(QUESTION_TYPES)}
    buckets: dict[str, list[str]] = {t: [t] for t in QUESTION_TYPES}
    for group in GROUPS:
        buckets[group] = [t for t in QUESTION_TYPES if TYPE_GROUP[t] == group]
    result = {}
    for name, types in buckets.items():
        correct = sum(per_type[t][0] for t in types)
        total = sum(per_type[t][1] for t in types)
        if total:
            result[name] = 100.0 * correct / total
    groups = [result[g] for g in GROUPS if g in result]
    if groups:
        result["avg"] = sum(groups) / len(groups)
        total = int(counts[:, 1].sum())
        result["overall"] = 100.0 * int(counts[:, 0].sum()) / total
    return result
