"""VALOR-32K (audio-visual captioning and retrieval) -> avpea-shards/1, one sample per video.

    python -m sharding.valor --ids ids_train.json --captions captions.json --frames DIR \\
        --audio DIR --out URL --split train|val|test [--strict] [--num-frames 10] \\
        [--image-size 224]

Inputs, in VALOR-32K's release layout:

- `--ids`: a JSON list of the split's video ids.
- `--captions`: the captions, in either of two forms (both accepted):
  a JSON object `{video_id: [caption, ...]}`, or VALOR's own annotation files
  (desc_train.json ...): a JSON list of `{"video_id": ..., "desc": caption}` records, grouped
  here by video_id in file order (`desc` may also be a list of captions). Videos of other
  splits in the file are ignored.
- `--frames DIR/<video_id>/*.jpg`: frames extracted at 1 fps.
- `--audio DIR/<video_id>.{wav,flac,mp3,m4a}`: one audio file per video, the first of these
  suffixes that exists (WAV/FLAC/MP3 through libsndfile, M4A through PyAV).

Each caption is stripped of surrounding whitespace, empty ones dropped. A video listed in
--ids without usable captions (absent from --captions, an empty list, a non-string caption)
is skipped as `no_captions`, like one with missing or unreadable frames or audio; --strict
turns any skip into a failure. Audio: T windows of 1 s, 102 fbank frames each (AVE's setting:
VALOR-32K clips are 10 s AudioSet clips). Beside the shards, vocab.txt: a BERT WordPiece
vocabulary of the split's caption words, which `BertTokenizerFast(path)` (positional) or
`BertTokenizerFast.from_pretrained(<its directory>)` loads without a download.
"""
from __future__ import annotations

import argparse
import sys
import unicodedata
from collections import Counter
from typing import Any, Iterable, Iterator, Sequence

from avpea_ray.data.audio import AudioConfig
from sharding import common, run

DATASET = "valor"
AUDIO = AudioConfig(window_seconds=1.0, target_frames=102)
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a")  # tried in this order
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4
VOCAB_NAME = "vocab.txt"
CAPTIONS_FORMS = ('{"video_id": ["caption", ...]} or a list of '
                  '{"video_id": "...", "desc": "caption"} records')


# -- BERT's basic tokenization (what BertTokenizer does before WordPiece) ---------------------

def _is_punctuation(char: str) -> bool:
    """ASCII punctuation (BERT counts `$`, `^`, `` ` `` ... too) or any Unicode P* category."""
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
            or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text: str) -> list[str]:
    """BERT's basic tokenization with do_lower_case=True (BertNormalizer + BertPreTokenizer).

    Control characters removed, CJK characters made words of their own, accents stripped
    (NFD, non-spacing marks dropped), lower-cased, split on whitespace, and every punctuation
    character its own token.

    Returns:
        The tokens; each is a whole entry of a WordPiece vocabulary built from them.
    """
    cleaned = []
    for char in text:
        cp = ord(char)
        if cp == 0 or cp == 0xFFFD:
            continue
        category = unicodedata.category(char)
        if char in "\t\n\r" or category == "Zs":
            cleaned.append(" ")
        elif category in ("Cc", "Cf"):
            continue
        elif _is_cjk(cp):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    text = unicodedata.normalize("NFD", "".join(cleaned))
    text = "".join(c for c in text if unicodedata.category(c) != "Mn").lower()
    tokens = []
    for word in text.split():
        start = 0
        for i, char in enumerate(word):
            if _is_punctuation(char):
                if start < i:
                    tokens.append(word[start:i])
                tokens.append(char)
                start = i + 1
        if start < len(word):
            tokens.append(word[start:])
    return tokens


def build_vocab(captions: Iterable[str]) -> list[str]:
    """The vocab.txt lines: the special tokens, then every word by descending count, then
    alphabetically."""
    counts = Counter(token for caption in captions for token in basic_tokenize(caption))
    for special in SPECIAL_TOKENS:  # cannot occur (brackets are split off), but be sure
        counts.pop(special, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    return [*SPECIAL_TOKENS, *words]


# -- annotations -----------------------------------------------------------------------------

def load_ids(path: str) -> list[str]:
    """The split's video ids; `UsageError` unless the file is a JSON list of non-empty strings."""
    what = "a JSON list of the split's video ids"
    ids = common.read_json(path, "--ids", what)
    if not isinstance(ids, list):
        raise common.UsageError(f"--ids: {path} should hold {what}, "
                                f"got a JSON {type(ids).__name__}")
    for position, video_id in enumerate(ids):
        if not isinstance(video_id, str) or not video_id.strip():
            raise common.UsageError(f"--ids: {path}[{position}] should be a non-empty string "
                                    f"video id, got {video_id!r:.60}")
    return [video_id.strip() for video_id in ids]


def load_captions(path: str) -> dict[str, list[Any]]:
    """video_id -> its raw captions, from either accepted form of --captions.

    The entries are not checked here (`clean_captions` does that per video); the file's
    structure is: a mapping, or a list of objects each with a string "video_id" and a "desc".

    Raises:
        common.UsageError: missing file, invalid JSON or neither form, naming the place.
    """
    doc = common.read_json(path, "--captions", CAPTIONS_FORMS)
    if isinstance(doc, dict):
        return {str(video_id).strip(): value for video_id, value in doc.items()}
    if not isinstance(doc, list):
        raise common.UsageError(f"--captions: {path} should hold {CAPTIONS_FORMS}, "
                                f"got a JSON {type(doc).__name__}")
    grouped: dict[str, list[Any]] = {}
    for position, record in enumerate(doc):
        where = f"--captions: {path}[{position}]"
        if not isinstance(record, dict):
            raise common.UsageError(f"{where} should be a {{\"video_id\": ..., \"desc\": ...}} "
                                    f"record, got a JSON {type(record).__name__}")
        for name in ("video_id", "desc"):
            if name not in record:
                raise common.UsageError(f"{where}: missing field '{name}' (expected "
                                        '{"video_id": "...", "desc": "caption"})')
        video_id = record["video_id"]
        if not isinstance(video_id, str) or not video_id.strip():
            raise common.UsageError(f"{where}: field 'video_id' should be a non-empty string, "
                                    f"got {video_id!r:.60}")
        desc = record["desc"]
        entries = grouped.setdefault(video_id.strip(), [])
        entries.extend(desc if isinstance(desc, list) else [desc])
    return grouped


def clean_captions(value: Any) -> tuple[list[str], int]:
    """A video's captions, stripped, empty ones dropped.

    Args:
        value: what --captions holds for the video: a list of strings (a lone string is
            taken as one caption).

    Returns:
        (the captions, how many empty ones were dropped). Raises `SkipSample("no_captions")`
        for a value that is not a list of strings or has no non-empty caption.
    """
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise common.SkipSample("no_captions", f"captions should be a list of strings, "
                                               f"got a JSON {type(value).__name__}")
    for i, caption in enumerate(value):
        if not isinstance(caption, str):
            raise common.SkipSample("no_captions", f"caption {i} is a JSON "
                                                   f"{type(caption).__name__}, not a string")
    captions = [c.strip() for c in value if c.strip()]
    if not captions:
        raise common.SkipSample("no_captions", "empty caption list" if not value
                                else f"all {len(value)} caption(s) are empty")
    return captions, len(value) - len(captions)


# -- the run ---------------------------------------------------------------------------------

def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ids", required=True,
                        help="JSON list of the split's video ids")
    parser.add_argument("--captions", required=True,
                        help='JSON {"video_id": ["caption", ...]} or VALOR\'s list of '
                             '{"video_id", "desc"} records')
    parser.add_argument("--frames", required=True, help="directory of <video_id>/ JPEG folders")
    parser.add_argument("--audio", required=True,
                        help="directory of <video_id>.wav|.flac|.mp3|.m4a files")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return run.build_parser(prog or "python -m sharding.valor", __doc__, add_args)


def plan(args: argparse.Namespace, report: common.Report) -> run.Plan:
    """Read the ids and captions; one record per listed video."""
    common.require_dir(args.frames, "--frames", "a folder of <video_id>/ frame folders")
    common.require_dir(args.audio, "--audio", "a folder of <video_id>.{wav,flac,mp3,m4a} files")
    ids = load_ids(args.ids)
    captions_by_video = load_captions(args.captions)

    def records() -> Iterator[run.Record]:
        for video_id in ids:
            try:
                if video_id not in captions_by_video:
                    raise common.SkipSample("no_captions", f"not in {args.captions}")
                captions, dropped = clean_captions(captions_by_video[video_id])
            except common.SkipSample as skip:
                yield run.Record(video_id, skip=skip)
                continue
            job = run.MediaJob(video_id, {"video_id": video_id, "captions": captions},
                               args.num_frames, args.image_size, AUDIO, frames_dir=args.frames,
                               audio_dir=args.audio, audio_suffixes=AUDIO_SUFFIXES)
            yield run.Record(video_id, job, counts={"empty_captions_dropped": dropped})

    def finish(written: list[run.MediaJob]) -> run.Extras:
        kept = [c for job in written for c in job.meta["captions"]]
        vocab = build_vocab(kept)
        return run.Extras(totals={"captions": len(kept)},
                          extra={"num_captions": len(kept), "vocab_size": len(vocab)},
                          files={VOCAB_NAME: "".join(f"{t}\n" for t in vocab).encode("utf-8")})

    return run.Plan(records(), run.make_sample, AUDIO, {"vocab": VOCAB_NAME}, finish)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Shard one VALOR-32K split. Returns the exit code (see common.run_main)."""
    return run.main(DATASET, build_parser(prog), plan, argv)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
