"""AVE event localisation: CMBS's supervised model as the head, per-second accuracy (the CMBS rule)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..config import ConfigError
from ..heads.avel import ARCHITECTURES, CMBS_ONLY_SETTINGS, avel_predict, build_avel_head
from .base import DAMAGE_KEYS, Batch, CountEvaluator, Task, to_device


@dataclass
class AVELHeadConfig:
    """`head:` for avel; the defaults are CMBS's (configs/avel_*.yaml cite where each comes from).

    Attributes:
        architecture: "cmbs" (CMBS's supervised model, heads/cmbs.py) or "compact" (a small
            CMBS-style head for demos and tests, heads/avel.py).
        hidden: CMBS's d_model; even and divisible by num_heads.
        num_heads: attention heads.
        alpha: weight of the background-suppression gate.
        dropout: head dropout (CMBS: after its visual FC and in its guided attention).
        gamma: cmbs only: weight of the class-activation scores in the clip's class logits.
        beta: cmbs only: weight of the guided attention's self-attention branch.
        feedforward: cmbs only: FFN width of the temporal encoder/decoder layers.
        visual_width: cmbs only: channels of the visual map the patch tokens are mapped to.
        audio_width: cmbs only: width the audio CLS token is mapped to.
        attention_width: cmbs only: width of the guided attention's projections.
        top_k: cmbs only: seconds averaged per class for the class-activation scores.
    """

    architecture: str = "cmbs"
    hidden: int = 256
    num_heads: int = 4
    alpha: float = 0.1
    dropout: float = 0.2
    gamma: float = 0.3
    beta: float = 0.4
    feedforward: int = 1024
    visual_width: int = 512
    audio_width: int = 128
    attention_width: int = 256
    top_k: int = 4

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"head.architecture must be one of {list(ARCHITECTURES)}, "
                              f"got {self.architecture!r}")
        if self.num_heads < 1 or self.hidden % 2 or self.hidden % self.num_heads:
            raise ConfigError(f"head.hidden={self.hidden} must be even and divisible by "
                              f"head.num_heads={self.num_heads}")
        if self.architecture == "compact":
            # The compact head has none of these: a changed value would be silently ignored.
            defaults = {f.name: f.default for f in fields(self)}
            changed = [name for name in CMBS_ONLY_SETTINGS if getattr(self, name) != defaults[name]]
            if changed:
                raise ConfigError(f"head.{changed[0]} applies to head.architecture 'cmbs' only")
            return
        for name in ("feedforward", "visual_width", "audio_width", "attention_width", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"head.{name}={getattr(self, name)} must be positive")
        if self.visual_width % 4:
            raise ConfigError(f"head.visual_width={self.visual_width} must be divisible by 4 "
                              "(CMBS's query/key width is a quarter of it)")


class AVELTask(Task):
    """AVE: per-second event / background and the clip's category (CMBS's model and rule).

    AVE has 28 categories and labels background seconds 28 whatever subset a split holds,
    so the head always has 28 classes; category names (for per-class metrics) come from the
    train index.
    """

    name = "avel"
    dataset = "ave"
    head_class = build_avel_head
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

    def adapter_files(self) -> dict[str, bytes]:
        """The class names, background last (`predict` labels each second with them)."""
        return {"classes.json": json.dumps(self.class_names, ensure_ascii=False).encode("utf-8")}

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
