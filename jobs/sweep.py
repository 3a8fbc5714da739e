"""Sweep AV-PEA's hyperparameters with Ray Tune over Ray Train, ASHA early stopping, MLflow.

    python jobs/sweep.py                                  # the demo: configs/demo_sweep_avqa.yaml
    python jobs/sweep.py --config configs/sweep_avqa_vit_b16.yaml \\
        --storage-path s3://bucket/avpea/runs --name avqa-b16-sweep
    ray job submit --working-dir . -- python jobs/sweep.py --config ...  # on a Ray cluster

The sweep file is a training config plus a `sweep` section (docs/sweeps.md); any task
trains in it (avqa, avel, avr, avc). Running the same
sweep name (and storage path) again continues the sweep: finished trials are not run again.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, too

from avpea_ray.cli import run_sweep_job  # noqa: E402
from sharding.demo import ensure_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_sweep_job(__doc__, argv, demo_config=ROOT / "configs" / "demo_sweep_avqa.yaml",
                         build_demo_data=ensure_demo_data)


if __name__ == "__main__":
    sys.exit(main())
