"""Retrieval (AVR) and captioning (AVC) end to end on local Ray: synthetic VALOR-style shards ->
the jobs' command lines -> Ray Train (2 DDP workers for retrieval) -> MLflow, each beating its
trivial baseline and selecting on its primary metric (what a sweep trial reports as val_score:
the loop computes it the same way for every task, and tests/test_sweep.py runs trials end to
end); a resume; bad text-model input refused before any worker starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from avpea_ray.config import ConfigError
from avpea_ray.cli import parse_job_args, resolve_config
from avpea_ray.train.preflight import preflight
from tests.toy import TINY_TEXT, train_overrides

pytestmark = pytest.mark.slow

AVR_HEAD = {"head.text_model": "random", "head.text_config": TINY_TEXT | {"max_position_embeddings": 32},
            "head.embed_dim": 32}
AVC_HEAD = {"head.text_model": "random", "head.hidden": 64, "head.layers": 2, "head.num_heads": 4}


def _overrides(shards, storage, task: str, **extra) -> list[str]:
    head = AVR_HEAD if task == "avr" else AVC_HEAD
    overrides = train_overrides(shards, storage, **({"task": task} | head | extra))
    return [o for o in overrides if not o.startswith("head.hidden=")] if task == "avr" else overrides


def _config(shards, storage, task, **extra):
    return resolve_config(parse_job_args("", _overrides(shards, storage, task, **extra)), None)[0]


def _run_job(task: str, argv: list[str], summary_json: Path) -> dict:
    """`python jobs/<task>.py ARGV --summary-json FILE`, in this process: on the test's local
    Ray (the job joins an initialised Ray, as under `ray job submit`)."""
    from avpea_ray.cli import run_job

    assert run_job(task, "", [*argv, "--summary-json", str(summary_json)]) == 0
    return json.loads(summary_json.read_text())


def _assert_selected_on_primary_metric(client, summary: dict) -> None:
    """val_score (what checkpoints and sweeps select on) is the best epoch's primary metric."""
    from avpea_ray.tasks import TASKS

    primary = TASKS[summary["task"]].primary_metric.replace("@", "_")
    history = client.get_metric_history(summary["mlflow_run_id"], f"val_{primary}")
    assert summary["best_val_score"] == pytest.approx(max(m.value for m in history))


def test_two_worker_retrieval_beats_chance_and_tracks(valor_shards, tmp_path, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    summary = _run_job("avr", [*_overrides(valor_shards, tmp_path, "avr", **{
        "optim.epochs": 20, "data.batch_size": 8, "optim.lr": 3e-3}), "--num-workers", "2", "--run-name", "avr"],
        tmp_path / "avr.json")
    assert "text->video R@1/5/10" in capsys.readouterr().out  # the job's line against chance
    metrics = summary["metrics"]
    assert metrics["num_videos"] == 24 and metrics["num_captions"] > 24  # the whole test split, every caption
    assert metrics["t2v_R@5"] > metrics["chance_R@5"] + 15, metrics
    assert metrics["v2t_R@5"] > metrics["chance_R@5"] + 10, metrics  # 24 clip queries: coarser
    assert metrics["t2v_MedR"] < 12  # chance: half of the 24 clips

    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # MLflow metric names cannot hold "@": R@k is logged as R_k.
    for metric in ("train_loss", "val_t2v_R_1", "val_t2v_Rsum", "test_t2v_R_10", "test_v2t_MedR", "final_t2v_R_5"):
        assert metric in run.data.metrics, metric
    _assert_selected_on_primary_metric(client, summary)
    best = Path(summary["checkpoint"])
    assert (best / "adapter_model.safetensors").exists() and (best / "tokenizer" / "tokenizer.json").exists()


def test_captioning_beats_captions_of_other_clips(valor_shards, tmp_path, ray_local):
    argv = [*_overrides(valor_shards, tmp_path, "avc", **{"optim.epochs": 12, "data.batch_size": 8,
                                                          "optim.lr": 6e-3, "evaluation.beam_size": 2}),
            "--run-name", "avc"]
    summary = _run_job("avc", argv, tmp_path / "avc.json")
    metrics = summary["metrics"]
    for name in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert name in metrics, name  # METEOR (Java) on the test split
    assert metrics["CIDEr"] > metrics["baseline_CIDEr"] + 10, metrics
    assert metrics["BLEU-4"] > metrics["baseline_BLEU-4"], metrics
    from mlflow.tracking import MlflowClient
    _assert_selected_on_primary_metric(MlflowClient(summary["mlflow_tracking_uri"]), summary)

    # The same run again resumes from its last checkpoint: nothing left to train, the same
    # MLflow run, and the restored best adapters decode the same captions. (Without METEOR's
    # JVM this time: an evaluation setting is not a change of model or data.)
    again = _run_job("avc", [*argv, 'evaluation.meteor="never"'], tmp_path / "again.json")
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert again["metrics"]["CIDEr"] == pytest.approx(metrics["CIDEr"])


@pytest.mark.parametrize("extra,message", [
    ({"head.text_model": "/nonexistent/bert"}, "head.text_model"),
    ({"data.vocab": "/nonexistent/vocab.txt"}, "vocab.txt"),
    ({"head.text_config": {"hidden_size": 30, "num_attention_heads": 4}}, "head.text_config"),
    ({"head.no_such_option": 1}, "unknown config key head.no_such_option"),
    ({"data.max_caption_tokens": 40}, "data.max_caption_tokens=40 but the text model has only 32 positions"),
])
def test_bad_text_model_input_is_refused_before_workers_start(valor_shards, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):  # a head typo already when the config resolves
        preflight(_config(valor_shards, tmp_path, "avr", **extra))


def test_task_and_shards_must_match(valor_shards, avqa_shards, tmp_path):
    cfg = _config(avqa_shards, tmp_path, "avr")
    with pytest.raises(ConfigError, match="shards hold dataset 'musicavqa', not what task 'avr' trains on"):
        preflight(cfg)
