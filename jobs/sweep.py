"""Sweep AV-PEA's hyperparameters with Ray Tune over Ray Train, ASHA early stopping, MLflow.

    python jobs/sweep.py                                  # the demo: 12 trials, tiny ViT, local Ray
    python jobs/sweep.py --config configs/sweep_avqa_vit_b16.yaml \\
        --storage-path s3://bucket/avpea/runs --name avqa-b16-sweep
    ray job submit --working-dir . -- python jobs/sweep.py --config ...  # on a Ray cluster

The sweep file is a training config plus a `sweep` section (docs/sweeps.md); any task
trains in it (avqa, avel, avr, avc; configs/sweep_avr_demo.yaml sweeps retrieval). Running the same
sweep name (and storage path) again continues the sweep: finished trials are not run again.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from avpea_ray.config import ConfigError  # noqa: E402
from avpea_ray.train.cli import (DEMO_LAYOUT, DEMO_NOTICE, DEMO_TRAIN_SHARDS,  # noqa: E402
                                 ensure_demo_data, fail)
from avpea_ray.tune.config import DEMO_SWEEP, load_sweep_config  # noqa: E402
from avpea_ray.tune.sweep import parse_sweep_args, report_sweep, run_sweep, sweep_flags  # noqa: E402


def main(argv=None) -> int:
    args = parse_sweep_args(__doc__, argv)
    try:
        cfg, sweep = load_sweep_config(args.config, args.overrides, values=sweep_flags(args),
                                       base=None if args.config else DEMO_SWEEP)
        if cfg.data.train in DEMO_TRAIN_SHARDS:  # the demo sweep, or a sweep file over demo data
            print(DEMO_NOTICE.format(layout=DEMO_LAYOUT[cfg.task]))
            ensure_demo_data(cfg.model.image_size, cfg.task)
        summary = run_sweep(cfg, sweep)
    except ConfigError as err:
        return fail(err)

    report_sweep(summary, args.summary_json)
    return 1 if summary["num_errors"] or summary["num_unfinished"] else 0


if __name__ == "__main__":
    sys.exit(main())
