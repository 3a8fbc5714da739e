"""A run's folder across restarts: the saved config, what may change on a resume, tidying.

`<storage>/<run>/avpea_run.json` holds the resolved config the run started with and the
identity of its shard indexes. Running the same command again resumes the run; before any
worker starts, the new config is compared with the saved one:

- the fields in `MAY_CHANGE` (more epochs, retries, logging, where metrics go, the number
  of workers) may change;
  the change is recorded in the file (and logged in MLflow by the caller);
- any other change (the model, the head, the data, the optimiser) is refused, naming the
  fields: the checkpoints hold a model trained with the old values;
- the shards are compared by index identity, not by path: moving the shards is fine,
  re-sharding (new shards, even with the same sample count) is refused.

`tidy_run_folder` removes checkpoint folders Ray never registered (a kill between the upload
and the registration leaves them) and sets aside an unreadable Ray checkpoint-manager
snapshot, so that neither ends a resume.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, from_dict, to_dict
from ..data import storage
from .config import TrainConfig
from .tracking import flatten

RUN_STATE = "avpea_run.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint_(?!manager_snapshot)")  # Ray's and ours, not its snapshot
log = logging.getLogger(__name__)

# Changing these does not change what the checkpoints mean.
MAY_CHANGE = frozenset({
    "optim.epochs", "run.max_failures", "run.log_every_steps", "run.checkpoint_every_steps",
    "run.keep_checkpoints", "run.tracking_uri", "run.experiment", "run.use_gpu", "run.cpus_per_worker",
    "run.sample_ledger", "run.verbose", "run.progress", "run.system_metrics_every_s", "run.fail_at_step", "run.fail_in_checkpoint_at_step", "run.pause_at_step", "run.hold_upload_at_step",
    "run.fail_rank",
    "data.eval_batch_size", "data.allow_damaged", "evaluation.meteor",
    "model.fuse_streams", "model.fused_attention", "model.activation_checkpointing", "model.channels_last",
    "run.compile", "run.checkpoint_upload",
    # The reader re-plans the rest of an epoch over another number of ranks (reader.py).
    "run.num_workers",
})
# Compared through the shards' index identity instead of their location.
DATA_PATHS = frozenset({"data.train", "data.val", "data.test"})


@dataclass
class RunFolder:
    """What `claim_run_folder` found."""

    url: str
    resumed: bool                                  # the run existed before
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (old, new)
    tidied: list[str] = field(default_factory=list)


def config_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (saved, new) for every leaf that differs.

    A run saved by an earlier version may hold fields that no longer exist (skipped: they mean
    nothing now) and lack fields added since (skipped when the new value is that field's
    default, which is what the earlier version used).
    """
    old_flat, new_flat = flatten(saved), flatten(new)
    defaults = flatten(to_dict(from_dict(TrainConfig, {"task": new["task"]})))
    return {k: (old_flat.get(k), new_flat.get(k)) for k in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(k) != new_flat.get(k) and k in new_flat
            and not (k not in old_flat and new_flat[k] == defaults.get(k))}


def check_resume(saved: dict, config: dict, data_ids: dict[str, str]) -> dict[str, tuple[Any, Any]]:
    """The allowed changes between a saved run state and the new config.

    Raises:
        ConfigError: naming every field whose change the run cannot take, and the splits
            whose shards changed.
    """
    changes = config_changes(saved["config"], config)
    refused = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()
               if k not in MAY_CHANGE and k not in DATA_PATHS]
    for split, digest in data_ids.items():
        before = saved.get("data_ids", {}).get(split)
        if before != digest:
            refused.append(f"data.{split}: the shards changed since the run started (index "
                           f"{str(before)[:12]} -> {digest[:12]}: re-sharded or another split)")
    for split in sorted(set(saved.get("data_ids", {})) - set(data_ids)):
        refused.append(f"data.{split}: the run started with {split} shards, now there are none")
    if refused:
        raise ConfigError(
            f"run {saved['config']['run']['name']!r} was started with a different model or data; "
            "its checkpoints cannot continue with " + "; ".join(refused) +
            ". Use the original values, or start a new run with --run-name")
    return {k: v for k, v in changes.items() if k in MAY_CHANGE or k in DATA_PATHS}


def claim_run_folder(run_url: str, config: dict, data_ids: dict[str, str]) -> RunFolder:
    """Check a resume against the saved run state (or save it for a new run) and tidy the
    folder. Call after preflight, before MLflow and before any worker starts."""
    state_url = storage.join(run_url, RUN_STATE)
    folder = RunFolder(run_url, resumed=storage.exists(state_url))
    if folder.resumed:
        try:
            saved = json.loads(storage.read_bytes(state_url))
        except ValueError as err:
            raise ConfigError(f"run.name: {state_url} is unreadable ({err}); move it away to start "
                              f"the run afresh, or use another --run-name") from err
        folder.changes = check_resume(saved, config, data_ids)
        history = saved.get("changes", [])
        if folder.changes:
            history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "changes": {k: list(v) for k, v in folder.changes.items()}})
        state = {"config": config, "data_ids": data_ids, "changes": history}
    else:
        state = {"config": config, "data_ids": data_ids, "changes": []}
    storage.atomic_write_bytes(state_url, json.dumps(state, indent=1, sort_keys=True).encode())
    folder.tidied = tidy_run_folder(run_url)
    return folder


def registered_checkpoints(run_url: str) -> set[str] | None:
    """Checkpoint folder names Ray's snapshot lists; None when it is unreadable (it is then
    moved aside, so that Ray starts a fresh snapshot instead of failing)."""
    url = storage.join(run_url, RAY_SNAPSHOT)
    if not storage.exists(url):
        return set()
    try:
        snapshot = json.loads(storage.read_bytes(url))
        results = [*snapshot["checkpoint_results"], *snapshot.get("pending_training_results", []),
                   *([snapshot["latest_checkpoint_result"]] if snapshot.get("latest_checkpoint_result") else [])]
        return {r["checkpoint_dir_name"] for r in results}
    except (ValueError, KeyError, TypeError) as err:
        aside = f"{url}.unreadable-{int(time.time())}"
        storage.atomic_write_bytes(aside, storage.read_bytes(url))
        storage.remove(url)
        log.warning("Ray's checkpoint-manager snapshot %s is unreadable (%s); moved to %s: the "
                    "run resumes from its newest intact checkpoint", url, err, aside)
        return None


def tidy_run_folder(run_url: str) -> list[str]:
    """Remove `checkpoint_*` folders Ray never registered; returns their names."""
    registered = registered_checkpoints(run_url)
    if registered is None:  # unknown: keep every folder, the resume picks the newest intact
        return []
    stray = [n for n in storage.list_names(run_url) if CHECKPOINT_DIR.match(n) and n not in registered]
    for name in stray:
        _remove_tree(storage.join(run_url, name))
    if stray:
        log.warning("removed %d checkpoint folder(s) of an interrupted attempt that Ray never "
                    "registered: %s", len(stray), ", ".join(stray))
    return stray


def _remove_tree(url: str) -> None:
    if storage.is_local(url):
        shutil.rmtree(storage.local_path(url), ignore_errors=True)
    else:
        fs, path = storage.filesystem(url)
        fs.rm(path, recursive=True)
