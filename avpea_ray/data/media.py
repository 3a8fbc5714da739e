"""Media -> model inputs: a video file, or a folder of frames plus an audio file, as T resized
frames and a 16 kHz mono waveform, then T fbank windows (`clip_sample`).

The one implementation of how a clip is read: the sharders (`sharding/`) build their samples
with it, and prediction (`avpea_ray.infer`) builds a user's video the same way, so that a model
sees a video exactly as it saw its training data. Every problem with the media is raised as
`SkipSample(reason, detail)`, the detail naming the file.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from . import shards
from .audio import AudioConfig, waveform_to_windows

SAMPLE_RATE = 16_000
FRAME_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class ClipSpec:
    """How a dataset's clips were made: what a model trained on it must be given.

    Args:
        dataset: the shards' dataset ("musicavqa", "ave", "valor").
        num_frames: T, frames and audio windows per clip.
        image_size: frame side in pixels.
        audio: the fbank settings.
    """

    dataset: str
    num_frames: int
    image_size: int
    audio: AudioConfig

    @classmethod
    def from_index(cls, index: "shards.ShardIndex") -> "ClipSpec":
        """The settings a shard index records."""
        return cls(index.dataset, index.num_frames, index.image_size, AudioConfig(**index.audio))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "ClipSpec":
        return cls(doc["dataset"], int(doc["num_frames"]), int(doc["image_size"]),
                   AudioConfig(**doc["audio"]))

    def seconds(self) -> float:
        """The shortest clip whose audio windows do not overlap: T windows end to end."""
        return self.num_frames * self.audio.window_seconds


class SkipSample(Exception):
    """A video (or record) that cannot be used.

    Args:
        reason: a short code for counting ("missing_frames", "unreadable_audio", ...).
        detail: what exactly was wrong, naming the file.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def natural_key(name: str) -> list:
    """Sort key that orders '2.jpg' before '10.jpg' and handles zero-padded names too."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def evenly_spaced(count: int, num: int) -> np.ndarray:
    """`num` indices spread evenly over `count` items (linspace, first and last included)."""
    return np.linspace(0, count - 1, num).round().astype(np.int64)


def resize_frame(img: Image.Image, image_size: int) -> np.ndarray:
    """An RGB (image_size, image_size, 3) uint8 array, bicubic (aspect ratio not kept)."""
    img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_frames(folder: str, num_frames: int, image_size: int) -> list[np.ndarray]:
    """T frames, evenly spaced, from a folder of per-second JPEGs (sorted by name).

    Args:
        folder: `<frames>/<video_id>`.
        num_frames: T (frames repeat when the folder has fewer).
        image_size: output side.

    Returns:
        T (image_size, image_size, 3) uint8 arrays. Raises `SkipSample` if the folder is
        missing or empty or a chosen frame cannot be decoded.
    """
    if not os.path.isdir(folder):
        raise SkipSample("missing_frames", f"no frame folder {folder}")
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES)),
                   key=natural_key)
    if not names:
        raise SkipSample("missing_frames", f"no .jpg files in {folder}")
    frames = []
    for i in evenly_spaced(len(names), num_frames):
        path = os.path.join(folder, names[i])
        try:
            with Image.open(path) as img:
                frames.append(resize_frame(img, image_size))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise SkipSample("unreadable_frame", f"{path}: {exc}") from None
    return frames


def to_mono_16k(wave: np.ndarray, rate: int, source: str) -> np.ndarray:
    """Downmix to mono and resample to 16 kHz.

    Args:
        wave: (samples,) or (samples, channels) float array.
        rate: its sample rate.
        source: file name for messages.

    Returns:
        1-D float32 array at 16 kHz.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if wave.size == 0:
        raise SkipSample("unreadable_audio", f"{source}: no audio samples")
    if rate != SAMPLE_RATE:
        import torch
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), int(rate),
                           SAMPLE_RATE).numpy()
    return wave


def load_wav(path: str) -> np.ndarray:
    """A WAV (or any soundfile format) as 16 kHz mono float32; other rates are resampled.

    Raises:
        SkipSample: the file is missing, unreadable or empty.
    """
    import soundfile as sf

    if not os.path.isfile(path):
        raise SkipSample("missing_audio", f"no audio file {path}")
    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=False)
    except Exception as exc:  # noqa: BLE001 - libsndfile errors vary
        raise SkipSample("unreadable_audio", f"{path}: {exc}") from None
    return to_mono_16k(wave, rate, path)


SOUNDFILE_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")  # what libsndfile >= 1.1 decodes


def load_audio(path: str) -> np.ndarray:
    """An audio file as 16 kHz mono float32, whatever its format.

    WAV, FLAC, MP3 and OGG go through libsndfile (`load_wav`); anything else (M4A/AAC, ...)
    through PyAV, like the audio of `load_video`.

    Raises:
        SkipSample: the file is missing (missing_audio), undecodable or has no audio
            stream (unreadable_audio), or holds no samples.
    """
    if path.lower().endswith(SOUNDFILE_SUFFIXES):
        return load_wav(path)
    import av

    if not os.path.isfile(path):
        raise SkipSample("missing_audio", f"no audio file {path}")
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise SkipSample("unreadable_audio", f"{path}: no audio stream")
            return _decode_audio(container, path)
    except SkipSample:
        raise
    except Exception as exc:  # noqa: BLE001 - FFmpeg errors come in many types
        raise SkipSample("unreadable_audio", f"{path}: {exc}") from None


def load_video(path: str, num_frames: int, image_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode an MP4 (any container PyAV reads): T frames evenly spaced in time + audio.

    Frame t is the first frame at or after the centre of the t-th of T equal segments of
    the video (one frame per second for AVE's 10 s clips and T=10).

    Args:
        path: the video file.
        num_frames: T.
        image_size: output side.

    Returns:
        (T frames as (S, S, 3) uint8 arrays, 1-D float32 waveform at 16 kHz).
        Raises `SkipSample` for a missing/undecodable file or one without video or audio.
    """
    import av

    if not os.path.isfile(path):
        raise SkipSample("missing_video", f"no video file {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise SkipSample("unreadable_video", f"{path}: no video stream")
            if not container.streams.audio:
                raise SkipSample("missing_audio", f"{path}: no audio stream")
            frames = _decode_frames(container, num_frames, image_size, path)
        with av.open(path) as container:
            wave = _decode_audio(container, path)
    except SkipSample:
        raise
    except Exception as exc:  # noqa: BLE001 - FFmpeg errors come in many types
        raise SkipSample("unreadable_video", f"{path}: {exc}") from None
    return frames, wave


def _frame_time(frame, position: int) -> float:
    if frame.pts is None or frame.time_base is None:
        return float(position)  # no timestamps: fall back to frame positions
    return float(frame.pts * frame.time_base)


def _decode_frames(container, num_frames: int, image_size: int, path: str) -> list[np.ndarray]:
    """T frames at the centres of T equal time segments, decoding in one streaming pass.

    Only the chosen frames are kept (a 10 s clip has ~250 full-size frames); when the
    container does not state its duration, resized copies of all frames are kept instead.
    """
    stream = container.streams.video[0]
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # av.time_base: microseconds
    start = float(stream.start_time * stream.time_base) if (
        stream.start_time is not None and stream.time_base is not None) else 0.0
    if duration:
        targets = start + (np.arange(num_frames) + 0.5) * duration / num_frames
        chosen: list[np.ndarray] = []
        previous = None  # the latest decoded frame
        for position, frame in enumerate(container.decode(stream)):
            previous = frame
            t = _frame_time(frame, position)
            if t >= targets[len(chosen)] - 1e-6:
                image = resize_frame(frame.to_image(), image_size)
                while len(chosen) < num_frames and t >= targets[len(chosen)] - 1e-6:
                    chosen.append(image)
                if len(chosen) == num_frames:
                    break
        if previous is None:
            raise SkipSample("unreadable_video", f"{path}: no decodable video frames")
        if len(chosen) < num_frames:  # frames end before the stated duration: repeat the last
            image = resize_frame(previous.to_image(), image_size)
            chosen.extend([image] * (num_frames - len(chosen)))
        return chosen
    decoded = [(_frame_time(f, i), resize_frame(f.to_image(), image_size))
               for i, f in enumerate(container.decode(stream))]
    if not decoded:
        raise SkipSample("unreadable_video", f"{path}: no decodable video frames")
    times = np.array([t for t, _ in decoded])
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
    span = times[-1] - times[0] + step
    targets = times[0] + (np.arange(num_frames) + 0.5) * span / num_frames
    picks = np.minimum(np.searchsorted(times, targets - 1e-6), len(decoded) - 1)
    return [decoded[int(i)][1] for i in picks]


def _decode_audio(container, path: str) -> np.ndarray:
    import av

    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):  # flush
        chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise SkipSample("missing_audio", f"{path}: the audio stream has no samples")
    return np.concatenate(chunks).astype(np.float32)


def clip_sample(key: str, meta: dict, num_frames: int, image_size: int, audio: AudioConfig, *,
                video: str | None = None, frames: str | None = None,
                audio_file: str | None = None, min_seconds: float = 0.0) -> dict:
    """Decode a clip's media and encode it as a shard sample (`shards.encode_sample`).

    Either `video` (a file with a video and an audio stream) or `frames` (a folder of JPEGs)
    plus `audio_file`.

    Args:
        key: the sample key (`shards.sample_key`).
        meta: the sample's json.
        num_frames: T, frames and audio windows.
        image_size: frame side.
        audio: the fbank settings.
        min_seconds: refuse audio shorter than this (`too_short`); the sharders take any length.

    Returns:
        The sample's members, exactly as a sharder writes them.

    Raises:
        SkipSample: missing or unreadable media, naming the file.
    """
    if video is not None:
        images, wave = load_video(video, num_frames, image_size)
    elif frames is not None and audio_file is not None:
        images = load_frames(frames, num_frames, image_size)
        wave = load_audio(audio_file)
    else:
        raise ValueError("clip_sample needs a video file, or a frames folder and an audio file")
    seconds = len(wave) / SAMPLE_RATE
    if seconds < min_seconds:
        raise SkipSample("too_short", f"{video or audio_file}: {seconds:.2f} s long, shorter than the "
                                      f"{num_frames} s of the model's clips ({num_frames} frames and "
                                      "audio windows, one per second)")
    fbank = waveform_to_windows(wave, num_frames, audio)
    return shards.encode_sample(key, images, fbank, meta)
