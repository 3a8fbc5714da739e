"""Train AV-PEA on text <-> audio-visual retrieval (VALOR-32K style) with Ray Train.

    python jobs/avr.py                                    # the demo: synthetic data, tiny ViT + text model
    python -m sharding.valor --ids VALOR/desc_train_ids.json --captions VALOR/captions.json \\
        --frames VALOR/frames --audio VALOR/audio --out s3://bucket/avpea/valor/train --split train
    python jobs/avr.py --config configs/avr_vit_b16.yaml --num-workers 8 --use-gpu \\
        --storage-path s3://bucket/runs --run-name avr-b16
    ray job submit --working-dir . -- python jobs/avr.py --config ...   # on a Ray cluster

Symmetric InfoNCE with negatives from every rank; the test split ranks every clip for every
caption (R@1/5/10, median and mean rank, both directions). Running the same --run-name (and
storage path) again resumes that run where it stopped.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, too

from avpea_ray.cli import run_job  # noqa: E402
from sharding.demo import ensure_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job("avr", __doc__, argv, configs=ROOT / "configs", build_demo_data=ensure_demo_data)


if __name__ == "__main__":
    sys.exit(main())
