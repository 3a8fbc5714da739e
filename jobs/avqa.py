"""Train AV-PEA on audio-visual question answering (MUSIC-AVQA) with Ray Train.

    python jobs/avqa.py                                   # the demo: synthetic data, tiny ViT, local Ray
    python jobs/avqa.py --config configs/avqa_vit_b16.yaml --num-workers 8 --use-gpu \\
        --storage-path s3://bucket/runs --run-name avqa-b16
    ray job submit --working-dir . -- python jobs/avqa.py --config ... # on a Ray cluster

Running the same --run-name (and storage path) again resumes that run where it stopped.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from avpea_ray.config import ConfigError  # noqa: E402
from avpea_ray.train.cli import (DEMO_AVQA, ensure_demo_data, fail, parse_job_args,  # noqa: E402
                                 report, resolve_config)
from avpea_ray.train.launcher import run_training  # noqa: E402


def main(argv=None) -> int:
    args = parse_job_args(__doc__, argv)
    try:
        cfg, uses_demo = resolve_config(args, DEMO_AVQA)
        if cfg.task != "avqa":
            raise ConfigError(f"task: jobs/avqa.py trains task 'avqa', the config says {cfg.task!r}")
        if uses_demo:
            print("demo mode: synthetic MUSIC-AVQA-layout data, a tiny random-weight ViT, local "
                  "Ray, local shards and a local MLflow store (pass --config for real runs)")
            ensure_demo_data(cfg.model.image_size)
        summary = run_training(cfg, dry_run=args.dry_run)
    except ConfigError as err:
        return fail(err)

    report(summary, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
