"""Text <-> audio-visual retrieval (VALOR-32K style): symmetric InfoNCE, R@k both directions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..heads.avr import AVRHead
from ..metrics.retrieval import retrieval_metrics
from .base import Batch
from .distributed import gather_objects, gather_with_local_grad
from .valor_clips import CaptionedClipsTask


@dataclass
class AVRHeadConfig:
    """`head:` for avr.

    Attributes:
        text_model: "random" (a small BERT over the train captions' vocab.txt), a local
            `save_pretrained` directory, or a Hugging Face name (VALOR: bert-base-uncased).
        text_config: sizes of the "random" text model (BERT config keys).
        embed_dim: width of the shared embedding space.
        freeze_text: keep the text encoder fixed (only its projection trains).
        init_temperature: the softmax temperature the learnable scale starts at (CLIP: 0.07).
    """

    text_model: str = "random"
    text_config: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 256
    freeze_text: bool = False
    init_temperature: float = 0.07


class AVRTask(CaptionedClipsTask):
    """Training pairs each clip with one random caption of its own; evaluation ranks every
    clip for every caption of the split (`RetrievalEvaluator`)."""

    name = "avr"
    head_class = AVRHead
    head_config = AVRHeadConfig
    primary_metric = "t2v_Rsum"
    primary_metric_label = "text->video R@1+R@5+R@10"
    reference_head_args = {"vocab_size": 30522}  # bert-base-uncased's vocabulary
    demo_config = "demo_avr.yaml"

    def data_head_args(self) -> dict[str, Any]:
        return {"vocab_size": len(self.tokenizer)}

    def make_batch(self, raw: dict, device: torch.device, training: bool = True) -> Batch:
        texts, owners = self.pick_captions(raw, per_clip=1 if training else None)
        tokens, mask = self.tokenize(texts, device)
        return self._batch(raw, device, texts, owners, caption_tokens=tokens, caption_mask=mask)

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        # Negatives from every rank: each rank's clips against all ranks' captions.
        return AVRHead.loss(gather_with_local_grad(outputs["video_embedding"]),
                            gather_with_local_grad(outputs["text_embedding"]), outputs["logit_scale"])

    def evaluator(self, final: bool = False) -> "RetrievalEvaluator":
        return RetrievalEvaluator()

    @classmethod
    def baseline_line(cls, metrics: dict[str, float]) -> str | None:
        if "t2v_R@1" not in metrics or "chance_R@1" not in metrics:
            return None
        return (f"text->video R@1/5/10 {metrics['t2v_R@1']:.1f}/{metrics['t2v_R@5']:.1f}/"
                f"{metrics['t2v_R@10']:.1f} vs. ranking at random {metrics['chance_R@1']:.1f}/"
                f"{metrics['chance_R@5']:.1f}/{metrics['chance_R@10']:.1f}")


class RetrievalEvaluator:
    """Embeds every clip and caption of a split, gathers them from all ranks and ranks every
    clip for every caption (R@1/5/10, median and mean rank, both directions)."""

    def __init__(self):
        self.videos: dict[str, torch.Tensor] = {}
        self.captions: list[tuple[str, torch.Tensor]] = []

    def update(self, model, batch: Batch) -> None:
        visual, audio = model.forward_features(batch.frames, batch.fbank)
        videos = model.head.encode_video(visual, audio).float().cpu()
        texts = model.head.encode_text(batch.head_inputs["caption_tokens"],
                                       batch.head_inputs["caption_mask"]).float().cpu()
        ids = batch.targets["video_ids"]
        self.videos.update(zip(ids, videos))
        owners = batch.targets["caption_video_index"].tolist()
        self.captions += [(ids[owner], text) for owner, text in zip(owners, texts)]

    def compute(self, device) -> dict[str, float]:
        videos: dict[str, torch.Tensor] = {}
        captions: list[tuple[str, torch.Tensor]] = []
        for part_videos, part_captions in gather_objects((self.videos, self.captions)):
            videos.update(part_videos)
            captions += part_captions
        if not videos:
            return {}
        order = sorted(videos)  # the same matrix whatever the rank layout
        column = {video_id: j for j, video_id in enumerate(order)}
        captions.sort(key=lambda pair: column[pair[0]])
        similarity = torch.stack([t for _, t in captions]) @ torch.stack([videos[v] for v in order]).t()
        metrics = retrieval_metrics(similarity, torch.tensor([column[v] for v, _ in captions]))
        # A model ranking clips at random: E[R@k] = k / clips.
        chance = {f"chance_R@{k}": 100.0 * min(k, len(order)) / len(order) for k in (1, 5, 10)}
        sums = {f"{d}_Rsum": sum(metrics[f"{d}_R@{k}"] for k in (1, 5, 10)) for d in ("t2v", "v2t")}
        return metrics | sums | chance | {"num_videos": float(len(order)), "num_captions": float(len(captions))}
