"""Training-step benchmark: the worker's real step vs. a reference written like the research code.

Times `avpea_ray.train.loop.train_step` (forward, AVQA loss, backward, clipping, AdamW, the
schedule) called directly, without Ray, on synthetic MUSIC-AVQA batches: T frames at 224 px
and T fbank windows (192 x 128) per video, ~4.9 questions per video (the release's mean).

Variants, all in the same run:

- fast: the step as training runs it: one backbone pass per video (the AVQA head gathers each
  question's video), the trunk's fast path (`model.fuse_streams`, fused SDPA attention), bf16
  autocast on a GPU, `--compile` / `--checkpointing` when asked;
- reference: the way the research code does it: one backbone pass per question (a batch
  item is a question with its video), each stream through each block separately, eager
  attention (`q @ k^T`, softmax, `@ v`), fp32, no compile;
- reference_trunk: the reference's trunk on the fast variant's batches (one pass per video):
  the same backbone passes as fast, so their ratio is the trunk's own speed-up.

Rates: samples/s (videos), frame-pairs/s (videos x T), QA-pairs/s (questions), from the
median step time; the variants run one after another, `--rounds` times, and each keeps its
fastest round (and the peak memory of its last round) (other jobs on the machine slow whichever variant runs beside them). The real
reader's decode rate over `--shards` (demo shards by default, when built) is set against what
the fast step consumes: the loader workers per accelerator the step needs. Peak memory: the GPU allocator's peak on cuda, the process's peak resident
set growth on CPU (reset between variants). FLOPs per step are counted once per variant
(`torch.utils.flop_counter`); on a GPU MFU = FLOP/s / `--peak-tflops`.

The last two lines are `trunk_only_ratio: X.XX` (fast vs reference_trunk, QA-pairs/s) and
`speedup_vs_reference: X.XX` (fast vs reference, QA-pairs/s).

    python bench/train_step.py                       # tiny ViT on CPU (the default)
    python bench/train_step.py --device cuda --model b16 [--compile] [--checkpointing]
    bash bench/gpu_report.sh                         # every GPU measurement, one table
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from avpea_ray.config import from_dict  # noqa: E402
from avpea_ray.heads.avqa import QUESTION_TYPES  # noqa: E402
from avpea_ray.tasks import build_model  # noqa: E402
from avpea_ray.tasks.avqa import AVQATask  # noqa: E402
from avpea_ray.train.config import TrainConfig  # noqa: E402
from avpea_ray.train.loop import _autocast, _optimizer, _schedule, train_step  # noqa: E402

MODELS = {
    # A ViT-B/16-shaped layout cut to CPU size: 224 px frames, 197 visual + 97 audio tokens.
    "tiny": ("vit_base_patch16_224", {"depth": 4, "embed_dim": 192, "num_heads": 3}),
    "b16": ("vit_base_patch16_224", {}),
    "l16": ("vit_large_patch16_224", {}),
}
# MUSIC-AVQA: ~4.9 questions per video; this cycle of ten videos has exactly that mean.
QUESTIONS_PER_VIDEO = (5, 5, 5, 5, 5, 4, 5, 5, 5, 5)
VOCAB_WORDS, ANSWERS, QUESTION_LENGTH = 100, 42, 10


def synthetic_batches(count: int, batch_size: int, steps: int, image_size: int,
                      fbank_shape: tuple[int, int], seed: int = 0) -> list[dict]:
    """`count` reader-style batches (`frames`, `fbank`, `meta` with the questions, `key`)."""
    gen = torch.Generator().manual_seed(seed)
    batches, video = [], 0
    for _ in range(count):
        meta = []
        for _ in range(batch_size):
            questions = [{"question_tokens": torch.randint(1, VOCAB_WORDS, (QUESTION_LENGTH,),
                                                           generator=gen).tolist(),
                          "answer_index": int(torch.randint(0, ANSWERS, (), generator=gen)),
                          "question_type": QUESTION_TYPES[(video + q) % len(QUESTION_TYPES)]}
                         for q in range(QUESTIONS_PER_VIDEO[video % len(QUESTIONS_PER_VIDEO)])]
            meta.append({"questions": questions})
            video += 1
        batches.append({
            "frames": torch.randint(0, 256, (batch_size, steps, 3, image_size, image_size),
                                    dtype=torch.uint8, generator=gen),
            "fbank": torch.randn(batch_size, steps, 1, *fbank_shape, generator=gen),
            "meta": meta, "key": [f"v{i}" for i in range(batch_size)]})
    return batches


def per_question(raw: dict) -> dict:
    """The research code's batch: one item per question, each carrying its video's clip."""
    index = [i for i, m in enumerate(raw["meta"]) for _ in m["questions"]]
    return {"frames": raw["frames"][index], "fbank": raw["fbank"][index],
            "meta": [{"questions": [q]} for m in raw["meta"] for q in m["questions"]],
            "key": [raw["key"][i] for i in index]}


def make_config(args, reference: bool) -> TrainConfig:
    backbone, kwargs = MODELS[args.model]
    model = {"backbone": backbone, "weights": "random", "backbone_kwargs": kwargs}
    model |= REFERENCE_MODEL if reference else FAST_MODEL
    return from_dict(TrainConfig, {
        "task": "avqa", "model": model,
        "optim": {"precision": "fp32" if reference else args.precision, "warmup_steps": 1}})


# The trunk switches of the reference (each stream through each block separately) and of the
# fast variant (the defaults, plus what the command line asks for).
REFERENCE_MODEL = {"fuse_streams": False, "fused_attention": False, "activation_checkpointing": False,
                   "channels_last": False}
FAST_MODEL: dict = {}


class Peak:
    """Peak memory while a variant runs: the CUDA allocator's, or on CPU the growth of the
    process's peak resident set (Linux resets it through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            import ctypes
            import gc

            # Hand memory freed by the last variant back to the system first: else it stays
            # resident and the next variant's growth reads as nothing.
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._rss("VmRSS")

    def read_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return (self._rss("VmHWM") - self.base) / 2**30

    @staticmethod
    def _rss(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0


def run_variant(name: str, args, raws: list[dict], device: torch.device, reference: bool,
                count_flops: bool = True, prepare=None) -> dict:
    """Build the model of a variant, warm up, time `args.steps` steps; rates and memory.
    `prepare`: what wraps the model before the steps (Ray Train's `prepare_model`)."""
    cfg = make_config(args, reference)
    task = AVQATask(cfg, {"question_words": ["<pad>"] + [f"w{i}" for i in range(1, VOCAB_WORDS)],
                          "answers": [f"a{i}" for i in range(ANSWERS)]})
    torch.manual_seed(0)
    model = build_model(cfg.model, "avqa", task.head_args()).to(device)
    compile_s = 0.0
    compiled = args.compile and name == "fast"  # fast_eager: the same fast path, not compiled
    if compiled:
        model.compile_trunk()  # as the loop does (`run.compile`)
    step_model = prepare(model) if prepare else model
    optimizer = _optimizer(model, cfg)
    scheduler = _schedule(optimizer, cfg, 1000)  # 1000 steps an epoch (a global batch of 1 "clip")
    autocast = _autocast(cfg, device)
    video_raws = raws
    if name == "reference":
        raws = [per_question(r) for r in raws]
    batches = [task.make_batch(r, device) for r in raws]
    model.train()

    def step(i: int) -> torch.Tensor:
        return train_step(step_model, model, task, batches[i % len(batches)], optimizer, scheduler,
                          autocast, cfg.optim.grad_clip)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    peak = Peak(device)
    peak.reset()
    t0 = time.perf_counter()
    step(0)
    sync()
    if compiled:
        compile_s = time.perf_counter() - t0  # the first step traces and compiles
    for i in range(1, args.warmup):
        step(i)
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(i)
        sync()
        times.append(time.perf_counter() - t0)
    memory = peak.read_gib()
    assert torch.isfinite(loss).item(), f"{name}: the loss is not finite"

    host_syncs = None
    if device.type == "cuda" and not reference:
        # CUDA's own account of the step's synchronising calls (the loop makes none).
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(0)
        torch.cuda.set_sync_debug_mode("default")
        host_syncs = sum("synchroniz" in str(w.message) for w in caught)
    flops = 0
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            step(0)
        flops = counter.get_total_flops()

    step_s = statistics.median(times)
    videos = statistics.mean(len(r["meta"]) for r in video_raws)
    questions = statistics.mean(len(b.targets["answer_index"]) for b in batches)
    clips = statistics.mean(b.frames.shape[0] for b in batches)
    return {"name": name, "step_s": step_s, "clips": clips, "samples_per_s": videos / step_s,
            "frame_pairs_per_s": videos * args.num_frames / step_s,
            "qa_pairs_per_s": questions / step_s, "peak_gib": memory, "flops": flops,
            "tflops_per_s": flops / step_s / 1e12, "compile_s": compile_s, "host_syncs": host_syncs}


def _ray_worker(config: dict) -> None:
    """The fast variant's steps inside a Ray Train worker, the model through `prepare_model`
    as the training loop does; reports the median step time."""
    import argparse as _argparse

    import ray.train
    import ray.train.torch

    args = _argparse.Namespace(**config["args"])
    torch.set_num_threads(config["threads"])
    raws = synthetic_batches(config["batches"], args.batch_size, args.num_frames, args.image_size,
                             tuple(args.fbank))
    r = run_variant("fast", args, raws, ray.train.torch.get_device(), False, count_flops=False,
                    prepare=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    ray.train.report({"step_s": r["step_s"]})
    # Ray Train V2 keeps a report's metrics only with a checkpoint: the number goes back in a
    # file (one machine).
    with open(config["out"], "w") as f:
        f.write(repr(r["step_s"]))


def ray_overhead(args, raws: list[dict], device: torch.device) -> tuple[float, float]:
    """The fast variant's median step time bare, then inside a 1-worker `TorchTrainer` (the
    worker's start-up not counted), one after the other, `args.rounds` times, best of each."""
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from avpea_ray.train.cluster import init_ray

    init_ray()
    threads = torch.get_num_threads()
    bare, inside = [], []
    with tempfile.TemporaryDirectory(prefix="avpea-bench-ray-") as storage:
        for round_ in range(args.rounds):
            bare.append(run_variant("fast", args, raws, device, False, count_flops=False)["step_s"])
            trainer = TorchTrainer(
                _ray_worker,
                train_loop_config={"args": {k: v for k, v in vars(args).items() if k != "json"},
                                   "threads": threads, "batches": len(raws),
                                   "out": os.path.join(storage, f"step_s_{round_}")},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=device.type == "cuda",
                                             resources_per_worker={"CPU": os.cpu_count() or 1}),
                run_config=RunConfig(name=f"bench-{round_}", storage_path=storage))
            trainer.fit()
            with open(os.path.join(storage, f"step_s_{round_}")) as f:
                inside.append(float(f.read()))
            print(f"  (round {round_ + 1}: bare {bare[-1] * 1e3:.1f} ms/step, in Ray Train "
                  f"{inside[-1] * 1e3:.1f} ms/step)", flush=True)
    ray.shutdown()
    return min(bare), min(inside)


def reader_rate(args, step_samples_per_s: float) -> None:
    """The real reader (`ShardStream`, 1 loader worker) over `args.shards`: samples decoded per
    CPU second (bench/data_path.py's measure), against what the fast step consumes."""
    import json
    import math

    from avpea_ray.data.reader import ShardStream
    from bench.data_path import measure

    with open(os.path.join(args.shards, "shards.json")) as f:
        index = json.load(f)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a loader worker: one core per process
    stream = ShardStream(args.shards, batch_size=args.batch_size, training=False, rank=0, world_size=1,
                         num_workers=1)
    _, per_core, n = measure(lambda: stream, args.reader_passes)
    torch.set_num_threads(threads)
    print(f"{'reader':>15}: {per_core:7.1f} samples/s per CPU core decoding {args.shards} "
          f"({index['image_size']} px frames, T={index['num_frames']}, {n} samples x "
          f"{args.reader_passes} passes); the fast step consumes {step_samples_per_s:.2f} samples/s: "
          f"{math.ceil(step_samples_per_s / per_core)} loader worker(s) keep up", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, choices=sorted(MODELS),
                    help="tiny (CPU default) | b16 (cuda default) | l16")
    ap.add_argument("--batch-size", type=int, default=None, help="videos per step (2 CPU, 8 GPU)")
    ap.add_argument("--num-frames", type=int, default=10, help="T: frames (and audio windows) per video")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--fbank", type=int, nargs=2, default=(192, 128), help="time x mel per window")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and round first")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the variants (the best kept)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="the fast variant's optim.precision (the reference is fp32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the fast variant")
    ap.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing in the fast variant's trunk")
    ap.add_argument("--channels-last", action="store_true",
                    help="the fast variant's patch-embedding convolution in channels-last layout")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the accelerator's dense bf16 peak, for MFU (H100/H200: 989)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    ap.add_argument("--shards", default=os.path.join(ROOT, "demo_data", "shards", "train"),
                    help="shards the real reader decodes to compare with the step's consumption "
                         "('' skips it)")
    ap.add_argument("--reader-passes", type=int, default=2)
    ap.add_argument("--variants", default="fast,reference_trunk,reference",
                    help="which variants to run (the ratios need all three; with --compile, fast_eager: "
                         "the fast step not compiled, for compile_speedup)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--ray", action="store_true",
                    help="only the Ray overhead: the fast steps bare vs. in a 1-worker TorchTrainer "
                         "(prints ray_overhead: in-Ray step time / bare step time)")
    args = ap.parse_args(argv)
    args.model = args.model or ("tiny" if args.device == "cpu" else "b16")
    args.batch_size = args.batch_size or (2 if args.device == "cpu" else 8)
    if args.checkpointing:
        FAST_MODEL["activation_checkpointing"] = True
    if args.channels_last:
        FAST_MODEL["channels_last"] = True
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    raws = synthetic_batches(max(len(QUESTIONS_PER_VIDEO) // args.batch_size, 1), args.batch_size,
                             args.num_frames, args.image_size, tuple(args.fbank))
    print(f"model {args.model} ({MODELS[args.model][0]} {MODELS[args.model][1] or ''}), "
          f"device {args.device}, {torch.get_num_threads()} threads, batch {args.batch_size} videos "
          f"x T={args.num_frames}, {statistics.mean(QUESTIONS_PER_VIDEO):.1f} questions per video, "
          f"{args.warmup} warm-up + {args.steps} timed steps per variant", flush=True)

    if args.ray:
        bare, inside = ray_overhead(args, raws, device)
        print(f"ray_overhead: {inside / bare:.3f} (step {inside * 1e3:.1f} ms in a 1-worker "
              f"TorchTrainer vs {bare * 1e3:.1f} ms bare)")
        return

    results = {}
    wanted = args.variants.split(",")
    # Rounds: the variants one after the other, again; each keeps its fastest round (a busy
    # machine slows whatever runs while it is busy, not one variant's code).
    for round_ in range(args.rounds):
        for name, reference in (("fast", False), ("fast_eager", False), ("reference_trunk", True),
                                ("reference", True)):
            if name in wanted:
                r = run_variant(name, args, raws, device, reference, count_flops=round_ == 0)
                best = results.setdefault(name, r)
                # The memory of the latest round: on CPU the first round's also counts the
                # process's heap growing to its working size, whichever variant runs first.
                if r["step_s"] < best["step_s"]:
                    results[name] = r | {k: best[k] for k in ("flops", "compile_s")}
                    results[name]["tflops_per_s"] = best["flops"] / r["step_s"] / 1e12
                results[name]["peak_gib"] = r["peak_gib"]
                print(f"  (round {round_ + 1}: {name} {r['step_s'] * 1e3:.1f} ms/step)", flush=True)
    for name, r in results.items():
        line = (f"{name:>15}: {r['step_s'] * 1e3:8.1f} ms/step  {r['clips']:5.1f} clips/step  {r['samples_per_s']:7.2f} samples/s  "
                f"{r['frame_pairs_per_s']:8.1f} frame-pairs/s  {r['qa_pairs_per_s']:7.2f} QA-pairs/s  "
                f"peak {r['peak_gib']:6.2f} GiB  {r['flops'] / 1e9:9.1f} GFLOP/step  "
                f"{r['tflops_per_s']:7.3f} TFLOP/s")
        if device.type == "cuda":
            line += f"  MFU {100 * r['tflops_per_s'] / args.peak_tflops:5.1f}%"
        if r.get("host_syncs") is not None:
            line += f"  {r['host_syncs']} host syncs/step"
        if r["compile_s"]:
            line += f"  (compile + first step {r['compile_s']:.1f} s)"
        print(line, flush=True)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results},
                      f, indent=1)
    if "fast" not in results:
        return
    if args.compile and "fast_eager" in results:
        print(f"compile_speedup: {results['fast_eager']['step_s'] / results['fast']['step_s']:.2f} "
              f"(the fast step compiled vs. eager)")
    if args.shards and os.path.exists(os.path.join(args.shards, "shards.json")):
        reader_rate(args, results["fast"]["samples_per_s"])
    if not {"reference_trunk", "reference"} <= results.keys():
        return
    fast = results["fast"]["qa_pairs_per_s"]
    print(f"trunk_only_ratio: {fast / results['reference_trunk']['qa_pairs_per_s']:.2f}")
    print(f"speedup_vs_reference: {fast / results['reference']['qa_pairs_per_s']:.2f}")


if __name__ == "__main__":
    main()
