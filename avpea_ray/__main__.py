"""`python -m avpea_ray <command>`: small tools around the library.

    params   build a model without weights and print its parameter counts
             python -m avpea_ray params --task avel --reduction-factor 16 head.hidden=512
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from .config import ConfigError, from_dict, merge, parse_override
from .model.config import ModelConfig
from .tasks import TASKS, build_model, get_task


def _params(args: argparse.Namespace) -> int:
    from .model.params import count_parameters, format_report

    task = get_task(args.task)
    head: dict = {}
    for text in args.head:
        path, value = parse_override(text)
        if path[0] != "head":
            raise ConfigError(f"{text!r}: only head.* settings are taken here")
        merge(head, path[1:], value)
    head_args = task.reference_head_args | asdict(from_dict(task.head_config, head, "head."))
    config = ModelConfig(backbone=args.backbone, weights="random",
                         reduction_factor=args.reduction_factor, adapters=args.adapters,
                         cross_attention=not args.no_cross_attention, gating=args.gating)
    model = build_model(config, args.task, head_args, meta=True)
    print(format_report(model, count_parameters(model)))
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m avpea_ray") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="parameter counts of a model (no weights needed)")
    params.add_argument("head", nargs="*", metavar="head.key=value", help="head settings")
    params.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name")
    params.add_argument("--reduction-factor", type=int, default=8, help="adapter bottleneck D/d")
    params.add_argument("--task", choices=sorted(TASKS), default="avqa")
    params.add_argument("--adapters", choices=("both", "audio", "visual", "none"), default="both")
    params.add_argument("--no-cross-attention", action="store_true")
    params.add_argument("--gating", choices=("learned", "open"), default="learned")
    params.set_defaults(run=_params)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
