"""`ray job submit -- python jobs/avqa.py --dry-run` against the session's Ray cluster (started
by `ray start --head`, tests/conftest.py), as users submit to theirs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.toy import train_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PYTHON_BIN = str(Path(sys.executable).parent)


def test_ray_job_submit_dry_run(avqa_shards, tmp_path, ray_local):
    home = tmp_path / "home"
    env = os.environ | {"PATH": f"{PYTHON_BIN}:{os.environ['PATH']}"}
    # No storage path: the job runs in Ray's temporary copy of the working directory,
    # which Ray deletes; results must go somewhere stable instead (~/avpea-runs).
    overrides = [o for o in train_overrides(avqa_shards, tmp_path, **{"run.name": "submitted"})
                 if not o.startswith("run.storage_path=")]
    runtime_env = json.dumps({"env_vars": {"HOME": str(home)}})
    for _ in range(60):  # the head answers before its job agent is up (slow on a busy machine)
        result = subprocess.run(
            [f"{PYTHON_BIN}/ray", "job", "submit", f"--address={ray_local.dashboard}", "--working-dir", str(REPO),
             "--runtime-env-json", runtime_env, "--", "python", "jobs/avqa.py", "--dry-run", *overrides],
            env=env, capture_output=True, text=True, timeout=400)
        not_ready = ("No available agent" in result.stdout + result.stderr
                     or "Connection refused" in result.stdout + result.stderr)
        if result.returncode == 0 or not not_ready:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Ray: cluster at" in result.stdout
    assert "dry run ok" in result.stdout
    assert f"results: {home}/avpea-runs/runs/submitted" in result.stdout, result.stdout[-3000:]
    assert (home / "avpea-runs" / "runs").is_dir()
