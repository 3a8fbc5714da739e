"""Plumbing shared by the dataset sharders (sharding.musicavqa, sharding.ave, sharding.valor).

- command line: the output flags every sharder has, argparse types, exit codes
  (2 = bad flag or missing annotation file, 1 = --strict tripped or nothing usable);
- media: re-exported from `avpea_ray.data.media` (frame folders, audio files and videos ->
  T resized frames and a 16 kHz mono waveform; problems raise `SkipSample(reason, detail)`);
- bookkeeping: `Report` (what was skipped and why -> report.json and the summary);
- the write loop: progress bar, optional worker processes, --strict.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from avpea_ray.data import shards, storage
# The media decoding lives in the library (one implementation for sharding and prediction);
# the sharders keep using these names from here.
from avpea_ray.data.media import (FRAME_SUFFIXES, SAMPLE_RATE, SOUNDFILE_SUFFIXES, SkipSample,  # noqa: F401
                                  evenly_spaced, load_audio, load_frames, load_video, load_wav,
                                  natural_key, resize_frame, to_mono_16k)

SUMMARY_LIST_LIMIT = 20  # skipped items printed in the summary; report.json has them all


class UsageError(Exception):
    """A bad flag or a missing/unreadable annotation file: exit code 2, no traceback."""


class RunError(Exception):
    """The run could not produce output (nothing usable, storage failure): exit code 1."""


class StrictError(RunError):
    """--strict and a skipped item: exit code 1, the message names the id and reason."""


# -- command line ----------------------------------------------------------------------------

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """argparse type: a size in bytes; "268435456", "256MiB", "256M", "1.5GB" (powers of 2)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes such as 268435456 or 256MiB, got {text!r}")
    number, unit = float(m.group(1)), m.group(2).lower()
    value = int(number * 1024 ** " kmgt".index(unit or " "))
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return value


def add_output_args(parser: argparse.ArgumentParser, default_frames: int = 10) -> None:
    """The flags every sharder shares (output, shape of a sample, strictness, workers)."""
    parser.add_argument("--out", required=True,
                        help="output directory or URL prefix (s3://bucket/prefix, any fsspec URL)")
    parser.add_argument("--split", required=True, choices=("train", "val", "test"))
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first unusable video/record instead of skipping it")
    parser.add_argument("--num-frames", type=positive_int, default=default_frames,
                        help="T: frames (and audio windows) per video (default %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=224,
                        help="frames are resized to SIZE x SIZE, bicubic (default %(default)s)")
    parser.add_argument("--max-shard-bytes", type=byte_size, default=256 * 2**20,
                        help="upper bound of a shard's size, e.g. 256MiB (default 256MiB)")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="worker processes decoding media (0 = in this process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def require_file(path: str, flag: str, what: str) -> str:
    """Raise `UsageError` unless `path` is a readable file.

    Args:
        path: the file.
        flag: the flag it came from ("--annotations").
        what: what it should be ("the MUSIC-AVQA train annotations").

    Returns:
        `path`.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: {path} not found (expected {what})")
    return path


def require_dir(path: str, flag: str, what: str) -> str:
    """Raise `UsageError` unless `path` is a directory."""
    if not os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is not a directory (expected {what})")
    return path


def read_json(path: str, flag: str, what: str) -> Any:
    """The content of a JSON file given by a flag; `UsageError` if missing or not JSON.

    Args:
        path: the file.
        flag: the flag it came from ("--ids").
        what: what it should hold ("a JSON list of video ids"), for the messages.

    Returns:
        The parsed JSON (the caller checks its shape).
    """
    require_file(path, flag, what)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: some copies carry a BOM
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{flag}: {path} is not valid JSON ({exc}; expected {what})") from None


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a sharder's `main`, turning user errors into a message and an exit code.

    Returns:
        The exit code: main's own, 2 for `UsageError`, 1 for `RunError` (including
        `StrictError`) and storage errors, 130 on Ctrl-C.
    """
    try:
        return main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StrictError as exc:
        print(f"error: --strict: {exc}", file=sys.stderr)
        return 1
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # storage trouble (no such bucket, no permission, disk full)
        print(f"error: {exc}; the previous output (if any) is unchanged", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the previous output (if any) is unchanged", file=sys.stderr)
        return 130


# -- bookkeeping -----------------------------------------------------------------------------

@dataclass
class Report:
    """What a sharding run kept and skipped; becomes report.json and the summary.

    Args:
        dataset, split: for the header.
    """

    dataset: str
    split: str
    skipped: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def skip(self, item_id: str, reason: str, detail: str, kind: str = "video") -> None:
        """Record one skipped video/record/question."""
        self.skipped.append({"id": str(item_id), "kind": kind, "reason": reason,
                             "detail": detail})

    def count(self, name: str, n: int = 1) -> None:
        """Add to a named counter (e.g. "unknown_answers")."""
        self.counts[name] += n

    def skipped_by_reason(self) -> dict[str, int]:
        """{reason: how many}, most frequent first."""
        return dict(Counter(s["reason"] for s in self.skipped).most_common())

    def to_json(self, **totals: Any) -> dict:
        """report.json's content; `totals` are the run's figures (samples, shards, ...)."""
        return {"dataset": self.dataset, "split": self.split, **totals,
                "counts": dict(self.counts), "skipped_by_reason": self.skipped_by_reason(),
                "skipped": self.skipped}


# -- the write loop --------------------------------------------------------------------------

def _init_worker() -> None:
    # One thread per worker process: N processes x N threads would oversubscribe the CPUs.
    import torch

    torch.set_num_threads(1)


def _prepare_one(prepare: Callable[[Any], dict], payload: Any):
    """Run `prepare`, returning a SkipSample as a value so it crosses process boundaries."""
    try:
        return prepare(payload)
    except SkipSample as skip:
        return skip


def write_samples(items: Sequence[tuple[str, Any]], prepare: Callable[[Any], dict],
                  writer: shards.ShardWriter, report: Report, *, strict: bool,
                  workers: int = 0, progress: bool = True, desc: str = "sharding") -> int:
    """Prepare every item (decode media, encode a sample) and write it, in input order.

    Args:
        items: `(item_id, payload)` pairs; `prepare(payload)` returns an `encode_sample()`
            dict or raises `SkipSample`. With workers > 0 `prepare` and payloads must pickle.
        prepare: the per-video work.
        writer: where samples go.
        report: skipped videos are recorded here.
        strict: raise `StrictError` on the first skip instead.
        workers: processes for `prepare` (0 = in this process).
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        Samples written.
    """
    import torch
    from tqdm import tqdm

    # fbank works on tiny tensors: intra-op threads only add OpenMP spin-waiting, which on a
    # busy 2-core machine made a sample take 0.85 s instead of 15 ms. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = [item_id for item_id, _ in items]
    payloads = [payload for _, payload in items]
    call = functools.partial(_prepare_one, prepare)
    pool = None
    if workers > 0:
        # spawn, not fork: torch's thread pools do not survive a fork reliably.
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
        results: Iterable = pool.imap(call, payloads, chunksize=1)
    else:
        results = map(call, payloads)
    written = 0
    try:
        with tqdm(total=len(items), desc=desc, unit="video", disable=not progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for item_id, result in zip(ids, results):
                if isinstance(result, SkipSample):
                    if strict:
                        raise StrictError(f"{item_id}: {result.reason} ({result.detail})")
                    report.skip(item_id, result.reason, result.detail)
                else:
                    writer.write(result)
                    written += 1
                bar.update(1)
                bar.set_postfix(shards=len(writer.shards), skipped=len(report.skipped),
                                refresh=False)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.terminate()
            pool.join()
    return written


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def finish(writer: shards.ShardWriter, report: Report, started: float,
           **totals: Any) -> shards.ShardIndex:
    """Close the writer (index last), write report.json, print the summary.

    Args:
        writer: the open writer.
        report: the run's report.
        started: `time.time()` at the start of the run.
        **totals: extra figures for the summary and report (e.g. questions=...).

    Returns:
        The published index. Raises `RunError` if nothing usable was written (the previous
        output, if any, is then left as it was).
    """
    try:
        index = writer.close()
    except ValueError as exc:
        print(summary_text(report, writer.out_url, {"samples": 0, **totals}), file=sys.stderr)
        raise RunError(str(exc)) from None
    seconds = time.time() - started
    figures = {"samples": index.total_samples, **totals, "shards": len(index.shards),
               "bytes": sum(s.bytes for s in index.shards), "seconds": round(seconds, 2)}
    storage.atomic_write_bytes(
        storage.join(writer.out_url, "report.json"),
        json.dumps(report.to_json(**figures), indent=1, ensure_ascii=False).encode("utf-8"))
    print(summary_text(report, writer.out_url, figures))
    return index


def summary_text(report: Report, out_url: str, figures: dict) -> str:
    """The end-of-run summary: totals, skipped by reason, the first skipped items."""
    lines = [f"{report.dataset} {report.split} -> {out_url}"]
    lines.append("  " + "  ".join(
        f"{k} {_human_bytes(v) if k == 'bytes' else v}" for k, v in figures.items()))
    for name, n in sorted(report.counts.items()):
        lines.append(f"  {name}: {n}")
    by_reason = report.skipped_by_reason()
    if by_reason:
        lines.append(f"  skipped {len(report.skipped)}: "
                     + ", ".join(f"{reason} {n}" for reason, n in by_reason.items()))
        for entry in report.skipped[:SUMMARY_LIST_LIMIT]:
            lines.append(f"    {entry['kind']} {entry['id']}: {entry['reason']} "
                         f"({entry['detail']})")
        if len(report.skipped) > SUMMARY_LIST_LIMIT:
            lines.append(f"    ... and {len(report.skipped) - SUMMARY_LIST_LIMIT} more "
                         "(see report.json)")
    else:
        lines.append("  skipped 0")
    return "\n".join(lines)


def open_writer(args: argparse.Namespace, dataset: str, audio: dict,
                extra: dict | None = None) -> shards.ShardWriter:
    """A `ShardWriter` from the common flags; a bad --out becomes a `UsageError`."""
    try:
        return shards.ShardWriter(
            args.out, split=args.split, dataset=dataset, num_frames=args.num_frames,
            image_size=args.image_size, audio=audio, max_shard_bytes=args.max_shard_bytes,
            extra=extra)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--out {args.out}: cannot write there ({exc})") from None
