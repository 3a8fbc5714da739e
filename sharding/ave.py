"""AVE (audio-visual event localisation) -> avpea-shards/1, one sample per 10 s clip.

    python -m sharding.ave --annotations Annotations.txt --splits DIR \\
        (--frames DIR --audio DIR | --videos DIR) --out URL --split train|val|test

`Annotations.txt` rows are `Category&VideoID&Quality&StartTime&EndTime` (with or without a
header row); the split lists trainSet.txt / valSet.txt / testSet.txt in --splits use the same
format. Category index = first-appearance order in Annotations.txt; second t of the clip is
labelled with the category if start <= t < end, else background (28). Audio: T windows of
1 s (10 one-second windows for T=10), 102 fbank frames each.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

from avpea_ray.data.audio import AudioConfig
from sharding import common, run

DATASET = "ave"
BACKGROUND = 28            # class index of "no event" seconds
NUM_SECONDS = 10           # AVE clips are 10 s, one label per second
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
AUDIO = AudioConfig(window_seconds=1.0, target_frames=102)


class MalformedRow(Exception):
    """A row that is not `Category&VideoID&Quality&StartTime&EndTime`."""


@dataclass
class Row:
    """One annotation row."""

    category: str
    video_id: str
    quality: str
    start: float
    end: float


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MalformedRow(f"{name} {text!r} is not a number") from None
    return int(value) if value.is_integer() else value


def parse_row(line: str) -> Row:
    """Parse `Category&VideoID&Quality&StartTime&EndTime`.

    Raises:
        MalformedRow: wrong number of fields, empty id/category, bad times.
    """
    fields = [f.strip() for f in line.split("&")]
    if len(fields) != 5:
        raise MalformedRow(f"expected 5 '&'-separated fields "
                           f"(Category&VideoID&Quality&StartTime&EndTime), got {len(fields)}")
    category, video_id, quality, start_text, end_text = fields
    if not category or not video_id:
        raise MalformedRow("empty category or video id")
    start, end = _number(start_text, "StartTime"), _number(end_text, "EndTime")
    if not 0 <= start <= end <= NUM_SECONDS:
        raise MalformedRow(f"times {start}..{end} are not within 0 <= start <= end <= "
                           f"{NUM_SECONDS}")
    return Row(category, video_id, quality, start, end)


def is_header(line: str) -> bool:
    """The optional first row naming the columns (its times are not numbers)."""
    fields = [f.strip() for f in line.split("&")]
    return len(fields) == 5 and fields[1].lower() == "videoid"


def read_rows(path: str, flag: str, report: common.Report | None,
              strict: bool = False) -> list[Row]:
    """Rows of Annotations.txt or a split list; malformed rows go to `report`.

    Args:
        path: the file.
        flag: the flag it came from, for messages.
        report: where malformed rows are recorded (None: drop them silently).
        strict: raise `StrictError` on a malformed row.

    Returns:
        The rows in file order. Raises `UsageError` if the file is missing or unreadable.
    """
    common.require_file(path, flag, "AVE rows Category&VideoID&Quality&StartTime&EndTime")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: some copies carry a BOM
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise common.UsageError(f"{flag}: cannot read {path} ({exc})") from None
    rows, first = [], True
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if first and is_header(line):
            first = False
            continue
        first = False
        try:
            rows.append(parse_row(line))
        except MalformedRow as exc:
            where = f"{os.path.basename(path)}:{number}"
            if strict:
                raise common.StrictError(f"{where}: malformed_record ({exc})") from None
            if report is not None:
                report.skip(where, "malformed_record", f"{exc}: {line.strip()!r:.100}",
                            kind="record")
    return rows


def category_order(rows: list[Row]) -> list[str]:
    """Category names in first-appearance order; `UsageError` beyond 28 categories."""
    names: dict[str, None] = {}
    for row in rows:
        names.setdefault(row.category, None)
    if len(names) > BACKGROUND:
        raise common.UsageError(f"--annotations: {len(names)} categories found; AVE has at most "
                                f"{BACKGROUND} (index {BACKGROUND} is background)")
    return list(names)


def second_labels(category_index: int, start: float, end: float,
                  seconds: int = NUM_SECONDS) -> list[int]:
    """Per-second labels: the category where start <= t < end, else BACKGROUND."""
    return [category_index if start <= t < end else BACKGROUND for t in range(seconds)]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="AVE's Annotations.txt")
    parser.add_argument("--splits", required=True,
                        help="directory with trainSet.txt, valSet.txt, testSet.txt")
    parser.add_argument("--frames", help="directory of <video_id>/ JPEG folders")
    parser.add_argument("--audio", help="directory of <video_id>.wav files")
    parser.add_argument("--videos", help="directory of <video_id>.mp4 files "
                                         "(instead of --frames and --audio)")


def build_parser() -> argparse.ArgumentParser:
    return run.build_parser("python -m sharding.ave", __doc__, add_args)


def check_media_flags(args: argparse.Namespace) -> None:
    """Exactly one of (--frames and --audio) or --videos, each an existing directory."""
    if args.videos:
        if args.frames or args.audio:
            raise common.UsageError("give either --videos or --frames with --audio, not both")
        common.require_dir(args.videos, "--videos", "a folder of <video_id>.mp4 files")
        return
    if not (args.frames and args.audio):
        raise common.UsageError("give --frames and --audio (frame folders and WAVs), "
                                "or --videos (MP4s)")
    common.require_dir(args.frames, "--frames", "a folder of <video_id>/ frame folders")
    common.require_dir(args.audio, "--audio", "a folder of <video_id>.wav files")


def plan(args: argparse.Namespace, report: common.Report) -> run.Plan:
    """Read Annotations.txt (the categories) and the split list; one record per row."""
    check_media_flags(args)
    common.require_dir(args.splits, "--splits",
                       "the folder with trainSet.txt, valSet.txt and testSet.txt")
    categories = category_order(read_rows(args.annotations, "--annotations", None))
    if not categories:
        raise common.UsageError(f"--annotations: {args.annotations} has no valid rows")
    category_ids = {name: i for i, name in enumerate(categories)}
    split_path = os.path.join(args.splits, SPLIT_FILES[args.split])
    rows = read_rows(split_path, "--splits", report, args.strict)

    def records() -> Iterator[run.Record]:
        for row in rows:
            if row.category not in category_ids:
                yield run.Record(row.video_id, skip=common.SkipSample(
                    "malformed_record", f"category {row.category!r} is not in "
                                        f"{os.path.basename(args.annotations)}"))
                continue
            index = category_ids[row.category]
            meta = {"video_id": row.video_id, "category": row.category,
                    "category_index": index, "quality": row.quality, "start": row.start,
                    "end": row.end, "labels": second_labels(index, row.start, row.end)}
            yield run.Record(row.video_id, run.MediaJob(
                row.video_id, meta, args.num_frames, args.image_size, AUDIO,
                frames_dir=args.frames, audio_dir=args.audio, videos_dir=args.videos))

    extra = {"categories": categories, "background_index": BACKGROUND,
             "source": "videos" if args.videos else "frames+audio"}
    return run.Plan(records(), run.make_sample, AUDIO, extra)


def main(argv: Sequence[str] | None = None) -> int:
    """Shard one AVE split. Returns the exit code (see common.run_main)."""
    return run.main(DATASET, build_parser(), plan, argv)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
