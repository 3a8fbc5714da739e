"""MUSIC-AVQA question answering: AVST-style head, accuracy per question type and group.

The headline metric, and the one that selects checkpoints and sweep trials, is `avg`: the mean
of the Audio, Visual and Audio-Visual group accuracies, as the AV-PEA paper's Table 2 "Avg".
`overall` (accuracy over all questions) is reported beside it.

`head.stage: grounding` is AVST's first stage on the same shards: the audio-visual match task
alone, scored by its match accuracy (`match_acc`, positives and negatives; chance is 50%). Its
adapters and head initialise the QA stage through `model.init_from`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..data import storage
from ..heads.avqa import QUESTION_TYPES, AVQAHead, avqa_accuracies, avqa_counts, question_lengths
from .base import DAMAGE_KEYS, Batch, CountEvaluator, Task, host_to_device, to_device

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


@dataclass
class AVQAHeadConfig:
    """`head:` for avqa (AVST's values are the defaults).

    Attributes:
        hidden: head width (512 in AVST).
        num_heads: heads of the temporal-grounding attention; must divide hidden.
        match_weight: weight of the audio-visual match loss (0.5 in AVST).
        stage: "qa" (answers + match) or "grounding" (AVST's first stage: the match task alone).
        audio_pooling: the audio feature per second: "cls" (the audio CLS token) or "mean"
            (the mean of the audio patch tokens, as LAVISH).
    """

    hidden: int = 512
    num_heads: int = 4
    match_weight: float = 0.5
    stage: str = "qa"
    audio_pooling: str = "cls"

    def __post_init__(self):
        for name, value, allowed in (("stage", self.stage, AVQAHead.STAGES),
                                     ("audio_pooling", self.audio_pooling, AVQAHead.AUDIO_POOLINGS)):
            if value not in allowed:
                raise ConfigError(f"head.{name} must be one of {list(allowed)}, got {value!r}")
        if self.num_heads < 1 or self.hidden < 4 or self.hidden % self.num_heads:
            raise ConfigError(f"head.hidden={self.hidden} must be >= 4 and divisible by "
                              f"head.num_heads={self.num_heads}")


def read_vocab(cfg, index) -> dict[str, Any]:
    """The train split's vocabularies (`vocab.json` beside its shards by default)."""
    url = cfg.data.vocab or storage.join(index.root, index.extra.get("vocab", "vocab.json"))
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError as err:
        raise ConfigError(f"data.vocab: AVQA vocabulary {url!r} not found: shard the train split "
                          f"with sharding.musicavqa or set data.vocab") from err


class AVQATask(Task):
    """MUSIC-AVQA: one sample per video holding all its questions."""

    name = "avqa"
    dataset = "musicavqa"
    head_class = AVQAHead
    head_config = AVQAHeadConfig
    primary_metric = "avg"
    primary_metric_label = "AVQA Avg: mean of the 3 group accuracies, %"
    reference_head_args = {"vocab_size": 100, "num_answers": 42}  # MUSIC-AVQA: 42 answers
    demo_config = "demo_avqa.yaml"

    @classmethod
    def selection(cls, cfg) -> tuple[str, str]:
        if cfg.head.stage == "grounding":
            return "match_acc", "audio-visual match accuracy (grounding stage), %"
        return cls.primary_metric, cls.primary_metric_label

    @classmethod
    def variant(cls, cfg) -> str:
        return "grounding" if cfg.head.stage == "grounding" else ""

    def __init__(self, cfg, vocab: dict[str, Any]):
        super().__init__(cfg)
        self.grounding = cfg is not None and getattr(cfg.head, "stage", "qa") == "grounding"
        self.vocab = vocab
        self.answers = vocab["answers"]
        counts = vocab.get("answer_counts")
        # The most frequent TRAIN answer: always answering it is the majority baseline.
        self.majority_answer = max(range(len(counts)), key=counts.__getitem__) if counts else -1

    @classmethod
    def from_config(cls, cfg, index) -> "AVQATask":
        return cls(cfg, read_vocab(cfg, index))

    def adapter_files(self) -> dict[str, bytes]:
        """The vocabularies (`predict` turns questions into ids and answers into words)."""
        return {"vocab.json": json.dumps(self.vocab, indent=1, ensure_ascii=False).encode("utf-8")}

    def data_head_args(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab["question_words"]), "num_answers": len(self.answers)}

    def check(self, model) -> None:
        if self.grounding:
            for name in ("batch_size", "eval_batch_size"):
                if getattr(self.cfg.data, name) < 2:
                    raise ConfigError(f"data.{name} must be >= 2 for head.stage=grounding: a clip's "
                                      f"negatives are frames of the other videos in its batch")

    def make_batch(self, raw: dict, device: torch.device, training: bool = True) -> Batch:
        if self.grounding:  # the match task needs no questions
            return to_device(raw, device, head_inputs={}, targets={})
        questions = [(i, q) for i, meta in enumerate(raw["meta"]) for q in meta["questions"]]
        length = max((len(q["question_tokens"]) for _, q in questions), default=1)
        tokens = torch.zeros(len(questions), max(length, 1), dtype=torch.long)
        for row, (_, q) in enumerate(questions):
            tokens[row, :len(q["question_tokens"])] = torch.tensor(q["question_tokens"])
        return to_device(
            raw, device,
            head_inputs={"question_tokens": host_to_device(tokens, device),
                         "question_video_index": host_to_device(torch.tensor([i for i, _ in questions]), device),
                         "question_lengths": question_lengths(tokens)},
            targets={"answer_index": host_to_device(torch.tensor([q["answer_index"] for _, q in questions]), device),
                     "question_types": [q["question_type"] for _, q in questions]})

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        if self.grounding:
            return head.match_loss(outputs)
        # Answers unseen in train (index -1, val/test only) cannot be learned: no loss. They
        # are ignored by the cross-entropy (the mean over the others) rather than masked out:
        # a boolean mask's size is known only after a host synchronisation.
        target = batch.targets["answer_index"]
        return head.loss(outputs, torch.where(target >= 0, target, IGNORE_INDEX))

    def counts(self, outputs: dict, batch: Batch) -> torch.Tensor:
        """(18, 2) [correct, total] per question type: the model's 9 rows, then the 9 rows of
        always answering the majority train answer (the baseline, in the same conventions).
        Grounding stage: (1, 2) [correct, total] match decisions."""
        if self.grounding:
            logits, labels = outputs["match_logits"], outputs["match_labels"]
            if logits is None:  # a one-clip eval batch: no other video to draw negatives from
                return self.empty_counts(batch.frames.device)
            return torch.stack([(logits.argmax(-1) == labels).sum(), torch.tensor(len(labels))]
                               ).to(labels.device).view(1, 2)
        target, types = batch.targets["answer_index"], batch.targets["question_types"]
        model = avqa_counts(outputs["answer_logits"].argmax(-1), target, types)
        majority = avqa_counts(torch.full_like(target, self.majority_answer), target, types)
        return torch.cat([model, majority])

    def empty_counts(self, device) -> torch.Tensor:
        rows = 1 if self.grounding else 2 * len(QUESTION_TYPES)
        return torch.zeros(rows, 2, dtype=torch.long, device=device)

    def evaluator(self, final: bool = False) -> CountEvaluator:
        return CountEvaluator(self)

    def metrics(self, counts: torch.Tensor) -> dict[str, float]:
        if self.grounding:
            correct, total = counts[0].tolist()
            return {"match_acc": 100.0 * correct / total} if total else {}
        metrics = avqa_accuracies(counts[:len(QUESTION_TYPES)])
        majority = avqa_accuracies(counts[len(QUESTION_TYPES):])
        if self.majority_answer >= 0 and majority:
            metrics["majority_avg"] = majority["avg"]
            metrics["majority_acc"] = majority["overall"]
        return metrics

    @classmethod
    def summary(cls, scores: dict[str, float]) -> dict[str, Any]:
        headline = ("avg", "overall", "majority_avg", "majority_acc", *DAMAGE_KEYS)
        return {"avg_acc": scores.get("avg"), "overall_acc": scores.get("overall"),
                "majority_avg": scores.get("majority_avg"), "majority_acc": scores.get("majority_acc"),
                "accuracies": {k: v for k, v in scores.items() if k not in headline}}

    @classmethod
    def baseline_line(cls, metrics: dict[str, float]) -> str | None:
        if metrics.get("match_acc") is not None:
            return (f"audio-visual match accuracy {metrics['match_acc']:.2f}% (grounding stage; half the "
                    f"pairs are negatives, so chance is 50%)")
        if any(metrics.get(k) is None for k in ("avg", "overall", "majority_avg", "majority_acc")):
            return None
        return (f"Avg accuracy {metrics['avg']:.2f}% (overall {metrics['overall']:.2f}%) vs. always "
                f"answering the most frequent train answer {metrics['majority_avg']:.2f}% "
                f"(overall {metrics['majority_acc']:.2f}%)")
