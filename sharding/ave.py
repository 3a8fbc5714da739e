"""AVE (audio-visual event localisation) -> avpea-shards/1, one sample per annotation row.

    python -m sharding.ave --annotations Annotations.txt --splits DIR \\
        (--frames DIR --audio DIR | --videos DIR) --out URL --split train|val|test

`Annotations.txt` rows are `Category&VideoID&Quality&StartTime&EndTime` (with or without a
header row); the split lists trainSet.txt / valSet.txt / testSet.txt in --splits use the same
format and hold rows of Annotations.txt. A row is one event of one 10 s clip, and a video can
have several rows (45 videos of the real file do, e.g. one segment labelled both "Male
speech, man speaking" and "Female speech, woman speaking"): each row is a sample of its own,
labelled from that row alone, as in the AVE release's labels.h5 and the loaders of AVE, CMBS
and LAVISH, which index Annotations.txt by row. Category index = first-appearance order in
Annotations.txt; second t of the clip is labelled with the row's category if
start <= t < end, else background (28). Audio: T windows of 1 s (10 one-second windows for
T=10), 102 fbank frames each.

Sample id: `<video_id>-r<row>`, where row is the row's 0-based position among the data rows
of Annotations.txt (header and blank lines not counted, malformed rows counted). That is the
index the AVE release's `*_order.h5`/labels.h5 and the CMBS/LAVISH loaders use, so a sample
maps back to them; it depends only on Annotations.txt, not on the split list, the order of
sharding or --workers, so reruns give the same ids. The media are looked up by the video
id (two rows of one video decode the same files) and the json keeps `video_id`.

A split row that is not in Annotations.txt is skipped as `malformed_record`; a row listed
twice (all five fields equal) is one sample, its repeats are skipped as `duplicate_key`.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Sequence

from avpea_ray.data.audio import AudioConfig
from sharding import common, run

DATASET = "ave"
BACKGROUND = 28            # class index of "no event" seconds
NUM_SECONDS = 10           # AVE clips are 10 s, one label per second
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
AUDIO = AudioConfig(window_seconds=1.0, target_frames=102)


class MalformedRow(Exception):
    """A row that is not `Category&VideoID&Quality&StartTime&EndTime`."""


@dataclass(frozen=True)
class Row:
    """One annotation row; rows compare and hash by their five fields only.

    Args:
        category, video_id, quality, start, end: the fields.
        line: 1-based line in its file (for messages; 0 when not read from a file).
        index: 0-based position among its file's data rows (header and blank lines not
            counted, malformed rows counted); in Annotations.txt, the row's id.
    """

    category: str
    video_id: str
    quality: str
    start: float
    end: float
    line: int = field(default=0, compare=False)
    index: int = field(default=0, compare=False)


def sample_id(video_id: str, row: int) -> str:
    """The id of the sample of Annotations.txt's data row `row` (0-based): `<video_id>-r<row>`.

    Unique even when ids sanitise alike (`shards.sample_key`): the key ends in `-r<row>`.
    """
    return f"{video_id}-r{row}"


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
        The well-formed rows in file order, each with its `line` and `index`. Raises
        `UsageError` if the file is missing or unreadable.
    """
    common.require_file(path, flag, "AVE rows Category&VideoID&Quality&StartTime&EndTime")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: some copies carry a BOM
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise common.UsageError(f"{flag}: cannot read {path} ({exc})") from None
    rows, first, index = [], True, -1
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if first and is_header(line):
            first = False
            continue
        first = False
        index += 1  # malformed rows count too: one bad row must not renumber the rest
        try:
            rows.append(replace(parse_row(line), line=number, index=index))
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


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return run.build_parser(prog or "python -m sharding.ave", __doc__, add_args)


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
    """Read Annotations.txt (categories, row ids) and the split list; one record per row.

    A split row whose category or whole row is not in Annotations.txt is reported as
    `malformed_record` under `<split file>:<line>` (--strict: `StrictError`).
    """
    check_media_flags(args)
    common.require_dir(args.splits, "--splits",
                       "the folder with trainSet.txt, valSet.txt and testSet.txt")
    annotations = read_rows(args.annotations, "--annotations", None)
    categories = category_order(annotations)
    if not categories:
        raise common.UsageError(f"--annotations: {args.annotations} has no valid rows")
    category_ids = {name: i for i, name in enumerate(categories)}
    row_ids: dict[Row, int] = {}
    for row in annotations:
        row_ids.setdefault(row, row.index)  # an identical repeat adds nothing: the first's id
    split_path = os.path.join(args.splits, SPLIT_FILES[args.split])
    annotations_name = os.path.basename(args.annotations)

    records = []
    for row in read_rows(split_path, "--splits", report, args.strict):
        if row.category not in category_ids:
            problem = f"category {row.category!r} is not in {annotations_name}"
        elif row not in row_ids:
            problem = f"the row is not in {annotations_name} (a sample's id is its row there)"
        else:
            problem = None
        if problem is not None:
            where = f"{os.path.basename(split_path)}:{row.line}"
            if args.strict:
                raise common.StrictError(f"{where}: malformed_record ({problem})")
            report.skip(where, "malformed_record", problem, kind="record")
            continue
        category_index, row_id = category_ids[row.category], row_ids[row]
        item_id = sample_id(row.video_id, row_id)
        meta = {"video_id": row.video_id, "row": row_id, "category": row.category,
                "category_index": category_index, "quality": row.quality, "start": row.start,
                "end": row.end, "labels": second_labels(category_index, row.start, row.end)}
        records.append(run.Record(item_id, run.MediaJob(
            row.video_id, meta, args.num_frames, args.image_size, AUDIO,
            frames_dir=args.frames, audio_dir=args.audio, videos_dir=args.videos,
            sample_id=item_id)))

    extra = {"categories": categories, "background_index": BACKGROUND,
             "source": "videos" if args.videos else "frames+audio"}
    return run.Plan(records, run.make_sample, AUDIO, extra)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Shard one AVE split. Returns the exit code (see common.run_main)."""
    return run.main(DATASET, build_parser(prog), plan, argv)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
