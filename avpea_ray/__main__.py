"""`python -m avpea_ray <command>`: small tools around the library.

    params   build a model without weights and print its parameter counts
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError
from .model.config import ModelConfig


def _params(args: argparse.Namespace) -> int:
    from .model.params import build_without_weights, count_parameters, format_report

    head_kwargs = ({"vocab_size": args.question_vocab_size, "num_answers": args.num_answers}
                   if args.task == "avqa" else {"num_classes": args.num_classes})
    config = ModelConfig(backbone=args.backbone, weights="random",
                         reduction_factor=args.reduction_factor, adapters=args.adapters,
                         cross_attention=not args.no_cross_attention, gating=args.gating)
    model = build_without_weights(config, args.task, head_kwargs)
    print(format_report(model, count_parameters(model)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avpea_ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="parameter counts of a model (no weights needed)")
    params.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name")
    params.add_argument("--reduction-factor", type=int, default=8, help="adapter bottleneck D/d")
    params.add_argument("--task", choices=("avqa", "avel"), default="avqa")
    params.add_argument("--adapters", choices=("both", "audio", "visual", "none"), default="both")
    params.add_argument("--no-cross-attention", action="store_true")
    params.add_argument("--gating", choices=("learned", "open"), default="learned")
    params.add_argument("--question-vocab-size", type=int, default=100,
                        help="AVQA question vocabulary size (the head's embedding rows)")
    params.add_argument("--num-answers", type=int, default=42)
    params.add_argument("--num-classes", type=int, default=28, help="AVE event classes")
    params.set_defaults(run=_params)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
