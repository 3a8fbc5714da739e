"""Sweeps: Ray Tune over Ray Train V2 with ASHA, MLflow parent/child runs, the summary files,
resume, and bad sweep configs refused before any trial starts.

The end-to-end sweep (2 trials of the tiny ViT, one after the other) is built so that ASHA
must stop a trial: max_t 2 epochs, grace_period 1, asha_reduction_factor 2, and a variant whose
learning rate (1e-6) leaves it far behind the first trial at the first rung.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from avpea_ray.config import ConfigError, merge, parse_override
from avpea_ray.config import to_dict
from avpea_ray.tasks import TASKS, build_model
from avpea_ray.tune.config import discrete_points, load_sweep_config, trial_config
from avpea_ray.tune.plan import count_trials, prepare_sweep
from avpea_ray.tune.ray_workarounds import ResumableASHA
from avpea_ray.tune.sweep import make_scheduler, max_concurrent_trials, param_space
from tests.toy import train_overrides

ROOT = Path(__file__).resolve().parents[1]
SWEEP_CONFIGS = sorted((ROOT / "configs").glob("sweep_*.yaml"))
DEMO_SWEEP = yaml.safe_load((ROOT / "configs" / "demo_sweep_avqa.yaml").read_text())


def _job():
    spec = importlib.util.spec_from_file_location("sweep_job", ROOT / "jobs" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep_file(folder: Path, shards: dict, storage: Path, sweep: dict, **train) -> Path:
    """A sweep YAML: the tiny-ViT training config on the test shards plus `sweep`."""
    data: dict = {}
    for text in train_overrides(shards, storage, **{"optim.epochs": 2} | train):
        merge(data, *parse_override(text))
    data["sweep"] = sweep
    path = folder / f"sweep-{len(list(folder.glob('sweep-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# The sweep config the checks below plan: 2 reduction factors x 2 variants; "open-slow" lags (lr 1e-6).
E2E = {"name": "e2e", "search": "grid",
       "space": {"model.reduction_factor": [8, 16]},
       "variants": {"learned": {"optim.lr": 4e-3}, "open-slow": {"model.gating": "open", "optim.lr": 1e-6}},
       "scheduler": {"type": "asha", "metric": "val_score", "mode": "max", "max_t": 2, "grace_period": 1,
                     "asha_reduction_factor": 2}}


# What the end-to-end test runs: one reduction factor x the 2 variants, one trial at a time, so
# that the learning trial has reached the first rung before the lagging one gets there (run side
# by side, which is first is a coin toss, and ASHA stops no trial when the lagging one is).
E2E_RUN = E2E | {"space": {"model.reduction_factor": [8]}, "max_concurrent_trials": 1}


# -- bad sweep configs: refused before any trial, naming the field (no Ray) -------------------

BAD = [
    # (case, sweep section or None, extra training keys, what the message must name)
    ("unknown-key", E2E | {"spaec": {}}, {}, "sweep.spaec"),
    ("asha-factor-under-the-adapter-name", E2E | {"scheduler": {"reduction_factor": 2}}, {},
     "sweep.scheduler.reduction_factor"),
    ("empty-space", {"name": "x", "space": {}}, {}, "sweep.space is empty"),
    ("empty-axis", {"name": "x", "space": {"optim.lr": []}}, {}, "sweep.space.optim.lr"),
    ("unknown-axis", {"name": "x", "space": {"model.reductionfactor": [4]}}, {}, "model.reductionfactor"),
    ("factor-does-not-divide-width", {"name": "x", "space": {"model.reduction_factor": [8, 7]}}, {},
     "sweep.space.model.reduction_factor=7"),
    ("bad-gating", {"name": "x", "space": {"model.gating": ["learned", "shut"]}}, {}, "model.gating"),
    ("bad-variant-key", {"name": "x", "variants": {"a": {"model.gatting": "open"}}}, {}, "model.gatting"),
    ("variant-and-axis-clash", E2E | {"space": {"optim.lr": [1e-3]}}, {}, "sweep.variants.learned.optim.lr"),
    ("bad-loguniform", {"name": "x", "space": {"optim.lr": {"loguniform": [0, 1e-3]}}}, {},
     "sweep.space.optim.lr.loguniform"),
    ("bad-search", E2E | {"search": "bayes"}, {}, "sweep.search"),
    ("asha-factor-too-small", E2E | {"scheduler": {"asha_reduction_factor": 1}}, {},
     "sweep.scheduler.asha_reduction_factor"),
    ("grace-not-below-max-t", E2E | {"scheduler": {"grace_period": 3}}, {}, "sweep.scheduler.grace_period"),
    ("mid-epoch-checkpoints", E2E, {"run.checkpoint_every_steps": 4}, "run.checkpoint_every_steps"),
    ("reserved-axis", {"name": "x", "space": {"run.name": ["a", "b"]}}, {}, "sweep.space.run.name"),
    ("bad-driver-resource", E2E | {"driver_resources": {"on_demand": 0}}, {},
     "sweep.driver_resources.on_demand"),
    ("missing-shards", E2E, {"data.val": "/nonexistent/val"}, "data.val"),
]


@pytest.mark.parametrize("case,sweep,train,field", BAD, ids=[b[0] for b in BAD])
def test_bad_sweep_config_is_refused_naming_the_field(case, sweep, train, field, avqa_shards, tmp_path, capsys):
    path = _sweep_file(tmp_path, avqa_shards, tmp_path / "runs", sweep, **train)
    assert _job().main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / sweep.get("name", "")).joinpath("tuner.pkl").exists()


def test_driver_resources_and_concurrency_from_the_cluster(avqa_shards, tmp_path):
    path = _sweep_file(tmp_path, avqa_shards, tmp_path / "runs", E2E)
    cfg, sweep = load_sweep_config(str(path))
    plan = prepare_sweep(cfg, sweep)
    assert plan.num_trials == 4 and plan.max_t == 2
    # A trial = driver 0.25 CPU + 1 worker x 0.5 CPU: 2 CPUs hold 2 trials.
    assert max_concurrent_trials(plan, {"CPU": 2.0}) == 2
    assert max_concurrent_trials(plan, {"CPU": 16.0}) == 21
    sweep.driver_resources = {"on_demand": 0.01}
    with pytest.raises(ConfigError, match="sweep.driver_resources.on_demand"):
        max_concurrent_trials(plan, {"CPU": 16.0})
    assert max_concurrent_trials(plan, {"CPU": 16.0, "on_demand": 0.02}) == 2
    plan.cfg.run.use_gpu, plan.cfg.run.num_workers = True, 4
    assert max_concurrent_trials(plan, {"CPU": 100.0, "GPU": 8.0, "on_demand": 2.0}) == 2
    sweep.max_concurrent_trials = 3
    assert max_concurrent_trials(plan, {"CPU": 100.0, "GPU": 8.0, "on_demand": 2.0}) == 3


def test_grid_and_random_search_spaces():
    from ray.tune.search.variant_generator import generate_variants

    _, sweep = load_sweep_config(None, ["sweep.search=grid", "sweep.num_samples=1"], base=DEMO_SWEEP)
    space = param_space(sweep)
    assert space["variant"] == {"grid_search": ["learned", "open", "no-xattn"]}
    assert space["model.reduction_factor"] == {"grid_search": [4, 8, 16, 32]}
    points = [config for _, config in generate_variants(space)]
    assert len(points) == count_trials(sweep) == 12
    assert {(p["variant"], p["model.reduction_factor"]) for p in points} == {
        (v, r) for v in ("learned", "open", "no-xattn") for r in (4, 8, 16, 32)}
    assert all(3e-4 <= p["optim.lr"] <= 3e-3 for p in points)

    _, sweep = load_sweep_config(None, ["sweep.search=random", "sweep.num_samples=7"], base=DEMO_SWEEP)
    space = param_space(sweep)
    assert count_trials(sweep) == 7
    assert "grid_search" not in json.dumps({k: v for k, v in space.items() if isinstance(v, dict)})
    points = [config for _ in range(7) for _, config in generate_variants(space)]
    assert {p["model.reduction_factor"] for p in points} <= {4, 8, 16, 32}
    assert {p["variant"] for p in points} <= {"learned", "open", "no-xattn"}

    # Each point is a full training config: the variant's overrides, then the axes.
    _, sweep = load_sweep_config(None, [], base=DEMO_SWEEP)
    base = {k: v for k, v in DEMO_SWEEP.items() if k != "sweep"}
    trial = trial_config(base, sweep, {"variant": "no-xattn", "model.reduction_factor": 32, "optim.lr": 1e-3})
    assert (trial.model.cross_attention, trial.model.reduction_factor, trial.optim.lr) == (False, 32, 1e-3)


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=[p.name for p in SWEEP_CONFIGS])
def test_shipped_sweep_config_points_build(path):
    """Every point of a shipped sweep builds (reduction factors divide the width; meta device)."""
    cfg, sweep = load_sweep_config(str(path))
    assert sweep.scheduler.type == "asha" and "asha_reduction_factor" in path.read_text()
    base = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "sweep"}
    assert len(discrete_points(sweep)) >= 20
    built = set()  # points that differ only in e.g. the learning rate build the same model
    for point in discrete_points(sweep):
        trial = trial_config(base, sweep, point)
        assert trial.run.checkpoint_every_steps == 0
        model = repr((trial.model, trial.task, trial.head))
        if model not in built:
            build_model(trial.model, trial.task, TASKS[trial.task].reference_head_args | to_dict(trial)["head"],
                        meta=True)
            built.add(model)
    assert len(built) >= 20


@pytest.mark.parametrize("epochs,grace,factor,rungs", [(3, 1, 2, [1, 2]), (4, 1, 2, [1, 2]),
                                                      (30, 3, 3, [3, 9, 27]), (8, 1, 2, [1, 2, 4])])
def test_asha_rungs_sit_before_the_last_epoch(epochs, grace, factor, rungs, tmp_path):
    """ASHA never stops a trial at its last epoch (which would skip its test evaluation)."""
    _, sweep = load_sweep_config(None, [f"sweep.scheduler.grace_period={grace}",
                                        f"sweep.scheduler.asha_reduction_factor={factor}"], base=DEMO_SWEEP)
    scheduler = make_scheduler(sweep, epochs, str(tmp_path / "rungs.json"))
    assert sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs) == rungs


def test_asha_rungs_survive_a_restored_sweep(tmp_path):
    """Tune restores a scheduler as it was created; ours reads its rungs back."""
    state = str(tmp_path / "rungs.json")
    kwargs = dict(time_attr="training_iteration", metric="val_score", mode="max", max_t=3, grace_period=1,
                  reduction_factor=2, stop_last_trials=False)
    good, slow = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="slow")
    first = ResumableASHA(state, **kwargs)
    first.on_trial_add(None, good)
    assert first.on_trial_result(None, good, {"training_iteration": 1, "val_score": 30.0}) == "CONTINUE"
    restored = ResumableASHA(state, **kwargs)
    restored.on_trial_add(None, slow)
    assert restored.on_trial_result(None, slow, {"training_iteration": 1, "val_score": 2.0}) == "STOP"
    fresh = ResumableASHA(str(tmp_path / "other.json"), **kwargs)  # what plain ASHA would do
    fresh.on_trial_add(None, slow)
    assert fresh.on_trial_result(None, slow, {"training_iteration": 1, "val_score": 2.0}) == "CONTINUE"


# -- the whole sweep on local Ray ---------------------------------------------------------------

@pytest.mark.slow  # starts Ray
def test_stopped_trials_release_their_workers_resources(ray_local):
    """ASHA kills a stopped trial's driver and its Train controller; the placement group of its
    workers would hold their CPUs until the job ends wherever Train's own cleaner cannot reach
    the state API (no dashboard, a stale /tmp/ray/ray_current_cluster)."""
    import ray
    from ray.tune.callback import CallbackList
    from ray.util.placement_group import placement_group, remove_placement_group

    from avpea_ray.tune.ray_workarounds import ReleaseStoppedTrials, remove_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def start_workers(self):
            self.group = placement_group([{"CPU": 0.5}])
            ray.get(self.group.ready())

    driver_group = placement_group([{"CPU": 0.25}])  # created by the driver: never touched
    ray.get(driver_group.ready())
    stopped, running = Controller.remote(), Controller.remote()
    ray.get([stopped.start_workers.remote(), running.start_workers.remote()])
    assert remove_orphaned_placement_groups() == 0
    ray.kill(stopped)
    # What the sweep's Tune callback does at the end of every control-loop step.
    tune_callbacks = CallbackList([ReleaseStoppedTrials(interval_s=0)])
    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < 1.25 and time.time() < deadline:
        tune_callbacks.on_step_end(iteration=1, trials=[])
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(1.25)  # 2 - driver's - running's
    assert remove_orphaned_placement_groups() == 0
    ray.kill(running)
    remove_placement_group(driver_group)
    while remove_orphaned_placement_groups() == 0 and time.time() < deadline:
        time.sleep(0.2)
    _wait_for_free_cpus(2.0)


@pytest.mark.slow  # starts Ray
def test_the_sweeps_end_waits_for_a_dying_trial_to_release_its_workers(ray_local):
    """When Tune returns, a stopped trial's Train controller may still be dying (seen under load:
    its workers' group then held its CPU until the job ended). The end of a sweep removes the
    group once its creator is dead."""
    import threading

    import ray
    from ray.util.placement_group import placement_group

    from avpea_ray.tune.ray_workarounds import release_ended_trials

    @ray.remote(num_cpus=0)
    class Controller:
        def start_workers(self):
            self.group = placement_group([{"CPU": 0.5}])
            ray.get(self.group.ready())

    dying = Controller.remote()
    ray.get(dying.start_workers.remote())
    threading.Timer(2.0, ray.kill, [dying]).start()  # dies after the sweep's end began
    assert release_ended_trials(timeout_s=60) == 1
    _wait_for_free_cpus(2.0)


def _wait_for_free_cpus(cpus: float, timeout: float = 180.0) -> None:
    # Placement groups of finished trials are removed asynchronously; on a loaded 2-core
    # machine that has taken over 20 s, and over 60 s with the suite's parallel processes.
    import ray

    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(cpus), ray.available_resources()


@pytest.mark.slow
def test_sweep_end_to_end_with_mlflow_and_resume(avqa_shards, tmp_path, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "runs"
    path = _sweep_file(tmp_path, avqa_shards, storage, E2E_RUN)
    summary_json = tmp_path / "out" / "summary.json"
    job = _job()
    assert job.main(["--config", str(path), "--summary-json", str(summary_json)]) == 0
    out = capsys.readouterr().out
    assert "asha_reduction_factor 2" in out and "best trial" in out
    _wait_for_free_cpus(2.0)  # nothing of the trials (one ended by ASHA) still holds CPUs

    summary = json.loads(summary_json.read_text())
    assert set(summary) >= {"trials", "best"}
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert len(trials) == 2
    assert {(t["variant"], t["reduction_factor"]) for t in trials.values()} == {
        ("learned", 8), ("open-slow", 8)}
    for t in trials.values():
        assert t["trainable_params"] > t["adapter_params"] > 0
        assert 1 <= t["epochs_run"] <= 2
        assert t["stopped_early"] == (t["status"] == "stopped early")
        assert t["status"] in ("completed", "stopped early"), t
        if t["status"] == "completed":
            assert t["epochs_run"] == 2 and "test_avg" in t["final_metrics"]
    # ASHA: the lagging variant is stopped at the first rung once a learning trial is recorded.
    slow = [t for t in trials.values() if t["variant"] == "open-slow"]
    assert any(t["stopped_early"] and t["epochs_run"] < 2 for t in slow), slow
    assert summary["num_stopped_early"] >= 1
    best = summary["best"]
    assert best["variant"] == "learned" and best["lr"] == 4e-3
    assert best["best_val_score"] == max(t["best_val_score"] for t in trials.values())
    assert Path(best["checkpoint"], "adapter_model.safetensors").exists()
    assert best["checkpoint"].startswith(str(storage / f"e2e-{best['trial_id']}"))

    files = summary["files"]
    rows = list(csv.DictReader(open(files["csv"])))
    assert len(rows) == 2
    assert {"reduction_factor", "gating", "lr", "trainable_params", "best_val_score", "test_avg", "epochs_run",
            "stopped_early"} <= set(rows[0])
    assert {float(r["test_avg"]) for r in rows if r["status"] == "completed"} == {
        t["final_metrics"]["test_avg"] for t in trials.values() if t["status"] == "completed"}
    assert Path(files["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(files["json"]).read_text())["best"]["trial_id"] == best["trial_id"]

    # MLflow: one parent with the summary artifacts, one nested child run per trial.
    client = MlflowClient(summary["mlflow_tracking_uri"])
    parent_id = summary["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {
        "sweep_trials.csv", "sweep_metric_vs_reduction_factor.png", "sweep_summary.json"}
    assert parent.data.params["sweep.scheduler.asha_reduction_factor"] == "2.0"
    assert "model.reduction_factor" not in parent.data.params  # swept: only on the children
    assert parent.data.metrics["best_val_score"] == pytest.approx(best["best_val_score"])
    experiment = client.get_experiment_by_name("avpea-ray")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    for child in children:
        trial = trials[child.data.tags["avpea.trial_id"]]
        assert child.info.run_id == trial["mlflow_run_id"]
        assert child.info.status == "FINISHED"
        assert child.data.params["model.reduction_factor"] == str(trial["reduction_factor"])
        assert child.data.params["model.gating"] == trial["gating"]
        assert float(child.data.params["optim.lr"]) == trial["lr"]
        assert int(child.data.params["params.trainable"]) == trial["trainable_params"]
        assert child.data.metrics["best_val_score"] == pytest.approx(trial["best_val_score"])
        assert child.data.metrics["stopped_early"] == float(trial["stopped_early"])
        # rank 0 of the trial's Train run logged its epochs into the child run
        history = client.get_metric_history(child.info.run_id, "val_avg")
        assert len(history) == trial["epochs_run"]

    # Resume: the same sweep again runs no new trial and finds the same parent run.
    checkpoints = sorted(p.name for p in storage.glob("e2e-*/checkpoint_*"))
    assert job.main(["--config", str(path), "--summary-json", str(summary_json)]) == 0
    again = json.loads(summary_json.read_text())
    assert again["restored"] is True
    assert again["mlflow_parent_run_id"] == parent_id
    assert [(t["trial_id"], t["best_val_score"], t["epochs_run"]) for t in again["trials"]] == \
        [(t["trial_id"], t["best_val_score"], t["epochs_run"]) for t in summary["trials"]]
    assert sorted(p.name for p in storage.glob("e2e-*/checkpoint_*")) == checkpoints
    assert len(client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")) == 2
    assert len(client.search_runs([experiment.experiment_id], "tags.`avpea.sweep` = 'e2e'")) == 3
    capsys.readouterr()

    # ... and refuses to continue it under a different config.
    changed = _sweep_file(tmp_path, avqa_shards, storage, E2E_RUN | {"space": {"model.reduction_factor": [8, 32]}})
    assert job.main(["--config", str(changed)]) == 2
    assert "was started with a different config" in capsys.readouterr().err
