"""`infer`: batch inference over a split's shards or a list of videos, on Ray Data.

    read (shard URLs or video paths) -> decode on CPU tasks -> predict in an actor pool
        (`map_batches` with a callable class; one GPU per actor with `use_gpu`)
        -> one row per question (avqa) or clip (avel, avc, avr) -> Parquet / JSONL, local or s3://

On a cluster the decode tasks go to any node with CPUs and the actors to the GPU nodes; Ray
Data streams between them, so the archive is never held whole. A clip that cannot be used (an
unreadable or silent video, one shorter than the model's clips, a damaged sample) becomes a
row of the report file with its id and reason, and the rest are processed; `strict` stops at
the first one instead.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..config import ConfigError
from ..data import shards, storage
from ..data.media import ClipSpec, SkipSample, clip_sample
from ..data.reader import shard_samples
from .predictor import Predictor, media_error

FORMATS = ("parquet", "jsonl")


class StrictError(ConfigError):
    """`strict` and an item that could not be used: names its id and the reason."""


@dataclass
class InferConfig:
    """How `infer` runs (the Ray Data settings a cluster needs, and the task's options).

    Args:
        batch_size: clips per model call (`map_batches`' batch_size).
        concurrency: prediction actors (one model each; `ActorPoolStrategy(size=...)`).
        use_gpu: one GPU per actor (`num_gpus=1`); CPU actors otherwise.
        cpus_per_actor: CPUs each actor reserves.
        decode_cpus: CPUs each decode task reserves.
        top_k: avqa: answers kept per question.
        beam_size: avc: decoding beam (1: greedy).
        strict: fail at the first unusable item instead of reporting it.
    """

    batch_size: int = 8
    concurrency: int = 1
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    decode_cpus: float = 1.0
    top_k: int = 3
    beam_size: int = 3
    strict: bool = False

    def __post_init__(self):
        for name in ("batch_size", "concurrency", "top_k", "beam_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


# -- decoding: shard samples or video files -> rows of arrays as npy bytes ------------------------

def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _clip_row(item_id: str, source: str, decoded: dict | None = None, error: str = "",
              detail: str = "") -> dict:
    """A decoded clip as a row (frames and fbank as lossless .npy bytes), or an item that
    failed (`error`: its reason, `detail`: what exactly)."""
    if decoded is None:
        return {"id": item_id, "source": source, "frames": b"", "fbank": b"", "meta": "{}",
                "error": error, "detail": detail}
    return {"id": item_id, "source": source, "frames": _npy(decoded["frames"].numpy()),
            "fbank": _npy(decoded["fbank"].numpy()), "meta": json.dumps(decoded["meta"]),
            "error": "", "detail": ""}


def _failed(item_id: str, source: str, reason: str, detail: str, strict: bool) -> dict:
    if strict:
        raise StrictError(f"{item_id}: {reason} ({detail})")
    return _clip_row(item_id, source, error=reason, detail=detail)


class ShardSamples:
    """flat_map: one shard URL -> its samples, decoded by the reader's own code."""

    def __init__(self, num_frames: int, strict: bool):
        self.num_frames, self.strict = num_frames, strict

    def __call__(self, row: dict) -> Iterator[dict]:
        import tarfile

        url = row["url"]
        try:
            for sample in shard_samples(url):
                key = sample.get("__key__", "?")
                try:
                    decoded = shards.decode_sample(sample)
                    if decoded["frames"].shape[0] != self.num_frames:
                        raise ValueError(f"{decoded['frames'].shape[0]} frames, expected {self.num_frames}")
                except Exception as exc:  # noqa: BLE001 - any undecodable member
                    yield _failed(key, url, "undecodable_sample", f"{url}: {exc}", self.strict)
                    continue
                yield _clip_row(key, url, decoded)
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield _failed(url, url, "damaged_shard", f"{url}: {exc}; the samples after the damage are "
                                                     "not read: re-shard the split or validate it", self.strict)


class VideoClips:
    """map: one video path -> its clip, made by the sharders' code."""

    def __init__(self, clips: ClipSpec, min_seconds: float, strict: bool):
        self.clips, self.min_seconds, self.strict = clips, min_seconds, strict

    def __call__(self, row: dict) -> dict:
        path = row["video"]
        key = shards.sample_key(path.rsplit("/", 1)[-1].rsplit(".", 1)[0] or "clip")
        try:
            sample = clip_sample(key, {"video_id": key}, self.clips.num_frames, self.clips.image_size,
                                 self.clips.audio, video=path, min_seconds=self.min_seconds)
        except SkipSample as skip:
            return _failed(path, path, skip.reason, str(media_error(skip)), self.strict)
        return _clip_row(path, path, shards.decode_sample(sample))


# -- prediction: an actor per model ---------------------------------------------------------------

class PredictActor:
    """`map_batches` callable class: loads the model once per actor, predicts batches of clips.

    Output rows: avqa one per question, the others one per clip; items that failed upstream
    pass through as rows with `error` set (and empty prediction fields)."""

    def __init__(self, adapters: str, weights: str | None, options: dict, questions: list[str] | None):
        import torch

        torch.set_num_threads(max(1, int(options.get("cpus_per_actor", 1))))
        self.predictor = Predictor.load(adapters, weights=weights)
        self.options, self.questions = options, questions or []
        self.encoded = [self.predictor.encode_question(q) for q in self.questions] \
            if self.predictor.task == "avqa" else []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        good = [i for i, error in enumerate(batch["error"]) if not error]
        clips = [{"key": str(batch["id"][i]),
                  "frames": torch.from_numpy(np.load(io.BytesIO(batch["frames"][i]), allow_pickle=False)),
                  "fbank": torch.from_numpy(np.load(io.BytesIO(batch["fbank"][i]), allow_pickle=False)),
                  "meta": json.loads(batch["meta"][i])} for i in good]
        rows = self._predict(clips) if clips else []
        rows += [self._error_row(str(batch["id"][i]), str(batch["error"][i]), str(batch["detail"][i]))
                 for i, error in enumerate(batch["error"]) if error]
        return {name: [row[name] for row in rows] for name in self.columns()}

    def columns(self) -> list[str]:
        common = ["id", "video_id"]
        per_task = {"avqa": ["question_id", "question", "question_type", "answer", "answer_index",
                             "probability", "top_k", "target", "target_index"],
                    "avel": ["labels", "event", "segment_start", "segment_end", "target_labels"],
                    "avc": ["caption"], "avr": ["embedding"]}[self.predictor.task]
        return common + per_task + ["error", "detail"]

    def _error_row(self, item_id: str, error: str, detail: str) -> dict:
        row = dict.fromkeys(self.columns(), "")
        row |= {"id": item_id, "error": error, "detail": detail}
        for name in ("answer_index", "target_index", "segment_start", "segment_end"):
            row[name] = -1
        row["probability"] = float("nan")
        return row

    def _predict(self, clips: list[dict]) -> list[dict]:
        p, task = self.predictor, self.predictor.task
        if task == "avqa":
            return self._answers(clips)
        raw = p.batch(clips)
        base = [{"id": c["key"], "video_id": c["meta"].get("video_id", c["key"]), "error": "", "detail": ""}
                for c in clips]
        if task == "avel":
            out = []
            for b, clip, loc in zip(base, clips, p.localise_batch(raw)):
                segment = loc["segment"] or [-1, -1]
                target = clip["meta"].get("labels")
                out.append(b | {"labels": json.dumps(loc["labels"]), "event": loc["event"] or "",
                                "segment_start": segment[0], "segment_end": segment[1],
                                "target_labels": json.dumps([p.class_names[i] for i in target]) if target else ""})
            return out
        if task == "avc":
            return [b | {"caption": c} for b, c in zip(base, p.caption_batch(raw, self.options.get("beam_size", 3)))]
        return [b | {"embedding": json.dumps([round(float(x), 6) for x in e])}
                for b, e in zip(base, p.embed_videos(raw))]

    def _answers(self, clips: list[dict]) -> list[dict]:
        """One row per question: the shard's own questions, or the questions asked."""
        metas = []
        for clip in clips:
            if self.questions:
                questions = [{"question": q, "question_tokens": ids, "question_id": str(n)}
                             for n, (q, (ids, _)) in enumerate(zip(self.questions, self.encoded))]
            else:
                questions = clip["meta"].get("questions", [])
            metas.append({**clip["meta"], "questions": questions})
        raw = self.predictor.batch([{**c, "meta": m} for c, m in zip(clips, metas)])
        answers = self.predictor.vocab["answers"]
        rows = []
        for clip, meta, predicted in zip(clips, metas, self.predictor.answer_batch(raw, self.options.get("top_k", 3))):
            for n, (q, a) in enumerate(zip(meta["questions"], predicted)):
                target = q.get("answer_index", -1)
                rows.append({"id": f"{clip['key']}/{q.get('question_id', n)}",
                             "video_id": meta.get("video_id", clip["key"]), "question_id": str(q.get("question_id", n)),
                             "question": q.get("question", ""), "question_type": q.get("question_type", ""),
                             "answer": a["answer"], "answer_index": a["answer_index"], "probability": a["probability"],
                             "top_k": json.dumps(a["top_k"]),
                             "target": answers[target] if target >= 0 else (q.get("anser") or ""),
                             "target_index": target, "error": "", "detail": ""})
        return rows


# -- the pipeline ---------------------------------------------------------------------------------

def infer(adapters: str, out: str, *, shards_url: str | None = None, videos: list[str] | None = None,
          fmt: str = "parquet", report: str | None = None, weights: str | None = None,
          questions: list[str] | None = None, config: InferConfig | None = None) -> dict[str, Any]:
    """Predict every question (avqa) or clip of a split's shards or of a list of videos.

    Args:
        adapters: the adapter directory (readable from every node).
        out: the output folder (local or s3://): Ray Data's Parquet or JSONL files.
        shards_url: a split's shards (its index).
        videos: video files (instead of shards).
        fmt: "parquet" or "jsonl".
        report: where the report goes (default: `<out>.report.json`).
        weights: the backbone's weights (default: as in training).
        questions: avqa with videos: the questions asked about every video.
        config: the Ray Data settings.

    Returns:
        The report: rows written, items failed (id, reason, detail), seconds, rows/s, and for
        shards with answers the accuracy the rows give.

    Raises:
        ConfigError: bad adapters, inputs or output; `StrictError` for the first bad item
            with `config.strict`.
    """
    import ray

    config = config or InferConfig()
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if (shards_url is None) == (videos is None):
        raise ConfigError("give either --shards URL (a split's shards) or --videos FILE (a list of videos)")
    predictor = Predictor.load(adapters, weights=weights, device="cpu")  # checks it all before Ray runs
    if predictor.task == "avqa":
        for question in questions or []:
            predictor.encode_question(question)
        if videos is not None and not questions:
            raise ConfigError("avqa on videos: give --question \"...\" (asked about every video)")
    elif questions:
        predictor.require("avqa", "--question")
    if predictor.task == "avr" and not shards_url and not videos:
        raise ConfigError("nothing to embed")
    index = _check_shards(predictor, shards_url) if shards_url is not None else None
    if videos is not None and not videos:
        raise ConfigError("--videos: the list holds no video")
    if not ray.is_initialized():
        ray.init(address="local", log_to_driver=False)  # a fresh local Ray, never a stale one
    started = time.perf_counter()
    ds = _source(predictor, index, videos, config)
    options = {"top_k": config.top_k, "beam_size": config.beam_size, "cpus_per_actor": config.cpus_per_actor}
    predicted = ds.map_batches(
        PredictActor, fn_constructor_kwargs={"adapters": adapters, "weights": weights, "options": options,
                                             "questions": questions},
        batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        batch_format="numpy", num_gpus=1 if config.use_gpu else 0, num_cpus=config.cpus_per_actor)
    try:
        results = predicted.materialize()
    except Exception as err:  # noqa: BLE001 - Ray wraps what the tasks raised
        raise _unwrap(err) from None
    from ray.data.expressions import col

    good = results.filter(expr=col("error") == "").drop_columns(["error", "detail"])
    bad = results.filter(expr=col("error") != "").select_columns(["id", "error", "detail"]).take_all()
    written = good.count()
    if written:
        _write(good, out, fmt)
    seconds = time.perf_counter() - started
    summary = {"adapters": adapters, "task": predictor.task, "input": shards_url or f"{len(videos)} videos",
               "out": out, "format": fmt, "rows": written, "failed": len(bad), "seconds": round(seconds, 2),
               "rows_per_s": round(written / seconds, 2) if seconds else None,
               "items": [{"id": r["id"], "reason": r["error"], "detail": r["detail"]} for r in bad],
               "ray_data": {"batch_size": config.batch_size, "concurrency": config.concurrency,
                            "num_gpus_per_actor": 1 if config.use_gpu else 0,
                            "num_cpus_per_actor": config.cpus_per_actor}}
    if predictor.task == "avqa" and shards_url and written:
        summary["accuracy"] = avqa_accuracy(good.select_columns(
            ["answer_index", "target_index", "question_type"]).take_all())
    report = report or out.rstrip("/") + ".report.json"
    storage.atomic_write_bytes(report, json.dumps(summary, indent=1, ensure_ascii=False).encode("utf-8"))
    summary["report"] = report
    return summary


def _check_shards(predictor: Predictor, shards_url: str) -> shards.ShardIndex:
    """The split's index, refused unless its clips are made as the adapters' training clips."""
    try:
        index = shards.read_index(shards_url)
    except (shards.ShardIndexError, OSError) as err:
        raise ConfigError(f"--shards {shards_url}: {err}") from None
    spec = ClipSpec.from_index(index)
    if (spec.num_frames, spec.image_size, spec.audio) != (
            predictor.clips.num_frames, predictor.clips.image_size, predictor.clips.audio):
        raise ConfigError(f"--shards {shards_url}: clips made with {spec}, the adapters were trained on "
                          f"{predictor.clips}: shard the videos with the training split's settings")
    return index


def _source(predictor: Predictor, index: shards.ShardIndex | None, videos: list[str] | None,
            config: InferConfig):
    """The decoded clips as a Ray dataset (decoding in CPU tasks)."""
    import ray

    if index is not None:
        urls = index.shard_urls()
        return ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls)).flat_map(
            ShardSamples(index.num_frames, config.strict), num_cpus=config.decode_cpus)
    return ray.data.from_items([{"video": v} for v in videos], override_num_blocks=min(len(videos), 64)).map(
        VideoClips(predictor.clips, predictor.min_seconds, config.strict), num_cpus=config.decode_cpus)


def _write(ds, out: str, fmt: str) -> None:
    """Ray Data's writer into `out`; object stores through the project's own filesystem (the
    endpoint, credentials and retries every other read and write here uses)."""
    from ray.data import SaveMode

    write = ds.write_parquet if fmt == "parquet" else ds.write_json
    # A rerun replaces the previous output (appending would leave every row twice).
    if storage.is_local(out):
        write(storage.local_path(out), mode=SaveMode.OVERWRITE)
        return
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(out)
    write(path, filesystem=PyFileSystem(FSSpecHandler(fs)), mode=SaveMode.OVERWRITE)


def _unwrap(err: Exception) -> Exception:
    """What a Ray task raised (a StrictError, a ConfigError) rather than Ray's wrapper."""
    seen = err
    for _ in range(5):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(cause, ConfigError):
            return type(cause)(str(cause))
        if cause is None:
            break
        seen = cause
    text = str(err)
    for marker in ("StrictError: ", "ConfigError: ", "MediaError: "):
        if marker in text:
            return StrictError(text.split(marker, 1)[1].strip().splitlines()[0])
    return err


def avqa_accuracy(rows: list[dict]) -> dict[str, float]:
    """AVQA's metrics from infer rows, computed as the evaluation computes them
    (`avqa_counts`, `avqa_accuracies`): `avg`, `overall` and per type/group."""
    import torch

    from ..heads.avqa import avqa_accuracies, avqa_counts

    predicted = torch.tensor([int(r["answer_index"]) for r in rows])
    target = torch.tensor([int(r["target_index"]) for r in rows])
    return avqa_accuracies(avqa_counts(predicted, target, [r["question_type"] for r in rows]))
