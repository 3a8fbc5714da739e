"""`ray start --head` + `ray job submit -- python jobs/avqa.py --dry-run` against a real local
cluster started by the test and stopped again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.toy import free_port, train_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PYTHON_BIN = str(Path(sys.executable).parent)


def test_ray_job_submit_dry_run(avqa_shards, tmp_path):
    port, dashboard = free_port(), free_port()
    home = tmp_path / "home"
    env = os.environ | {"PATH": f"{PYTHON_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
                        "HOME": str(home)}
    ray, address = f"{PYTHON_BIN}/ray", f"--address=http://127.0.0.1:{dashboard}"
    # --block keeps the head in this process group, so the test stops exactly this cluster
    # (`ray stop` would end every Ray process on the machine).
    # Every port free, not Ray's defaults: another Ray on this machine (a developer's, a
    # parallel test run) holding e.g. the job agent's port would leave the jobs API unusable.
    ports = [f"--{flag}={free_port()}" for flag in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}",
                             f"--dashboard-port={dashboard}", *ports, "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # No storage path: the job runs in Ray's temporary copy of the working directory,
        # which Ray deletes; results must go somewhere stable instead.
        overrides = [o for o in train_overrides(avqa_shards, tmp_path, **{"run.name": "submitted"})
                     if not o.startswith("run.storage_path=")]
        for _ in range(90):  # the head answers before its job agent is up (slow on a busy machine)
            result = subprocess.run(
                [ray, "job", "submit", address, "--working-dir", str(REPO),
                 "--", "python", "jobs/avqa.py", "--dry-run", *overrides],
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
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
