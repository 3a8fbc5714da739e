"""Training on Ray end to end: DDP learns, a killed worker resumes exactly, MLflow (sqlite and
a real `mlflow server`), `ray start --head` + `ray job submit`, and bad input before workers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from avpea_ray.config import ConfigError
from avpea_ray.train.cli import parse_job_args, resolve_config
from avpea_ray.train.launcher import preflight

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PYTHON_BIN = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """A small synthetic MUSIC-AVQA split set, sharded into several shards per split."""
    from sharding import musicavqa, synth

    root = tmp_path_factory.mktemp("avqa")
    release = root / "release"
    synth.main(["--out", str(release), "--videos-train", "128", "--videos-val", "32",
                "--videos-test", "32", "--seconds", "4", "--frame-size", "32", "--seed", "3"])
    out = {}
    for split in ("train", "val", "test"):
        out[split] = str(root / "shards" / split)
        assert musicavqa.main(["--annotations", str(release), "--frames", str(release / "frames"),
                               "--audio", str(release / "audio"), "--out", out[split], "--split", split,
                               "--num-frames", "4", "--image-size", "32", "--max-shard-bytes", "3MiB",
                               "--no-progress"]) == 0
    return out


def _overrides(shards: dict[str, str], storage: Path, **extra) -> list[str]:
    base = {
        "model.backbone": "vit_base_patch16_224", "model.weights": "random", "model.image_size": 32,
        "model.num_frames": 4, "model.backbone_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32},
        "head.hidden": 64, "data.train": shards["train"], "data.val": shards["val"], "data.test": shards["test"],
        "data.batch_size": 4, "data.eval_batch_size": 8, "data.loader_workers": 1, "data.shuffle_buffer": 16,
        "optim.lr": 4e-3, "optim.warmup_steps": 5, "run.storage_path": str(storage),
        "run.cpus_per_worker": 0.5, "run.log_every_steps": 2,
    } | extra
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def _config(shards, storage, **extra):
    """The resolved TrainConfig the job would build from these overrides."""
    return resolve_config(parse_job_args("", _overrides(shards, storage, **extra)), None)[0]


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _ledger(storage: Path, name: str) -> dict[tuple[int, int, int], list[str]]:
    """The batches each rank finally trained on: a batch re-done after a restart replaces the
    copy the crashed attempt wrote."""
    batches = {}
    for file in sorted((storage / name / "ledger").glob("rank*.jsonl")):
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            batches[(entry["epoch"], entry["batch"], entry["rank"])] = entry["ids"]
    return batches


def test_two_worker_ddp_learns_and_tracks(shards, tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    from avpea_ray.train.launcher import run_training

    cfg = _config(shards, tmp_path, **{"run.num_workers": 2, "run.name": "ddp", "optim.epochs": 8})
    summary = run_training(cfg)
    assert summary["majority_acc"] is not None
    assert summary["overall_acc"] > summary["majority_acc"] + 15, summary

    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.reduction_factor"] == "8"
    assert int(run.data.params["params.trainable"]) == summary["parameters"]["trainable"]
    for metric in ("train_loss", "lr", "samples_per_s", "data_wait_s", "val_overall", "val_Audio-Counting",
                   "test_overall", "final_overall"):
        assert metric in run.data.metrics, metric
    assert len(client.get_metric_history(run.info.run_id, "val_overall")) == 8
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "summary.json", "accuracy_per_type.png", "adapters"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapters")} == {
        "adapters/adapter_config.json", "adapters/adapter_model.safetensors"}
    assert Path(summary["checkpoint"], "adapter_model.safetensors").exists()


def test_killed_worker_resumes_mid_epoch_without_repeating_or_skipping(shards, tmp_path, ray_local):
    from avpea_ray.train.launcher import run_training

    common = {"run.num_workers": 2, "optim.epochs": 2, "run.sample_ledger": True,
              "run.checkpoint_every_steps": 4, "data.test": ""}
    clean = run_training(_config(shards, tmp_path, **common, **{"run.name": "clean"}))
    crashed = run_training(_config(shards, tmp_path, **common, **{"run.name": "crashed", "run.fail_at_step": 14,
                                                                   "run.fail_rank": 1}))
    assert (tmp_path / "crashed" / "failure-injected-at-14").exists()  # it did die
    clean_batches, crashed_batches = _ledger(tmp_path, "clean"), _ledger(tmp_path, "crashed")
    steps_per_epoch = max(b for _, b, _ in clean_batches)
    assert 14 % steps_per_epoch > 4  # it died mid-epoch, after a mid-epoch checkpoint (every 4 steps)
    assert crashed_batches == clean_batches
    for epoch in (0, 1):
        ids = [i for (e, _, _), batch in clean_batches.items() if e == epoch for i in batch]
        assert len(ids) == len(set(ids))  # each sample at most once per epoch
    assert crashed["best_val_score"] == pytest.approx(clean["best_val_score"], abs=1e-6)


def test_mlflow_server_and_driver_restart_continue_one_run(shards, tmp_path, ray_local, monkeypatch):
    from mlflow.tracking import MlflowClient

    from avpea_ray.train.launcher import run_training

    port = _free_port()
    server = subprocess.Popen(
        [f"{PYTHON_BIN}/mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        import requests
        for _ in range(120):
            try:
                requests.get(f"{uri}/health", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        first = run_training(_config(shards, tmp_path, **{"run.name": "restart", "optim.epochs": 1,
                                                           "data.test": ""}))
        # The driver comes back (same name and storage) and trains one more epoch.
        second = run_training(_config(shards, tmp_path, **{"run.name": "restart", "optim.epochs": 2,
                                                            "data.test": ""}))
        assert first["mlflow_tracking_uri"] == uri and second["mlflow_run_id"] == first["mlflow_run_id"]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("avpea-ray").experiment_id])
        assert len(runs) == 1
        history = client.get_metric_history(first["mlflow_run_id"], "val_overall")
        assert len(history) == 2  # epoch 0 from the first driver, epoch 1 from the second
        assert {a.path for a in client.list_artifacts(first["mlflow_run_id"])} >= {"config.json", "adapters"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_ray_job_submit_dry_run(shards, tmp_path):
    port, dashboard = _free_port(), _free_port()
    env = os.environ | {"PATH": f"{PYTHON_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    ray = f"{PYTHON_BIN}/ray"
    subprocess.run([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                    "--num-cpus=2", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    try:
        overrides = _overrides(shards, tmp_path, **{"run.name": "submitted"})
        result = subprocess.run(
            [ray, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
             "--", "python", "jobs/avqa.py", "--dry-run", *overrides],
            env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Ray: cluster at" in result.stdout
        assert "dry run ok" in result.stdout
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


@pytest.mark.parametrize("extra,message", [
    ({"model.reduction_factr": 8}, "unknown config key model.reduction_factr"),
    ({"optim.lr": "fast"}, "optim.lr must be a number"),
    ({"model.reduction_factor": 7}, "model.reduction_factor: reduction_factor=7 does not divide"),
    ({"run.storage_path": "/dev/null/runs"}, "run.storage_path '/dev/null/runs' is not writable"),
    ({"run.tracking_uri": "http://127.0.0.1:9"}, "run.tracking_uri: MLflow tracking server"),
    ({"data.val": "/nonexistent/val"}, "data.val"),
])
def test_bad_input_is_refused_before_any_worker(shards, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        preflight(_config(shards, tmp_path, **extra))


def test_job_reports_bad_input_without_traceback(shards, tmp_path):
    result = subprocess.run([sys.executable, "jobs/avqa.py", *_overrides(shards, tmp_path),
                             "model.reduction_factor=5"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: model.reduction_factor" in result.stderr and "Traceback" not in result.stderr
