"""A small synthetic audio-visual event dataset in AVE's release layout.

The videos are sharding.synth's scenes: coloured instrument blocks at the left, middle and/or
right, pure tones for the sounding ones. Each 10 s clip has one event: an instrument on
screen that plays from StartTime to EndTime (whole seconds, at least 2 s); a second visible
instrument may stay silent, so the category is the one both seen and heard. The category is
the instrument's name; every second outside the event is background.

Layout written under `--out DIR` (what `sharding.ave --splits DIR` reads):

    Annotations.txt                          Category&VideoID&Quality&StartTime&EndTime, all clips
    trainSet.txt, valSet.txt, testSet.txt    the same rows, per split
    frames/<video_id>/000001.jpg ...         1 fps frames, one folder per video
    audio/<video_id>.wav                     16 kHz mono PCM
    synth_facts.json                         the generator's ground truth per video

    python -m sharding.synth_ave --out demo_data/ave/release --seed 0
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sharding import synth
from sharding.synth import Scene, Sound

ID_PREFIX = "ave"  # 3 characters: synth.write_media seeds its texture from video_id[3:]
SECONDS = 10       # AVE clips are 10 s, one label per second
HEADER = "Category&VideoID&Quality&StartTime&EndTime"
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}


def sample_clip(video_id: str, rng: np.random.Generator) -> Scene:
    """One clip: an instrument seen and heard over [start, end), maybe a silent one beside it."""
    names = [inst.name for inst in synth.INSTRUMENTS]
    shown = [str(n) for n in rng.choice(names, size=int(rng.integers(1, 3)), replace=False)]
    positions = [str(p) for p in rng.choice(synth.POSITIONS, size=len(shown), replace=False)]
    start = int(rng.integers(0, SECONDS - 1))
    end = int(rng.integers(start + 2, SECONDS + 1))
    level = float(rng.choice(synth.LEVELS[1:]))
    return Scene(video_id, dict(zip(positions, shown)), [Sound(shown[0], start, end, level)])


def generate(num_videos: dict[str, int], *, seed: int = 0) -> dict[str, list[Scene]]:
    """Draw the clips of each split (no media; cheap); ids "ave" + 5 digits, unique overall."""
    scenes: dict[str, list[Scene]] = {}
    vid = 0
    for split, n in num_videos.items():
        scenes[split] = []
        for _ in range(n):
            scenes[split].append(sample_clip(f"{ID_PREFIX}{vid:05d}",
                                              np.random.default_rng([seed, vid, 3])))
            vid += 1
    return scenes


def row(scene: Scene) -> str:
    """The clip's annotation row."""
    event = scene.sounds[0]
    return f"{event.instrument}&{scene.video_id}&good&{event.start}&{event.end}"


def write_dataset(out: str, num_videos: dict[str, int], *, seed: int = 0,
                  seconds: int = SECONDS, frame_size: tuple[int, int] = (64, 64),
                  texture: float = 0.0, workers: int | None = None) -> dict[str, list[Scene]]:
    """Generate and write the AVE layout under `out` (a local directory).

    Args:
        seconds: must be 10 (AVE's clip length); accepted for `synth.media_kwargs`.
        Others as `synth.write_dataset`.

    Returns:
        The scenes per split.
    """
    if seconds != SECONDS:
        raise ValueError(f"AVE clips are {SECONDS} s long, got --seconds {seconds}")
    scenes = generate(num_videos, seed=seed)
    os.makedirs(out, exist_ok=True)
    lines = {split: [row(s) for s in ss] for split, ss in scenes.items()}
    with open(os.path.join(out, "Annotations.txt"), "w") as f:
        f.write("\n".join([HEADER, *(r for rs in lines.values() for r in rs)]) + "\n")
    for split, rows in lines.items():
        with open(os.path.join(out, SPLIT_FILES[split]), "w") as f:
            f.write("\n".join([HEADER, *rows]) + "\n")
    synth.write_scenes(out, scenes, seed=seed, seconds=seconds, frame_size=frame_size,
                       texture=texture, workers=workers)
    return scenes


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog or "python -m sharding.synth_ave",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    synth.add_split_args(ap, "clips")
    synth.add_media_args(ap)
    args = ap.parse_args(argv)
    t0 = time.time()
    scenes = write_dataset(args.out, {"train": args.train, "val": args.val, "test": args.test},
                           **synth.media_kwargs(args))
    counts = {split: len(ss) for split, ss in scenes.items()}
    print(f"wrote {args.out}: clips {counts} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
