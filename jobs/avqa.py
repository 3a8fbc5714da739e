"""Train AV-PEA on audio-visual question answering (MUSIC-AVQA) with Ray Train.

    python jobs/avqa.py                                   # the demo: configs/demo_avqa.yaml
    python jobs/avqa.py --config configs/avqa_vit_b16.yaml --num-workers 8 --use-gpu \\
        --storage-path s3://bucket/runs --run-name avqa-b16
    ray job submit --working-dir . -- python jobs/avqa.py --config ... # on a Ray cluster

Running the same --run-name (and storage path) again resumes that run where it stopped.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, too

from avpea_ray.cli import run_job  # noqa: E402
from sharding.demo import ensure_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job("avqa", __doc__, argv, configs=ROOT / "configs", build_demo_data=ensure_demo_data)


if __name__ == "__main__":
    sys.exit(main())
