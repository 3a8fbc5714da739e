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
