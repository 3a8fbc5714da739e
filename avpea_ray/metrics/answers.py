"""Exact match of generated answers: the generative AVQA metric (VALOR's framing of MUSIC-AVQA).

An answer counts as correct when its normalised string equals the normalised reference:
lower-cased, surrounding whitespace stripped, inner whitespace collapsed to one space and
trailing punctuation stripped ("Two." == "two", "  left  " == "left"), nothing else: "2" is
not "two", and "yes it is" is not "yes".
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

_SPACES = re.compile(r"\s+")
# ASCII punctuation and the full-width marks of MUSIC-AVQA's questions.
TRAILING_PUNCTUATION = string.punctuation + "\uff1f\uff01\u3002\uff0c"


def normalize_answer(text: str) -> str:
    """`text` lower-cased, whitespace stripped and collapsed, trailing punctuation stripped."""
    text = _SPACES.sub(" ", text.lower()).strip()
    return text.rstrip(TRAILING_PUNCTUATION).rstrip()


def exact_matches(predicted: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per answer, whether the prediction equals its reference after `normalize_answer`."""
    if len(predicted) != len(references):
        raise ValueError(f"{len(predicted)} predictions for {len(references)} references")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(predicted, references)]
