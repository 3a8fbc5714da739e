"""Text models for retrieval and captioning: a tokenizer and a BERT-style encoder.

`text_model` names where they come from:
- "random": a small BERT with random weights (`text_config` sets its sizes) and a WordPiece
  tokenizer over the words of the training captions (`vocab.txt` written by
  `sharding.valor`): nothing to download, what tests and the demo use;
- a local directory holding a Hugging Face model and tokenizer (`save_pretrained` output);
- a Hugging Face hub name, e.g. "bert-base-uncased" (what VALOR uses), from the local cache or
  the hub.

Offline with no cached copy a hub name fails within seconds, saying what to do, instead of
transformers' minutes of retries.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError
from ..hub import hub_reachable

# Sizes of the "random" text model; `head.text_config` overrides any of them.
RANDOM_TEXT_CONFIG: dict[str, Any] = {"hidden_size": 128, "num_hidden_layers": 2,
                                      "num_attention_heads": 2, "intermediate_size": 256,
                                      "max_position_embeddings": 64}


class TextModelError(ConfigError):
    """A text model or tokenizer could not be loaded; the message says why and what to do."""


def load_tokenizer(text_model: str, vocab_words: list[str] | None = None):
    """The tokenizer of `text_model`.

    Args:
        text_model: "random", a local directory, or a hub name.
        vocab_words: the WordPiece vocabulary for "random" (the train split's vocab.txt lines).

    Raises:
        TextModelError: no vocabulary for "random", or the named tokenizer cannot be had.
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    if text_model == "random":
        if not vocab_words:
            raise TextModelError("head.text_model='random' needs the train split's vocab.txt "
                                 "(written by sharding.valor) and none was given")
        return BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab_words)}, do_lower_case=True)
    return _from_pretrained(AutoTokenizer, text_model, "tokenizer")


def build_text_encoder(text_model: str, vocab_size: int, text_config: dict | None = None,
                       pretrained: bool = True) -> nn.Module:
    """A BERT-style encoder whose `last_hidden_state[:, 0]` is the text's feature.

    Args:
        text_model: "random", a local directory, or a hub name.
        vocab_size: the tokenizer's size ("random" only; a pretrained model has its own).
        text_config: overrides of `RANDOM_TEXT_CONFIG` ("random" only).
        pretrained: False builds a named model from its config without loading weights
            (shape-only builds on the meta device).

    Raises:
        TextModelError: the named model cannot be had, or `text_config` is not a BERT config.
    """
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    if text_model == "random":
        options = RANDOM_TEXT_CONFIG | dict(text_config or {})
        try:
            return BertModel(BertConfig(vocab_size=vocab_size, **options), add_pooling_layer=False)
        except (TypeError, ValueError) as err:
            raise TextModelError(f"head.text_config: {err}") from err
    if text_config:
        raise TextModelError(f"head.text_config only applies to text_model='random', "
                             f"not to the pretrained {text_model!r}")
    if not pretrained:
        return AutoModel.from_config(_from_pretrained(AutoConfig, text_model, "config"))
    return _from_pretrained(AutoModel, text_model, "model")


def _from_pretrained(loader, text_model: str, what: str):
    """`loader.from_pretrained(text_model)`: a local directory, else the local cache, else the
    hub if it answers within seconds."""
    if Path(text_model).is_dir():
        try:
            return loader.from_pretrained(text_model)
        except Exception as err:  # noqa: BLE001 - any loader failure means the same to the user
            raise TextModelError(f"head.text_model: could not load the {what} from directory "
                                 f"{text_model!r}: {type(err).__name__}: {str(err)[:200]}") from err
    try:
        return loader.from_pretrained(text_model, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: try the hub below
        pass
    if not hub_reachable():
        raise TextModelError(
            f"head.text_model: {text_model!r} is neither a local directory nor in the Hugging Face "
            f"cache, and the hub is unreachable. Save it on a machine with internet "
            f"(AutoModel/AutoTokenizer.from_pretrained(...).save_pretrained(DIR)) and pass "
            f"head.text_model=DIR, or use head.text_model=random")
    try:
        return loader.from_pretrained(text_model)
    except Exception as err:  # noqa: BLE001
        raise TextModelError(f"head.text_model: could not load the {what} of {text_model!r} from "
                             f"the Hugging Face hub: {type(err).__name__}: {str(err)[:200]}") from err
