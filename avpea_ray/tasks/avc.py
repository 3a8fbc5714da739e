"""Audio-visual captioning (VALOR-32K style): a caption decoder, COCO caption metrics."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..heads.avc import AVCHead
from ..metrics.captions import caption_scores
from .base import Batch
from .distributed import broadcast_object, gather_objects, is_distributed
from .valor_clips import CaptionedClipsTask


@dataclass
class AVCHeadConfig:
    """`head:` for avc.

    Attributes:
        text_model: the tokenizer: "random" (WordPiece over the train captions' vocab.txt), a
            local `save_pretrained` directory or a Hugging Face name (VALOR: bert-base-uncased).
            The decoder itself is trained from scratch.
        hidden: decoder width.
        layers: decoder layers.
        num_heads: attention heads; must divide hidden.
        memory_patches: pooled patch tokens per stream and time step.
        max_steps: most time steps a clip may have.
        dropout: decoder dropout.
    """

    text_model: str = "random"
    hidden: int = 256
    layers: int = 2
    num_heads: int = 4
    memory_patches: int = 1
    max_steps: int = 64
    dropout: float = 0.1

    def __post_init__(self):
        if self.num_heads < 1 or self.hidden % self.num_heads:
            raise ConfigError(f"head.hidden={self.hidden} must be divisible by head.num_heads={self.num_heads}")


class AVCTask(CaptionedClipsTask):
    """Teacher-forced cross-entropy over up to `data.captions_per_clip` captions per clip (one
    backbone pass per clip), evaluated on decoded captions with the COCO caption metrics
    (`CaptionEvaluator`)."""

    name = "avc"
    head_class = AVCHead
    head_config = AVCHeadConfig
    primary_metric = "CIDEr"
    primary_metric_label = "CIDEr"
    reference_head_args = {"vocab_size": 30522, "bos_id": 101, "eos_id": 102, "pad_id": 0, "max_length": 32}  # bert-base-uncased
    demo_config = "demo_avc.yaml"

    def data_head_args(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"vocab_size": len(tok), "bos_id": tok.cls_token_id if tok.cls_token_id is not None
                else tok.bos_token_id, "eos_id": tok.sep_token_id if tok.sep_token_id is not None
                else tok.eos_token_id, "pad_id": tok.pad_token_id, "max_length": self.max_tokens}

    def check(self, model) -> None:
        super().check(model)
        if self.cfg.evaluation.meteor != "never" and shutil.which("java") is None:
            raise ConfigError("evaluation.meteor: METEOR runs the COCO caption toolkit's Java jar and "
                              "there is no `java` on PATH: install a JRE or set evaluation.meteor=never")

    def make_batch(self, raw: dict, device: torch.device, training: bool = True) -> Batch:
        texts, owners = self.pick_captions(raw, self.cfg.data.captions_per_clip if training else None)
        tokens, _ = self.tokenize(texts, device)
        return self._batch(raw, device, texts, owners, caption_tokens=tokens,
                           caption_video_index=torch.tensor(owners, device=device))

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        return head.loss(outputs)

    def evaluator(self, final: bool = False) -> "CaptionEvaluator":
        meteor = self.cfg.evaluation.meteor == "always" or (final and self.cfg.evaluation.meteor == "test")
        return CaptionEvaluator(self.tokenizer, self.cfg.evaluation.beam_size,
                                self.cfg.evaluation.length_penalty, meteor)

    @classmethod
    def baseline_line(cls, metrics: dict[str, float]) -> str | None:
        if "CIDEr" not in metrics or "baseline_CIDEr" not in metrics:
            return None
        return (f"CIDEr {metrics['CIDEr']:.2f} vs. {metrics['baseline_CIDEr']:.2f} for captions "
                f"of other clips (a fluent captioner that ignores the clip)")


class CaptionEvaluator:
    """Decodes a caption for every clip of a split, gathers them from all ranks and scores
    them against the clips' reference captions with the COCO caption metrics (on rank 0,
    which needs Java for METEOR; the others receive the result)."""

    def __init__(self, tokenizer, beam_size: int, length_penalty: float, meteor: bool):
        self.tokenizer, self.beam_size, self.length_penalty, self.meteor = (
            tokenizer, beam_size, length_penalty, meteor)
        self.generated: dict[str, str] = {}
        self.references: dict[str, list[str]] = {}

    def update(self, model, batch: Batch) -> None:
        visual, audio = model.forward_features(batch.frames, batch.fbank)
        decoded = model.head.generate(visual, audio, beam_size=self.beam_size,
                                      length_penalty=self.length_penalty)
        for video_id, ids, references in zip(batch.targets["video_ids"], decoded, batch.targets["references"]):
            self.generated[video_id] = self.tokenizer.decode(ids, skip_special_tokens=True)
            self.references[video_id] = references

    def compute(self, device) -> dict[str, float]:
        generated: dict[str, str] = {}
        references: dict[str, list[str]] = {}
        for part_generated, part_references in gather_objects((self.generated, self.references)):
            generated.update(part_generated)
            references.update(part_references)
        metrics = None
        if not is_distributed() or torch.distributed.get_rank() == 0:
            metrics = caption_scores(generated, references, meteor=self.meteor) if generated else {}
            if generated:
                metrics |= self._shuffled_baseline(references)
                metrics["num_videos"] = float(len(generated))
        return broadcast_object(metrics)

    @staticmethod
    def _shuffled_baseline(references: dict[str, list[str]]) -> dict[str, float]:
        """Each clip "captioned" with another clip's first reference: fluent text that ignores
        the clip. A captioner that uses what it sees and hears must beat it."""
        ids = sorted(references)
        shifted = {video_id: references[ids[(i + 1) % len(ids)]][0] for i, video_id in enumerate(ids)}
        scores = caption_scores(shifted, references, meteor=False)
        return {f"baseline_{k}": scores[k] for k in ("BLEU-4", "ROUGE-L", "CIDEr")}
