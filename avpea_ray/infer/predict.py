"""`predict`: a trained adapter directory applied to videos as users have them.

    from avpea_ray.infer import predict
    result = predict("runs/avqa-demo/best_adapters", videos=["concert.mp4"],
                     questions=["Is the violin playing?"])

One call per task: AVQA answers questions, AVE labels every second and finds the event's
segment, captioning writes a caption, retrieval ranks the videos for each text (and the texts
for each video). The result is JSON-able; `format_table` renders it for a terminal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .predictor import Predictor


@dataclass
class Media:
    """One input: a video file, or a folder of frames plus an audio file."""

    video: str | None = None
    frames: str | None = None
    audio: str | None = None

    @property
    def name(self) -> str:
        return self.video or self.frames or "?"


def predict(adapters: str | Predictor, media: list[Media], *, questions: list[str] | None = None,
            texts: list[str] | None = None, top_k: int = 5, beam_size: int = 3,
            length_penalty: float = 1.0, weights: str | None = None, device: str | None = None,
            vocab: str | None = None, train_shards: str | None = None) -> dict[str, Any]:
    """Apply trained adapters to videos.

    Args:
        adapters: an adapter directory (or an already loaded `Predictor`).
        media: the videos.
        questions: avqa: asked about every video.
        texts: avr: the texts to rank the videos for (and to rank for each video).
        top_k: avqa: answers listed per question.
        beam_size, length_penalty: avc: decoding (1: greedy).
        weights, device, vocab, train_shards: see `Predictor.load`.

    Returns:
        {"task", "adapters", "results": [one entry per video]} (+ "texts" for avr).

    Raises:
        ConfigError: bad adapters, media, questions or a flag the task does not take; the
            message names the file or flag and what to do.
    """
    predictor = adapters if isinstance(adapters, Predictor) else Predictor.load(
        adapters, weights=weights, device=device, vocab=vocab, train_shards=train_shards)
    if not media:
        raise ConfigError("no input: give --video FILE, or --frames DIR with --audio FILE")
    if questions and predictor.task != "avqa":
        predictor.require("avqa", "--question")
    if texts and predictor.task != "avr":
        predictor.require("avr", "--texts")
    if predictor.task == "avqa" and not questions:
        raise ConfigError(f"{predictor.directory} answers questions: give --question \"...\" (one or more)")
    if predictor.task == "avr" and not texts:
        raise ConfigError(f"{predictor.directory} ranks videos for texts: give --texts FILE (one text per line)")
    if questions:  # refuse a question the vocabulary cannot read before decoding any video
        for question in questions:
            predictor.encode_question(question)
    clips = [(m, predictor.clip(video=m.video, frames=m.frames, audio=m.audio)) for m in media]
    out: dict[str, Any] = {"task": predictor.task, "adapters": predictor.directory,
                           "device": str(predictor.device)}
    if predictor.task == "avqa":
        out["results"] = [{"input": m.name, "answers": predictor.answer(clip, questions, top_k)}
                          for m, clip in clips]
    elif predictor.task == "avel":
        out["results"] = [{"input": m.name, **predictor.localise(clip)} for m, clip in clips]
    elif predictor.task == "avc":
        captions = predictor.caption_batch(predictor.batch([c for _, c in clips]), beam_size, length_penalty)
        out["results"] = [{"input": m.name, "caption": caption} for (m, _), caption in zip(clips, captions)]
        out["decoding"] = "greedy" if beam_size == 1 else f"beam {beam_size}"
    else:
        out |= retrieval(predictor, [m.name for m, _ in clips], [c for _, c in clips], texts)
    return out


def retrieval(predictor: Predictor, names: list[str], clips: list[dict], texts: list[str]) -> dict:
    """Rank the videos for each text and the texts for each video, by cosine similarity."""
    videos = predictor.embed_videos(predictor.batch(clips))
    similarity = predictor.embed_texts(texts) @ videos.t()  # (texts, videos)
    by_text = [{"text": text, "ranking": [{"input": names[j], "score": float(row[j])}
                                          for j in row.argsort(descending=True).tolist()]}
               for text, row in zip(texts, similarity)]
    by_video = [{"input": name, "ranking": [{"text": texts[i], "score": float(column[i])}
                                            for i in column.argsort(descending=True).tolist()]}
                for name, column in zip(names, similarity.t())]
    return {"texts": by_text, "results": by_video}


def format_table(result: dict[str, Any]) -> str:
    """A prediction result as readable lines."""
    task, lines = result["task"], []
    if task == "avqa":
        for entry in result["results"]:
            lines.append(f"{entry['input']}")
            width = max(len(a["question"]) for a in entry["answers"])
            lines.append(f"  {'question':<{width}}  {'answer':<12} {'prob':>6}  top answers")
            for a in entry["answers"]:
                top = ", ".join(f"{t['answer']} {t['probability']:.2f}" for t in a["top_k"])
                lines.append(f"  {a['question']:<{width}}  {a['answer']:<12} {a['probability']:>6.3f}  {top}")
                if a["unknown_words"]:
                    lines.append(f"  {'':<{width}}  (not in the vocabulary, read as <unk>: "
                                 f"{', '.join(a['unknown_words'])})")
    elif task == "avel":
        for entry in result["results"]:
            segment = entry["segment"]
            lines.append(f"{entry['input']}: " + (f"{entry['event']}, seconds {segment[0]}-{segment[1]}"
                                                  if segment else "no event"))
            lines.append("  second  label")
            lines += [f"  {t:>6}  {label}" for t, label in enumerate(entry["labels"])]
    elif task == "avc":
        lines.append(f"captions ({result['decoding']}):")
        lines += [f"  {entry['input']}: {entry['caption']}" for entry in result["results"]]
    else:
        for entry in result["texts"]:
            lines.append(f"{entry['text']!r}:")
            lines += [f"  {rank:>3}. {r['input']}  {r['score']:.3f}"
                      for rank, r in enumerate(entry["ranking"], 1)]
    return "\n".join(lines)
