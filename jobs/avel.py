"""Train AV-PEA on audio-visual event localisation (AVE) with Ray Train.

    python -m sharding.ave --annotations AVE/Annotations.txt --splits AVE --videos AVE/videos \\
        --out s3://bucket/avpea/ave/train --split train             # (and val, test)
    python jobs/avel.py                                   # the demo: configs/demo_avel.yaml
    python jobs/avel.py --config configs/avel_vit_b16.yaml --num-workers 8 --use-gpu \\
        --storage-path s3://bucket/runs --run-name avel-b16
    ray job submit --working-dir . -- python jobs/avel.py --config ...   # on a Ray cluster

Running the same --run-name (and storage path) again resumes that run where it stopped.
Scores follow the CMBS rule; the test score is from the epoch chosen on validation.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, too

from avpea_ray.cli import run_job  # noqa: E402
from sharding.demo import ensure_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job("avel", __doc__, argv, configs=ROOT / "configs", build_demo_data=ensure_demo_data)


if __name__ == "__main__":
    sys.exit(main())
