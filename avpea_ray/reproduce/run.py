"""Every row of the paper's Tables 1-4 as a Ray Tune trial over the trainer, one MLflow parent
run with a child run per trial, and the tables written back (`tables.py`).

    plan = plan_reproduction(ReproRequest(...))    # every trial's config checked, no Ray
    summary = run_reproduction(plan)               # Tune runs what is not finished; tables

1. Planning resolves each (row, seed) to a TrainConfig: the row's config under configs/ (with
   --demo the task's demo config instead), the row's own settings (Table 4's placements), the
   shard locations of its dataset, `data.seed`, and a stable run name `<name>-<row>-s<seed>`.
   Each goes through the training preflight, so a missing shard URL or a bad field is refused,
   naming the file, field or flag, before any worker starts.
2. A trial is a Tune trial driver that fits its Train run with `fit_run` (as a sweep trial
   does; an AVQA row first fits AVST's grounding stage, whose best adapters start its QA
   stage) and, when the run finished, writes its record `<storage>/<name>/trials/<row>-s<seed>.json`
   atomically. The records are what "finished" means: running the same --name again skips
   every trial with a record (it re-runs nothing finished) and resumes the others from their
   own Train checkpoints (their run names are stable).
3. The tables are built from the records (JSON, never unpickled) of every row, run or not, so
   they can be written at the end and on demand from a partial reproduction
   (`tables_only=True`), and are logged on the parent run.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, from_dict, load_config, to_dict
from ..data import storage
from ..tasks import get_task
from ..train.cluster import init_ray, quiet_known_noise
from ..train.config import TrainConfig
from ..train.preflight import preflight
from ..train.tracking import flatten, redact_uri, start_or_resume_run
from .paper import PaperRow, load_paper, tables_of
from .tables import build_tables, write_tables

# The shard-locations file: one key per dataset, each with its three split URLs.
DATASETS = {"avel": "ave", "avqa": "musicavqa", "avqa_gen": "musicavqa", "avr": "valor32k", "avc": "valor32k"}
SPLITS = ("train", "val", "test")
RECORDS = "trials"
DRIVER_CPUS = 0.25  # a trial driver only waits on its Train workers
# Settings a finished trial may differ in from a rerun's plan without being a different trial.
IGNORED_ON_RERUN = ("run.", "data.loader_workers", "data.eval_batch_size")


@dataclass
class ReproRequest:
    """What `avpea-ray reproduce` was asked (flags named as on the command line)."""

    configs: Path                                  # the repository's configs/
    storage_path: str                              # --storage-path
    name: str = "avpea-paper"                      # --name
    shards: str | None = None                      # --shards FILE (None with --demo: the demo data)
    only: list[str] = field(default_factory=list)  # --only table1,table4
    seeds: int = 1                                 # --seeds N
    demo: bool = False                             # --demo
    dry_run: bool = False                          # --dry-run
    overrides: list[str] = field(default_factory=list)  # section.key=value on every trial
    max_concurrent_trials: int = 0                 # 0: as many as the cluster holds


@dataclass
class PlannedTrial:
    row: PaperRow
    seed: int
    cfg: TrainConfig          # preflighted: absolute paths, run name
    parameters: dict[str, int]
    grounding: TrainConfig | None = None  # AVQA's first stage, run before `cfg`

    @property
    def key(self) -> str:
        return f"{self.row.id}-s{self.seed}"

    @property
    def gpus(self) -> int:
        return self.cfg.run.num_workers if self.cfg.run.use_gpu else 0


@dataclass
class ReproPlan:
    request: ReproRequest
    rows: list[PaperRow]      # every row of the paper (the tables show them all)
    ordering: dict[str, Any]
    trials: list[PlannedTrial]
    path: str                 # <storage>/<name>: records, tables, Tune's experiments
    tracking_uri: str

    @property
    def records_url(self) -> str:
        return storage.join(self.path, RECORDS)


def read_shard_locations(path: str, datasets: set[str]) -> dict[str, dict[str, str]]:
    """The split URLs of each needed dataset from the shard-locations YAML.

    Raises:
        ConfigError: naming the file and the missing or malformed field (e.g. `musicavqa.test`).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"--shards: {path} does not exist (a YAML of {', '.join(sorted(set(DATASETS.values())))}"
                          f" with train/val/test URLs each)") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"--shards: {path} is not YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--shards: {path} must map dataset names to their split URLs")
    unknown = set(data) - set(DATASETS.values())
    if unknown:
        raise ConfigError(f"{path}: unknown dataset(s) {sorted(unknown)}; expected "
                          f"{sorted(set(DATASETS.values()))}")
    locations = {}
    for dataset in sorted(datasets):
        splits = data.get(dataset)
        if not isinstance(splits, dict):
            raise ConfigError(f"{path}: {dataset}: missing (the rows asked for need its train/val/test URLs)")
        for split in SPLITS:
            if not isinstance(splits.get(split), str) or not splits[split]:
                raise ConfigError(f"{path}: {dataset}.{split}: missing shard URL")
        locations[dataset] = {split: splits[split] for split in SPLITS}
    return locations


def select_rows(rows: list[PaperRow], only: list[str]) -> list[PaperRow]:
    """The rows `--only` names, by table ("table1") or by row id ("table4_none"); all without it."""
    if not only:
        return rows
    known = tables_of(rows)
    unknown = [t for t in only if t not in known and t not in {row.id for row in rows}]
    if unknown:
        raise ConfigError(f"--only: unknown table(s) or row(s) {unknown}; the paper's tables are "
                          f"{','.join(known)}, its rows {','.join(row.id for row in rows)}")
    return [row for row in rows if row.table_key in only or row.id in only]


def trial_config(request: ReproRequest, row: PaperRow, seed: int,
                 locations: dict[str, dict[str, str]], stage: str = "") -> TrainConfig:
    """The TrainConfig of one (row, seed): row config (or the task's demo config) <- the
    row's settings <- shard URLs <- the request's overrides <- seed and run name.

    `stage="grounding"`: the row's first stage (its `grounding` config; with --demo the demo
    config with `head.stage: grounding`). The QA stage after it is planned with
    `model.init_from` empty: the trial sets it to the grounding run's best adapters."""
    task = get_task(row.task)
    grounding = stage == "grounding"
    file = request.configs / (task.demo_config if request.demo else row.grounding if grounding else row.config)
    if not file.is_file():
        raise ConfigError(f"row {row.id}: config {file} not found (the configs ship with the repository)")
    values: dict[str, Any] = dict(row.overrides)
    if row.task in DATASETS and DATASETS[row.task] in locations:
        values |= {f"data.{split}": url for split, url in locations[DATASETS[row.task]].items()}
    if row.grounding:
        values |= {"model.init_from": ""} | ({"head.stage": "grounding"} if grounding else {})
    values |= {"data.seed": seed, "run.name": f"{request.name}-{row.id}-s{seed}" + ("-grounding" if grounding else ""),
               "run.storage_path": request.storage_path}
    try:
        cfg = load_config(TrainConfig, file, request.overrides, values=values)
    except ConfigError as err:
        raise ConfigError(f"row {row.id} ({file.name}): {err}") from err
    if cfg.task != row.task:
        raise ConfigError(f"row {row.id}: {file} trains {cfg.task!r}, the row needs {row.task!r}")
    return cfg


def plan_reproduction(request: ReproRequest, paper_text: str | None = None) -> ReproPlan:
    """Check every trial's config before anything runs (no Ray needed).

    Raises:
        ConfigError: naming the flag, the shard-locations field or the row's config field.
    """
    if request.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {request.seeds}")
    if not request.storage_path:
        raise ConfigError("--storage-path: where the trials, records and tables go (local dir or s3://)")
    rows, ordering = load_paper(paper_text)
    chosen = select_rows(rows, request.only)
    if request.shards:
        locations = read_shard_locations(request.shards, {DATASETS[row.task] for row in chosen})
    elif request.demo:
        locations = {}  # the demo configs name the synthetic demo data
    else:
        raise ConfigError("--shards: a YAML naming the AVE, MUSIC-AVQA and VALOR-32K shard URLs "
                          "(ave/musicavqa/valor32k: train/val/test) is needed without --demo")
    trials, uris = [], set()
    for row in chosen:
        for seed in range(request.seeds):
            stages = {}
            for stage in (["grounding"] if row.grounding else []) + [""]:
                try:
                    stages[stage] = preflight(trial_config(request, row, seed, locations, stage))
                except ConfigError as err:
                    message = str(err)
                    raise ConfigError(message if message.startswith("row ") else f"row {row.id}: {message}") from err
                uris.add(stages[stage].tracking_uri)
            first = stages.get("grounding")
            trials.append(PlannedTrial(row, seed, stages[""].cfg, stages[""].parameter_counts,
                                       first.cfg if first else None))
    if len(uris) > 1:
        raise ConfigError(f"run.tracking_uri: the rows would track in different stores {sorted(uris)}; "
                          f"set one with run.tracking_uri=...")
    path = storage.join(trials[0].cfg.run.storage_path, request.name)
    return ReproPlan(request, rows, ordering, trials, path, uris.pop())


# -- records ---------------------------------------------------------------------------------
def record_url(plan: ReproPlan, key: str) -> str:
    return storage.join(plan.records_url, f"{key}.json")


def read_records(plan: ReproPlan) -> dict[str, dict[str, Any]]:
    """The finished trials' records (plain JSON) by trial key."""
    known = {row.id for row in plan.rows}
    records = {}
    try:
        names = storage.list_names(plan.records_url)
    except FileNotFoundError:
        return {}
    for name in sorted(names):
        if not name.endswith(".json"):
            continue
        record = json.loads(storage.read_bytes(storage.join(plan.records_url, name)))
        if record.get("row") in known and record.get("status") == "finished":
            records[name.removesuffix(".json")] = record
    return records


def comparable_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """A trial's settings that decide its numbers (not where it runs or how it is named)."""
    return {k: v for k, v in flatten(cfg).items() if not k.startswith(IGNORED_ON_RERUN)}


def check_finished_match(plan: ReproPlan, records: dict[str, dict[str, Any]]) -> None:
    """A finished trial is reused only for the same settings: a rerun that changed one (more
    epochs, other shards) under the same --name would otherwise mix two reproductions."""
    for trial in plan.trials:
        record = records.get(trial.key)
        if record is None or "config" not in record:
            continue
        old, new = comparable_settings(record["config"]), comparable_settings(to_dict(trial.cfg))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            raise ConfigError(f"--name {plan.request.name}: trial {trial.key} finished with other settings "
                              f"({', '.join(changed[:5])}); use another --name for a new reproduction")


# -- trials ----------------------------------------------------------------------------------
def run_trial(point: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: fit the (row, seed)'s Train run as the parent's child run; on a finished
    run, publish its record."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.fit import fit_run

    spec = setup["trials"][point["trial"]]
    dry_run = setup["dry_run"]

    def fit(cfg: TrainConfig, stage: str) -> dict[str, Any]:
        return fit_run(preflight(cfg), dry_run=dry_run, mlflow_name=f"{spec['row']} seed {spec['seed']}{stage}",
                       parent_run_id=None if dry_run else setup["parent_run_id"],
                       callbacks=[TuneReportCallback()],
                       tags={"avpea.reproduce": setup["name"], "avpea.row": spec["row"],
                             "avpea.seed": str(spec["seed"]), "avpea.stage": stage.strip() or "final"})

    cfg = from_dict(TrainConfig, spec["config"])
    seconds, grounding = 0.0, None
    if spec.get("grounding"):
        grounding = fit(from_dict(TrainConfig, spec["grounding"]), " grounding")
        seconds += grounding["seconds"]
        if not dry_run:  # a dry run's grounding stage leaves no adapters to start from
            if not grounding.get("best_adapters"):
                raise RuntimeError(f"{spec['row']}: the grounding stage left no best adapters to start QA from")
            cfg = replace(cfg, model=replace(cfg.model, init_from=grounding["best_adapters"]))
    summary = fit(cfg, "")
    if dry_run:
        return
    record = {"row": spec["row"], "seed": spec["seed"], "status": "finished", "metrics": summary["metrics"],
              "parameters": summary["parameters"], "seconds": seconds + summary["seconds"], "gpus": spec["gpus"],
              "mlflow_run_id": summary["mlflow_run_id"], "run_folder": summary["run_folder"],
              "grounding_run_folder": grounding and grounding["run_folder"],
              "config": spec["config"], "finished_at": time.time()}
    storage.atomic_write_bytes(spec["record_url"], json.dumps(record, indent=1).encode("utf-8"))


def max_concurrent(plan: ReproPlan, cluster: dict[str, float]) -> int:
    """The request's limit, else as many of the largest trial as the cluster holds."""
    if plan.request.max_concurrent_trials:
        return plan.request.max_concurrent_trials
    cpus = max(DRIVER_CPUS + t.cfg.run.num_workers * t.cfg.run.cpus_per_worker for t in plan.trials)
    limits = [cluster.get("CPU", 0) / cpus]
    gpus = max(t.gpus for t in plan.trials)
    if gpus:
        limits.append(cluster.get("GPU", 0) / gpus)
    return max(1, int(min(limits) + 1e-9))


def run_trials(plan: ReproPlan, todo: list[PlannedTrial], parent_run_id: str | None) -> dict[str, str]:
    """Run `todo` as Tune trials (side by side as the cluster allows). Returns key -> Tune status."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    setup = {"name": plan.request.name, "parent_run_id": parent_run_id, "dry_run": plan.request.dry_run,
             "trials": {t.key: {"row": t.row.id, "seed": t.seed, "gpus": t.gpus, "config": to_dict(t.cfg),
                                "grounding": to_dict(t.grounding) if t.grounding else None,
                                "record_url": record_url(plan, t.key)} for t in todo}}

    def avpea_reproduce_trial(config: dict) -> None:
        run_trial(config, setup)

    concurrency = max_concurrent(plan, ray.cluster_resources())
    print(f"  {len(todo)} trial(s), {concurrency} at a time")
    # Each invocation is its own Tune experiment: what is finished is decided by the records,
    # and an unfinished trial resumes from its Train run's checkpoint, not from Tune's state.
    tuner = tune.Tuner(
        tune.with_resources(avpea_reproduce_trial, {"CPU": DRIVER_CPUS}),
        param_space={"trial": tune.grid_search([t.key for t in todo])},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=concurrency),
                                    reuse_actors=False,
                                    trial_dirname_creator=lambda trial: f"{trial.config['trial']}"),
        run_config=tune.RunConfig(name=f"{plan.request.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=plan.trials[0].cfg.run.storage_path,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0))
    grid = tuner.fit()
    statuses = {}
    for result in grid:
        key = result.config["trial"]
        statuses[key] = "error" if result.error else "finished"
        if result.error:
            print(f"  trial {key} failed: {str(result.error).strip().splitlines()[-1][:300]}")
    return statuses


# -- tables and the parent run --------------------------------------------------------------
def start_parent(plan: ReproPlan) -> str:
    """The reproduction's MLflow parent run (found again by its storage path and name)."""
    cfg = plan.trials[0].cfg
    params = {"reproduce.name": plan.request.name, "reproduce.demo": plan.request.demo,
              "reproduce.shards": plan.request.shards or "demo data",
              "reproduce.storage_path": plan.path}
    local = storage.is_local(cfg.run.storage_path) and plan.tracking_uri.startswith("sqlite")
    run_id, _ = start_or_resume_run(plan.tracking_uri, cfg.run.experiment, f"reproduce:{plan.path}",
                                    plan.request.name, params,
                                    str(Path(cfg.run.storage_path) / "mlflow-artifacts") if local else None)
    return run_id


def write_and_log_tables(plan: ReproPlan, parent_run_id: str) -> dict[str, Any]:
    """Build the tables from the records, write them beside the records, log them on the
    parent run (files, headline numbers, the ordering verdict)."""
    from mlflow.tracking import MlflowClient

    trials = list(read_records(plan).values())
    tables = build_tables(trials, plan.rows, plan.ordering, demo=plan.request.demo, name=plan.request.name)
    written = write_tables(tables, plan.path)
    client = MlflowClient(plan.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        write_tables(tables, tmp)
        client.log_artifacts(parent_run_id, tmp, "paper_tables")
    for row in tables["rows"]:
        value = row["columns"][row["headline"]]["measured"]
        if value is not None:
            client.log_metric(parent_run_id, f"{row['id']}.{row['headline']}".replace("@", "_"), value)
    holds = tables["ordering"]["holds"]
    client.set_tag(parent_run_id, "avpea.table4_ordering", {True: "holds", False: "fails", None: "not checked"}[holds])
    return {"tables": tables, "files": written}


def run_reproduction(plan: ReproPlan, tables_only: bool = False) -> dict[str, Any]:
    """Run every planned trial that has no record (none with `tables_only`), then write the
    tables. Returns the summary."""
    start = time.time()
    request = plan.request
    records = read_records(plan)
    if not request.dry_run:
        check_finished_match(plan, records)
    todo = [t for t in plan.trials if request.dry_run or t.key not in records]
    done = [t.key for t in plan.trials if t.key in records]
    print(f"reproduce {request.name}: {len(plan.trials)} trial(s) "
          f"({', '.join(dict.fromkeys(t.row.table for t in plan.trials))}, {request.seeds} seed(s) each"
          f"{', demo' if request.demo else ''}{', dry run: one batch each' if request.dry_run else ''}); "
          f"{len(done)} finished before" + (f": {', '.join(done)}" if done else ""))
    print(f"  in {plan.path}; tracking {redact_uri(plan.tracking_uri)}")
    parent_id = None if request.dry_run else start_parent(plan)
    statuses: dict[str, str] = {}
    if todo and not tables_only:
        quiet_known_noise(plan.trials[0].cfg.run.verbose)
        print(init_ray())
        statuses = run_trials(plan, todo, parent_id)
    summary: dict[str, Any] = {
        "name": request.name, "path": plan.path, "demo": request.demo, "dry_run": request.dry_run,
        "parent_run_id": parent_id, "planned": [t.key for t in plan.trials], "finished_before": done,
        "ran": sorted(statuses), "failed": sorted(k for k, s in statuses.items() if s != "finished"),
        "not_run": sorted(t.key for t in todo if t.key not in statuses) if not request.dry_run else [],
    }
    if parent_id is not None:
        result = write_and_log_tables(plan, parent_id)
        summary["files"] = result["files"]
        summary["ordering_holds"] = result["tables"]["ordering"]["holds"]
        summary["tables"] = result["tables"]
        # Ended, not left RUNNING; the next invocation of the name sets it running again.
        from mlflow.tracking import MlflowClient
        MlflowClient(plan.tracking_uri).set_terminated(parent_id, "FAILED" if summary["failed"] else "FINISHED")
    summary["seconds"] = round(time.time() - start, 1)
    return summary


def demo_tasks(request: ReproRequest) -> list[str]:
    """The tasks whose demo data `--demo` (without --shards) needs."""
    rows, _ = load_paper()
    return sorted({row.task for row in select_rows(rows, request.only)})
