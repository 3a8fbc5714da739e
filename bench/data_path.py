"""Data path benchmark: shards through the reader vs the per-file release layout.

Both paths turn the same synthetic MUSIC-AVQA-style videos (realistic 640x360 JPEG frames
at 1 fps, 60 s of 16 kHz audio) into the model's inputs, T=10 frames at 224 px and T
fbank windows, with the same number of DataLoader worker processes:

(a) shards: `ShardStream` over tar shards written by `python -m sharding.musicavqa`:
    decode T already-resized JPEGs and the precomputed float16 fbank per sample;
(b) release layout, the way the original research code reads it: list the video's frame
    folder, open T full-size JPEGs, decode, resize to 224 (bicubic), read the wav and run
    the kaldi fbank on each of the T windows, per sample, every epoch.

The headline rate is samples/s per CPU core = samples per CPU second, counting the CPU time
of the main process and of its loader workers (robust when other jobs share the machine);
the wall-clock rate with N workers is printed beside it. The last line is
`speedup_vs_release_layout: X.XX`, the ratio of the per-core rates of (a) and (b).
Data generation and the one-off sharding run are timed but not part of the comparison.

    python bench/data_path.py [--videos 96] [--workers 2] [--passes 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avpea_ray.data.reader import ShardStream  # noqa: E402
from avpea_ray.data.audio import AudioConfig, waveform_to_windows  # noqa: E402
from sharding import musicavqa, synth  # noqa: E402


class ReleaseLayoutDataset(Dataset):
    """Per-video reads from the release layout, as the research code does them.

    Args:
        root: the synthetic release directory (frames/, audio/).
        video_ids: the videos, one item each.
        num_frames: T.
        image_size: model input side.
    """

    def __init__(self, root: str, video_ids: list[str], num_frames: int, image_size: int):
        self.root, self.video_ids = root, video_ids
        self.num_frames, self.image_size = num_frames, image_size
        self.audio = AudioConfig()

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image
        import soundfile as sf

        vid = self.video_ids[i]
        folder = os.path.join(self.root, "frames", vid)
        names = sorted(os.listdir(folder))
        picks = np.linspace(0, len(names) - 1, self.num_frames).round().astype(int)
        frames = []
        for p in picks:
            with Image.open(os.path.join(folder, names[p])) as img:
                img = img.convert("RGB").resize((self.image_size, self.image_size),
                                                Image.BICUBIC)
                frames.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        wave, _ = sf.read(os.path.join(self.root, "audio", f"{vid}.wav"), dtype="float32")
        fbank = waveform_to_windows(wave, self.num_frames, self.audio)
        return {"frames": torch.stack(frames), "fbank": fbank}


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(make_batches, passes: int) -> tuple[float, float, int]:
    """Run `passes` full passes.

    Returns:
        (best wall-clock samples/s, samples per CPU second over all passes, samples/pass).

    Worker processes are not persistent, so each pass's workers have exited (and their CPU
    time is counted) when the pass ends.
    """
    best, total_samples, total_cpu = 0.0, 0, 0.0
    for _ in range(passes):
        cpu0, t0, n = cpu_seconds(), time.perf_counter(), 0
        for batch in make_batches():
            n += batch["frames"].shape[0]
        wall = time.perf_counter() - t0
        total_cpu += cpu_seconds() - cpu0
        total_samples += n
        best = max(best, n / wall)
    return best, total_samples / total_cpu, total_samples // passes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=96)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--frame-size", type=synth.parse_frame_size, default=(640, 360))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-frames", type=int, default=10)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="DataLoader worker processes for both paths")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--passes", type=int, default=3, help="passes per path")
    ap.add_argument("--keep", default=None, help="keep the generated data in this directory")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # like a loader worker: one core per process

    work = args.keep or tempfile.mkdtemp(prefix="avpea-bench-")
    release, shard_dir = os.path.join(work, "release"), os.path.join(work, "shards")
    try:
        t0 = time.perf_counter()
        synth.write_dataset(release, {"train": args.videos}, seed=0, seconds=args.seconds,
                            frame_size=args.frame_size, texture=8.0, workers=args.workers)
        print(f"generated {args.videos} videos ({args.frame_size[0]}x{args.frame_size[1]}, "
              f"{args.seconds} s) in {time.perf_counter() - t0:.1f}s", flush=True)
        t0 = time.perf_counter()
        musicavqa.main(["--annotations", release, "--frames", os.path.join(release, "frames"),
                        "--audio", os.path.join(release, "audio"), "--out", shard_dir,
                        "--split", "train", "--num-frames", str(args.num_frames),
                        "--image-size", str(args.image_size), "--workers", str(args.workers),
                        "--no-progress"])
        shard_bytes = sum(os.path.getsize(os.path.join(shard_dir, n))
                          for n in os.listdir(shard_dir) if n.endswith(".tar"))
        print(f"sharded once in {time.perf_counter() - t0:.1f}s "
              f"({shard_bytes / args.videos / 1e6:.2f} MB per sample)", flush=True)

        stream = ShardStream(shard_dir, batch_size=args.batch_size, training=False, rank=0,
                             world_size=1, num_workers=args.workers)
        video_ids = sorted(os.listdir(os.path.join(release, "frames")))
        baseline = DataLoader(
            ReleaseLayoutDataset(release, video_ids, args.num_frames, args.image_size),
            batch_size=args.batch_size, num_workers=args.workers)

        results = {}
        for name, make in (("release_layout", lambda: baseline), ("shards", lambda: stream)):
            wall_rate, per_core, n = measure(make, args.passes)
            results[name] = per_core
            print(f"{name:>15}: {per_core:7.1f} samples/s per CPU core "
                  f"(wall clock {wall_rate:6.1f} samples/s with {args.workers} workers; "
                  f"{n} samples x {args.passes} passes)", flush=True)
        print(f"speedup_vs_release_layout: {results['shards'] / results['release_layout']:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
