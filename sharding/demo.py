"""Synthetic demo data for a task: a release in the dataset's layout, sharded per split.

    python -m sharding.demo --task avqa|avqa_gen|avel|avr|avc [--root demo_data] [--image-size 64]

Built once, on first use; a split whose `shards.json` exists is left as it is.

| task | release (generator) | shards |
|---|---|---|
| avqa, avqa_gen | `ROOT/release` (sharding.synth, MUSIC-AVQA layout) | `ROOT/shards/{train,val,test}` |
| avel | `ROOT/ave/release` (sharding.synth_ave, AVE layout) | `ROOT/ave/shards/{train,val,test}` |
| avr, avc | `ROOT/valor/release` (sharding.synth_valor, VALOR-32K layout) | `ROOT/valor/shards/{train,val,test}` |
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class _Demo:
    folder: str                              # under the root ("" = the root itself)
    marker: str                              # a file the finished release has
    layout: str                              # for the messages
    generate: Callable[[str], None]          # release directory -> written
    shard_args: Callable[[Path, str], list]  # (release, split) -> the sharder's input flags
    sharder: Callable[[list], int]           # argv -> exit code


def _avqa() -> _Demo:
    from sharding import musicavqa, synth

    return _Demo("", "avqa-test.json", "MUSIC-AVQA", lambda out: synth.main(["--out", out]),
                 lambda rel, split: ["--annotations", str(rel), "--frames", str(rel / "frames"),
                                     "--audio", str(rel / "audio")],
                 musicavqa.main)


def _valor() -> _Demo:
    from sharding import synth_valor, valor

    return _Demo("valor", "captions.json", "VALOR-32K",
                 lambda out: synth_valor.main(["--out", out]),
                 lambda rel, split: ["--ids", str(rel / f"ids_{split}.json"),
                                     "--captions", str(rel / "captions.json"),
                                     "--frames", str(rel / "frames"),
                                     "--audio", str(rel / "audio")],
                 valor.main)


def _ave() -> _Demo:
    from sharding import ave, synth_ave

    return _Demo("ave", "testSet.txt", "AVE", lambda out: synth_ave.main(["--out", out]),
                 lambda rel, split: ["--annotations", str(rel / "Annotations.txt"),
                                     "--splits", str(rel), "--frames", str(rel / "frames"),
                                     "--audio", str(rel / "audio")],
                 ave.main)


DEMOS: dict[str, Callable[[], _Demo]] = {"avqa": _avqa, "avqa_gen": _avqa, "avel": _ave, "avr": _valor,
                                         "avc": _valor}


def ensure_demo_data(task: str, root: str | Path = "demo_data",
                     image_size: int = 64) -> dict[str, str]:
    """Build the task's synthetic release and its shards where they are missing.

    Args:
        task: "avqa", "avqa_gen", "avel", "avr" or "avc" (the two AVQA tasks share one dataset,
            retrieval and captioning another).
        root: the demo folder.
        image_size: frame side in the shards (the model's input size).

    Returns:
        {split: shard directory} for train, val and test.

    Raises:
        ValueError: an unknown task.
        SystemExit: a split could not be sharded (the message names it).
    """
    if task not in DEMOS:
        raise ValueError(f"no demo data for task {task!r}; tasks: {', '.join(DEMOS)}")
    demo = DEMOS[task]()
    base = Path(root) / demo.folder
    release = base / "release"
    if not (release / demo.marker).exists():
        print(f"demo data: generating the synthetic {demo.layout}-layout dataset in {release}")
        demo.generate(str(release))
    out = {}
    for split in SPLITS:
        shards_dir = base / "shards" / split
        out[split] = str(shards_dir)
        if (shards_dir / "shards.json").exists():
            continue
        print(f"demo data: sharding the {split} split into {shards_dir}")
        code = demo.sharder([*demo.shard_args(release, split), "--out", str(shards_dir),
                             "--split", split, "--image-size", str(image_size),
                             "--max-shard-bytes", "16MiB", "--no-progress"])
        if code:
            raise SystemExit(f"demo data: sharding the {split} split failed (exit {code})")
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog or "python -m sharding.demo",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=sorted(DEMOS))
    ap.add_argument("--root", default="demo_data", help="demo folder (default %(default)s)")
    ap.add_argument("--image-size", type=int, default=64,
                    help="frame side in the shards (default %(default)s)")
    args = ap.parse_args(argv)
    print(json.dumps(ensure_demo_data(args.task, args.root, args.image_size), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
