"""A trained adapter directory made usable: the model, how its clips are made, its vocabulary.

    predictor = Predictor.load("runs/avqa-demo/best_adapters", weights="random")
    clip = predictor.clip(video="concert.mp4")
    predictor.answer([clip], ["Is the violin playing?"])

A video becomes a clip through `avpea_ray.data.media.clip_sample`, the code the sharders
use, then `shards.decode_sample`, the code the reader uses: the model sees a user's video
exactly as it saw a shard sample (JPEG frames, float16 fbank windows included).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data import shards, storage
from ..data.media import ClipSpec, SkipSample, clip_sample
from ..data.questions import question_ids
from ..data.reader import collate
from ..model.adapter_io import AdapterMismatchError, read_adapter_config
from ..tasks import load_model
from ..tasks.avqa import AVQATask

INPUTS_NAME = "inputs.json"  # written beside the adapters by training (train/checkpoint.py)
TASK_NAMES = {"avqa": "question answering (MUSIC-AVQA)", "avel": "event localisation (AVE)",
              "avr": "text-video retrieval", "avc": "captioning"}
# What a user can do about a video that cannot be used, by `SkipSample.reason`.
MEDIA_ADVICE = {
    "missing_video": "check the path",
    "unreadable_video": "check that it plays (ffprobe FILE), or re-encode it: "
                        "ffmpeg -i FILE -c:v libx264 -c:a aac out.mp4",
    "missing_audio": "the model hears as well as sees: give a video with a sound track, or its "
                     "frames with --frames DIR and the sound with --audio FILE",
    "unreadable_audio": "convert the audio: ffmpeg -i FILE -ac 1 -ar 16000 out.wav",
    "missing_frames": "give a folder of .jpg frames (one per second, sorted by name)",
    "unreadable_frame": "re-save the frame as JPEG or remove it",
    "too_short": "give a longer clip",
}


class MediaError(ConfigError):
    """A video (or frames + audio) that cannot be made into a clip; names the file and what
    to do. `reason` is `SkipSample`'s short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def media_error(skip: SkipSample) -> MediaError:
    """A `SkipSample` as a user-facing error with what to do."""
    advice = MEDIA_ADVICE.get(skip.reason)
    return MediaError(skip.reason, f"{skip.detail} ({skip.reason})" + (f": {advice}" if advice else ""))


@dataclass
class Predictor:
    """A model rebuilt from an adapter directory, on a device, in eval mode.

    Attributes:
        directory: the adapter directory.
        task: "avqa", "avel", "avr" or "avc".
        model: the AVPEAModel.
        clips: how its clips are made (T, frame size, fbank settings).
        device: where it runs.
        vocab: avqa's vocabularies (`vocab.json`).
        class_names: avel's class names, background last.
        tokenizer: avr/avc's caption tokenizer.
    """

    directory: str
    task: str
    model: Any
    clips: ClipSpec
    device: torch.device
    vocab: dict | None = None
    class_names: list[str] | None = None
    tokenizer: Any = None
    vocab_source: str = ""
    extra: dict = field(default_factory=dict)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str, weights: str | None = None, device: str | None = None,
             vocab: str | None = None, train_shards: str | None = None) -> "Predictor":
        """Rebuild the model of an adapter directory and what using it needs.

        Args:
            directory: a run's `best_adapters/` or a checkpoint's `best_adapters/`/`adapters/`.
            weights: the frozen backbone's weights ("timm", "random", a file); default: as
                in training.
            device: "cpu", "cuda", ...; default: the GPU when there is one.
            vocab: avqa: a `vocab.json` for adapters saved without one.
            train_shards: the train split's shards, for adapters saved without `inputs.json`.

        Raises:
            ConfigError: not an adapter directory, weights that do not fit, no vocabulary,
                no clip settings; each message says what to give instead.
        """
        directory = str(directory)
        directory = storage.local_path(directory) if storage.is_local(directory) else directory
        # An object-store directory is fetched into a temporary folder that lives only while
        # loading: everything a predictor uses is in memory once it is built.
        with _local_copy(directory) as local:
            try:
                saved = read_adapter_config(local)
            except FileNotFoundError:
                raise ConfigError(f"{directory}: not an adapter directory (no adapter_config.json); give a "
                                  "run's best_adapters/ or a checkpoint_*/best_adapters/ folder") from None
            except (AdapterMismatchError, json.JSONDecodeError) as err:
                raise ConfigError(f"{directory}: unreadable adapter_config.json ({err})") from None
            if saved.get("task") not in TASK_NAMES:
                # e.g. generative AVQA: its answers are decoded text, which predict does not do yet.
                raise ConfigError(f"{directory}: adapters for task {saved.get('task')!r}; predict and infer "
                                  f"serve {', '.join(TASK_NAMES)} (score generative AVQA adapters with "
                                  f"jobs/avqa_gen.py's test evaluation)")
            inputs = _read_inputs(local, train_shards)
            device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            # A random backbone is what torch's RNG drew right after training seeded it: draw it again.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(inputs.get("seed", 0)))
                try:
                    model = load_model(local, weights=weights)
                except AdapterMismatchError as err:
                    raise ConfigError(f"{err}; the adapters belong to another model: use the weights and "
                                      "adapter directory of the same run") from None
            predictor = cls(directory, saved["task"], model.to(device_).eval(),
                            ClipSpec.from_json(inputs["clips"]), device_, extra=saved.get("extra", {}))
            predictor._load_task_files(local, vocab, inputs)
        return predictor

    def _load_task_files(self, local: str, vocab: str | None, inputs: dict) -> None:
        folder = Path(local)
        if self.task == "avqa":
            beside = folder / "vocab.json"
            # `source` is where the vocabulary is, as the user knows it (not the fetched copy).
            if vocab:
                url, source = vocab, vocab
            elif beside.is_file():
                url, source = str(beside), storage.join(self.directory, "vocab.json")
            elif inputs.get("train"):
                url = source = storage.join(inputs["train"], "vocab.json")
            else:
                url = source = None
            try:
                self.vocab = json.loads(storage.read_bytes(url)) if url else None
            except (FileNotFoundError, OSError, json.JSONDecodeError):
                self.vocab = None
            if not self.vocab:
                raise ConfigError(f"{self.directory}: no vocab.json (adapters saved before it was kept with "
                                  "them): give --vocab PATH, the vocab.json beside the train shards")
            self.vocab_source = source
            expected = self.model.head_spec["args"].get("vocab_size")
            if expected is not None and expected != len(self.vocab["question_words"]):
                raise ConfigError(f"--vocab {source}: {len(self.vocab['question_words'])} question words, the "
                                  f"adapters were trained with {expected}: give the vocab.json of their train split")
        elif self.task == "avel":
            path = folder / "classes.json"
            self.class_names = json.loads(path.read_text()) if path.is_file() else None
            if not self.class_names:
                n = self.model.head_spec["args"].get("num_classes", 28)
                self.class_names = [f"class_{i}" for i in range(n)] + ["background"]
        elif self.task in ("avr", "avc"):
            from ..heads.text import load_tokenizer

            path = folder / "tokenizer"
            if not path.is_dir():
                raise ConfigError(f"{self.directory}: no tokenizer/ folder beside the adapters: give the "
                                  "best_adapters/ folder training wrote (it saves the tokenizer there)")
            self.tokenizer = load_tokenizer(str(path))

    def require(self, task: str, what: str) -> None:
        """Refuse an operation (`what`, e.g. "--question") that the adapters' task cannot do."""
        if self.task != task:
            raise ConfigError(f"{what} needs adapters trained for {TASK_NAMES[task]} ({task}); "
                              f"{self.directory} holds adapters for {TASK_NAMES.get(self.task, self.task)} "
                              f"({self.task})")

    # -- clips -----------------------------------------------------------------------------

    def clip(self, video: str | None = None, frames: str | None = None, audio: str | None = None,
             key: str | None = None) -> dict:
        """A video file (or a frames folder and an audio file) as a decoded clip, exactly as
        the reader decodes a shard sample of it.

        Raises:
            MediaError: unreadable, silent or too short media, naming the file and what to do.
        """
        source = video or frames
        key = shards.sample_key(key or Path(source or "clip").stem or "clip")
        try:
            sample = clip_sample(key, {"video_id": key}, self.clips.num_frames, self.clips.image_size,
                                 self.clips.audio, video=video, frames=frames, audio_file=audio,
                                 min_seconds=self.min_seconds)
        except SkipSample as skip:
            raise media_error(skip) from None
        return shards.decode_sample(sample)

    @property
    def min_seconds(self) -> float:
        """The shortest audio accepted: T seconds (the datasets' clips give a frame and an audio
        window per second), less a tenth of a second that audio codecs may trim."""
        return max(self.clips.num_frames - 0.1, 0.0)

    def batch(self, clips: list[dict]) -> dict:
        """Decoded clips stacked as the reader stacks them."""
        return collate(clips)

    def autocast(self):
        """bf16 autocast on a GPU, as training evaluated (`optim.precision: auto`)."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    # -- AVQA ------------------------------------------------------------------------------

    def encode_question(self, question: str) -> tuple[list[int], list[str]]:
        """A question's word ids and the words the vocabulary never saw.

        Raises:
            ConfigError: none of its words is known (nothing to answer from).
        """
        ids, unknown = question_ids(question, self.vocab["question_words"])
        if not ids or len(unknown) == len(ids):
            examples = ", ".join(self.vocab["question_words"][2:12])
            raise ConfigError(f"question {question!r}: none of its words is in the vocabulary "
                              f"({self.vocab_source}, {len(self.vocab['question_words'])} words, e.g. "
                              f"{examples}): ask with the words of the training questions")
        return ids, unknown

    @torch.no_grad()
    def answer_batch(self, raw: dict, top_k: int = 5) -> list[list[dict]]:
        """Answers for the questions in a batch's metas (`meta["questions"]`, each with
        `question_tokens`), through the task's own `make_batch`.

        Returns:
            Per clip, per question: {"answer", "answer_index", "probability", "top_k"}.
        """
        task = AVQATask(None, self.vocab)
        metas = [{**meta, "questions": [{"answer_index": -1, "question_type": "", **q} for q in meta["questions"]]}
                 for meta in raw["meta"]]
        batch = task.make_batch({**raw, "meta": metas}, self.device, training=False)
        with self.autocast():
            outputs = self.model(batch.frames, batch.fbank, **batch.head_inputs)
        logits = outputs["answer_logits"].float()
        probs = logits.softmax(-1).cpu()
        best = logits.argmax(-1).cpu()  # the argmax the evaluation scores
        answers, k = self.vocab["answers"], min(top_k, logits.shape[-1])
        rows = []
        for i in range(len(best)):
            top = probs[i].topk(k)
            rows.append({"answer": answers[int(best[i])], "answer_index": int(best[i]),
                         "probability": float(probs[i, best[i]]),
                         "top_k": [{"answer": answers[int(j)], "probability": float(p)}
                                   for p, j in zip(top.values, top.indices)]})
        owners = batch.head_inputs["question_video_index"].tolist()
        per_clip: list[list[dict]] = [[] for _ in metas]
        for owner, row in zip(owners, rows):
            per_clip[owner].append(row)
        return per_clip

    def answer(self, clip: dict, questions: list[str], top_k: int = 5) -> list[dict]:
        """Answer questions about one decoded clip.

        Returns:
            Per question: {"question", "answer", "probability", "top_k", "unknown_words"}.
        """
        self.require("avqa", "--question")
        encoded = [self.encode_question(q) for q in questions]
        meta = {**clip["meta"], "questions": [{"question": q, "question_tokens": ids}
                                              for q, (ids, _) in zip(questions, encoded)]}
        rows = self.answer_batch(self.batch([{**clip, "meta": meta}]), top_k)[0]
        return [{"question": q, **row, "unknown_words": unknown}
                for q, (_, unknown), row in zip(questions, encoded, rows)]

    # -- AVE -------------------------------------------------------------------------------

    @torch.no_grad()
    def localise_batch(self, raw: dict) -> list[dict]:
        """Per clip: each second's label (CMBS's rule), the event and its segment."""
        from ..heads.avel import avel_predict

        frames, fbank = raw["frames"].to(self.device), raw["fbank"].to(self.device)
        with self.autocast():
            outputs = self.model(frames, fbank)
        labels = avel_predict({k: v.float() for k, v in outputs.items() if torch.is_tensor(v)}).cpu()
        return [localisation(row.tolist(), self.class_names) for row in labels]

    def localise(self, clip: dict) -> dict:
        """Event localisation of one decoded clip (see `localisation`)."""
        self.require("avel", "event localisation")
        return self.localise_batch(self.batch([clip]))[0]

    # -- captioning and retrieval -------------------------------------------------------------

    @torch.no_grad()
    def caption_batch(self, raw: dict, beam_size: int = 3, length_penalty: float = 1.0) -> list[str]:
        """One caption per clip (greedy when `beam_size` is 1), as the evaluation decodes."""
        frames, fbank = raw["frames"].to(self.device), raw["fbank"].to(self.device)
        with self.autocast():
            visual, audio = self.model.forward_features(frames, fbank)
            decoded = self.model.head.generate(visual, audio, beam_size=beam_size,
                                               length_penalty=length_penalty)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in decoded]

    @torch.no_grad()
    def embed_videos(self, raw: dict) -> torch.Tensor:
        """(B, E) unit vectors of the clips (retrieval)."""
        frames, fbank = raw["frames"].to(self.device), raw["fbank"].to(self.device)
        with self.autocast():
            visual, audio = self.model.forward_features(frames, fbank)
            return self.model.head.encode_video(visual, audio).float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str], max_tokens: int = 32) -> torch.Tensor:
        """(C, E) unit vectors of texts, tokenised as training tokenised captions."""
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens,
                                 return_tensors="pt")
        with self.autocast():
            return self.model.head.encode_text(encoded["input_ids"].to(self.device),
                                               encoded["attention_mask"].to(self.device)).float().cpu()


def localisation(labels: list[int], class_names: list[str]) -> dict:
    """Per-second labels -> the event and its segment.

    The event is the clip's predicted category (CMBS's rule gives every event second the same
    one); the segment is its longest run of consecutive seconds, `end` exclusive.

    Returns:
        {"labels": [name per second], "event": name or None, "segment": [start, end] or None}.
    """
    background = len(class_names) - 1
    names = [class_names[i] for i in labels]
    events = [i for i in labels if i != background]
    if not events:
        return {"labels": names, "event": None, "segment": None}
    best, start = (0, 0), None
    for t, label in enumerate(labels + [background]):
        if label != background and start is None:
            start = t
        elif label == background and start is not None:
            if t - start > best[1] - best[0]:
                best = (start, t)
            start = None
    return {"labels": names, "event": class_names[events[0]], "segment": list(best)}


@contextlib.contextmanager
def _local_copy(directory: str) -> Iterator[str]:
    """The adapter directory itself when local; an object-store one (`s3://.../best_adapters`,
    what actors on a cluster read) fetched into a temporary folder, removed on exit."""
    if storage.is_local(directory):
        yield storage.local_path(directory)
        return
    fs, path = storage.filesystem(directory)
    with tempfile.TemporaryDirectory(prefix="avpea-adapters-") as local:
        try:
            fs.get(path.rstrip("/") + "/", local, recursive=True)
        except (FileNotFoundError, OSError) as err:
            raise ConfigError(f"{directory}: cannot fetch the adapter directory ({err})") from None
        yield local


def _read_inputs(directory: str, train_shards: str | None) -> dict:
    """`inputs.json` of an adapter directory; for directories saved before it existed, the
    same facts from the run's saved config (a checkpoint's `config.json`, a run's
    `avpea_run.json`) or from `train_shards`."""
    folder = Path(directory)
    if (folder / INPUTS_NAME).is_file() and not train_shards:
        return json.loads((folder / INPUTS_NAME).read_text())
    train, seed = train_shards, 0
    for candidate in (folder.parent / "config.json", folder.parent / "avpea_run.json"):
        if candidate.is_file():
            doc = json.loads(candidate.read_text())
            data = doc.get("config", doc).get("data", {})
            train, seed = train or data.get("train"), data.get("seed", 0)
            break
    if not train:
        raise ConfigError(f"{directory}: no {INPUTS_NAME} (adapters saved before it was kept with them) "
                          "and no run config beside them: give --train-shards URL, the train split "
                          "the adapters were trained on (its index says how clips are made)")
    try:
        index = shards.read_index(train)
    except (shards.ShardIndexError, OSError) as err:
        raise ConfigError(f"--train-shards {train}: {err}") from None
    return {"clips": ClipSpec.from_index(index).to_json(), "seed": seed, "train": train}
