"""What retrieval and captioning share: VALOR-style shards (one sample per clip holding all
its captions) and a tokenizer ("random" reads the train split's vocab.txt)."""
from __future__ import annotations

import random

import torch

from ..config import ConfigError
from ..data import storage
from ..heads.text import TextModelError, load_tokenizer
from .base import Batch, Task, to_device


def read_vocab_words(url: str) -> list[str]:
    """The WordPiece vocabulary `sharding.valor` wrote beside the train shards."""
    try:
        return storage.read_bytes(url).decode("utf-8").splitlines()
    except FileNotFoundError as err:
        raise TextModelError(f"vocabulary file {url!r} does not exist (expected the train "
                             f"split's vocab.txt from sharding.valor; set data.vocab)") from err


class CaptionedClipsTask(Task):
    """A VALOR-style task: clips with captions, a tokenizer, and a text model in the head."""

    dataset = "valor"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.max_tokens = cfg.data.max_caption_tokens

    @classmethod
    def from_config(cls, cfg, index):
        words = None
        if cfg.head.text_model == "random":
            words = read_vocab_words(cfg.data.vocab or storage.join(index.root, index.extra.get("vocab", "vocab.txt")))
        return cls(cfg, load_tokenizer(cfg.head.text_model, words))

    def check(self, model) -> None:
        positions = getattr(getattr(model.head, "text_encoder", None), "config", None)
        positions = getattr(positions, "max_position_embeddings", None)
        if positions is not None and self.max_tokens > positions:
            raise ConfigError(f"data.max_caption_tokens={self.max_tokens} but the text model has only "
                              f"{positions} positions (head.text_config.max_position_embeddings for a "
                              f"random one): lower data.max_caption_tokens")

    def tokenize(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> `(C, L)` ids ([CLS] words [SEP], right-padded) and attention mask."""
        encoded = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def pick_captions(self, raw: dict, per_clip: int | None) -> tuple[list[str], list[int]]:
        """Each clip's captions (a random `per_clip` of them; all when None), and their clip."""
        texts, owners = [], []
        for i, meta in enumerate(raw["meta"]):
            captions = meta["captions"]
            if per_clip is not None and len(captions) > per_clip:
                captions = random.sample(captions, per_clip)  # python RNG: checkpointed per rank
            texts += captions
            owners += [i] * len(captions)
        return texts, owners

    def _batch(self, raw: dict, device, texts: list[str], owners: list[int], **head_inputs) -> Batch:
        return to_device(raw, device, head_inputs=head_inputs,
                         targets={"captions": texts, "caption_video_index": torch.tensor(owners, device=device),
                                  "video_ids": [meta["video_id"] for meta in raw["meta"]],
                                  "references": [meta["captions"] for meta in raw["meta"]]})
