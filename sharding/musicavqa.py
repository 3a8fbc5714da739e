"""MUSIC-AVQA -> avpea-shards/1 (one sample per video holding all of its QA pairs).

    python -m sharding.musicavqa --annotations DIR --frames DIR --audio DIR \\
        --out URL --split train|val|test [--strict] [--num-frames 10] [--image-size 224]

Inputs as the dataset's users prepare them (github.com/GeWu-Lab/MUSIC-AVQA):
`DIR/avqa-{train,val,test}.json`, `FRAMES/<video_id>/*.jpg` (1 fps) and `AUDIO/<video_id>.wav`.
The vocabularies come from avqa-train.json whatever --split is, and are written as
vocab.json beside the shards.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from avpea_ray.data.audio import AudioConfig
# One tokenizer for sharding and prediction, in the library.
from avpea_ray.data.questions import PAD, UNK, tokenize
from sharding import common, run

DATASET = "musicavqa"
AUDIO = AudioConfig()  # 1.95 s windows, 192 fbank frames
KEPT_FIELDS = ("video_id", "question_id", "type", "question_content", "templ_values", "anser")
PLACEHOLDER = re.compile(r"<[A-Za-z_]+>")


class MalformedRecord(Exception):
    """An annotation record that cannot be used (the message says which field and why)."""


@dataclass
class Question:
    """One usable QA record: the kept original fields and what is derived from them."""

    record: dict
    question: str
    words: list[str]
    question_type: str

    @property
    def video_id(self) -> str:
        return self.record["video_id"]


def parse_list_field(value: Any, name: str) -> list[str]:
    """`type` / `templ_values`: a string holding a list (JSON, or a Python literal).

    Returns:
        The list of strings. Raises `MalformedRecord` naming the field.
    """
    if isinstance(value, list):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            try:  # some copies use single quotes
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise MalformedRecord(f"field '{name}' is not a list: {value!r:.80}") from None
    else:
        raise MalformedRecord(f"field '{name}' should be a string holding a list, "
                              f"got {type(value).__name__}")
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise MalformedRecord(f"field '{name}' should hold a list of strings: {value!r:.80}")
    return parsed


def fill_question(content: str, templ_values: list[str]) -> str:
    """Replace `<Object>`, `<LR>`, ... placeholders, in order, by the template values.

    Raises:
        MalformedRecord: the numbers of placeholders and values differ.
    """
    slots = PLACEHOLDER.findall(content)
    if len(slots) != len(templ_values):
        raise MalformedRecord(f"question has {len(slots)} placeholder(s) {slots} but "
                              f"templ_values has {len(templ_values)} value(s)")
    values = iter(templ_values)
    return PLACEHOLDER.sub(lambda _: next(values), content)


def parse_record(record: Any) -> Question:
    """Check one annotation record and derive the filled question and its type.

    Raises:
        MalformedRecord: a field is missing or unusable.
    """
    if not isinstance(record, dict):
        raise MalformedRecord(f"record is a {type(record).__name__}, expected an object")
    missing = [f for f in KEPT_FIELDS if f not in record]
    if missing:
        raise MalformedRecord(f"missing field(s) {', '.join(missing)}")
    for name in ("video_id", "question_content", "anser"):
        if not isinstance(record[name], str) or not record[name].strip():
            raise MalformedRecord(f"field '{name}' should be a non-empty string")
    qtype = parse_list_field(record["type"], "type")
    if not qtype:
        raise MalformedRecord("field 'type' is an empty list")
    question = fill_question(record["question_content"],
                             parse_list_field(record["templ_values"], "templ_values"))
    words = tokenize(question)
    if not words:
        raise MalformedRecord("the question has no words")
    kept = {f: record[f] for f in KEPT_FIELDS}
    return Question(record=kept, question=question, words=words, question_type="-".join(qtype))


def is_deleted(record: Any) -> bool:
    """question_deleted == 1 (as int or string)."""
    return isinstance(record, dict) and str(record.get("question_deleted", 0)).strip() == "1"


def record_id(record: Any, position: int, file_name: str) -> str:
    """The question id for messages, or the record's place in the file when it has none."""
    if isinstance(record, dict) and "question_id" in record:
        return str(record["question_id"])
    return f"{file_name}[{position}]"


def load_annotations(path: str) -> list:
    """The list of records in an avqa-*.json file; `UsageError` if missing or not a list."""
    common.require_file(path, "--annotations", "a MUSIC-AVQA annotation file (list of records)")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise common.UsageError(f"--annotations: {path} is not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise common.UsageError(f"--annotations: {path} should hold a JSON list of records, "
                                f"got {type(records).__name__}")
    return records


def parse_records(records: list, file_name: str, report: common.Report | None,
                  strict: bool = False) -> list[Question]:
    """Usable questions of a file; deleted and malformed ones are counted in `report`.

    Args:
        records: the file's records.
        file_name: for ids of records without a question_id.
        report: where skips go (None: ignore them, e.g. for the train vocabulary).
        strict: raise `StrictError` on a malformed record.

    Returns:
        The questions in file order.
    """
    questions = []
    for position, record in enumerate(records):
        qid = record_id(record, position, file_name)
        if is_deleted(record):
            if report is not None:
                report.skip(qid, "question_deleted", "question_deleted == 1", kind="question")
            continue
        try:
            questions.append(parse_record(record))
        except MalformedRecord as exc:
            if report is None:
                continue
            if strict:
                raise common.StrictError(f"question {qid}: malformed_record ({exc})") from None
            report.skip(qid, "malformed_record", f"{file_name}: {exc}", kind="question")
    return questions


def build_vocab(train_questions: list[Question]) -> dict[str, list[str]]:
    """Question-word and answer vocabularies in first-appearance order (train only).

    Returns:
        `{"question_words": ["<pad>", "<unk>", ...], "answers": [...], "answer_counts": [...]}`;
        a word's id is its position (0 = pad, 1 = unk); `answer_counts[i]` is how many train
        questions have answer i (the majority-answer baseline comes from it).
    """
    words = {PAD: 0, UNK: 1}
    answers: dict[str, int] = {}
    for q in train_questions:
        for w in q.words:
            words.setdefault(w, len(words))
        answers[q.record["anser"]] = answers.get(q.record["anser"], 0) + 1
    return {"question_words": list(words), "answers": list(answers),
            "answer_counts": list(answers.values())}


def question_meta(q: Question, word_ids: dict[str, int], answer_ids: dict[str, int]) -> dict:
    """The per-question entry of a sample's json (original fields + derived ones)."""
    return {**q.record, "question": q.question,
            "question_tokens": [word_ids.get(w, 1) for w in q.words],
            "answer_index": answer_ids.get(q.record["anser"], -1),
            "question_type": q.question_type}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True,
                        help="directory with avqa-train.json, avqa-val.json, avqa-test.json")
    parser.add_argument("--frames", required=True, help="directory of <video_id>/ JPEG folders")
    parser.add_argument("--audio", required=True, help="directory of <video_id>.wav files")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return run.build_parser(prog or "python -m sharding.musicavqa", __doc__, add_args)


def plan(args: argparse.Namespace, report: common.Report) -> run.Plan:
    """Read the annotations and vocabularies; one record per video, its questions grouped."""
    common.require_dir(args.annotations, "--annotations", "the folder with avqa-*.json")
    common.require_dir(args.frames, "--frames", "a folder of <video_id>/ frame folders")
    common.require_dir(args.audio, "--audio", "a folder of <video_id>.wav files")
    train_path = os.path.join(args.annotations, "avqa-train.json")
    split_path = os.path.join(args.annotations, f"avqa-{args.split}.json")
    train_records = load_annotations(train_path)
    split_records = train_records if args.split == "train" else load_annotations(split_path)

    vocab = build_vocab(parse_records(train_records, "avqa-train.json", None))
    word_ids = {w: i for i, w in enumerate(vocab["question_words"])}
    answer_ids = {a: i for i, a in enumerate(vocab["answers"])}
    questions = parse_records(split_records, os.path.basename(split_path), report, args.strict)

    by_video: dict[str, list[dict]] = {}  # first-appearance order
    for q in questions:
        entry = question_meta(q, word_ids, answer_ids)
        if entry["answer_index"] < 0:
            report.count("unknown_answers")
        by_video.setdefault(q.video_id, []).append(entry)
    records = [run.Record(video_id, run.MediaJob(
        video_id, {"video_id": video_id, "questions": entries}, args.num_frames,
        args.image_size, AUDIO, frames_dir=args.frames, audio_dir=args.audio))
        for video_id, entries in by_video.items()]

    def finish(written: list[run.MediaJob]) -> run.Extras:
        kept_questions = sum(len(job.meta["questions"]) for job in written)
        return run.Extras(
            totals={"questions": kept_questions}, extra={"num_questions": kept_questions},
            files={"vocab.json": json.dumps(vocab, indent=1, ensure_ascii=False).encode("utf-8")})

    extra = {"vocab": "vocab.json", "num_question_words": len(vocab["question_words"]),
             "num_answers": len(vocab["answers"])}
    return run.Plan(records, run.make_sample, AUDIO, extra, finish)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Shard one MUSIC-AVQA split. Returns the exit code (see common.run_main)."""
    return run.main(DATASET, build_parser(prog), plan, argv)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
