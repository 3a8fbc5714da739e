"""A small synthetic audio-visual QA dataset in MUSIC-AVQA's release layout.

Every video is a static scene of 1-3 "instruments" (big flat colour blocks) standing at the
left, middle and/or right, and a soundtrack in which 1-3 instruments play pure tones (one
pitch per instrument, each in its own mel band) over whole-second ranges. A sounding
instrument may be off screen and a visible one may be silent, so questions about sounding
*and* seen things need both modalities. Questions follow MUSIC-AVQA's release format
(github.com/GeWu-Lab/MUSIC-AVQA) and cover all nine of its question types.

Layout written under `--out DIR` (what users download, before sharding):

    avqa-train.json, avqa-val.json, avqa-test.json   QA records, as in the release
    frames/<video_id>/000001.jpg ...                 1 fps frames, one folder per video
    audio/<video_id>.wav                             16 kHz mono PCM
    synth_facts.json                                 the generator's ground truth per video

    python -m sharding.synth --out demo_data/release --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

SAMPLE_RATE = 16_000
POSITIONS = ("left", "middle", "right")
NUMBER_WORDS = ("zero", "one", "two", "three")
# Sound levels (peak amplitude); ~8 dB apart so "louder" is obvious in a log-mel image.
LEVELS = (0.08, 0.2, 0.5)
COMBOS = ((0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0))
WINDOWS = 10  # frames and audio windows per clip the sharder takes (its --num-frames default)


@dataclass(frozen=True)
class Instrument:
    """An instrument's look and sound.

    Args:
        name: MUSIC-AVQA answer word.
        rgb: flat colour of its block in the frames.
        hz: the pure tone it plays; the six tones sit in six different 16-bin mel bands of a
            128-bin kaldi fbank (one ViT patch column each).
    """

    name: str
    rgb: tuple[int, int, int]
    hz: float


INSTRUMENTS = (
    Instrument("piano", (230, 30, 30), 400.0),
    Instrument("violin", (30, 200, 40), 770.0),
    Instrument("cello", (40, 60, 230), 1260.0),
    Instrument("flute", (240, 220, 30), 1920.0),
    Instrument("trumpet", (220, 40, 220), 2800.0),
    Instrument("drum", (30, 220, 220), 4000.0),
)
BY_NAME = {inst.name: inst for inst in INSTRUMENTS}


@dataclass
class Sound:
    """One instrument playing: a tone from `start` to `end` seconds at peak `level`."""

    instrument: str
    start: int
    end: int
    level: float


@dataclass
class Scene:
    """The generator's ground truth for one video.

    Args:
        video_id: e.g. "syn00042".
        layout: position ("left"/"middle"/"right") -> instrument name, for visible ones.
        sounds: the sounding instruments, sorted by onset (onsets are distinct).
    """

    video_id: str
    layout: dict[str, str]
    sounds: list[Sound] = field(default_factory=list)

    @property
    def visible(self) -> set[str]:
        return set(self.layout.values())

    @property
    def sounding(self) -> set[str]:
        return {s.instrument for s in self.sounds}

    def position_of(self, name: str) -> str | None:
        return next((pos for pos, inst in self.layout.items() if inst == name), None)

    def level_of(self, name: str) -> float:
        return next(s.level for s in self.sounds if s.instrument == name)


def onset_grid(seconds: int, windows: int = WINDOWS, window_seconds: float = 1.95) -> list[int]:
    """Whole seconds at which a sound may start: one inside each audio window but the last.

    The sharder cuts `windows` windows of `window_seconds`, evenly spaced
    (`avpea_ray.data.audio.window_starts`); a sound starting at ceil(window start) is heard
    in that window, and on long clips (windows further apart than their length) in no
    earlier one. For 10 s clips this is 0..8.
    """
    step = max(seconds - window_seconds, 0) / (windows - 1)
    return sorted({math.ceil(i * step - 1e-9) for i in range(windows - 1)})


def sample_scene(video_id: str, rng: np.random.Generator, seconds: int) -> Scene:
    """Draw one video's ground truth.

    1-3 visible instruments at distinct positions; 1-3 sounding instruments, 0-3 of them on
    screen and at most one off screen, so the overlap between what is seen and what is
    heard varies from video to video.

    Args:
        video_id: the id to give the scene.
        rng: the video's own generator.
        seconds: clip length; onsets come from `onset_grid`, sounds last >= 2 s.

    Returns:
        The scene.
    """
    names = [inst.name for inst in INSTRUMENTS]
    # (sounding on screen, sounding off screen), uniform over the six combinations with 1-3
    # sounding instruments and at most one off screen: balances the audio, audio-visual
    # counting and existential answers.
    n_on, n_off = COMBOS[int(rng.integers(len(COMBOS)))]
    n_visible = int(rng.integers(max(n_on, 1), 4))
    visible = [str(v) for v in rng.choice(names, size=n_visible, replace=False)]
    positions = [str(p) for p in rng.choice(POSITIONS, size=n_visible, replace=False)]
    layout = dict(zip(positions, visible))
    hidden = [n for n in names if n not in visible]
    sounding = ([str(v) for v in rng.choice(visible, size=n_on, replace=False)]
                + [str(h) for h in rng.choice(hidden, size=n_off, replace=False)])
    sounding = [sounding[i] for i in rng.permutation(len(sounding))]

    # Distinct onsets on the audio-window grid, so "first"/"after" questions have one answer.
    onsets = sorted(rng.choice(onset_grid(seconds), size=len(sounding), replace=False))
    levels = rng.permutation(LEVELS)[: len(sounding)]
    sounds = []
    for name, onset, level in zip(sounding, onsets, levels):
        end = int(rng.integers(onset + 2, seconds + 1))  # at least 2 s long
        sounds.append(Sound(name, int(onset), end, float(level)))
    return Scene(video_id, layout, sounds)


# --- questions --------------------------------------------------------------------------
# Each template: (type list, text with placeholders, builder). A builder returns
# (templ_values, answer) or None when the template does not apply to the scene.

def _audio_counting(scene, rng):
    return [], NUMBER_WORDS[len(scene.sounds)]


def _audio_comparative(scene, rng):
    if len(scene.sounds) < 2:
        return None
    a, b = (str(x) for x in rng.choice(sorted(scene.sounding), size=2, replace=False))
    return [a, b], "yes" if scene.level_of(a) > scene.level_of(b) else "no"


def _visual_counting(scene, rng):
    return [], NUMBER_WORDS[len(scene.layout)]


def _visual_location(scene, rng):
    name = str(rng.choice(sorted(scene.visible)))
    return [name], scene.position_of(name)


def _visual_location_what(scene, rng):
    pos = str(rng.choice(sorted(scene.layout)))
    return [pos], scene.layout[pos]


def _av_existential(scene, rng):
    # Needs both: the sounds present (audio) and whether each one is on screen (vision).
    return [], "yes" if scene.sounding <= scene.visible else "no"


def _av_counting(scene, rng):
    return [], NUMBER_WORDS[len(scene.sounding & scene.visible)]


def _av_location(scene, rng):
    order = "first" if rng.random() < 0.5 else "last"
    target = scene.sounds[0 if order == "first" else -1].instrument
    pos = scene.position_of(target)
    return None if pos is None else ([order], pos)


def _on_screen_sounding_positions(scene):
    return sorted(p for p, inst in scene.layout.items() if inst in scene.sounding)


def _av_comparative(scene, rng):
    positions = _on_screen_sounding_positions(scene)
    if len(positions) < 2:
        return None
    p, q = (str(x) for x in rng.choice(positions, size=2, replace=False))
    louder = scene.level_of(scene.layout[p]) > scene.level_of(scene.layout[q])
    return [p, q], "yes" if louder else "no"


def _av_temporal(scene, rng):
    # "Where is the instrument that starts playing right after <Object>?": audio says who
    # comes next, vision says where it stands.
    candidates = [(a.instrument, b.instrument) for a, b in zip(scene.sounds, scene.sounds[1:])
                  if scene.position_of(b.instrument) is not None]
    if not candidates:
        return None
    before, after = candidates[int(rng.integers(len(candidates)))]
    return [before], scene.position_of(after)


TEMPLATES = (
    (("Audio", "Counting"), "How many instruments are sounding in the video?",
     _audio_counting),
    (("Audio", "Comparative"), "Is the <Object> louder than the <Object>?",
     _audio_comparative),
    (("Visual", "Counting"), "How many instruments are in the video?", _visual_counting),
    (("Visual", "Location"), "Where is the <Object> in the video?", _visual_location),
    (("Visual", "Location"), "What is the instrument on the <LR>?", _visual_location_what),
    (("Audio-Visual", "Existential"), "Is this sound from the instrument in the video?",
     _av_existential),
    (("Audio-Visual", "Counting"), "How many instruments in the video are sounding?",
     _av_counting),
    (("Audio-Visual", "Location"), "Where is the <FL> sounding instrument?", _av_location),
    (("Audio-Visual", "Comparative"),
     "Is the instrument on the <LR> louder than the instrument on the <LR>?", _av_comparative),
    (("Audio-Visual", "Temporal"),
     "Where is the instrument that starts playing after the <Object>?", _av_temporal),
)


def fill_question(content: str, templ_values: list[str]) -> str:
    """Replace the `<...>` placeholders in order, as MUSIC-AVQA's loaders do."""
    words, values = content.split(" "), iter(templ_values)
    out = []
    for word in words:
        if word.startswith("<"):
            close = word.index(">")
            word = next(values) + word[close + 1:]
        out.append(word)
    return " ".join(out)


def make_questions(scene: Scene, rng: np.random.Generator, per_video: int) -> list[dict]:
    """Pick up to `per_video` applicable templates (at most one per question type).

    Returns:
        Records without `question_id`: video_id, type, question_content, templ_values,
        question_deleted, anser.
    """
    records, used_types = [], set()
    for t in rng.permutation(len(TEMPLATES)):
        qtype, content, build = TEMPLATES[t]
        if qtype in used_types:
            continue
        built = build(scene, rng)
        if built is None:
            continue
        values, answer = built
        used_types.add(qtype)
        records.append({
            "video_id": scene.video_id,
            "type": json.dumps(list(qtype)),
            "question_content": content,
            "templ_values": json.dumps(values),
            "question_deleted": 0,
            "anser": answer,
        })
        if len(records) == per_video:
            break
    return records


# --- media ------------------------------------------------------------------------------

def render_frame(scene: Scene, width: int, height: int) -> np.ndarray:
    """One HxWx3 uint8 frame: grey background, a flat colour block per visible instrument.

    Each block fills the central 80% of its third of the width and the middle 70% of the
    height, so at 32-64 px every position still covers whole ViT patches' worth of pixels.
    The scene is static: every frame of a video shows the same layout.
    """
    frame = np.full((height, width, 3), 96, dtype=np.uint8)
    third = width / 3
    y0, y1 = int(height * 0.15), int(height * 0.85)
    for pos, name in scene.layout.items():
        col = POSITIONS.index(pos)
        x0, x1 = int(third * (col + 0.1)), int(third * (col + 0.9))
        frame[y0:y1, x0:x1] = BY_NAME[name].rgb
    return frame


def render_audio(scene: Scene, seconds: int) -> np.ndarray:
    """The soundtrack: each sound a pure tone with 10 ms ramps (no clicks), as int16."""
    n = seconds * SAMPLE_RATE
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    wav = np.zeros(n, dtype=np.float64)
    ramp = int(0.01 * SAMPLE_RATE)
    for s in scene.sounds:
        a, b = s.start * SAMPLE_RATE, s.end * SAMPLE_RATE
        env = np.ones(b - a)
        env[:ramp] = np.linspace(0, 1, ramp)
        env[-ramp:] = np.linspace(1, 0, ramp)
        wav[a:b] += s.level * env * np.sin(2 * np.pi * BY_NAME[s.instrument].hz * t[a:b])
    return np.round(wav * 32767).astype(np.int16)


def write_media(job: tuple) -> None:
    """Write one video's frames and wav (a process-pool task; deterministic per video)."""
    from PIL import Image
    import soundfile as sf

    scene, out, seconds, width, height, texture, seed = job
    base = render_frame(scene, width, height)
    noise = None
    if texture > 0:
        # Pixel noise (std `texture` grey levels) gives JPEGs the size and decode cost of
        # natural images. One wide noise field per video, a window of it per frame: drawing
        # fresh Gaussian noise for every 640x360 frame would cost more than encoding it.
        rng = np.random.default_rng([seed, int(scene.video_id[3:]), 1])
        noise = rng.normal(0.0, texture, size=(height, width + 8 * seconds, 3)).astype(np.int16)
        base = base.astype(np.int16)
    frame_dir = os.path.join(out, "frames", scene.video_id)
    os.makedirs(frame_dir, exist_ok=True)
    for t in range(seconds):
        img = base if noise is None else np.clip(
            base + noise[:, 8 * t:8 * t + width], 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(frame_dir, f"{t + 1:06d}.jpg"), quality=90)
    sf.write(os.path.join(out, "audio", f"{scene.video_id}.wav"),
             render_audio(scene, seconds), SAMPLE_RATE, subtype="PCM_16")


# --- the whole dataset ------------------------------------------------------------------

def generate(num_videos: dict[str, int], *, seed: int = 0, seconds: int = 10,
             questions_per_video: int = 5) -> tuple[dict[str, list[Scene]], dict[str, list[dict]]]:
    """Draw scenes and QA records for each split (no media; cheap).

    Args:
        num_videos: split -> number of videos, e.g. {"train": 240, "val": 60, "test": 60}.
        seed: everything is a function of it.
        seconds: clip length in seconds (>= 4).
        questions_per_video: at most this many questions per video (one per type).

    Returns:
        (scenes per split, records per split); question ids are unique over all splits and
        video ids are "syn" + 5 digits, unique over all splits.
    """
    if seconds < 4:
        raise ValueError("--seconds must be at least 4")
    scenes: dict[str, list[Scene]] = {}
    records: dict[str, list[dict]] = {}
    vid, qid = 0, 0
    for split, n in num_videos.items():
        scenes[split], records[split] = [], []
        for _ in range(n):
            rng = np.random.default_rng([seed, vid, 0])
            scene = sample_scene(f"syn{vid:05d}", rng, seconds)
            for rec in make_questions(scene, rng, questions_per_video):
                records[split].append({"video_id": rec["video_id"], "question_id": qid,
                                       **{k: v for k, v in rec.items() if k != "video_id"}})
                qid += 1
            scenes[split].append(scene)
            vid += 1
    return scenes, records


def parse_frame_size(text: str) -> tuple[int, int]:
    """"64" -> (64, 64); "640x360" -> (640, 360) (width x height)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"frame size must be N or WxH, got {text!r}")


def write_dataset(out: str, num_videos: dict[str, int], *, seed: int = 0, seconds: int = 10,
                  frame_size: tuple[int, int] = (64, 64), texture: float = 0.0,
                  workers: int | None = None) -> dict[str, list[dict]]:
    """Generate and write the release layout under `out` (a local directory).

    Args:
        out: output directory (created).
        num_videos: split -> number of videos.
        seed: RNG seed; the output is a function of the arguments.
        seconds: clip length (frames at 1 fps, so also the number of frames).
        frame_size: (width, height) of the frames.
        texture: pixel noise level for realistic JPEGs (0 = flat colours).
        workers: processes for the media (default: CPU count).

    Returns:
        The QA records per split.
    """
    scenes, records = generate(num_videos, seed=seed, seconds=seconds)
    os.makedirs(out, exist_ok=True)
    for split, recs in records.items():
        with open(os.path.join(out, f"avqa-{split}.json"), "w") as f:
            json.dump(recs, f)
    write_scenes(out, scenes, seed=seed, seconds=seconds, frame_size=frame_size, texture=texture,
                 workers=workers)
    return records


def write_scenes(out: str, scenes: dict[str, list[Scene]], *, seed: int, seconds: int,
                 frame_size: tuple[int, int], texture: float, workers: int | None) -> None:
    """Write what every synthetic dataset shares: `frames/<id>/*.jpg`, `audio/<id>.wav` and the
    ground truth `synth_facts.json`, the media in `workers` processes (default: CPU count)."""
    os.makedirs(os.path.join(out, "frames"), exist_ok=True)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    facts = {s.video_id: {"split": split, **asdict(s)}
             for split, ss in scenes.items() for s in ss}
    with open(os.path.join(out, "synth_facts.json"), "w") as f:
        json.dump(facts, f)
    width, height = frame_size
    jobs = [(s, out, seconds, width, height, texture, seed)
            for ss in scenes.values() for s in ss]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 8:
        for job in jobs:
            write_media(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write_media, jobs, chunksize=8))


def add_split_args(ap, noun: str = "videos") -> None:
    """--train/--val/--test: how many of `noun` per split (200/40/40 by default)."""
    for split, default in (("train", 200), ("val", 40), ("test", 40)):
        ap.add_argument(f"--{split}", type=int, default=default, help=f"{split} {noun} (default %(default)s)")


def add_media_args(ap: argparse.ArgumentParser) -> None:
    """The flags every synthetic release generator shares (seed, clip length, media)."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=int, default=10, help="clip length (1 fps frames)")
    ap.add_argument("--frame-size", type=parse_frame_size, default=(64, 64),
                    help="N (square) or WxH, e.g. 640x360 (default 64)")
    ap.add_argument("--texture", type=float, default=0.0,
                    help="pixel noise std (grey levels) for realistic JPEG sizes")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPUs)")


def media_kwargs(args: argparse.Namespace) -> dict:
    """`write_dataset` keyword arguments from `add_media_args`'s flags."""
    return {"seed": args.seed, "seconds": args.seconds, "frame_size": args.frame_size,
            "texture": args.texture, "workers": args.workers}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog or "python -m sharding.synth",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--videos-train", type=int, default=240)
    ap.add_argument("--videos-val", type=int, default=60)
    ap.add_argument("--videos-test", type=int, default=60)
    add_media_args(ap)
    args = ap.parse_args(argv)
    t0 = time.time()
    records = write_dataset(
        args.out, {"train": args.videos_train, "val": args.videos_val, "test": args.videos_test},
        **media_kwargs(args))
    counts = {split: len(r) for split, r in records.items()}
    print(f"wrote {args.out}: questions {counts} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
