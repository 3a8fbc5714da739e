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

from avpea_ray.train.cli import DEMO_AVQA, run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("avqa", __doc__, demo=DEMO_AVQA))
