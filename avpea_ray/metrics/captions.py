"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), equal to the COCO toolkit's.

Captioning papers (VALOR-32K, MSR-VTT, ...) report the numbers of the COCO caption toolkit
(pycocoevalcap): every caption goes through Stanford's PTBTokenizer (lowercased, punctuation
tokens dropped), then Bleu(4), Meteor(), Rouge() and Cider() score the tokenized strings.
This module runs that pipeline with the toolkit's own scorers, except for two parts:

- Tokenizing: `tokenize` / `tokenize_batch` (in `ptb_tokenizer`) are a pure-Python port of
  CoreNLP 3.4.1's PTBTokenizer (the jar the toolkit ships) run as the toolkit runs it
  (`-preserveLines -lowerCase`), followed by the toolkit's punctuation filter. The toolkit's
  PTBTokenizer starts Java; the port keeps per-epoch validation (`meteor=False`) Java-free.
- METEOR: `MeteorProcess` drives the toolkit's Meteor 1.5 jar over the same stdin protocol
  as the toolkit's Meteor(), but reads each answer after flushing its request, sends stderr
  to a file (a full stderr pipe cannot stall the JVM), reports a dead JVM with its stderr
  and ends the JVM when done (not in `__del__`). Needs `java`.

BLEU, ROUGE-L and CIDEr-D are pycocoevalcap's `Bleu(4)`, `Rouge()` and `Cider()` (pure
Python), so their quirks are the toolkit's: ROUGE-L splits on single spaces (an empty
candidate against an empty reference scores 1), CIDEr-D's length penalty compares bigram
counts. `caption_scores` gives all of them ×100 (percent scale, as papers report them).

The tokenizer reproduces one toolkit quirk: parentheses and braces become
`-lrb-`/`-rrb-`/`-lcb-`/`-rcb-`/`-lsb-`/`-rsb-` and are *kept* (the toolkit's punctuation
list holds the upper-case forms, but it filters the lowercased tokens).

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
- When no reference of any id holds a word (all tokenize to ""), the toolkit's Cider() fails
  (max() of no document frequencies); here CIDEr is 0, as every similarity is.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

log = logging.getLogger(__name__)

from .ptb_tokenizer import PUNCTUATIONS, tokenize, tokenize_batch  # noqa: F401 - re-exported


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

    # The toolkit scorers' input: id -> [candidate] and id -> references, in references' order.
    gts = dict(zip(ids, refs))
    res = {i: [c] for i, c in zip(ids, cands)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: no print of its counts
    scores = {f"BLEU-{k + 1}": 100.0 * b for k, b in enumerate(bleu)}
    if meteor:
        scores["METEOR"] = 100.0 * meteor_score(cands, refs)
    scores["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    if any(r.split() for r in flat_refs):
        scores["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    else:  # no reference n-grams: the toolkit's Cider() would fail; every similarity is 0
        scores["CIDEr"] = 0.0
    return scores
