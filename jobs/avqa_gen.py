"""Train AV-PEA on MUSIC-AVQA posed as answer generation (the paper's Table 3 AVQA column).

    python jobs/avqa_gen.py                               # the demo: synthetic data, tiny ViT + decoder
    python jobs/avqa_gen.py --config configs/avqa_gen_vit_b16.yaml --num-workers 8 --use-gpu \\
        --storage-path s3://bucket/runs --run-name avqa-gen-b16
    ray job submit --working-dir . -- python jobs/avqa_gen.py --config ...   # on a Ray cluster

The captioning decoder continues `[CLS] question [SEP]` with the answer; answers are scored by
exact match of the normalised string, per question type and group (Avg: the group mean).
Shards: the MUSIC-AVQA shards of `python -m sharding.musicavqa`, as for jobs/avqa.py.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, too

from avpea_ray.cli import run_job  # noqa: E402
from sharding.demo import ensure_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job("avqa_gen", __doc__, argv, configs=ROOT / "configs", build_demo_data=ensure_demo_data)


if __name__ == "__main__":
    sys.exit(main())
