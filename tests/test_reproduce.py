"""`reproduce`: planning refuses bad input naming the file, field or flag before anything
runs; `reproduce --demo` end to end through real Ray Tune, Ray Train and MLflow (one parent
run, a child per trial, the tables logged on the parent); a rerun of the same name re-runs
nothing finished; the tables on demand from a partial reproduction."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from avpea_ray.config import ConfigError
from avpea_ray.reproduce.run import ReproRequest, plan_reproduction, read_shard_locations, select_rows
from avpea_ray.reproduce.paper import load_paper

ROOT = Path(__file__).resolve().parents[1]
ROWS, _ = load_paper()
# The session's 32 px synthetic shards: the tiny ViT of tests/toy.py, one short epoch.
TINY = {"model.backbone_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32},
        "data.batch_size": 16, "data.eval_batch_size": 32, "data.shuffle_buffer": 16,
        "optim.epochs": 1, "optim.warmup_steps": 2, "run.cpus_per_worker": 0.5, "run.log_every_steps": 4}


def _overrides(tmp_path: Path, **extra) -> list[str]:
    values = TINY | {"run.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"} | extra
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _shards_yaml(tmp_path: Path, **datasets) -> str:
    path = tmp_path / "shards.yaml"
    path.write_text(yaml.safe_dump(datasets))
    return str(path)


def test_only_selects_tables_and_names_unknown_ones():
    assert {r.table for r in select_rows(ROWS, ["table1", "table4"])} == {"Table 1", "Table 4"}
    assert len(select_rows(ROWS, [])) == 11
    assert [r.id for r in select_rows(ROWS, ["table4_none", "table1"])] == [
        "table1_avel_b16", "table1_avel_l16", "table4_none"]
    with pytest.raises(ConfigError, match=r"--only: unknown table\(s\) or row\(s\) \['tabel2'\]"):
        select_rows(ROWS, ["tabel2"])


@pytest.mark.parametrize("content,message", [
    ({"musicavqa": {"train": "a", "val": "b"}}, r"shards.yaml: musicavqa.test: missing shard URL"),
    ({"ave": {"train": "a", "val": "b", "test": "c"}}, r"shards.yaml: musicavqa: missing"),
    ({"musicavqa": {"train": "a", "val": "b", "test": "c"}, "kinetics": {}}, r"unknown dataset\(s\) \['kinetics'\]"),
])
def test_shard_locations_errors_name_the_file_and_field(tmp_path, content, message):
    path = _shards_yaml(tmp_path, **content)
    with pytest.raises(ConfigError, match=message):
        read_shard_locations(path, {"musicavqa"})


def test_missing_inputs_are_refused_naming_the_flag(tmp_path):
    request = ReproRequest(configs=ROOT / "configs", storage_path=str(tmp_path))
    with pytest.raises(ConfigError, match="--shards: a YAML naming"):
        plan_reproduction(request)
    with pytest.raises(ConfigError, match="--shards: .*nowhere.yaml does not exist"):
        plan_reproduction(ReproRequest(configs=ROOT / "configs", storage_path=str(tmp_path),
                                       shards=str(tmp_path / "nowhere.yaml")))
    with pytest.raises(ConfigError, match="--seeds must be >= 1"):
        plan_reproduction(ReproRequest(configs=ROOT / "configs", storage_path=str(tmp_path), seeds=0))


def test_a_shard_url_that_holds_no_shards_is_refused_naming_the_row(tmp_path):
    shards = _shards_yaml(tmp_path, musicavqa={s: str(tmp_path / "none" / s) for s in ("train", "val", "test")})
    request = ReproRequest(configs=ROOT / "configs", storage_path=str(tmp_path), shards=shards, only=["table2"])
    with pytest.raises(ConfigError, match=r"row table2_avqa_b16: .*data.train"):
        plan_reproduction(request)


@pytest.mark.slow  # builds the session's shards (no Ray)
def test_every_row_plans_in_demo_mode_with_its_seed_placement_and_shards(avqa_shards, valor_shards, tmp_path):
    """Tables 2 and 3 (the session has MUSIC-AVQA and VALOR-32K shards) x 2 seeds: each trial
    its task, its shard URLs, its seed and a stable run name; Table 4's placements as set."""
    shards = _shards_yaml(tmp_path, musicavqa=avqa_shards, valor32k=valor_shards)
    request = ReproRequest(configs=ROOT / "configs", storage_path=str(tmp_path / "runs"), shards=shards,
                           only=["table2", "table3"], seeds=2, demo=True,
                           overrides=_overrides(tmp_path, **{"evaluation.meteor": "never"}))
    plan = plan_reproduction(request)
    assert [t.key for t in plan.trials] == [f"{r}-s{s}" for r in ("table2_avqa_b16", "table2_avqa_l16", "table3_avr",
                                                                  "table3_avc", "table3_avqa_gen") for s in (0, 1)]
    for trial in plan.trials:
        assert trial.cfg.task == trial.row.task and trial.cfg.data.seed == trial.seed
        assert trial.cfg.run.name == f"avpea-paper-{trial.row.id}-s{trial.seed}"
        expected = avqa_shards if trial.row.task.startswith("avqa") else valor_shards
        assert trial.cfg.data.test == expected["test"]
        # AVQA's QA stage follows AVST's grounding stage, whose adapters the trial hands on.
        if trial.row.task == "avqa":
            assert trial.grounding.head.stage == "grounding" and trial.cfg.head.stage == "qa"
            assert trial.grounding.run.name == trial.cfg.run.name + "-grounding"
            assert trial.grounding.data.seed == trial.seed and trial.cfg.model.init_from == ""
        else:
            assert trial.grounding is None
    assert plan.path == str(tmp_path / "runs" / "avpea-paper")


@pytest.fixture(scope="module")
def tiny_avqa_shards(tmp_path_factory) -> dict[str, str]:
    """A MUSIC-AVQA-layout split set a quarter of the session's (a trial's steps are few)."""
    from sharding import musicavqa, synth

    root = tmp_path_factory.mktemp("tiny-avqa")
    synth.main(["--out", str(root / "release"), "--videos-train", "32", "--videos-val", "8",
                "--videos-test", "8", "--seconds", "4", "--frame-size", "32", "--seed", "4"])
    out = {}
    for split in ("train", "val", "test"):
        out[split] = str(root / "shards" / split)
        assert musicavqa.main(["--annotations", str(root / "release"), "--frames", str(root / "release/frames"),
                               "--audio", str(root / "release/audio"), "--out", out[split], "--split", split,
                               "--num-frames", "2", "--image-size", "32", "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_demo_reproduction_end_to_end_then_a_rerun_runs_nothing(tiny_avqa_shards, tmp_path, ray_local, capsys):
    """A row on the MUSIC-AVQA shards at toy size as a Tune trial, MLflow children under one
    parent: Table 2's AVQA ViT-B/16 (AVST's grounding stage, then QA started from its best
    adapters; the generative AVQA task runs end to end in tests/test_avqa_gen.py); the tables
    written and logged; then the same command again: nothing re-run, the same records, the
    same parent run; then the tables on demand."""
    from mlflow.tracking import MlflowClient

    from avpea_ray.cli import run_reproduce_job

    shards = _shards_yaml(tmp_path, musicavqa=tiny_avqa_shards)
    storage_path = tmp_path / "runs"
    argv = ["--demo", "--shards", shards, "--storage-path", str(storage_path), "--name", "repro-demo",
            "--only", "table2_avqa_b16", *_overrides(tmp_path, **{"head.hidden": 32})]
    first_json, again_json = tmp_path / "first.json", tmp_path / "again.json"
    assert run_reproduce_job("", [*argv, "--summary-json", str(first_json)], configs=ROOT / "configs") == 0
    first = json.loads(first_json.read_text())
    assert first["ran"] == ["table2_avqa_b16-s0"] and not first["failed"]
    folder = storage_path / "repro-demo"
    records = {p.name: p.read_bytes() for p in (folder / "trials").iterdir()}
    assert sorted(records) == ["table2_avqa_b16-s0.json"]

    tables = json.loads((folder / "paper_tables.json").read_text())
    rows = {r["id"]: r for r in tables["rows"]}
    b16 = rows["table2_avqa_b16"]
    assert tables["demo"] and b16["status"] == "measured" and b16["columns"]["Avg"]["paper"] == 74.90
    group_mean = sum(b16["columns"][c]["measured"] for c in ("Audio", "Visual", "Audio-visual")) / 3
    assert b16["columns"]["Avg"]["measured"] == pytest.approx(group_mean)
    assert b16["params_m"]["trainable"] > 0 and rows["table1_avel_b16"]["status"] == "not run"
    md = (folder / "paper_tables.md").read_text()
    assert "say nothing about the paper's" in md and "AVQA+AV-PEA, ViT-B/16 (measured)" in md
    assert (folder / "paper_tables.png").stat().st_size > 1000

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(first["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((c.data.tags["avpea.row"], c.data.tags["avpea.stage"]) for c in children) == [
        ("table2_avqa_b16", "final"), ("table2_avqa_b16", "grounding")]
    qa = next(c for c in children if c.data.tags["avpea.stage"] == "final" and c.data.tags["avpea.row"] == "table2_avqa_b16")
    assert qa.data.params["model.init_from"].endswith("repro-demo-table2_avqa_b16-s0-grounding/best_adapters")
    _assert_qa_started_from_the_grounding_stage(children, qa, tiny_avqa_shards, tmp_path)
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "paper_tables")} == {
        "paper_tables/paper_tables.json", "paper_tables/paper_tables.md", "paper_tables/paper_tables.png"}
    assert parent.data.metrics["table2_avqa_b16.Avg"] == pytest.approx(b16["columns"]["Avg"]["measured"])

    # The same command again: nothing re-run, no new child run, the records untouched.
    capsys.readouterr()
    assert run_reproduce_job("", [*argv, "--summary-json", str(again_json)], configs=ROOT / "configs") == 0
    again = json.loads(again_json.read_text())
    assert again["ran"] == [] and again["finished_before"] == first["ran"]
    assert again["parent_run_id"] == first["parent_run_id"]
    assert client.get_run(first["parent_run_id"]).info.status == "FINISHED"
    assert {p.name: p.read_bytes() for p in (folder / "trials").iterdir()} == records
    assert len(client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 2
    assert "1 finished before" in capsys.readouterr().out

    # On demand, from what finished so far (Table 1 and 4 never ran): the same tables.
    (folder / "paper_tables.json").unlink()
    assert run_reproduce_job("", [*argv, "--tables-only"], configs=ROOT / "configs") == 0
    assert json.loads((folder / "paper_tables.json").read_text())["rows"] == tables["rows"]


def _assert_qa_started_from_the_grounding_stage(children, qa, shards, tmp_path) -> None:
    """AVST's recipe: the grounding stage is the match task alone, scored on match accuracy,
    its best adapters published at a stable path; the QA stage's workers start from them
    (every saved tensor; the QA modules fresh: tests/test_tasks.py checks the values); a QA
    stage of another width is refused before any worker."""
    from safetensors.torch import load_file

    from avpea_ray.cli import parse_job_args, resolve_config
    from avpea_ray.model.adapter_io import CONFIG_NAME, WEIGHTS_NAME
    from avpea_ray.train.preflight import preflight
    from tests.toy import train_overrides

    grounding = next(c for c in children if c.data.tags["avpea.stage"] == "grounding")
    assert {k for k in grounding.data.metrics if k.startswith("final_")} == {"final_match_acc"}
    assert "val_match_acc" in grounding.data.metrics and "val_avg" not in grounding.data.metrics
    best = Path(qa.data.params["model.init_from"])
    assert (best / CONFIG_NAME).is_file()
    assert qa.data.tags["avpea.init_from"] == str(best)
    assert int(qa.data.tags["avpea.init_from.tensors"]) == len(load_file(str(best / WEIGHTS_NAME)))
    assert qa.data.tags["avpea.init_from.fresh"] == (
        "answer_classifier, audio_temporal, fusion, question_encoder, visual_temporal")

    wider = train_overrides(shards, tmp_path, **{"model.init_from": str(best), "head.hidden": 64})
    with pytest.raises(ConfigError, match="model.init_from: .* does not fit this model: head.hidden: saved 32, model 64"):
        preflight(resolve_config(parse_job_args("", wider), None)[0])


def _finished_record(trial, avg: float) -> dict:
    """What a finished trial publishes (run.py's run_trial), written by hand."""
    from avpea_ray.config import to_dict

    groups = {"Audio": avg + 3, "Visual": avg, "Audio-Visual": avg - 3, "avg": avg, "overall": avg - 1}
    return {"row": trial.row.id, "seed": trial.seed, "status": "finished", "metrics": groups,
            "parameters": trial.parameters, "seconds": 10.0, "gpus": 0, "mlflow_run_id": None,
            "config": to_dict(trial.cfg)}


def _tiny_request(tmp_path, shards_yaml, **extra) -> ReproRequest:
    return ReproRequest(configs=ROOT / "configs", storage_path=str(tmp_path / "runs"), shards=shards_yaml,
                        only=["table2"], demo=True, overrides=_overrides(tmp_path, **{"head.hidden": 32}) +
                        [f"{k}={json.dumps(v)}" for k, v in extra.items()])


def test_finished_trials_are_not_run_again_and_tables_come_from_their_records(tiny_avqa_shards, tmp_path,
                                                                             monkeypatch):
    """Both Table 2 trials have records: run_reproduction starts no trial (Ray is not even
    started: here that fails the test) and writes the tables from the records; with one record
    the tables on demand show the other row not run."""
    from avpea_ray.data import storage
    from avpea_ray.reproduce import run
    from avpea_ray.reproduce.run import record_url, run_reproduction

    def no_ray():
        raise AssertionError("a trial was started: Ray initialised")
    monkeypatch.setattr(run, "init_ray", no_ray)

    plan = plan_reproduction(_tiny_request(tmp_path, _shards_yaml(tmp_path, musicavqa=tiny_avqa_shards)))
    b16, l16 = plan.trials
    storage.atomic_write_bytes(record_url(plan, b16.key), json.dumps(_finished_record(b16, 60.0)).encode())
    partial = run_reproduction(plan, tables_only=True)
    assert partial["ran"] == [] and partial["finished_before"] == [b16.key] and partial["not_run"] == [l16.key]
    rows = {r["id"]: r for r in partial["tables"]["rows"]}
    assert rows["table2_avqa_b16"]["columns"]["Avg"]["measured"] == pytest.approx(60.0)
    assert rows["table2_avqa_l16"]["status"] == "not run"

    storage.atomic_write_bytes(record_url(plan, l16.key), json.dumps(_finished_record(l16, 50.0)).encode())
    summary = run_reproduction(plan)  # would start Ray and fail here if it ran anything
    assert summary["ran"] == [] and summary["finished_before"] == [b16.key, l16.key]
    assert json.loads((Path(plan.path) / "paper_tables.json").read_text())["rows"][3]["columns"]["Avg"][
        "measured"] == pytest.approx(50.0)


def test_a_rerun_with_other_settings_under_the_same_name_is_refused(tiny_avqa_shards, tmp_path):
    from avpea_ray.data import storage
    from avpea_ray.reproduce.run import record_url, run_reproduction

    shards = _shards_yaml(tmp_path, musicavqa=tiny_avqa_shards)
    plan = plan_reproduction(_tiny_request(tmp_path, shards))
    for trial in plan.trials:
        storage.atomic_write_bytes(record_url(plan, trial.key), json.dumps(_finished_record(trial, 60.0)).encode())
    changed = plan_reproduction(_tiny_request(tmp_path, shards, **{"optim.epochs": 2}))
    with pytest.raises(ConfigError, match=r"--name avpea-paper: trial table2_avqa_b16-s0 finished with other "
                                          r"settings \(optim.epochs\)"):
        run_reproduction(changed)
    # Where it runs may change (more workers on a bigger cluster): still the same trials.
    moved = plan_reproduction(_tiny_request(tmp_path, shards, **{"run.num_workers": 2}))
    assert run_reproduction(moved, tables_only=True)["finished_before"] == [t.key for t in plan.trials]
