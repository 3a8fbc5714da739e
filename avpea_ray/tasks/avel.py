"""AVE event localisation: a CMBS-style head, per-second accuracy (the CMBS rule)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..heads.avel import AVELHead, avel_predict
from .base import DAMAGE_KEYS, Batch, CountEvaluator, Task, to_device


@dataclass
class AVELHeadConfig:
    """`head:` for avel (CMBS's values in configs/avel_*.yaml).

    Attributes:
        hidden: head width; even and divisible by num_heads.
        num_heads: cross-modal attention heads.
        alpha: weight of the background-suppression gate.
        dropout: head dropout.
    """

    hidden: int = 256
    num_heads: int = 4
    alpha: float = 0.1
    dropout: float = 0.1

    def __post_init__(self):
        if self.num_heads < 1 or self.hidden % 2 or self.hidden % self.num_heads:
            raise ConfigError(f"head.hidden={self.hidden} must be even and divisible by "
                              f"head.num_heads={self.num_heads}")


class AVELTask(Task):
    """AVE: per-second event / background and the clip's category (CMBS rule).

    AVE has 28 categories and labels background seconds 28 whatever subset a split holds,
    so the head always has 28 classes; category names (for per-class metrics) come from the
    train index.
    """

    name = "avel"
    dataset = "ave"
    head_class = AVELHead
    head_config = AVELHeadConfig
    primary_metric = "accuracy"
    primary_metric_label = "AVE accuracy, %"
    reference_head_args = {"num_classes": 28}  # AVE: 28 event classes
    demo_config = "demo_avel.yaml"
    num_classes = 28

    def __init__(self, cfg, categories: list[str] | None = None):
        super().__init__(cfg)
        names = list(categories or [])
        self.class_names = names + [f"class_{i}" for i in range(len(names), self.num_classes)] + ["background"]

    @classmethod
    def from_config(cls, cfg, index) -> "AVELTask":
        return cls(cfg, index.extra.get("categories"))

    def data_head_args(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def make_batch(self, raw: dict, device: torch.device, training: bool = True) -> Batch:
        labels = torch.tensor([meta["labels"] for meta in raw["meta"]], device=device)
        return to_device(raw, device, head_inputs={}, targets={"labels": labels})

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        return head.loss(outputs, batch.targets["labels"])

    def counts(self, outputs: dict, batch: Batch) -> torch.Tensor:
        """(29, 2) [correct, total] seconds per true label (28 categories, then background)."""
        labels = batch.targets["labels"].flatten()
        correct = (avel_predict(outputs).flatten() == labels).long()
        counts = self.empty_counts(labels.device)
        counts[:, 0].index_add_(0, labels, correct)
        counts[:, 1].index_add_(0, labels, torch.ones_like(correct))
        return counts

    def empty_counts(self, device) -> torch.Tensor:
        return torch.zeros(self.num_classes + 1, 2, dtype=torch.long, device=device)

    def evaluator(self, final: bool = False) -> CountEvaluator:
        return CountEvaluator(self)

    def metrics(self, counts: torch.Tensor) -> dict[str, float]:
        correct, total = counts.sum(0).tolist()
        if not total:
            return {}
        per_class = {name: 100.0 * c / t for name, (c, t) in zip(self.class_names, counts.tolist()) if t}
        return {"accuracy": 100.0 * correct / total} | per_class

    @classmethod
    def summary(cls, scores: dict[str, float]) -> dict[str, Any]:
        return {"accuracy": scores.get("accuracy"),
                "accuracies": {k: v for k, v in scores.items() if k not in ("accuracy", *DAMAGE_KEYS)}}
