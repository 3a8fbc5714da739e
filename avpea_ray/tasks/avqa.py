"""MUSIC-AVQA question answering: AVST-style head, accuracy per question type and group.

The headline metric, and the one that selects checkpoints and sweep trials, is `avg`: the mean
of the Audio, Visual and Audio-Visual group accuracies, as the AV-PEA paper's Table 2 "Avg".
`overall` (accuracy over all questions) is reported beside it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..data import storage
from ..heads.avqa import QUESTION_TYPES, AVQAHead, avqa_accuracies, avqa_counts
from .base import DAMAGE_KEYS, Batch, CountEvaluator, Task, to_device


@dataclass
class AVQAHeadConfig:
    """`head:` for avqa (AVST's values are the defaults).

    Attributes:
        hidden: head width (512 in AVST).
        num_heads: heads of the temporal-grounding attention; must divide hidden.
        match_weight: weight of the audio-visual match loss (0.5 in AVST).
    """

    hidden: int = 512
    num_heads: int = 4
    match_weight: float = 0.5

    def __post_init__(self):
        if self.num_heads < 1 or self.hidden < 4 or self.hidden % self.num_heads:
            raise ConfigError(f"head.hidden={self.hidden} must be >= 4 and divisible by "
                              f"head.num_heads={self.num_heads}")


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

    def __init__(self, cfg, vocab: dict[str, Any]):
        super().__init__(cfg)
        self.vocab = vocab
        self.answers = vocab["answers"]
        counts = vocab.get("answer_counts")
        # The most frequent TRAIN answer: always answering it is the majority baseline.
        self.majority_answer = max(range(len(counts)), key=counts.__getitem__) if counts else -1

    @classmethod
    def from_config(cls, cfg, index) -> "AVQATask":
        """Read the train split's vocabularies (`vocab.json` beside its shards by default)."""
        url = cfg.data.vocab or storage.join(index.root, index.extra.get("vocab", "vocab.json"))
        try:
            return cls(cfg, json.loads(storage.read_bytes(url)))
        except FileNotFoundError as err:
            raise ConfigError(f"data.vocab: AVQA vocabulary {url!r} not found: shard the train split "
                              f"with sharding.musicavqa or set data.vocab") from err

    def data_head_args(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab["question_words"]), "num_answers": len(self.answers)}

    def make_batch(self, raw: dict, device: torch.device, training: bool = True) -> Batch:
        questions = [(i, q) for i, meta in enumerate(raw["meta"]) for q in meta["questions"]]
        length = max((len(q["question_tokens"]) for _, q in questions), default=1)
        tokens = torch.zeros(len(questions), max(length, 1), dtype=torch.long)
        for row, (_, q) in enumerate(questions):
            tokens[row, :len(q["question_tokens"])] = torch.tensor(q["question_tokens"])
        return to_device(
            raw, device,
            head_inputs={"question_tokens": tokens.to(device),
                         "question_video_index": torch.tensor([i for i, _ in questions], device=device)},
            targets={"answer_index": torch.tensor([q["answer_index"] for _, q in questions], device=device),
                     "question_types": [q["question_type"] for _, q in questions]})

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        # Answers unseen in train (index -1, val/test only) cannot be learned: no loss.
        target = batch.targets["answer_index"]
        known = target >= 0
        outputs = dict(outputs, answer_logits=outputs["answer_logits"][known])
        return head.loss(outputs, target[known])

    def counts(self, outputs: dict, batch: Batch) -> torch.Tensor:
        """(18, 2) [correct, total] per question type: the model's 9 rows, then the 9 rows of
        always answering the majority train answer (the baseline, in the same conventions)."""
        target, types = batch.targets["answer_index"], batch.targets["question_types"]
        model = avqa_counts(outputs["answer_logits"].argmax(-1), target, types)
        majority = avqa_counts(torch.full_like(target, self.majority_answer), target, types)
        return torch.cat([model, majority])

    def empty_counts(self, device) -> torch.Tensor:
        return torch.zeros(2 * len(QUESTION_TYPES), 2, dtype=torch.long, device=device)

    def evaluator(self, final: bool = False) -> CountEvaluator:
        return CountEvaluator(self)

    def metrics(self, counts: torch.Tensor) -> dict[str, float]:
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
        if any(metrics.get(k) is None for k in ("avg", "overall", "majority_avg", "majority_acc")):
            return None
        return (f"Avg accuracy {metrics['avg']:.2f}% (overall {metrics['overall']:.2f}%) vs. always "
                f"answering the most frequent train answer {metrics['majority_avg']:.2f}% "
                f"(overall {metrics['majority_acc']:.2f}%)")
