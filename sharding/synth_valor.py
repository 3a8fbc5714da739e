"""A small synthetic captioned audio-visual dataset in VALOR-32K's release layout.

The videos are sharding.synth's scenes (1-3 coloured instrument blocks at the left, middle
and/or right; 1-3 instruments playing pure tones, possibly off screen, while some visible ones
stay silent), rendered by its `write_media`. Each video gets 2-4 captions in varied phrasing
that name every visible and every sounding instrument (some also colours, positions or the
order in which the sounds start), so a caption singles out its video among the others:

    "a red piano on the left and a green violin on the right; only the piano can be heard"
    "you can see a piano and a violin, and you hear a piano playing"

Layout written under `--out DIR` (what `sharding.valor` reads):

    ids_train.json, ids_val.json, ids_test.json   each a JSON list of the split's video ids
    captions.json                                 {video_id: [caption, ...]} for all splits
    frames/<video_id>/000001.jpg ...              1 fps frames, one folder per video
    audio/<video_id>.wav                          16 kHz mono PCM
    synth_facts.json                              the generator's ground truth per video

    python -m sharding.synth_valor --out demo_data/valor/release --seed 0
    python -m sharding.valor --ids demo_data/valor/release/ids_train.json \\
        --captions demo_data/valor/release/captions.json \\
        --frames demo_data/valor/release/frames --audio demo_data/valor/release/audio \\
        --out demo_data/valor/shards/train --split train
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import numpy as np

from sharding import synth
from sharding.synth import Scene

ID_PREFIX = "vlr"  # 3 characters: synth.write_media seeds its texture from video_id[3:]
NUMBER_WORDS = ("no", "one", "two", "three")
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
# Plain colour names; each instrument gets the nearest one to the colour synth draws it in.
PALETTE = {"red": (255, 0, 0), "green": (0, 180, 0), "blue": (0, 0, 255),
           "yellow": (255, 230, 0), "purple": (200, 0, 200), "cyan": (0, 230, 230),
           "orange": (255, 140, 0), "white": (255, 255, 255), "black": (0, 0, 0)}


def colour_name(rgb: tuple[int, int, int]) -> str:
    """The PALETTE name nearest to `rgb`."""
    return min(PALETTE, key=lambda n: sum((a - b) ** 2 for a, b in zip(PALETTE[n], rgb)))


COLOURS = {inst.name: colour_name(inst.rgb) for inst in synth.INSTRUMENTS}


# --- captions ---------------------------------------------------------------------------

def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _be(items: list) -> str:
    return "is" if len(items) == 1 else "are"


class _Facts:
    """What a caption may say about a scene, in the order a viewer meets it."""

    def __init__(self, scene: Scene):
        self.seen = [(p, scene.layout[p]) for p in synth.POSITIONS if p in scene.layout]
        self.visible = [name for _, name in self.seen]  # left to right
        self.heard = [s.instrument for s in scene.sounds]  # by onset
        self.on = [n for n in self.heard if n in scene.layout.values()]
        self.off = [n for n in self.heard if n not in scene.layout.values()]
        self.silent = [n for n in self.visible if n not in self.heard]

    def named(self, names: list[str], colour: bool = False) -> str:
        return _join([_a(f"{COLOURS[n]} {n}" if colour else n) for n in names])


def heard_clause(f: _Facts, rng: np.random.Generator) -> str:
    """Which of the visible instruments sound, and what is heard off screen."""
    the_on = _join([f"the {n}" for n in f.on]) if f.on else ""
    if f.on and f.silent:
        on_part = str(rng.choice([f"only {the_on} can be heard",
                                  f"only {the_on} {_be(f.on)} playing",
                                  f"{the_on} {_be(f.on)} playing while "
                                  f"{_join([f'the {n}' for n in f.silent])} "
                                  f"{_be(f.silent)} silent"]))
    elif f.on:
        everyone = ("it" if len(f.visible) == 1 else "both" if len(f.visible) == 2
                    else "all three")
        on_part = str(rng.choice([f"{the_on} {_be(f.on)} playing",
                                  f"{everyone} can be heard",
                                  f"{the_on} can be heard"]))
    else:
        on_part = str(rng.choice(["it makes no sound", "it is silent"] if len(f.visible) == 1
                                 else ["none of them makes a sound", "they are all silent"]))
    if not f.off:
        return on_part
    off = f.named(f.off)
    off_part = str(rng.choice([f"{off} {_be(f.off)} heard but not seen",
                               f"you also hear {off} off screen",
                               f"{'an unseen ' + f.off[0] if len(f.off) == 1 else off} "
                               f"{_be(f.off)} playing too"]))
    return f"{on_part}, but {off_part}" if not f.on else f"{on_part}, and {off_part}"


def _layout_caption(f: _Facts, rng: np.random.Generator) -> str:
    where = _join([f"{_a(COLOURS[n] + ' ' + n)} {POSITION_PHRASES[p]}" for p, n in f.seen])
    return f"{where}; {heard_clause(f, rng)}"


def _see_hear_caption(f: _Facts, rng: np.random.Generator) -> str:
    seen, heard = f.named(f.visible), f.named(f.heard)
    return str(rng.choice([f"you can see {seen}, and you hear {heard} playing",
                           f"{seen} {_be(f.visible)} on screen, and {heard} can be heard",
                           f"a video of {seen}; the sound is {heard}"]))


def _count_caption(f: _Facts, rng: np.random.Generator) -> str:
    n_seen, n_heard = NUMBER_WORDS[len(f.visible)], NUMBER_WORDS[len(f.heard)]
    plural = "instrument" if len(f.visible) == 1 else "instruments"
    return (f"{n_seen} {plural} can be seen ({f.named(f.visible, colour=True)}) and "
            f"{n_heard} can be heard ({f.named(f.heard)})")


def _order_caption(f: _Facts, rng: np.random.Generator) -> str:
    shown = f"{f.named(f.visible)} {_be(f.visible)} on screen"
    if len(f.heard) == 1:
        return f"{_a(f.heard[0])} is the only sound, while {shown}"
    steps = [f"first {_a(f.heard[0])} starts playing"]
    steps += [f"then {_a(n)} joins" for n in f.heard[1:]]
    return f"{', '.join(steps)}; {shown}"


def _left_to_right_caption(f: _Facts, rng: np.random.Generator) -> str:
    if len(f.visible) == 1:
        shown = f"only {f.named(f.visible, colour=True)} is on screen"
    else:
        shown = f"from left to right: {f.named(f.visible, colour=True)}"
    return f"{shown}. {heard_clause(f, rng)}."


TEMPLATES: tuple[Callable[[_Facts, np.random.Generator], str], ...] = (
    _layout_caption, _see_hear_caption, _count_caption, _order_caption, _left_to_right_caption)


def make_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """2-4 distinct captions of the scene, each from a different template.

    Every caption names all visible and all sounding instruments; lower-case words with
    `, ; : . ( )` only.
    """
    facts = _Facts(scene)
    count = int(rng.integers(2, 5))
    picked = rng.choice(len(TEMPLATES), size=count, replace=False)
    return [TEMPLATES[int(t)](facts, rng) for t in picked]


# --- the whole dataset ------------------------------------------------------------------

def generate(num_videos: dict[str, int], *, seed: int = 0, seconds: int = 10
             ) -> tuple[dict[str, list[Scene]], dict[str, dict[str, list[str]]]]:
    """Draw scenes and captions for each split (no media; cheap).

    Args:
        num_videos: split -> number of videos, e.g. {"train": 200, "val": 40, "test": 40}.
        seed: everything is a function of it.
        seconds: clip length in seconds (>= 4).

    Returns:
        (scenes per split, {video_id: captions} per split); video ids are "vlr" + 5 digits,
        unique over all splits.
    """
    if seconds < 4:
        raise ValueError("--seconds must be at least 4")
    scenes: dict[str, list[Scene]] = {}
    captions: dict[str, dict[str, list[str]]] = {}
    vid = 0
    for split, n in num_videos.items():
        scenes[split], captions[split] = [], {}
        for _ in range(n):
            scene = synth.sample_scene(f"{ID_PREFIX}{vid:05d}",
                                       np.random.default_rng([seed, vid, 0]), seconds)
            captions[split][scene.video_id] = make_captions(
                scene, np.random.default_rng([seed, vid, 2]))
            scenes[split].append(scene)
            vid += 1
    return scenes, captions


def write_dataset(out: str, num_videos: dict[str, int], *, seed: int = 0, seconds: int = 10,
                  frame_size: tuple[int, int] = (64, 64), texture: float = 0.0,
                  workers: int | None = None) -> dict[str, dict[str, list[str]]]:
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
        {video_id: captions} per split.
    """
    scenes, captions = generate(num_videos, seed=seed, seconds=seconds)
    os.makedirs(out, exist_ok=True)
    for split, by_video in captions.items():
        with open(os.path.join(out, f"ids_{split}.json"), "w") as f:
            json.dump(list(by_video), f)
    with open(os.path.join(out, "captions.json"), "w") as f:
        json.dump({vid: caps for by_video in captions.values() for vid, caps in by_video.items()},
                  f, indent=1)
    synth.write_scenes(out, scenes, seed=seed, seconds=seconds, frame_size=frame_size,
                       texture=texture, workers=workers)
    return captions


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog or "python -m sharding.synth_valor",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    synth.add_split_args(ap, "videos")
    synth.add_media_args(ap)
    args = ap.parse_args(argv)
    t0 = time.time()
    captions = write_dataset(args.out, {"train": args.train, "val": args.val, "test": args.test},
                             **synth.media_kwargs(args))
    counts = {split: f"{len(c)} videos, {sum(map(len, c.values()))} captions"
              for split, c in captions.items()}
    print(f"wrote {args.out}: {counts} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
