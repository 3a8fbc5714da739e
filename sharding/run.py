"""The skeleton every dataset sharder runs (sharding.musicavqa, sharding.ave, sharding.valor).

A dataset module supplies only what its release layout makes specific: its flags, how its
annotations become `Record`s (one per sample, or a reason to skip it) and what goes into the
index beside the samples. This module does the rest, the same way for every dataset:

    flags -> records -> duplicate keys / --strict -> decode media and write shards
          -> side files -> index -> report.json and summary -> exit code

Media decoding is shared too: a `MediaJob` names a video's frame folder and audio file (or
its MP4) and `make_sample` turns it into an `encode_sample()` dict.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from avpea_ray.data import media, shards
from avpea_ray.data.audio import AudioConfig
from sharding import common


# -- what a dataset module supplies ----------------------------------------------------------

@dataclass
class Record:
    """One sample-to-be from the annotations.

    Args:
        item_id: the sample's id, its sample key being `shards.sample_key(item_id)`: the
            video id where a dataset has one sample per video (AVE: one per annotation row,
            `sharding.ave.sample_id`).
        job: what `Plan.make_sample` turns into the sample (must pickle for --workers).
        skip: why the record cannot be used (the job is then ignored).
        counts: report counters to add if the record is kept (e.g. dropped empty captions).
    """

    item_id: str
    job: Any = None
    skip: common.SkipSample | None = None
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Extras:
    """What a dataset adds once its samples are written.

    Args:
        totals: figures for the summary and report.json (e.g. questions=...).
        extra: entries for the index's `extra`.
        files: side files (name -> bytes) written beside the shards, before the index, and
            only when at least one sample was written.
    """

    totals: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Plan:
    """One split's work, as a dataset module describes it.

    Args:
        records: the split's records in output order.
        make_sample: job -> `encode_sample()` dict, or raise `common.SkipSample` (runs in
            worker processes with --workers: a module-level function).
        audio: the fbank settings (recorded in the index).
        extra: the index's dataset-specific `extra` entries known before writing.
        finish: the jobs actually written -> `Extras` (vocabularies, totals).
    """

    records: Iterable[Record]
    make_sample: Callable[[Any], dict]
    audio: AudioConfig
    extra: dict[str, Any] | None = None
    finish: Callable[[list[Any]], Extras] | None = None


# -- command line ----------------------------------------------------------------------------

def build_parser(prog: str, doc: str | None,
                 add_dataset_args: Callable[[argparse.ArgumentParser], None]
                 ) -> argparse.ArgumentParser:
    """A sharder's parser: its own flags first, then `common.add_output_args`'s."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    common.add_output_args(parser)
    return parser


def main(dataset: str, parser: argparse.ArgumentParser,
         plan: Callable[[argparse.Namespace, common.Report], Plan],
         argv: Sequence[str] | None = None) -> int:
    """Parse the flags, plan the split, shard it. Returns 0 (errors raise; see common.run_main).

    Args:
        dataset: the index's `dataset` and the report's name ("musicavqa").
        parser: from `build_parser`.
        plan: reads the annotations (records skipped while reading go to the report) and
            returns the split's `Plan`; raises `common.UsageError` for bad inputs.
        argv: the command line (None: sys.argv).
    """
    args = parser.parse_args(argv)
    started = time.time()
    report = common.Report(dataset, args.split)
    shard_split(args, dataset, plan(args, report), report, started)
    return 0


# -- the run ---------------------------------------------------------------------------------

def skip_or_fail(report: common.Report, item_id: str, skip: common.SkipSample, strict: bool,
                 kind: str = "video") -> None:
    """Record a skipped item, or raise `StrictError` with --strict."""
    if strict:
        raise common.StrictError(f"{item_id}: {skip.reason} ({skip.detail})")
    report.skip(item_id, skip.reason, skip.detail, kind=kind)


def collect(records: Iterable[Record], report: common.Report, strict: bool
            ) -> list[tuple[str, Any]]:
    """The usable records as `(item_id, job)`, each sample key once.

    A record's own `skip`, then a key already taken (the id listed twice, or two ids that
    sanitise to the same key), skip it; `counts` are added for the records kept.
    """
    items, seen_keys = [], {}
    for record in records:
        key = shards.sample_key(record.item_id)
        skip = record.skip
        if skip is None and key in seen_keys:
            skip = common.SkipSample("duplicate_key", "listed twice"
                                     if seen_keys[key] == record.item_id else
                                     f"key {key} already used by {seen_keys[key]}")
        if skip is not None:
            skip_or_fail(report, record.item_id, skip, strict)
            continue
        seen_keys[key] = record.item_id
        for name, n in record.counts.items():
            if n:
                report.count(name, n)
        items.append((record.item_id, record.job))
    return items


def shard_split(args: argparse.Namespace, dataset: str, plan: Plan, report: common.Report,
                started: float) -> shards.ShardIndex:
    """Write one split: samples, then side files, then the index; report.json and summary.

    Args:
        args: the common flags (`common.add_output_args`).
        dataset: the index's `dataset`.
        plan: the dataset's records and hooks.
        report: where skips go (already holding those found while reading annotations).
        started: `time.time()` at the start of the run.

    Returns:
        The published index.
    """
    items = collect(plan.records, report, args.strict)
    skipped_before = len(report.skipped)
    with common.open_writer(args, dataset, asdict(plan.audio), plan.extra) as writer:
        common.write_samples(items, plan.make_sample, writer, report, strict=args.strict,
                             workers=args.workers, progress=not args.no_progress,
                             desc=f"{dataset} {args.split}")
        failed = {s["id"] for s in report.skipped[skipped_before:]}
        written = [job for item_id, job in items if item_id not in failed]
        extras = plan.finish(written) if plan.finish else Extras()
        writer.extra.update(extras.extra)
        if writer.total_samples:
            for name, data in extras.files.items():  # before the index, which records sha256
                writer.add_file(name, data)
        return common.finish(writer, report, started, **extras.totals)


# -- media -----------------------------------------------------------------------------------

@dataclass
class MediaJob:
    """Everything a worker needs to build one sample from a video's media (picklable).

    The media come from `frames_dir/<video_id>/*.jpg` plus `audio_dir/<video_id><suffix>` (the
    first of `audio_suffixes` that exists), or from `videos_dir/<video_id>.mp4` when set.

    Args:
        video_id: whose media to decode; also the sample's id unless `sample_id` is set.
        meta: the sample's json.
        num_frames: T (frames and audio windows).
        image_size: frame side.
        audio: fbank settings.
        sample_id: the sample's id when a video gives several samples (AVE rows).
    """

    video_id: str
    meta: dict
    num_frames: int
    image_size: int
    audio: AudioConfig
    frames_dir: str | None = None
    audio_dir: str | None = None
    audio_suffixes: tuple[str, ...] = (".wav",)
    videos_dir: str | None = None
    sample_id: str | None = None


def find_audio(audio_dir: str, video_id: str, suffixes: Sequence[str]) -> str:
    """`<audio_dir>/<video_id><suffix>` for the first suffix that exists (with one suffix, that
    path whether or not it exists: loading it reports `missing_audio`)."""
    if len(suffixes) == 1:
        return os.path.join(audio_dir, video_id + suffixes[0])
    for suffix in suffixes:
        path = os.path.join(audio_dir, video_id + suffix)
        if os.path.isfile(path):
            return path
    raise common.SkipSample("missing_audio", f"no {video_id}{{{','.join(suffixes)}}} "
                                             f"in {audio_dir}")


def make_sample(job: MediaJob) -> dict:
    """Decode a video's frames and audio and encode the job's sample (`media.clip_sample`,
    which prediction uses too).

    Raises:
        common.SkipSample: missing or unreadable media.
    """
    key = shards.sample_key(job.sample_id or job.video_id)
    if job.videos_dir is not None:
        return media.clip_sample(key, job.meta, job.num_frames, job.image_size, job.audio,
                                 video=os.path.join(job.videos_dir, f"{job.video_id}.mp4"))
    return media.clip_sample(key, job.meta, job.num_frames, job.image_size, job.audio,
                             frames=os.path.join(job.frames_dir, job.video_id),
                             audio_file=find_audio(job.audio_dir, job.video_id, job.audio_suffixes))
