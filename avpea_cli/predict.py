"""`avpea-ray predict` and `avpea-ray infer`: trained adapters applied to videos and archives."""
from __future__ import annotations

import argparse
import json
import sys

PREDICT_HELP = """Apply trained adapters to videos as you have them: a video file with its sound
(mp4/mkv/webm/avi) or a folder of frames plus an audio file. The task comes from the adapters.

examples:
  avpea-ray predict runs/avqa-demo/best_adapters --video concert.mp4 \\
      --question "Is the violin playing?" --question "How many instruments are sounding?"
  avpea-ray predict runs/avel-demo/best_adapters --video clip.mkv --json
  avpea-ray predict runs/avc-demo/best_adapters --video a.mp4 --video b.webm --beam-size 1
  avpea-ray predict runs/avr-demo/best_adapters --video a.mp4 --video b.mp4 --texts queries.txt
  avpea-ray predict runs/avqa-demo/best_adapters --frames frames/syn00300 --audio audio/syn00300.wav \\
      --question "Where is the sounding instrument?"

--weights is the frozen backbone's as in training: timm (the hub or its cache), a local
.safetensors/.pth file, or random (the demos); by default what training used."""


def build_predict_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=PREDICT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", help="an adapter directory: a run's best_adapters/ or a "
                                         "checkpoint_*/best_adapters/")
    parser.add_argument("--video", action="append", default=[], metavar="FILE",
                        help="a video file with its audio track (repeat for several)")
    parser.add_argument("--frames", metavar="DIR", help="a folder of .jpg frames (with --audio)")
    parser.add_argument("--audio", metavar="FILE", help="the audio of --frames (wav, flac, m4a, ...)")
    parser.add_argument("--question", action="append", default=[], metavar="TEXT",
                        help="avqa: a question about the video (repeat for several)")
    parser.add_argument("--top-k", type=int, default=5, help="avqa: answers listed per question")
    parser.add_argument("--texts", metavar="FILE", help="avr: a text file, one query per line")
    parser.add_argument("--beam-size", type=int, default=None,
                        help="avc: beam size (1 = greedy; default: as evaluated in training, 3)")
    parser.add_argument("--weights", help="the backbone's weights: timm, random or a file "
                                          "(default: as in training)")
    parser.add_argument("--vocab", help="avqa: vocab.json, for adapters saved without one")
    parser.add_argument("--train-shards", metavar="URL",
                        help="the train split's shards, for adapters saved without inputs.json")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _read_texts(path: str) -> list[str]:
    from avpea_ray.config import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--texts {path}: cannot read it ({err})") from None
    if not texts:
        raise ConfigError(f"--texts {path}: no text in it (one query per line)")
    return texts


def run_predict(argv: list[str], prog: str) -> int:
    """`avpea-ray predict`: exit 0, or 2 with one `error:` line for bad input."""
    args = build_predict_parser(prog).parse_args(argv)
    from avpea_ray.config import ConfigError
    from avpea_ray.infer import Media, format_table, predict

    try:
        for flag, value in (("--top-k", args.top_k), ("--beam-size", args.beam_size or 1)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        media = [Media(video=v) for v in args.video]
        if args.frames or args.audio:
            if not (args.frames and args.audio):
                raise ConfigError("--frames and --audio go together (the frames folder and its sound)")
            media.append(Media(frames=args.frames, audio=args.audio))
        result = predict(args.adapters, media, questions=args.question,
                         texts=_read_texts(args.texts) if args.texts else None, top_k=args.top_k,
                         beam_size=args.beam_size or 3, weights=args.weights, device=args.device,
                         vocab=args.vocab, train_shards=args.train_shards)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        print(format_table(result))
        for entry in result.get("results", []):
            for answer in entry.get("answers", []):
                if answer["unknown_words"]:
                    print(f"note: {answer['question']!r}: {', '.join(map(repr, answer['unknown_words']))} "
                          "never appeared in the training questions (read as <unk>); the answer may "
                          "not use them", file=sys.stderr)
    return 0


INFER_HELP = """Batch inference on Ray Data: every question (avqa) or clip (avel, avc, avr) of a
split's shards or of a list of videos, one row each, to Parquet or JSONL (local or s3://).
Clips are decoded in CPU tasks and predicted in an actor pool (one model per actor, one GPU
each with --use-gpu); items that cannot be used are listed with their id and reason in the
report file (default <out>.report.json) and the rest are processed (--strict: stop instead).

examples:
  avpea-ray infer runs/avqa-demo/best_adapters --shards demo_data/shards/test --out preds/avqa-test
  avpea-ray infer runs/avel-demo/best_adapters --videos archive.txt --format jsonl \\
      --out s3://YOUR-BUCKET/avpea/preds/ave --use-gpu --concurrency 8 --batch-size 32
  avpea-ray infer runs/avqa-demo/best_adapters --videos archive.txt --question "Is the violin playing?" \\
      --out preds/violin --strict

On a cluster: ray job submit --working-dir . -- avpea-ray infer ... --use-gpu --concurrency N
(RAY_ADDRESS set: joins that cluster; otherwise a local Ray starts)."""


def build_infer_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=INFER_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", help="an adapter directory, readable from every node")
    parser.add_argument("--shards", metavar="URL", help="a split's shards (its folder or shards.json)")
    parser.add_argument("--videos", metavar="FILE", help="a text file, one video path per line")
    parser.add_argument("--question", action="append", default=[], metavar="TEXT",
                        help="avqa with --videos: a question asked about every video (repeat)")
    parser.add_argument("--out", required=True, metavar="URL", help="output folder, local or s3://")
    parser.add_argument("--format", default="parquet", choices=("parquet", "jsonl"))
    parser.add_argument("--report", metavar="URL", help="the report file (default: <out>.report.json)")
    parser.add_argument("--weights", help="the backbone's weights (default: as in training)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per model call (default 8)")
    parser.add_argument("--concurrency", type=int, default=1, help="prediction actors (default 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=3, help="avqa: answers kept per question")
    parser.add_argument("--beam-size", type=int, default=3, help="avc: beam size (1 = greedy)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unusable item")
    return parser


def run_infer(argv: list[str], prog: str) -> int:
    """`avpea-ray infer`: exit 0, 1 when items failed, 2 with one `error:` line for bad input."""
    args = build_infer_parser(prog).parse_args(argv)
    from avpea_ray.config import ConfigError
    from avpea_ray.infer.batch import InferConfig, infer

    try:
        videos = None
        if args.videos:
            try:
                with open(args.videos, encoding="utf-8") as f:
                    videos = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"--videos {args.videos}: cannot read it ({err})") from None
        config = InferConfig(batch_size=args.batch_size, concurrency=args.concurrency, use_gpu=args.use_gpu,
                             cpus_per_actor=args.cpus_per_actor, top_k=args.top_k, beam_size=args.beam_size,
                             strict=args.strict)
        # Ray as training starts it: RAY_ADDRESS's cluster, or a local one (never a stale
        # cluster address left on the machine).
        from avpea_ray.train.cluster import init_ray

        init_ray()
        summary = infer(args.adapters, args.out, shards_url=args.shards, videos=videos, fmt=args.format,
                        report=args.report, weights=args.weights, questions=args.question or None,
                        config=config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{summary['rows']} rows -> {summary['out']} ({summary['format']}) in {summary['seconds']} s: "
          f"{summary['rows_per_s']} rows/s")
    if "accuracy" in summary:
        acc = summary["accuracy"]
        print(f"accuracy from the rows: avg {acc.get('avg', float('nan')):.2f}%, "
              f"overall {acc.get('overall', float('nan')):.2f}%")
    for item in summary["items"][:20]:
        print(f"  failed {item['id']}: {item['reason']} ({item['detail']})", file=sys.stderr)
    print(f"report: {summary['report']}" + (f" ({summary['failed']} failed)" if summary["failed"] else ""))
    return 1 if summary["failed"] else 0
