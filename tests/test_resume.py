"""Resume after a real kill of the driver: its process group SIGKILLed mid-epoch, the newest
checkpoint left damaged, and the same command run again. The audit compares the sample ledger
(every attempt's lines, never overwritten) with the reader's plan of an uninterrupted run, so a
restart from scratch, a lost batch or a repeated one all fail. Both drivers track into a real
`mlflow server` (a token in its URI), which must hold one run continued across the kill.
(Worker kills, also during a checkpoint upload: tests/test_train.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.ledger import attempts, effective_batches, planned_batches
from tests.toy import free_port, mlflow_server, train_overrides

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
            "run.checkpoint_every_steps": 3, "run.log_every_steps": 1, "run.system_metrics_every_s": 1}


def test_driver_sigkill_mid_epoch_then_same_command_resumes_exactly(avqa_shards, tmp_path, monkeypatch):
    # A short Ray folder of its own (Ray's unix sockets live under it; their paths are limited).
    with mlflow_server(tmp_path) as url, tempfile.TemporaryDirectory(prefix="avpea-ray-", dir="/tmp") as ray_tmp:
        _kill_and_resume(avqa_shards, tmp_path, monkeypatch, url, Path(ray_tmp))


def _kill_and_resume(avqa_shards, tmp_path, monkeypatch, url: str, ray_tmp: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "killed"
    overrides = train_overrides(avqa_shards, tmp_path, **SETTINGS)
    command = [sys.executable, "jobs/avqa.py", *overrides, "--run-name", "killed",
               "--summary-json", str(tmp_path / "summary.json")]
    # Its own local Ray (the embedded default: a laptop's job killed with everything it
    # started), and a token in the tracking URI, as users put it there.
    token_uri = url.replace("http://", "http://avpea:tok3n@")
    # Ray's folder holds a `ray_current_cluster` naming a cluster long gone, as a laptop's does
    # after a `ray start` cluster died: the embedded Ray's actors must not follow it (Ray Train's
    # placement-group cleaner used to time out on it and print a traceback).
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "MLFLOW_TRACKING_URI": token_uri, "RAY_TMPDIR": str(ray_tmp)}
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

    # The same command (an evaluation batch size may change: it changes no checkpoint).
    rerun = subprocess.run([*command, "run.pause_at_step=8", "data.eval_batch_size=16"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    console = rerun.stdout + rerun.stderr
    # Ray Train logs one warning with a traceback when its autoscaling coordinator takes over 5 s
    # to answer, on an overloaded machine ("safe to ignore", in its own words); any other
    # traceback fails this.
    assert console.count("Traceback") == console.count("Failed to send resource request"), console[-6000:]
    assert "Reporting training result" not in console, console[-6000:]
    assert "PreemptionWatcher" not in console, console[-6000:]  # Ray's known noise, left out

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
    assert summary["mlflow_tracking_uri"] == url.replace("http://", "http://***@")
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("avpea-ray")
    (run,) = client.search_runs([experiment.experiment_id])  # one run, continued by the second driver
    assert run.info.status == "FINISHED" and run.info.run_id == summary["mlflow_run_id"]
    assert "tok3n" not in json.dumps(run.data.params) + json.dumps(summary)
    assert run.data.tags["avpea.changed.data.eval_batch_size"] == "8 -> 16"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json", "adapters"}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == sorted(set(steps)) == list(range(1, max(steps) + 1))  # each step once
    assert len(client.get_metric_history(run.info.run_id, "val_overall")) == 2
    # The node's system metrics, sampled by both attempts into the one run, steps continued.
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        history = client.get_metric_history(run.info.run_id, f"system/node0/{name}")
        steps = sorted(m.step for m in history)
        assert len(history) >= 2 and steps == sorted(set(steps)), (name, steps)
    assert float(run.data.params["params.trainable_percent"]) > 0
    folders = {p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")}
    assert folders == _registered(run_dir)  # nothing left behind that Ray does not know

    # A changed model is refused before anything starts: exit 2, the finished run untouched.
    from avpea_ray.cli import run_job

    monkeypatch.setenv("MLFLOW_TRACKING_URI", token_uri)
    assert run_job("avqa", "", [*overrides, "--run-name", "killed", "model.reduction_factor=16"]) == 2
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
