"""Generative MUSIC-AVQA (the AV-PEA paper's Table 3 "AVQA" column, VALOR's framing): the
answer is decoded as text instead of picked from the 42 answers.

The captioning decoder (`heads/avc.py`, `AVCHead`) reads the clip's audio-visual memory
tokens; the question is the decoded text's prefix: each question trains as the token sequence
`[CLS] question [SEP] answer [SEP]` (BERT's pair encoding), teacher-forced, the loss on the
answer tokens and the final [SEP] only. At evaluation the decoder continues
`[CLS] question [SEP]` (greedy, or beam search with `evaluation.beam_size`) until [SEP], and an
answer is correct when its normalised string equals the reference's (`metrics/answers.py`:
lower-case, whitespace stripped and collapsed, trailing punctuation stripped).

Accuracies are reported per question type, per group, as the group mean `avg` (the selection
metric, as AVQA's Table 2 "Avg") and over all questions (`overall`), with the same counts and
function as the classification task (`heads/avqa.py`), beside always answering the most
frequent train answer. The MUSIC-AVQA shards serve as they are: a sample holds its video's
questions with their text (`question`) and answer string (`anser`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..data import storage
from ..heads.avc import AVCHead
from ..heads.avqa import QUESTION_TYPES, avqa_accuracies, avqa_counts
from ..heads.text import load_tokenizer
from ..metrics.answers import exact_matches, normalize_answer  # noqa: F401 (re-exported)
from .avc import AVCHeadConfig
from .avqa import AVQATask, read_vocab
from .base import Batch, CountEvaluator, host_to_device, to_device

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PIECES = re.compile(r"\w+|[^\w\s]")  # what BERT's pre-tokenizer splits words into


@dataclass
class AVQAGenHeadConfig(AVCHeadConfig):
    """`head:` for avqa_gen (the caption decoder's settings, `AVCHead`).

    Attributes:
        text_model: the tokenizer: "random" (a word-level WordPiece vocabulary made from the
            train split's `vocab.json`: its question words and answers) or a local
            `save_pretrained` directory / Hugging Face name (VALOR: bert-base-uncased).
        hidden, layers, num_heads, memory_patches, max_steps, dropout: as `head:` for avc.
    """



def vocabulary_words(vocab: dict[str, Any]) -> list[str]:
    """The "random" tokenizer's vocabulary: BERT's special tokens, then every piece of the
    train split's question words and answers (first-appearance order)."""
    words = dict.fromkeys(SPECIAL_TOKENS)
    for text in [*vocab["question_words"][2:], *vocab["answers"]]:  # [2:]: <pad>, <unk>
        words.update(dict.fromkeys(_PIECES.findall(text.lower())))
    return list(words)


class AVQAGenTask(AVQATask):
    """MUSIC-AVQA with decoded answers; one sample per video holding all its questions."""

    name = "avqa_gen"
    head_class = AVCHead
    head_config = AVQAGenHeadConfig
    primary_metric = "avg"
    primary_metric_label = "generative AVQA Avg: mean of the 3 group exact-match accuracies, %"
    reference_head_args = {"vocab_size": 30522, "bos_id": 101, "eos_id": 102, "pad_id": 0, "max_length": 32}
    demo_config = "demo_avqa_gen.yaml"

    def __init__(self, cfg, vocab: dict[str, Any], tokenizer=None):
        super().__init__(cfg, vocab)
        self.tokenizer = tokenizer or load_tokenizer("random", vocabulary_words(vocab))
        self.max_tokens = cfg.data.max_caption_tokens if cfg is not None else 32
        counts = vocab.get("answer_counts")
        self.majority_text = self.answers[self.majority_answer] if counts else None

    @classmethod
    def selection(cls, cfg) -> tuple[str, str]:
        return cls.primary_metric, cls.primary_metric_label

    @classmethod
    def variant(cls, cfg) -> str:
        return ""

    @classmethod
    def from_config(cls, cfg, index) -> "AVQAGenTask":
        tokenizer = None if cfg.head.text_model == "random" else load_tokenizer(cfg.head.text_model)
        return cls(cfg, read_vocab(cfg, index), tokenizer)

    def adapter_files(self) -> dict[str, bytes]:
        return {"vocab.json": json.dumps(self.vocab, indent=1, ensure_ascii=False).encode("utf-8")}

    def data_head_args(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"vocab_size": len(tok), "bos_id": tok.cls_token_id, "eos_id": tok.sep_token_id,
                "pad_id": tok.pad_token_id, "max_length": self.max_tokens}

    def check(self, model) -> None:
        if self.tokenizer.cls_token_id is None or self.tokenizer.sep_token_id is None:
            raise ConfigError(f"head.text_model={self.cfg.head.text_model!r}: the tokenizer has no "
                              f"[CLS]/[SEP] tokens to start and end an answer (use a BERT tokenizer)")

    # -- batches ---------------------------------------------------------------------------
    def encode(self, questions: list[str], answers: list[str] | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`[CLS] question [SEP] answer [SEP]` ids `(Q, L)` (right-padded; without answers:
        the prefixes) and each sequence's prefix length (`[CLS] question [SEP]`)."""
        pairs = (questions,) if answers is None else (questions, answers)
        encoded = self.tokenizer(*pairs, padding=True, truncation="only_first" if answers else True,
                                 max_length=self.max_tokens, return_tensors="pt",
                                 return_token_type_ids=True)
        # The prefix is segment 0 of the pair: its tokens are the non-padding ones of type 0.
        prefix = ((encoded["token_type_ids"] == 0) & (encoded["attention_mask"] == 1)).sum(1)
        return host_to_device(encoded["input_ids"], device), prefix

    def make_batch(self, raw: dict, device: torch.device, training: bool = True) -> Batch:
        questions = [(i, q) for i, meta in enumerate(raw["meta"]) for q in meta["questions"]]
        texts = [q["question"] for _, q in questions]
        answers = [q["anser"] for _, q in questions]
        tokens, prefix = self.encode(texts, answers, device)
        return to_device(
            raw, device,
            head_inputs={"caption_tokens": tokens,
                         "caption_video_index": host_to_device(torch.tensor([i for i, _ in questions]), device)},
            targets={"prefix_lengths": host_to_device(prefix, device), "questions": texts, "answers": answers,
                     "question_types": [q["question_type"] for _, q in questions]})

    def loss(self, head, outputs: dict, batch: Batch) -> tuple[torch.Tensor, dict]:
        # Only the answer is learned: targets inside the prefix (positions 1..P-1 predict the
        # question's own tokens) are padding to the loss.
        targets = outputs["targets"]
        positions = torch.arange(1, targets.shape[1] + 1, device=targets.device)
        in_prefix = positions[None, :] < batch.targets["prefix_lengths"][:, None]
        return head.loss({"logits": outputs["logits"],
                          "targets": targets.masked_fill(in_prefix, head.pad_id)})

    # -- evaluation ------------------------------------------------------------------------
    def decode_answers(self, model, batch: Batch) -> list[str]:
        """The decoded answer of every question of a batch. Prefixes of one length decode
        together (the decoder takes unpadded prefixes)."""
        visual, audio = model.forward_features(batch.frames, batch.fbank)
        prefixes, lengths = self.encode(batch.targets["questions"], None, batch.frames.device)
        owners = batch.head_inputs["caption_video_index"]
        decoded: list[str] = [""] * len(lengths)
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero().flatten()
            ids = model.head.generate(visual, audio, beam_size=self.cfg.evaluation.beam_size,
                                      length_penalty=self.cfg.evaluation.length_penalty,
                                      prefix=prefixes[rows.to(prefixes.device), :length],
                                      video_index=owners[rows.to(owners.device)])
            for row, answer in zip(rows.tolist(), ids):
                decoded[row] = self.tokenizer.decode(answer, skip_special_tokens=True)
        return decoded

    def counts_of(self, decoded: list[str], batch: Batch) -> torch.Tensor:
        """(18, 2) [correct, total] per question type: the decoded answers' exact matches, then
        the majority train answer's (the baseline, in the same conventions)."""
        answers, types = batch.targets["answers"], batch.targets["question_types"]
        ones = torch.ones(len(answers), dtype=torch.long)

        def counts(predicted: list[str]) -> torch.Tensor:
            return avqa_counts(torch.tensor(exact_matches(predicted, answers), dtype=torch.long), ones, types)

        majority = counts([self.majority_text or ""] * len(answers))
        return torch.cat([counts(decoded), majority])

    def evaluator(self, final: bool = False) -> "AnswerEvaluator":
        return AnswerEvaluator(self)

    def empty_counts(self, device) -> torch.Tensor:
        return torch.zeros(2 * len(QUESTION_TYPES), 2, dtype=torch.long, device=device)

    def metrics(self, counts: torch.Tensor) -> dict[str, float]:
        metrics = avqa_accuracies(counts[:len(QUESTION_TYPES)])
        majority = avqa_accuracies(counts[len(QUESTION_TYPES):])
        if self.majority_text is not None and majority:
            metrics["majority_avg"] = majority["avg"]
            metrics["majority_acc"] = majority["overall"]
        return metrics

    @classmethod
    def baseline_line(cls, metrics: dict[str, float]) -> str | None:
        line = super().baseline_line(metrics)
        return line and f"generated answers, exact match: {line}"


class AnswerEvaluator(CountEvaluator):
    """Decodes every question's answer and sums exact-match counts per question type (then
    across ranks, as `CountEvaluator`)."""

    def update(self, model, batch: Batch) -> None:
        counts = self.task.counts_of(self.task.decode_answers(model, batch), batch)
        counts = counts.to(batch.frames.device)
        self.counts = counts if self.counts is None else self.counts + counts


__all__ = ["AVQAGenHeadConfig", "AVQAGenTask", "AnswerEvaluator", "normalize_answer", "vocabulary_words"]
