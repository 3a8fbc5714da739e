"""What differs between tasks in training: head arguments, batch -> inputs, loss, metrics.

A task turns a reader batch (`frames`, `fbank`, per-sample `meta`) into the head's inputs and
targets, computes the loss, and makes an evaluator for a split:
- AVQA and AVE keep their metrics as a tensor of counts that DDP ranks sum with one
  all-reduce (`CountEvaluator`);
- retrieval ranks every caption against every clip and captioning scores the corpus, so
  their evaluators gather embeddings / generated captions from all ranks first.

Each task names the dataset its shards must hold (`dataset`) and the metric that selects
checkpoints (`primary_metric`).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import torch

from ..data import storage
from ..data.shards import ShardIndex
from ..heads import avel, avqa
from ..heads.avr import AVRHead
from ..metrics.captions import caption_scores
from ..metrics.retrieval import retrieval_metrics
from ..model.text import load_tokenizer
from .config import TrainConfig
from .distributed import broadcast_object, gather_objects, gather_with_local_grad, is_distributed


@dataclass
class Batch:
    """A batch moved to the device, split into model inputs and targets."""

    frames: torch.Tensor
    fbank: torch.Tensor
    head_inputs: dict[str, torch.Tensor]
    targets: dict[str, Any]
    num_items: int  # questions (AVQA) or clips (AVE): what accuracy counts


class CountEvaluator:
    """Sums a count-metric task's `counts` over a split, then across ranks (one all-reduce)."""

    def __init__(self, task):
        self.task, self.counts = task, None

    def update(self, model, batch: Batch) -> None:
        outputs = model(batch.frames, batch.fbank, **batch.head_inputs)
        counts = self.task.counts(outputs, batch)
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self, device) -> dict[str, float]:
        # A rank that got no sample contributes zeros of the right shape.
        counts = self.task.empty_counts(device) if self.counts is None else self.counts.to(device)
        if is_distributed():
            torch.distributed.all_reduce(counts)
        return self.task.metrics(counts.cpu())


class AVQATask:
    """MUSIC-AVQA: one sample per video holding all its questions."""

    name = "avqa"
    dataset = "musicavqa"
    primary_metric = "overall"

    def __init__(self, vocab: dict[str, Any]):
        self.vocab = vocab
        self.answers = vocab["answers"]
        counts = vocab.get("answer_counts")
        # The most frequent TRAIN answer: always answering it is the majority baseline.
        self.majority_answer = max(range(len(counts)), key=counts.__getitem__) if counts else -1

    @classmethod
    def from_config(cls, cfg: TrainConfig, index: ShardIndex) -> "AVQATask":
        """Read the train split's vocabularies (`vocab.json` beside its shards by default)."""
        url = cfg.data.vocab or storage.join(index.root, index.extra.get("vocab", "vocab.json"))
        try:
            return cls(json.loads(storage.read_bytes(url)))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"AVQA vocabulary {url!r} not found: shard the train split "
                                    f"with sharding.musicavqa or set data.vocab") from err

    def head_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab["question_words"]), "num_answers": len(self.answers)}

    def make_batch(self, batch: dict, device: torch.device, training: bool = True) -> Batch:
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

    def evaluator(self, final: bool = False) -> CountEvaluator:
        return CountEvaluator(self)

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
    dataset = "ave"
    primary_metric = "accuracy"
    num_classes = 28

    def __init__(self, categories: list[str] | None = None):
        names = list(categories or [])
        self.class_names = names + [f"class_{i}" for i in range(len(names), self.num_classes)] + ["background"]

    @classmethod
    def from_config(cls, cfg: TrainConfig, index: ShardIndex) -> "AVELTask":
        return cls(index.extra.get("categories"))

    def head_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def make_batch(self, batch: dict, device: torch.device, training: bool = True) -> Batch:
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

    def evaluator(self, final: bool = False) -> CountEvaluator:
        return CountEvaluator(self)

    def metrics(self, counts: torch.Tensor) -> dict[str, float]:
        correct, total = counts.sum(0).tolist()
        if not total:
            return {}
        per_class = {name: 100.0 * c / t for name, (c, t) in zip(self.class_names, counts.tolist()) if t}
        return {"accuracy": 100.0 * correct / total} | per_class


class _CaptionTask:
    """What retrieval and captioning share: VALOR-style shards (one sample per clip holding all
    its captions) and a tokenizer ("random" reads the train split's vocab.txt)."""

    dataset = "valor"

    def __init__(self, tokenizer, cfg: TrainConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_tokens = cfg.data.max_caption_tokens

    @classmethod
    def from_config(cls, cfg: TrainConfig, index: ShardIndex):
        vocab = cfg.data.vocab or storage.join(index.root, index.extra.get("vocab", "vocab.txt"))
        return cls(load_tokenizer(cfg.head.get("text_model", "random"), vocab), cfg)

    def tokenize(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> `(C, L)` ids ([CLS] words [SEP], right-padded) and attention mask."""
        encoded = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def pick_captions(self, batch: dict, per_clip: int | None) -> tuple[list[str], list[int]]:
        """Each clip's captions (a random `per_clip` of them; all when None), and their clip."""
        texts, owners = [], []
        for i, meta in enumerate(batch["meta"]):
            captions = meta["captions"]
            if per_clip is not None and len(captions) > per_clip:
                captions = random.sample(captions, per_clip)  # python RNG: checkpointed per rank
            texts += captions
            owners += [i] * len(captions)
        return texts, owners

    def _batch(self, batch: dict, device, texts: list[str], owners: list[int], **head_inputs) -> Batch:
        return Batch(frames=batch["frames"].to(device, non_blocking=True),
                     fbank=batch["fbank"].to(device, non_blocking=True),
                     head_inputs=head_inputs,
                     targets={"captions": texts, "caption_video_index": torch.tensor(owners, device=device),
                              "video_ids": [meta["video_id"] for meta in batch["meta"]],
                              "references": [meta["captions"] for meta in batch["meta"]]},
                     num_items=len(batch["meta"]))


class AVRTask(_CaptionTask):
    """Text <-> audio-visual retrieval (VALOR-32K style), trained with symmetric InfoNCE.

    Training pairs each clip with one random caption of its own; evaluation ranks every clip
    for every caption of the split (`RetrievalEvaluator`).
    """

    name = "avr"
    primary_metric = "t2v_Rsum"

    def head_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": len(self.tokenizer)}

    def make_batch(self, batch: dict, device: torch.device, training: bool = True) -> Batch:
        texts, owners = self.pick_captions(batch, per_clip=1 if training else None)
        tokens, mask = self.tokenize(texts, device)
        return self._batch(batch, device, texts, owners, caption_tokens=tokens, caption_mask=mask)

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        # Negatives from every rank: each rank's clips against all ranks' captions.
        return AVRHead.loss(gather_with_local_grad(outputs["video_embedding"]),
                            gather_with_local_grad(outputs["text_embedding"]), outputs["logit_scale"])

    def evaluator(self, final: bool = False) -> "RetrievalEvaluator":
        return RetrievalEvaluator()


class AVCTask(_CaptionTask):
    """Audio-visual captioning (VALOR-32K style): teacher-forced cross-entropy over up to
    `data.captions_per_clip` captions per clip (one backbone pass per clip), evaluated on
    decoded captions with the COCO caption metrics (`CaptionEvaluator`)."""

    name = "avc"
    primary_metric = "CIDEr"

    def head_kwargs(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"vocab_size": len(tok), "bos_id": tok.cls_token_id if tok.cls_token_id is not None
                else tok.bos_token_id, "eos_id": tok.sep_token_id if tok.sep_token_id is not None
                else tok.eos_token_id, "pad_id": tok.pad_token_id, "max_length": self.max_tokens}

    def make_batch(self, batch: dict, device: torch.device, training: bool = True) -> Batch:
        texts, owners = self.pick_captions(batch, self.cfg.data.captions_per_clip if training else None)
        tokens, _ = self.tokenize(texts, device)
        return self._batch(batch, device, texts, owners, caption_tokens=tokens,
                           caption_video_index=torch.tensor(owners, device=device))

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        return head.loss(outputs)

    def evaluator(self, final: bool = False) -> "CaptionEvaluator":
        meteor = self.cfg.evaluation.meteor == "always" or (final and self.cfg.evaluation.meteor == "test")
        return CaptionEvaluator(self.tokenizer, self.cfg.evaluation.beam_size,
                                self.cfg.evaluation.length_penalty, meteor)


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


TASKS = {"avqa": AVQATask, "avel": AVELTask, "avr": AVRTask, "avc": AVCTask}


def make_task(cfg: TrainConfig, train_index: ShardIndex):
    """The task object `cfg.task` names, with what it needs from the train split's index."""
    return TASKS[cfg.task].from_config(cfg, train_index)
