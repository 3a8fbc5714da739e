"""Write tiny datasets in the layouts users download/prepare (real JPEG, WAV and MP4 files).

MUSIC-AVQA: `annotations/avqa-{train,val,test}.json`, `frames/<id>/0001.jpg...`,
`audio/<id>.wav`. AVE: `Annotations.txt`, `splits/{train,val,test}Set.txt`, the same frame
and audio folders, or `videos/<id>.mp4`.

Every frame is a solid colour that encodes its position (`frame_color`), so a test can tell
which source frame ended up in a sample even after resizing and two JPEG round trips.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from PIL import Image

RATE = 16_000
FRAME_SIZE = (40, 30)  # width, height: not square, so the resize is exercised


def frame_color(index: int) -> tuple[int, int, int]:
    """The solid colour of source frame `index` (channels 20 levels apart per step)."""
    return ((20 * index) % 240, 235 - (20 * index) % 240, 90)


def write_frames(folder: str, count: int, pattern: str = "{:04d}.jpg") -> None:
    """`count` solid-colour JPEGs named by `pattern` (1-based numbers, like ffmpeg)."""
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.new("RGB", FRAME_SIZE, frame_color(i)).save(
            os.path.join(folder, pattern.format(i + 1)), quality=95)


def tone(seconds: float, freq: float = 440.0, rate: int = RATE,
         silent_until: float = 0.0) -> np.ndarray:
    """A float32 sine, silent before `silent_until` seconds."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    wave[t < silent_until] = 0.0
    return wave.astype(np.float32)


def write_wav(path: str, wave: np.ndarray, rate: int = RATE) -> np.ndarray:
    """Write a 16-bit WAV; returns the samples as a reader gets them back (float32)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, wave, rate, subtype="PCM_16")
    return sf.read(path, dtype="float32")[0]


def avqa_record(video_id: str, question_id: int, answer: str = "one",
                content: str = "How many instruments are sounding in the video?",
                templ: list[str] | None = None, qtype: tuple[str, str] = ("Audio", "Counting"),
                deleted: int = 0) -> dict:
    """One record as in avqa-*.json (list fields stored as JSON strings, `anser`)."""
    return {"video_id": video_id, "question_id": question_id,
            "type": json.dumps(list(qtype)), "question_content": content,
            "templ_values": json.dumps(templ or []), "question_deleted": deleted,
            "anser": answer}


@dataclass
class AvqaLayout:
    annotations: str
    frames: str
    audio: str

    def args(self, out: str, split: str = "train", *extra: str) -> list[str]:
        """CLI arguments for sharding.musicavqa."""
        return ["--annotations", self.annotations, "--frames", self.frames, "--audio",
                self.audio, "--out", out, "--split", split, "--image-size", "32",
                "--no-progress", *extra]


def make_avqa(root: str, records: dict[str, list[dict]], media: dict[str, int] | None = None,
              seconds: float = 2.0, frames_per_video: int = 12) -> AvqaLayout:
    """A MUSIC-AVQA-shaped dataset.

    Args:
        root: where to write it.
        records: {"train": [...], "val": [...], "test": [...]} annotation records.
        media: video_id -> frame count to write (default: every video in the records,
            `frames_per_video` frames); each gets a `seconds`-long WAV.

    Returns:
        The folders, for the CLI.
    """
    layout = AvqaLayout(*(os.path.join(root, d) for d in ("annotations", "frames", "audio")))
    os.makedirs(layout.annotations, exist_ok=True)
    for split, recs in records.items():
        with open(os.path.join(layout.annotations, f"avqa-{split}.json"), "w") as f:
            json.dump(recs, f, ensure_ascii=False)
    if media is None:
        ids = dict.fromkeys(r["video_id"] for recs in records.values() for r in recs)
        media = {vid: frames_per_video for vid in ids}
    for i, (vid, count) in enumerate(media.items()):
        write_frames(os.path.join(layout.frames, vid), count)
        write_wav(os.path.join(layout.audio, f"{vid}.wav"), tone(seconds, 300 + 50 * i))
    return layout


@dataclass
class AveLayout:
    annotations: str
    splits: str
    frames: str
    audio: str
    videos: str

    def args(self, out: str, split: str = "train", *extra: str, mp4: bool = False) -> list[str]:
        """CLI arguments for sharding.ave."""
        media = ["--videos", self.videos] if mp4 else ["--frames", self.frames,
                                                       "--audio", self.audio]
        return ["--annotations", self.annotations, "--splits", self.splits, *media,
                "--out", out, "--split", split, "--image-size", "32", "--no-progress", *extra]


AVE_HEADER = "Category&VideoID&Quality&StartTime&EndTime"


def make_ave(root: str, rows: list[tuple], splits: dict[str, list[int]], header: bool = True,
             frames: bool = True, mp4: bool = False) -> AveLayout:
    """An AVE-shaped dataset.

    Args:
        rows: (category, video_id, quality, start, end) tuples for Annotations.txt.
        splits: {"train": [row indices], ...} -> trainSet.txt etc. (same format).
        header: write the header row.
        frames: write frame folders (30 frames, 3 fps) and 10 s WAVs.
        mp4: write 10 s MP4s instead/as well (`write_mp4`).
    """
    layout = AveLayout(os.path.join(root, "Annotations.txt"), os.path.join(root, "splits"),
                       os.path.join(root, "frames"), os.path.join(root, "audio"),
                       os.path.join(root, "videos"))
    os.makedirs(layout.splits, exist_ok=True)

    def write_rows(path: str, selected: list[tuple]) -> None:
        lines = ([AVE_HEADER] if header else []) + ["&".join(map(str, r)) for r in selected]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    write_rows(layout.annotations, rows)
    names = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
    for split, indices in splits.items():
        write_rows(os.path.join(layout.splits, names[split]), [rows[i] for i in indices])
    for i, row in enumerate(rows):
        vid = row[1]
        if frames:
            write_frames(os.path.join(layout.frames, vid), 30)
            write_wav(os.path.join(layout.audio, f"{vid}.wav"), tone(10.0, 300 + 50 * i))
        if mp4:
            write_mp4(os.path.join(layout.videos, f"{vid}.mp4"))
    return layout


def write_mp4(path: str, seconds: int = 10, fps: int = 5, audio_rate: int = 44_100,
              silent_until: float = 5.0) -> None:
    """An H.264 + AAC MP4 whose second s shows `frame_color(s)`; stereo 44.1 kHz audio that
    is silent for the first `silent_until` seconds, then a 440 Hz tone (so a test can check
    both the resampling to 16 kHz mono and where in time the audio lands)."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=audio_rate, layout="stereo")
        for i in range(seconds * fps):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:] = frame_color(i // fps)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        wave = tone(seconds, 440.0, audio_rate, silent_until)
        stereo = np.stack([wave, wave])  # planar (channels, samples)
        chunk = 1024
        for start in range(0, stereo.shape[1], chunk):
            part = np.ascontiguousarray(stereo[:, start:start + chunk])
            frame = av.AudioFrame.from_ndarray(part, format="fltp", layout="stereo")
            frame.sample_rate = audio_rate
            frame.pts = start
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)


def tree_digest(root: str) -> str:
    """A digest of every file's path and bytes below `root` (reproducibility checks)."""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()
