"""Tests of the retrieval and caption metrics.

Retrieval: hand-made similarity matrices whose ranks are worked out by hand in the table.
Captions: `caption_scores` and `tokenize` against the COCO toolkit itself (pycocoevalcap's
PTBTokenizer, Bleu, Meteor, Rouge, Cider); those tests need java and pycocoevalcap and run the
toolkit once per module (each METEOR run starts a JVM that loads a 60 MB paraphrase table).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import shutil

import numpy as np
import pytest
import torch

from avpea_ray.metrics import captions
from avpea_ray.metrics.captions import (
    MeteorProcess,
    MeteorUnavailable,
    caption_scores,
    tokenize,
    tokenize_batch,
)
from avpea_ray.metrics.retrieval import rank_of_targets, retrieval_metrics

# ------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------


def _summary(prefix: str, r1: float, r5: float, r10: float, medr: float, meanr: float) -> dict[str, float]:
    """The five metrics of one direction, keyed as `retrieval_metrics` keys them."""
    values = {"R@1": r1, "R@5": r5, "R@10": r10, "MedR": medr, "MeanR": meanr}
    return {f"{prefix}_{key}": value for key, value in values.items()}


def _triangle(n: int) -> np.ndarray:
    """Caption i sees its own video i below exactly the i videos j < i: t2v rank i + 1."""
    j, i = np.meshgrid(np.arange(n), np.arange(n))
    return np.where(j < i, 1.0, np.where(j == i, 0.5, 0.0))


# name -> (similarity (captions x videos), caption_to_video, expected metrics)
RETRIEVAL_CASES = {
    # Own video first everywhere.
    "perfect": (
        np.eye(3), [0, 1, 2],
        {**_summary("t2v", 100, 100, 100, 1, 1), **_summary("v2t", 100, 100, 100, 1, 1)},
    ),
    # Own video last everywhere (12 candidates, so even R@10 misses).
    "reversed": (
        1.0 - np.eye(12), list(range(12)),
        {**_summary("t2v", 0, 0, 0, 12, 12), **_summary("v2t", 0, 0, 0, 12, 12)},
    ),
    # t2v ranks 1..12 (caption i has i videos above its own); v2t: column j has the 11 - j
    # captions i > j above its own caption, ranks 12..1. R@5 = 5/12, R@10 = 10/12, median 6.5.
    "triangle": (
        _triangle(12), list(range(12)),
        {**_summary("t2v", 100 / 12, 500 / 12, 1000 / 12, 6.5, 6.5),
         **_summary("v2t", 100 / 12, 500 / 12, 1000 / 12, 6.5, 6.5)},
    ),
    # A collapsed model: every score equal. Pessimistic ties: each caption ranks its video 2nd
    # of 2; each video finds its first own caption 3rd of 4 (after the other video's two);
    # never R@1 = 100.
    "all_equal": (
        np.zeros((4, 2)), [0, 0, 1, 1],
        {**_summary("t2v", 0, 100, 100, 2, 2), **_summary("v2t", 0, 100, 100, 3, 3)},
    ),
    # Duplicate captions tied with each other: a tie between two correct captions costs nothing,
    # a tie with a wrong one does. v2t: column 0 [.9 .9 .5] -> 1; column 1 [.1 .1 .5] -> 1.
    # t2v: [.9 .1] -> 1, [.9 .1] -> 1, [.5 .5] -> 2 (tied with the wrong video).
    "duplicate_captions": (
        np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]]), [0, 0, 1],
        {**_summary("t2v", 200 / 3, 100, 100, 1, 4 / 3), **_summary("v2t", 100, 100, 100, 1, 1)},
    ),
    # Partial ties. t2v: caption 0 ties videos 0 and 1 -> 2; caption 1 ties 1 and 2 -> 2;
    # caption 2 -> 1. v2t: column 0 [.5 .2 0] -> 1; column 1 [.5 .9 0] -> 1;
    # column 2 [.1 .9 .3] -> 2.
    "ties": (
        np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.0, 0.0, 0.3]]), [0, 1, 2],
        {**_summary("t2v", 100 / 3, 100, 100, 2, 5 / 3), **_summary("v2t", 200 / 3, 100, 100, 1, 4 / 3)},
    ),
    # Two captions per video; video 0's second caption ranks better than its first.
    # t2v: [.1 .9] -> 2, [.8 .2] -> 1, [.3 .4] -> 1, [.6 .35] -> 2.
    # v2t: column 0 [.1 .8 .3 .6]: own captions 0 (rank 4) and 1 (rank 1) -> 1;
    #      column 1 [.9 .2 .4 .35]: own captions 2 (rank 2) and 3 (rank 3) -> 2.
    "two_captions_per_video": (
        np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.4], [0.6, 0.35]]), [0, 0, 1, 1],
        {**_summary("t2v", 50, 100, 100, 1.5, 1.5), **_summary("v2t", 50, 100, 100, 1.5, 1.5)},
    ),
    # Three videos, captions listed out of video order; video 2 is found first only by its
    # third caption. t2v: [.9 .1 .0] own 0 -> 1; [.2 .75 .7] own 2 -> 2; [.5 .8 .4] own 1 -> 1;
    # [.6 .1 .5] own 2 -> 2; [.1 .2 .8] own 2 -> 1.
    # v2t: column 0 [.9 .2 .5 .6 .1] own caption 0 -> 1; column 1 [.1 .75 .8 .1 .2] own
    # caption 2 -> 1; column 2 [0 .7 .4 .5 .8] own captions 1 (2), 3 (3), 4 (1) -> 1.
    "shuffled_owners": (
        np.array([[0.9, 0.1, 0.0], [0.2, 0.75, 0.7], [0.5, 0.8, 0.4], [0.6, 0.1, 0.5], [0.1, 0.2, 0.8]]),
        [0, 2, 1, 2, 2],
        {**_summary("t2v", 60, 100, 100, 1, 7 / 5), **_summary("v2t", 100, 100, 100, 1, 1)},
    ),
}


@pytest.mark.parametrize("name", list(RETRIEVAL_CASES))
def test_retrieval_metrics_table(name):
    sim, c2v, expected = RETRIEVAL_CASES[name]
    got = retrieval_metrics(sim, np.asarray(c2v))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_retrieval_metrics_accepts_torch(dtype):
    sim, c2v, expected = RETRIEVAL_CASES["two_captions_per_video"]
    got = retrieval_metrics(torch.tensor(sim, dtype=dtype), torch.tensor(c2v))
    assert got == pytest.approx(expected)


def test_retrieval_metrics_integer_scores_and_large_input():
    # Integer scores are fine; a shuffled 5000 x 1000 identity-like matrix is perfect.
    rng = np.random.default_rng(0)
    c2v = rng.permutation(np.arange(5000) % 1000)
    sim = rng.normal(size=(5000, 1000)).astype(np.float32)
    sim[np.arange(5000), c2v] = 10.0
    got = retrieval_metrics(sim, c2v)
    assert got["t2v_R@1"] == 100 and got["v2t_R@1"] == 100 and got["t2v_MeanR"] == 1
    assert retrieval_metrics(np.eye(2, dtype=np.int64), np.array([0, 1]))["t2v_R@1"] == 100


def test_rank_of_targets():
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 5.0, 5.0]])
    assert rank_of_targets(scores, np.array([2, 0, 1])).tolist() == [2, 3, 2]


@pytest.mark.parametrize(
    "sim, c2v, match",
    [
        (np.zeros(3), np.array([0, 1, 2]), "2-D"),
        (np.zeros((0, 3)), np.zeros(0, dtype=np.int64), "non-empty"),
        (np.zeros((3, 2)), np.array([0, 1]), r"shape \(3,\)"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "integer"),
        (np.zeros((2, 2)), np.array([0, 2]), r"\[0, 2\)"),
        (np.zeros((2, 2)), np.array([-1, 1]), r"\[0, 2\)"),
        (np.zeros((3, 3)), np.array([0, 0, 1]), r"no caption \(e.g. \[2\]\)"),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), np.array([0, 1]), "NaN"),
        (np.ones((2, 2), dtype=bool), np.array([0, 1]), "real"),
        (np.array([["a", "b"], ["c", "d"]]), np.array([0, 1]), "real"),
    ],
)
def test_retrieval_metrics_input_errors(sim, c2v, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, c2v)


# ------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------

HAVE_TOOLKIT = shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None
needs_toolkit = pytest.mark.skipif(not HAVE_TOOLKIT, reason="needs java on PATH and the pycocoevalcap package")

# id -> (candidate, references)
PAIRS = {
    "punctuation": (
        "A man plays the guitar, loudly!",
        ["A man is playing a guitar.", "Someone plays guitar loudly; a crowd cheers."],
    ),
    "contractions": (
        "He doesn't like it, but she's singing.",
        ["She's singing while he isn't.", "A woman sings and a man doesn't."],
    ),
    "repeated": ("the the the dog dog", ["The dog barks at the cat.", "A dog is barking."]),
    "identical": (
        "A woman is talking in a kitchen.",
        ["A woman is talking in a kitchen.", "Someone speaks while cooking food in the kitchen."],
    ),
    "short": ("a dog", ["A small brown dog runs across the green field and barks at a bird.", "Dog."]),
    "no_overlap": ("Xylophone zebra quantum.", ["A man is cooking pasta.", "Someone cooks in a kitchen."]),
    "ref_lengths": (
        "A car drives by on a road while rain falls.",
        [
            "Car.",
            "A car passes.",
            "Rain falls on a road as cars drive by.",
            "A red car drives down a wet road in the rain while thunder rumbles in the distance.",
        ],
    ),
    "quotes_parens": (
        'The man says "hello" (twice) to a child.',
        ["A man says 'hello' to a kid.", "The man greets the child -- twice."],
    ),
    "numbers_hyphens": (
        "Two people play 3,000-year-old drums at 10:30.",
        ["2 people are playing drums.", "Two drummers play old drums at 10.30 am."],
    ),
    "upper_case": (
        "A DOG BARKS AT THE MAILMAN!!",
        ["A dog barks at the mailman.", "The dog is barking loudly at a man."],
    ),
    "empty": ("", ["A baby laughs.", "An infant is laughing."]),
    "spaces": ("  A   cat    meows   .", ["A cat meows.", "A kitten cries for food."]),
    "unicode": (
        "A caf\u00e9 owner says \u201cbonjour\u201d to Zo\u00eb\u2026",
        ["The caf\u00e9 owner greets Zo\u00eb.", "A man says bonjour in a caf\u00e9."],
    ),
    "well_known": (
        "A well-known singer sings a black-and-white song.",
        ["A famous singer sings an old black-and-white song.", "A well known singer performs."],
    ),
}

# (raw sentence, what the Java PTBTokenizer + the toolkit's punctuation filter give)
SENTENCES = [
    (
        "A man's colour isn't \"great\" (really)... he said -- ok?",
        "a man 's colour is n't great -lrb- really -rrb- he said ok",
    ),
    (
        "The well-known 3,000.5 people & dogs; e.g. U.S.A. in 1/2 time.",
        "the well-known 3,000.5 people & dogs e.g. u.s.a. in 1/2 time",
    ),
    (
        "Don't you'll we're I'm they've he'd CAN'T won't gonna",
        "do n't you 'll we 're i 'm they 've he 'd ca n't wo n't gon na",
    ),
    ("Mr. Smith's cat   sits  on the mat .", "mr. smith 's cat sits on the mat"),
    ("'Tis a 'quoted' word, isn't it?", "'t is a quoted word is n't it"),
    (
        "Two children (a boy and a girl) play in the U.S. today.",
        "two children -lrb- a boy and a girl -rrb- play in the u.s. today",
    ),
    ("She said: \u201cit\u2019s fine\u201d \u2014 and left\u2026", "she said it 's fine and left"),
    (
        "A 10-year-old kid scores 2-1 at 7:45 p.m. on 12/25/2020!",
        "a 10-year-old kid scores 2-1 at 7:45 p.m. on 12/25/2020",
    ),
    ("Rock 'n' roll music plays; the '90s were great.", "rock 'n' roll music plays the '90s were great"),
    ("Is this $5.00 or \u00a33? 50% off, and/or free!", "is this $ 5.00 or # 3 50 % off and/or free"),
    (
        "The e-mail from test@example.com links www.example.com/page.",
        "the e-mail from test@example.com links www.example.com/page",
    ),
    ("Hello    World.  ", "hello world"),
    ("UPPER CASE SENTENCE WITH A TRAILING PERIOD.", "upper case sentence with a trailing period"),
    (
        "A [bracketed] {braced} <tagged> text ... and more....",
        "a -lsb- bracketed -rsb- -lcb- braced -rcb- <tagged> text and more",
    ),
    ("O'Neil and d'Artagnan can't go o'clock y'all.", "o'neil and d'artagnan ca n't go o'clock y' all"),
    ("Numbers like 1,000,000 and 3.14 and -5 and +7.", "numbers like 1,000,000 and 3.14 and -5 and +7"),
    ("", ""),
]


def _toolkit_tokenize(captions_by_id: dict[str, list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions_by_id.items()})


@pytest.fixture(scope="module")
def both_scores() -> tuple[dict[str, float], dict[str, float]]:
    """(`caption_scores`, pycocoevalcap's own pipeline) on PAIRS, ×100, METEOR included.

    The toolkit's Meteor starts its JVM on construction; creating it first lets its
    paraphrase table load while `caption_scores` runs its own JVM (~8 s each).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    meteor = Meteor()
    try:
        ours = caption_scores({k: cand for k, (cand, _) in PAIRS.items()}, {k: refs for k, (_, refs) in PAIRS.items()})
        gts = _toolkit_tokenize({k: refs for k, (_, refs) in PAIRS.items()})
        res = _toolkit_tokenize({k: [cand] for k, (cand, _) in PAIRS.items()})
        meteor_value, _ = meteor.compute_score(gts, res)
    finally:
        del meteor  # its __del__ ends the JVM
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    theirs = {f"BLEU-{k + 1}": 100 * b for k, b in enumerate(bleu)}
    theirs["METEOR"] = 100 * meteor_value
    theirs["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    theirs["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    return ours, theirs


@pytest.mark.slow  # two JVMs: the toolkit's own tokenizer and METEOR
@needs_toolkit
def test_caption_scores_equal_toolkit(both_scores):
    """Every metric in one test: the two JVMs start once, in one test process."""
    our_scores, toolkit_scores = both_scores
    assert set(our_scores) == set(toolkit_scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                                                      "CIDEr"}
    for metric, ours in our_scores.items():
        assert ours == pytest.approx(toolkit_scores[metric], abs=1e-6), metric
        assert 0 < ours < 100 * (10 if metric == "CIDEr" else 1), metric


@needs_toolkit
def test_tokenize_equals_java_ptb_tokenizer():
    raw = [s for s, _ in SENTENCES]
    java = _toolkit_tokenize({str(i): [s] for i, s in enumerate(raw)})
    java_lines = [java[str(i)][0] for i in range(len(raw))]
    assert java_lines == [expected for _, expected in SENTENCES]
    assert tokenize_batch(raw) == java_lines
    assert [tokenize(s) for s in raw] == java_lines
    # The toolkit scans all captions as one text: a single-letter acronym before a line that
    # starts a sentence ("The") loses its period; at the end of the text it keeps it.
    assert _toolkit_tokenize({"a": ["plan b.", "The end."]})["a"] == tokenize_batch(["plan b.", "The end."])
    assert _toolkit_tokenize({"a": ["plan b."]})["a"] == [tokenize("plan b.")]


@pytest.mark.parametrize("raw, expected", SENTENCES)
def test_tokenize_fixed_sentences(raw, expected):
    # The expectations are the Java tokenizer's output (checked above when java is here).
    assert tokenize(raw) == expected


def test_tokenize_batch_context_across_lines():
    assert tokenize_batch(["plan b.", "The end."]) == ["plan b", "the end"]
    assert tokenize("plan b.") == "plan b."
    # Line breaks inside a caption are spaces (the toolkit would shift the later captions).
    assert tokenize_batch(["a\rb", "c\u2028d", "e\nf"]) == ["a b", "c d", "e f"]


def _scores(pairs: dict[str, tuple[str, list[str]]]) -> dict[str, float]:
    """`caption_scores` without METEOR, back on the 0..1 scale (0..10 for CIDEr)."""
    scores = caption_scores({k: c for k, (c, _) in pairs.items()}, {k: r for k, (_, r) in pairs.items()}, meteor=False)
    return {k: v / 100 for k, v in scores.items()}


def test_metric_functions_hand_values():
    # Identical candidate and reference: BLEU ~1 (the toolkit's 1e-15/1e-9 smoothing), ROUGE-L 1.
    same = _scores({"x": ("a b c d e", ["a b c d e"])})
    assert [same[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx([1, 1, 1, 1], abs=1e-9)
    assert same["ROUGE-L"] == 1.0
    # One candidate word of a two-word reference: P = 1, R = 1/2, F = 2.44 * .5 / (.5 + 1.44).
    short = _scores({"x": ("a", ["a b"])})
    assert short["ROUGE-L"] == pytest.approx(2.44 * 0.5 / (0.5 + 1.44))
    # BLEU-1 with brevity penalty: 1 clipped match of 1 word, reference length 2 -> e^(1-2).
    assert short["BLEU-1"] == pytest.approx(math.exp(-1), rel=1e-8)
    # One segment: every n-gram's IDF is log(1) - log(1) = 0, so CIDEr-D is 0.
    assert _scores({"x": ("a b c", ["a b c"])})["CIDEr"] == 0.0
    # Two segments, candidate = reference and no shared n-grams: each order's cosine is 1,
    # so each segment scores 10.
    assert _scores({"x": ("a b c d", ["a b c d"]), "y": ("e f g h", ["e f g h"])})["CIDEr"] == pytest.approx(10.0)
    # No reference holds a word (the toolkit's Cider() would fail on it): CIDEr 0.
    assert _scores({"x": ("a dog", ["..."]), "y": ("a cat", ["!"])})["CIDEr"] == 0.0


def test_caption_scores_do_not_print(capsys):
    caption_scores({"a": "A dog barks."}, {"a": ["A dog barks.", "A dog is barking."]}, meteor=False)
    assert capsys.readouterr().out == ""


def test_caption_scores_without_meteor_needs_no_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    scores = caption_scores({"a": "A dog barks."}, {"a": ["A dog barks.", "A dog is barking."]}, meteor=False)
    assert sorted(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "ROUGE-L"]
    assert scores["ROUGE-L"] == pytest.approx(100.0)


def test_meteor_unavailable_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MeteorUnavailable, match="java"):
        caption_scores({"a": "A dog."}, {"a": ["A dog."]})
    with pytest.raises(MeteorUnavailable, match="java"):
        MeteorProcess()
    assert issubclass(MeteorUnavailable, RuntimeError)


def test_meteor_unavailable_without_pycocoevalcap(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "pycocoevalcap" else real_find_spec(name, *args)

    monkeypatch.setattr(captions.importlib.util, "find_spec", find_spec)
    with pytest.raises(MeteorUnavailable, match="pycocoevalcap"):
        captions.meteor_jar()


@pytest.mark.parametrize(
    "candidates, references, match",
    [
        ({"a": "x"}, {"a": ["x"], "b": ["y"]}, r"1 reference ids have no candidate \(e.g. \['b'\]\)"),
        ({"a": "x", "c": "z"}, {"a": ["x"]}, r"1 candidate ids have no references \(e.g. \['c'\]\)"),
        ({"a": "x"}, {"a": []}, "non-empty list"),
        ({"a": "x"}, {"a": "x"}, "non-empty list"),
        ({}, {}, "no captions"),
        ({"a": None}, {"a": ["x"]}, "must be strings"),
    ],
)
def test_caption_scores_id_errors(candidates, references, match):
    with pytest.raises(ValueError, match=match):
        caption_scores(candidates, references, meteor=False)
