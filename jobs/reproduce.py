"""Reproduce the AV-PEA paper's Tables 1-4: every row a Ray Tune trial over the trainer, one
MLflow parent run with a child run per trial, the tables written back beside the paper's.

    python jobs/reproduce.py --shards shards.yaml --storage-path s3://bucket/avpea/runs \\
        run.num_workers=8 run.use_gpu=true                   # every row of the paper
    python jobs/reproduce.py --shards shards.yaml --storage-path ... --only table1,table4 --seeds 3
    python jobs/reproduce.py --demo                          # every row at toy size, synthetic data
    python jobs/reproduce.py --demo --tables-only            # the tables from what finished so far
    ray job submit --working-dir . -- python jobs/reproduce.py --shards ...   # on a Ray cluster

shards.yaml names each dataset's shard URLs (from `avpea-ray shard ...`):

    ave:       {train: s3://.../ave/train, val: s3://.../ave/val, test: s3://.../ave/test}
    musicavqa: {train: ..., val: ..., test: ...}
    valor32k:  {train: ..., val: ..., test: ...}

The same --name (and --storage-path) again re-runs nothing finished and resumes the rest.
Writes paper_tables.md, paper_tables.json and paper_tables.png under <storage-path>/<name>/.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, too

from avpea_ray.cli import run_reproduce_job  # noqa: E402
from sharding.demo import ensure_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_reproduce_job(__doc__, argv, configs=ROOT / "configs", build_demo_data=ensure_demo_data)


if __name__ == "__main__":
    sys.exit(main())
