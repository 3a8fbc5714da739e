"""AVQA questions as word ids: the tokenizer the MUSIC-AVQA sharder uses, and the lookup.

One implementation for sharding (`sharding.musicavqa`) and prediction (`avpea_ray.infer`), so
that a typed question becomes the same ids as a question of the training data.
"""
from __future__ import annotations

PAD, UNK = "<pad>", "<unk>"  # question-word ids 0 and 1
QUESTION_MARKS = "?\uff1f"  # ASCII and full-width


def tokenize(question: str) -> list[str]:
    """Lower-cased words of a filled question, the final (ASCII or full-width) '?' removed."""
    return question.strip().rstrip(QUESTION_MARKS).strip().lower().split()


def question_ids(question: str, question_words: list[str]) -> tuple[list[int], list[str]]:
    """The word ids of `question` in a vocabulary (`vocab.json`'s "question_words").

    Returns:
        (the ids, unknown words mapped to <unk> as the sharder maps them; the words the
        vocabulary never saw, in order, for the caller to report).
    """
    word_ids = {w: i for i, w in enumerate(question_words)}
    unk = word_ids.get(UNK, 1)
    words = tokenize(question)
    return [word_ids.get(w, unk) for w in words], [w for w in words if w not in word_ids]
