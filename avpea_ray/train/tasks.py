"""What differs between tasks in training: head arguments, batch -> inputs, loss, metrics.

A `Task` turns a reader batch (`frames`, `fbank`, per-sample `meta`) into the head's inputs
and targets, and keeps its metric as a tensor of counts so DDP ranks can sum it with one
all-reduce before the accuracies are computed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ..data import storage
from ..data.shards import ShardIndex
from ..heads import avel, avqa


@dataclass
class Batch:
    """A batch moved to the device, split into model inputs and targets."""

    frames: torch.Tensor
    fbank: torch.Tensor
    head_inputs: dict[str, torch.Tensor]
    targets: dict[str, Any]
    num_items: int  # questions (AVQA) or clips (AVE): what accuracy counts


class AVQATask:
    """MUSIC-AVQA: one sample per video holding all its questions."""

    name = "avqa"
    primary_metric = "overall"

    def __init__(self, vocab: dict[str, Any]):
        self.vocab = vocab
        self.answers = vocab["answers"]
        counts = vocab.get("answer_counts")
        # The most frequent TRAIN answer: always answering it is the majority baseline.
        self.majority_answer = max(range(len(counts)), key=counts.__getitem__) if counts else -1

    @classmethod
    def from_index(cls, index: ShardIndex, vocab_url: str = "") -> "AVQATask":
        """Read the train split's vocabularies (`vocab.json` beside its shards by default)."""
        url = vocab_url or storage.join(index.root, index.extra.get("vocab", "vocab.json"))
        try:
            return cls(json.loads(storage.read_bytes(url)))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"AVQA vocabulary {url!r} not found: shard the train split "
                                    f"with sharding.musicavqa or set data.vocab") from err

    def head_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab["question_words"]), "num_answers": len(self.answers)}

    def make_batch(self, batch: dict, device: torch.device) -> Batch:
        questions = [(i, q) for i, meta in enumerate(batch["meta"]) for q in meta["questions"]]
        length = max((len(q["question_tokens"]) for _, q in questions), default=1)
        tokens = torch.zeros(len(questions), max(length, 1), dtype=torch.long)
        for row, (_, q) in enumerate(questions):
            tokens[row, :len(q["question_tokens"])] = torch.tensor(q["question_tokens"])
        return Batch(
            frames=batch["frames"].to(device, non_blocking=True),
            fbank=batch["fbank"].to(device, non_blocking=True),
            head_inputs={"question_tokens": tokens.to(device),
                         "question_video_index": torch.tensor([i for i, _ in questions], device=device)},
            targets={"answer_index": torch.tensor([q["answer_index"] for _, q in questions], device=device),
                     "question_types": [q["question_type"] for _, q in questions]},
            num_items=len(questions))

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        # Answers unseen in train (index -1, val/test only) cannot be learned: no loss.
        target = batch.targets["answer_index"]
        known = target >= 0
        outputs = dict(outputs, answer_logits=outputs["answer_logits"][known])
        return head.loss(outputs, target[known])

    def counts(self, outputs: dict, batch: Batch) -> torch.Tensor:
        """(10, 2) [correct, total]: the 9 question types, then the majority baseline."""
        target = batch.targets["answer_index"]
        prediction = outputs["answer_logits"].argmax(-1)
        per_type = avqa.avqa_counts(prediction, target, batch.targets["question_types"])
        majority = torch.stack([(target == self.majority_answer).sum(), torch.tensor(len(target))])
        return torch.cat([per_type, majority.to(per_type).unsqueeze(0)])

    def empty_counts(self, device) -> torch.Tensor:
        return torch.zeros(len(avqa.QUESTION_TYPES) + 1, 2, dtype=torch.long, device=device)

    def metrics(self, counts: torch.Tensor) -> dict[str, float]:
        metrics = avqa.avqa_accuracies(counts[:-1])
        correct, total = counts[-1].tolist()
        if self.majority_answer >= 0 and total:
            metrics["majority_acc"] = 100.0 * correct / total
        return metrics


class AVELTask:
    """AVE: per-second event / background and the clip's category (CMBS rule).

    AVE has 28 categories and labels background seconds 28 whatever subset a split holds,
    so the head always has 28 classes; category names (for per-class metrics) come from the
    train index.
    """

    name = "avel"
    primary_metric = "accuracy"
    num_classes = 28

    def __init__(self, categories: list[str] | None = None):
        names = list(categories or [])
        self.class_names = names + [f"class_{i}" for i in range(len(names), self.num_classes)] + ["background"]

    @classmethod
    def from_index(cls, index: ShardIndex, vocab_url: str = "") -> "AVELTask":
        return cls(index.extra.get("categories"))

    def head_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def make_batch(self, batch: dict, device: torch.device) -> Batch:
        labels = torch.tensor([meta["labels"] for meta in batch["meta"]], device=device)
        return Batch(frames=batch["frames"].to(device, non_blocking=True),
                     fbank=batch["fbank"].to(device, non_blocking=True),
                     head_inputs={}, targets={"labels": labels}, num_items=len(labels))

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        return head.loss(outputs, batch.targets["labels"])

    def counts(self, outputs: dict, batch: Batch) -> torch.Tensor:
        """(29, 2) [correct, total] seconds per true label (28 categories, then background)."""
        labels = batch.targets["labels"].flatten()
        correct = (avel.avel_predict(outputs).flatten() == labels).long()
        counts = self.empty_counts(labels.device)
        counts[:, 0].index_add_(0, labels, correct)
        counts[:, 1].index_add_(0, labels, torch.ones_like(correct))
        return counts

    def empty_counts(self, device) -> torch.Tensor:
        return torch.zeros(self.num_classes + 1, 2, dtype=torch.long, device=device)

    def metrics(self, counts: torch.Tensor) -> dict[str, float]:
        correct, total = counts.sum(0).tolist()
        if not total:
            return {}
        per_class = {name: 100.0 * c / t for name, (c, t) in zip(self.class_names, counts.tolist()) if t}
        return {"accuracy": 100.0 * correct / total} | per_class


TASKS = {"avqa": AVQATask, "avel": AVELTask}


def make_task(name: str, train_index: ShardIndex, vocab_url: str = ""):
    """The task object for `name`, with what it needs from the train split's index."""
    return TASKS[name].from_index(train_index, vocab_url)
