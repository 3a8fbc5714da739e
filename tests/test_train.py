"""Training on Ray end to end: DDP learns and is tracked, a killed worker resumes exactly, AVE
on object storage, and bad input refused before any worker starts. (A real `mlflow server`
and a killed driver: tests/test_resume.py; AVST's two stages: tests/test_reproduce.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from avpea_ray.config import ConfigError
from avpea_ray.cli import parse_job_args, resolve_config
from avpea_ray.train.preflight import preflight
from tests.ledger import attempts, effective_batches, planned_batches
from tests.toy import train_overrides as _overrides

pytestmark = pytest.mark.slow


def _config(shards, storage, **extra):
    """The resolved TrainConfig the job would build from these overrides."""
    return resolve_config(parse_job_args("", _overrides(shards, storage, **extra)), None)[0]


def test_two_worker_ddp_learns_tracks_and_counts_a_missing_test_shard(ddp_avqa_run, avqa_shards, tmp_path, capsys):
    """One DDP run serves both checks (each Ray Train start takes a while): it learns and is
    tracked, and its test split has a shard missing, which stops the job unless allowed (the
    run allowed it), and is then counted. Its adapters serve tests/test_infer.py too."""
    from mlflow.tracking import MlflowClient

    from avpea_ray.cli import run_job

    run = ddp_avqa_run
    # Not allowed: refused before any worker, naming the shard and the flag.
    args = [*_overrides(avqa_shards | {"test": run.damaged_test}, tmp_path, **{"run.name": "refused"}),
            "--summary-json", str(tmp_path / "summary.json")]
    assert run_job("avqa", "", args) == 2
    err = capsys.readouterr().err
    assert "data.test: 1 of 3 shards are missing" in err and run.lost_url in err and "data.allow_damaged" in err
    assert not (tmp_path / "summary.json").exists()

    summary, out = run.summary, run.out
    assert summary["majority_acc"] is not None and summary["majority_avg"] is not None
    assert summary["overall_acc"] > summary["majority_acc"] + 15, summary
    assert summary["avg_acc"] > summary["majority_avg"] + 15, summary
    groups = [summary["accuracies"][g] for g in ("Audio", "Visual", "Audio-Visual")]
    assert summary["avg_acc"] == pytest.approx(sum(groups) / 3)

    client = MlflowClient(summary["mlflow_tracking_uri"])
    tracked = client.get_run(summary["mlflow_run_id"])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["model.reduction_factor"] == "8"
    assert int(tracked.data.params["params.trainable"]) == summary["parameters"]["trainable"]
    for metric in ("train_loss", "lr", "samples_per_s", "data_wait_s", "val_avg", "val_overall",
                   "val_Audio-Counting", "test_avg", "test_overall", "final_avg", "final_overall"):
        assert metric in tracked.data.metrics, metric
    val_avg = [m.value for m in client.get_metric_history(tracked.info.run_id, "val_avg")]
    assert len(val_avg) == 5  # one validation per epoch
    # The adapters kept are those of the best validation Avg (the paper's headline metric).
    assert summary["best_val_score"] == pytest.approx(max(val_avg))
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"config.json", "summary.json", "accuracy_per_type.png", "adapters"} <= artifacts
    # The best adapters with what `predict` needs besides them: clip settings and the vocabulary.
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "adapters")} == {
        "adapters/adapter_config.json", "adapters/adapter_model.safetensors", "adapters/inputs.json",
        "adapters/vocab.json"}
    assert Path(summary["checkpoint"], "adapter_model.safetensors").exists()

    assert summary["data_damage"]["test_samples_lost"] == run.lost_samples
    assert summary["data_damage"]["test_damaged_shards"] == 1
    assert summary["data_damage"]["train_samples_lost"] == 0
    assert f"test_samples_lost {run.lost_samples}" in out  # the printed table says so
    assert tracked.data.metrics["test_samples_lost"] == run.lost_samples


def test_killed_worker_resumes_mid_epoch_without_repeating_or_skipping(avqa_shards, tmp_path, ray_local):
    from avpea_ray.train.fit import run_training

    common = {"run.num_workers": 2, "optim.epochs": 2, "run.sample_ledger": True, "data.batch_size": 8,
              "run.checkpoint_every_steps": 3, "data.test": ""}
    clean = run_training(_config(avqa_shards, tmp_path, **common, **{"run.name": "clean"}))
    # Rank 1 is killed twice: at step 5, and half-way through uploading its part of step 9's
    # checkpoint. The crashed run uploads asynchronously (`run.checkpoint_upload=async`): step
    # 9's upload is held until rank 1's loop has gone on to step 11, so the kill comes while
    # the upload is in flight and the loop is past it (the clean run uploads synchronously).
    crashed = run_training(_config(avqa_shards, tmp_path, **common, **{
        "run.name": "crashed", "run.fail_at_step": 5, "run.fail_in_checkpoint_at_step": 9, "run.fail_rank": 1,
        "run.checkpoint_upload": "async", "run.hold_upload_at_step": 9}))
    run_dir = tmp_path / "crashed"
    assert (run_dir / "failure-injected-at-5").exists() and (run_dir / "failure-injected-in-checkpoint-at-9").exists()
    # Saving did not stall the steps: they went on while step 9's checkpoint was uploading
    # (synchronously, the hold runs out after 20 s with the loop still at step 9).
    held = json.loads((run_dir / "upload-held-at-9").read_text())
    assert held["loop_step_before"] == 9 and held["loop_step_after"] >= 11, held
    # Both ranks restarted from the step-3 checkpoint, mid-epoch (a restart from scratch, or
    # from the epoch's start, would say 0 here and re-train what the checkpoint holds), then
    # from the epoch-end checkpoint of step 8: step 9's lacks rank 1's file and is skipped.
    for rank, runs in attempts(run_dir).items():
        assert [(a.restored["global_step"], a.restored["batch"]) for a in runs] == [(0, 0), (3, 3), (8, 0)], rank
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    assert {p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")} == registered
    planned = planned_batches(avqa_shards["train"], world_size=2, epochs=2, batch_size=8, loader_workers=1,
                              shuffle_buffer=16)
    assert effective_batches(tmp_path / "clean") == planned
    assert effective_batches(tmp_path / "crashed") == planned  # every sample once, none repeated
    for epoch in (0, 1):
        ids = [i for (e, _, _), batch in planned.items() if e == epoch for i in batch]
        assert len(ids) == len(set(ids))  # each sample at most once per epoch
    assert crashed["best_val_score"] == pytest.approx(clean["best_val_score"], abs=1e-6)
    # The checkpoints fetched to resume from (and the scratch folder of the fresh start) are gone.
    assert not list(ray_local.tmpdir.glob("avpea-resume-*"))


@pytest.mark.parametrize("extra,message", [
    ({"model.reduction_factr": 8}, "unknown config key model.reduction_factr"),
    ({"optim.lr": "fast"}, "optim.lr must be a finite number"),
    ({"model.reduction_factor": 7}, "model.reduction_factor=7 does not divide"),
    ({"run.storage_path": "/dev/null/runs"}, "run.storage_path '/dev/null/runs' is not writable"),
    ({"run.tracking_uri": "http://127.0.0.1:9"}, "run.tracking_uri: MLflow tracking server"),
    ({"data.val": "/nonexistent/val"}, "data.val"),
    ({"model.weights": "missing.safetensors"}, "model.weights: 'missing.safetensors' is not a file"),
])
def test_bad_input_is_refused_before_any_worker(avqa_shards, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        preflight(_config(avqa_shards, tmp_path, **extra))


def test_avel_job_on_object_storage_reports_per_class(tmp_path, ray_local, s3):
    from mlflow.tracking import MlflowClient

    from avpea_ray.train.fit import run_training
    from sharding import ave
    from tests import media

    categories = ["Church bell", "Dog bark", "Male speech, man speaking"]
    rows = [(categories[i % 3], f"clip{i}", "good", i % 4, 10 - i % 3) for i in range(8)]
    layout = media.make_ave(str(tmp_path / "ave"), rows, {"train": list(range(6)), "val": [6, 7]})
    for split in ("train", "val"):
        assert ave.main(["--annotations", layout.annotations, "--splits", layout.splits,
                         "--frames", layout.frames, "--audio", layout.audio, "--out", str(tmp_path / split),
                         "--split", split, "--num-frames", "10", "--image-size", "32", "--no-progress"]) == 0
    cfg = resolve_config(parse_job_args("", [
        *_overrides({"train": str(tmp_path / "train"), "val": str(tmp_path / "val"), "test": ""}, tmp_path,
                    **{"task": "avel", "head.hidden": 32, "data.batch_size": 2,
                       "optim.epochs": 2, "run.name": "ave",
                       "run.storage_path": s3.make_bucket("runs") + "/avpea",
                       "run.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})]), None)[0]
    summary = run_training(cfg)
    assert 0 <= summary["accuracy"] <= 100 and summary["evaluated_on"] == "val"
    # checkpoints (adapters, not the backbone) went to the object store
    assert summary["checkpoint"].startswith("s3://runs/avpea/ave/checkpoint_")
    from avpea_ray.data import storage
    assert storage.exists(summary["checkpoint"] + "/adapter_model.safetensors")
    assert storage.exists(summary["checkpoint"].rsplit("/", 1)[0] + "/train_state.pt")
    assert set(summary["accuracies"]) <= set(categories) | {"background"}
    run = MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert "val_accuracy" in run.data.metrics and "val_background" in run.data.metrics
