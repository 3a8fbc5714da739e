"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), equal to the COCO toolkit's.

Captioning papers (VALOR-32K, MSR-VTT, ...) report the numbers of the COCO caption toolkit
(pycocoevalcap): every caption goes through Stanford's PTBTokenizer (lowercased, punctuation
tokens dropped), then Bleu(4), Meteor(), Rouge() and Cider() score the tokenized strings.
This module re-implements that pipeline:

- `tokenize` / `tokenize_batch` (in `ptb_tokenizer`): a pure-Python port of the behaviour of CoreNLP 3.4.1's
  PTBTokenizer (the jar the toolkit ships) run as the toolkit runs it
  (`-preserveLines -lowerCase`), followed by the toolkit's punctuation filter.
- `corpus_bleu`, `rouge_l`, `cider_d`: pure Python/numpy, the toolkit's definitions.
- `meteor_score`: the toolkit's own Meteor 1.5 jar over its stdin protocol (needs `java`).
- `caption_scores`: all of the above, ×100 (percent scale, as papers report them).

Deliberate toolkit quirks that are reproduced (so that numbers are comparable):

- Parentheses and braces become `-lrb-`/`-rrb-`/`-lcb-`/`-rcb-`/`-lsb-`/`-rsb-` and are *kept*:
  the toolkit's punctuation list holds the upper-case forms, but it filters the lowercased
  tokens.
- BLEU and CIDEr split the tokenized strings on any whitespace (`str.split()`), ROUGE-L on
  single spaces (`str.split(" ")`); they differ when a token holds a non-breaking space (the
  PTB tokenizer's `1 1/2` or phone numbers) or a string is empty (ROUGE-L then sees one empty
  token, so an empty candidate against an empty reference scores 1).
- CIDEr-D's length penalty compares the numbers of *bigrams* of candidate and reference (the
  toolkit counts lengths in its bigram loop), not the numbers of words.

Known differences from the toolkit (only for input it mishandles or for rare scripts; the
tokenizer otherwise agreed with the Java one on ~60,000 fuzzed lines of words, punctuation,
contractions, abbreviations, URLs, numbers, quotes and Unicode):

- A caption holding a line break other than "\\n" (\\r, U+2028, U+2029, \\v, \\f) makes the
  toolkit's tokenizer emit an extra line, which shifts every later caption onto the wrong id;
  here all line breaks inside a caption count as spaces.
- Lowercasing is Python's `str.lower`; Java places the Greek final sigma differently in some
  tokens ("ΟΔΟΣ-x": Java "οδοσ-x", here "οδος-x").
- Which characters count as letters follows Python's Unicode tables (plus combining marks as
  word-internal), where the Java lexer used those of its 2014 build; characters added to
  Unicode since then may tokenize differently.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

from .ptb_tokenizer import PUNCTUATIONS, tokenize, tokenize_batch  # noqa: F401 - re-exported


# ============================================================================================
# BLEU, ROUGE-L, CIDEr-D on tokenized strings
# ============================================================================================


def _ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams of `words` (tuples as keys)."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus-level BLEU-1..n, as the toolkit's Bleu(n) (effective reference length 'closest').

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus; the brevity
    penalty compares the total candidate length with the sum over segments of the reference
    length closest to that segment's candidate length (the shorter one on a tie). The toolkit
    adds 1e-15 to every numerator and 1e-9 to every denominator (so an n-gram order without
    any candidate n-gram gives ~0, not a division by zero); these are kept so that the numbers
    agree to the last digits.

    Args:
        candidates: tokenized candidate strings (split on white space).
        references: for each candidate, its tokenized references (at least one).
        n: highest n-gram order.

    Returns:
        [BLEU-1, ..., BLEU-n] in [0, 1].
    """
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        words = cand.split()
        cand_counts = _ngrams(words, n)
        max_ref: dict[tuple, int] = {}
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, count in _ngrams(ref_words, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        test_len += len(words)
        ref_len += min(ref_lens, key=lambda length: (abs(length - len(words)), length))
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in cand_counts.items():
            correct[len(gram) - 1] += min(count, max_ref.get(gram, 0))
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score over segments, as the toolkit's Rouge().

    Per segment: precision and recall of the LCS against each reference, the best precision
    and the best recall (maximised separately, over references), then
    F = (1 + beta^2) P R / (R + beta^2 P), or 0 when either is 0. Strings are split on single
    spaces, as the toolkit does (an empty string is one empty token).

    Args:
        candidates: tokenized candidate strings.
        references: for each candidate, its tokenized references (at least one).
        beta: recall weight (the toolkit uses 1.2).

    Returns:
        The mean F-score in [0, 1].
    """
    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        cand_tokens = cand.split(" ")
        precision = recall = 0.0
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, cand_tokens)
            precision = max(precision, lcs / len(cand_tokens))
            recall = max(recall, lcs / len(ref_tokens))
        if precision and recall:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
        else:
            scores.append(0.0)
    return float(np.mean(scores)) if scores else 0.0


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> float:
    """CIDEr-D averaged over segments, as the toolkit's Cider() (its "CIDEr" is CIDEr-D).

    Each string becomes, per n-gram order, a TF-IDF vector: term count times
    log(number of segments) - log(max(1, df)), where df counts the segments whose references
    contain the n-gram (so IDF comes from the evaluated set's references). Per order, the
    similarity with one reference is sum(min(c, r) * r) / (|c| |r|) (the candidate's weights
    clipped at the reference's), times a Gaussian penalty exp(-delta^2 / (2 sigma^2)) on the
    difference delta in bigram counts (see the module docstring). A segment's score is the mean
    over orders of the mean over references, times 10.

    Args:
        candidates: tokenized candidate strings (split on white space).
        references: for each candidate, its tokenized references (at least one).
        n: highest n-gram order.
        sigma: width of the length penalty.

    Returns:
        The mean score (about 0..10; papers print it ×100).
    """
    cand_counts = [_ngrams(c.split(), n) for c in candidates]
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    if len(cand_counts) != len(ref_counts):
        raise ValueError(f"{len(cand_counts)} candidates but {len(ref_counts)} reference lists")
    if not cand_counts:
        return 0.0
    df: Counter = Counter()
    for refs in ref_counts:
        df.update(set().union(*(r.keys() for r in refs)))
    log_num_docs = math.log(float(len(ref_counts)))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_num_docs - math.log(max(1.0, df[gram])))
            vec[order][gram] = weight
            norm[order] += weight**2
            if order == 1:
                bigrams += tf
        return vec, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = tfidf(cand)
        total = np.zeros(n)
        for ref in refs:
            vec_r, norm_r, length_r = tfidf(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(scores))


# ============================================================================================
# METEOR through the toolkit's Meteor 1.5 jar
# ============================================================================================


class MeteorUnavailable(RuntimeError):
    """METEOR cannot run here: no `java` on PATH, or no pycocoevalcap package / Meteor jar."""


def meteor_jar() -> Path:
    """Locate meteor-1.5.jar inside the installed pycocoevalcap package.

    Returns:
        The jar's path (its directory also holds data/paraphrase-en.gz, which Meteor loads).

    Raises:
        MeteorUnavailable: pycocoevalcap is not installed or lacks the jar or its data.
    """
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MeteorUnavailable(
            "METEOR needs the pycocoevalcap package (it ships meteor-1.5.jar): pip install pycocoevalcap"
        )
    for root in spec.submodule_search_locations:
        jar = Path(root) / "meteor" / "meteor-1.5.jar"
        if jar.is_file():
            table = jar.parent / "data" / "paraphrase-en.gz"
            if not table.is_file():
                raise MeteorUnavailable(f"Meteor's paraphrase table is missing: {table}")
            return jar
    raise MeteorUnavailable(
        f"pycocoevalcap at {list(spec.submodule_search_locations)} has no meteor/meteor-1.5.jar"
    )


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailable(
            "METEOR needs a Java runtime: no `java` executable on PATH (or pass meteor=False)"
        )
    return java


class MeteorProcess:
    """A running Meteor 1.5 (`-stdio -l en -norm`, as the toolkit starts it); use with `with`.

    Protocol: "SCORE ||| ref1 ||| ... ||| hyp" answers one line of sufficient statistics;
    "EVAL ||| stats1 ||| stats2 ..." answers one score line per segment and then the corpus
    score (computed from the summed statistics, not the mean of segment scores). Each request
    is written and flushed before its answer is read, so neither side ever waits on a full
    pipe; stderr goes to a temporary file for the same reason.

    Raises:
        MeteorUnavailable: on construction, when java or the jar is missing.
    """

    def __init__(self) -> None:
        self._cmd = [_java(), "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
        self._cwd = meteor_jar().parent
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    def __enter__(self) -> MeteorProcess:
        log.debug("starting Meteor: %s (in %s)", " ".join(self._cmd), self._cwd)
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self._cmd, cwd=self._cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the JVM (closing its stdin ends Meteor's loop; kill it if it lingers)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin:
                    proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            finally:
                if proc.stdout:
                    proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _request(self, line: str, answers: int) -> list[str]:
        if self._proc is None:
            raise RuntimeError("MeteorProcess used outside its `with` block")
        try:
            self._proc.stdin.write(line.encode("utf-8") + b"\n")
            self._proc.stdin.flush()
            out = [self._proc.stdout.readline() for _ in range(answers)]
        except BrokenPipeError:
            out = [b""]
        if not all(out):  # EOF: the JVM died
            self._stderr.seek(0)
            err = self._stderr.read().decode("utf-8", "replace").strip()
            raise RuntimeError(f"Meteor (java) exited unexpectedly: {err[-2000:] or 'no stderr'}")
        return [o.decode("utf-8").strip() for o in out]

    def statistics(self, hypothesis: str, references: Sequence[str]) -> str:
        """Meteor's sufficient statistics for one segment (a line of numbers)."""
        # As the toolkit: "|||" would split the hypothesis field, double spaces are squeezed
        # once; line breaks would break the line protocol.
        hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
        line = " ||| ".join(["SCORE", *references, hypothesis])
        return self._request(re.sub("[\r\n]", " ", line), 1)[0]

    def score(self, statistics: Sequence[str]) -> float:
        """Corpus METEOR (0..1) from per-segment statistics."""
        answers = self._request(" ||| ".join(["EVAL", *statistics]), len(statistics) + 1)
        return float(answers[-1])


def meteor_score(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR of tokenized candidates, as the toolkit's Meteor().compute_score.

    Args:
        candidates: tokenized candidate strings.
        references: for each candidate, its tokenized references.

    Returns:
        METEOR in [0, 1].

    Raises:
        MeteorUnavailable: no java on PATH or no pycocoevalcap jar.
        ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("METEOR needs at least one candidate")
    with MeteorProcess() as proc:
        stats = [proc.statistics(c, refs) for c, refs in zip(candidates, references, strict=True)]
        return proc.score(stats)


# ============================================================================================
# All metrics
# ============================================================================================


def _check_ids(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    """Raise ValueError unless both dicts have the same ids, strings and non-empty reference lists."""
    missing = [k for k in references if k not in candidates]
    extra = [k for k in candidates if k not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference ids have no candidate (e.g. {missing[:5]})")
        if extra:
            parts.append(f"{len(extra)} candidate ids have no references (e.g. {extra[:5]})")
        raise ValueError("candidate ids must equal reference ids: " + "; ".join(parts))
    bad_refs = [
        k for k, refs in references.items()
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(r, str) for r in refs)
    ]
    if bad_refs:
        raise ValueError(f"each id needs a non-empty list of reference strings; not so for {bad_refs[:5]}")
    bad_cands = [k for k, c in candidates.items() if not isinstance(c, str)]
    if bad_cands:
        raise ValueError(f"candidates must be strings; not so for {bad_cands[:5]}")
    if not references:
        raise ValueError("no captions to score")


def caption_scores(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], *, meteor: bool = True
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of generated captions, ×100, as papers report.

    Equal to pycocoevalcap's pipeline: PTBTokenizer over the references and, separately,
    over the candidates, then Bleu(4), Meteor(), Rouge(), Cider() on the tokenized strings.
    Empty candidates are allowed; they score as the toolkit scores them (no n-gram matches,
    length 0 in BLEU's brevity penalty).

    Args:
        candidates: id -> generated caption.
        references: id -> list of reference captions; the ids must be those of `candidates`.
            The order of `references` is the order in which the toolkit would see them, which
            matters only through `tokenize_batch`'s look-ahead across captions.
        meteor: also run METEOR (needs java and pycocoevalcap's jar); False leaves it out.

    Returns:
        {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} -> value ×100
        ("METEOR" only when `meteor`).

    Raises:
        ValueError: the ids differ, or an id has no references.
        MeteorUnavailable: `meteor` is True and java or the jar is missing.
    """
    _check_ids(candidates, references)
    if meteor:  # fail before the work, not after it
        _java()
        meteor_jar()
    # Like the toolkit: references in one batch, candidates in another, each in its dict order.
    ids = list(references)
    flat_refs = tokenize_batch([r for i in ids for r in references[i]])
    refs: list[list[str]] = []
    start = 0
    for i in ids:
        refs.append(flat_refs[start : start + len(references[i])])
        start += len(references[i])
    tokenized = dict(zip(candidates, tokenize_batch(list(candidates.values()))))
    cands = [tokenized[i] for i in ids]

    scores = {f"BLEU-{k + 1}": 100.0 * b for k, b in enumerate(corpus_bleu(cands, refs, 4))}
    if meteor:
        scores["METEOR"] = 100.0 * meteor_score(cands, refs)
    scores["ROUGE-L"] = 100.0 * rouge_l(cands, refs)
    scores["CIDEr"] = 100.0 * cider_d(cands, refs)
    return scores
