"""Train AV-PEA on audio-visual captioning (VALOR-32K style) with Ray Train.

    python jobs/avc.py                                    # the demo: synthetic data, tiny ViT + decoder
    python jobs/avc.py --config configs/avc_vit_b16.yaml --num-workers 8 --use-gpu \\
        --storage-path s3://bucket/runs --run-name avc-b16
    ray job submit --working-dir . -- python jobs/avc.py --config ...   # on a Ray cluster

Teacher-forced training of a caption decoder over the AV-PEA tokens; evaluation decodes with
beam search (evaluation.beam_size) and scores BLEU-4, METEOR (Java), ROUGE-L and CIDEr as the
COCO caption toolkit does. Shards come from `python -m sharding.valor` (see jobs/avr.py).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, too

from avpea_ray.cli import run_job  # noqa: E402
from sharding.demo import ensure_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job("avc", __doc__, argv, configs=ROOT / "configs", build_demo_data=ensure_demo_data)


if __name__ == "__main__":
    sys.exit(main())
