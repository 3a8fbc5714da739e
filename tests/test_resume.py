"""Resume after a real kill of the driver: its process group SIGKILLed mid-epoch, the newest
checkpoint left damaged, and the same command run again. The audit compares the sample ledger
(every attempt's lines, never overwritten) with the reader's plan of an uninterrupted run, so a
restart from scratch, a lost batch or a repeated one all fail. (Worker kills, also during a
checkpoint upload: tests/test_train.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ledger import attempts, effective_batches, planned_batches
from tests.toy import train_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _registered(run_dir: Path) -> set[str]:
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    results = snapshot["checkpoint_results"] + [snapshot["latest_checkpoint_result"]]
    return {r["checkpoint_dir_name"] for r in results}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "avpea_checkpoint.json").read_text())


def _wait_for(predicate, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the job ended (exit {process.returncode}) before the test could kill it")
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the run to get there")
        time.sleep(0.2)


def _trained_steps(run_dir: Path) -> int:
    return max((s["global_step"] for runs in attempts(run_dir).values() for a in runs for s in a.steps), default=0)


SETTINGS = {"optim.epochs": 2, "data.batch_size": 8, "data.test": "", "run.sample_ledger": True,
            "run.checkpoint_every_steps": 3, "run.log_every_steps": 1}


def test_driver_sigkill_mid_epoch_then_same_command_resumes_exactly(avqa_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "killed"
    command = [sys.executable, "jobs/avqa.py", *train_overrides(avqa_shards, tmp_path, **SETTINGS),
               "--run-name", "killed", "--summary-json", str(tmp_path / "summary.json")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "first.log", "w")
    # The worker stops at step 8 (once) so that the kill lands there, not wherever a fast
    # machine happens to be.
    job = subprocess.Popen([*command, "run.pause_at_step=8"], cwd=REPO, env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Kill once two mid-epoch checkpoints are registered (steps 3 and 6) and steps 7-8,
        # trained after the second, would be lost.
        def ready() -> bool:
            if not (run_dir / "paused-at-8").exists() or not (run_dir / "checkpoint_manager_snapshot.json").exists():
                return False
            try:
                mids = [f for f in _registered(run_dir) if _manifest(run_dir / f)["progress"]["batches_in_epoch"] > 0]
            except (OSError, ValueError, KeyError):
                return False
            return len(mids) >= 2
        _wait_for(ready, timeout=240, process=job)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and every process it started
        job.wait()
    killed_at = _trained_steps(run_dir)

    # A kill can also leave the newest checkpoint damaged: the resume must use the one before.
    newest, previous = sorted((_manifest(run_dir / f)["progress"]["global_step"], f) for f in _registered(run_dir))[-2:][::-1]
    state = run_dir / newest[1] / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    rerun = subprocess.run([*command, "run.pause_at_step=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    runs = attempts(run_dir)[0]
    assert len(runs) == 2
    assert runs[0].restored["global_step"] == 0
    resumed = runs[1].restored
    assert resumed["global_step"] == previous[0] < killed_at  # the checkpoint before the damaged newest
    assert resumed["batch"] > 0  # mid-epoch, not from an epoch boundary or the start
    planned = planned_batches(avqa_shards["train"], world_size=1, epochs=2, batch_size=8, loader_workers=1,
                              shuffle_buffer=16)
    assert effective_batches(run_dir) == planned  # every planned sample exactly once, in its batch
    for epoch in (0, 1):
        ids = [i for (e, _, _), batch in planned.items() if e == epoch for i in batch]
        assert len(ids) == len(set(ids))

    summary = json.loads((tmp_path / "summary.json").read_text())
    client = MlflowClient(summary["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("avpea-ray")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == sorted(set(steps)) == list(range(1, max(steps) + 1))  # each step once
    assert len(client.get_metric_history(run.info.run_id, "val_overall")) == 2
    folders = {p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")}
    assert folders == _registered(run_dir)  # nothing left behind that Ray does not know
