"""Pre-run checks: everything a run needs, checked in the driver before any Ray worker starts.

`preflight(cfg)` resolves the run name and storage path, reads the shard indexes, builds the
model on the meta device, and checks storage and tracking; every user error is a
`ConfigError` naming the field (data.train, model.reduction_factor, run.storage_path, ...).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError
from ..data import shards, storage
from ..data.reader import check_shards_present, plan_epoch
from ..data.shards import ShardIndex, ShardIndexError, read_index
from ..model.params import count_parameters
from ..tasks import build_model, get_task, make_task
from .config import RunConfig, TrainConfig
from .tracking import TrackingError, check_reachable, resolve_tracking_uri


@dataclass
class Preflight:
    """What the driver learned before starting workers."""

    cfg: TrainConfig
    head_args: dict[str, Any]
    parameter_counts: dict[str, int]
    tracking_uri: str
    split_sizes: dict[str, int] = field(default_factory=dict)
    data_ids: dict[str, str] = field(default_factory=dict)  # split -> shard index identity
    storage_defaulted: bool = False  # no storage path was given

    @property
    def run_url(self) -> str:
        """The run's folder: checkpoints, the saved config, the ledger."""
        return storage.join(self.cfg.run.storage_path, self.cfg.run.name)


def default_run_name(cfg: TrainConfig) -> str:
    """A stable name, so running the same command again resumes the same run."""
    backbone = cfg.model.backbone.split(".")[0]
    variant = get_task(cfg.task).variant(cfg)
    return "-".join([cfg.task, *([variant] if variant else []), backbone,
                     f"r{cfg.model.reduction_factor}", cfg.model.adapters])


def preflight(cfg: TrainConfig) -> Preflight:
    """Check shards, model, storage and tracking; resolve the run name and storage path.

    Raises:
        ConfigError: naming the field and what was expected.
    """
    storage_defaulted = cfg.run.storage_path == RunConfig().storage_path
    cfg = resolve_paths(cfg)
    indexes = read_indexes(cfg)
    check_data(cfg, indexes)
    task = make_task(cfg, indexes["train"])
    head_args = task.head_args()
    model = build_model(cfg.model, cfg.task, head_args, meta=True)
    task.check(model)
    if cfg.model.init_from:
        check_init_source(cfg.model.init_from, model)
    counts = count_parameters(model)
    check_storage(cfg.run.storage_path)
    uri = resolve_tracking_uri(cfg.run.tracking_uri, cfg.run.storage_path)
    try:
        check_reachable(uri)
    except TrackingError as err:
        raise ConfigError(f"run.tracking_uri: {err}") from err
    return Preflight(cfg, head_args,
                     {"adapter": counts.adapter, "head": counts.head, "backbone": counts.backbone,
                      "trainable": counts.trainable, "total": counts.total},
                     uri, {k: v.total_samples for k, v in indexes.items()},
                     {k: shards.index_id(v) for k, v in indexes.items()},
                     storage_defaulted=storage_defaulted)


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute local paths (Ray workers run in their own working directories), the default
    run name and storage path."""
    run, data = cfg.run, cfg.data
    weights = cfg.model.weights
    if weights not in ("random", "timm"):
        if not Path(weights).is_file():
            raise ConfigError(f"model.weights: {weights!r} is not a file (expected 'timm', 'random' "
                              f"or a local .safetensors/.pth state dict)")
        weights = absolute(weights)
    init_from = absolute(cfg.model.init_from) if cfg.model.init_from else ""
    return replace(cfg, model=replace(cfg.model, weights=weights, init_from=init_from),
                   data=replace(data, **{name: absolute(getattr(data, name)) for name in ("train", "val", "test", "vocab")}),
                   run=replace(run, name=run.name or default_run_name(cfg),
                               storage_path=absolute(default_storage_path(run.storage_path))))


def check_init_source(url: str, model) -> None:
    """`model.init_from` names adapters that fit the model (built on the meta device)."""
    from ..model.adapter_io import AdapterMismatchError, initialise_from
    from .checkpoint import read_adapter_source

    saved, tensors = read_adapter_source(url)
    try:
        initialise_from(model, saved, tensors, url, check_only=True)
    except AdapterMismatchError as err:
        raise ConfigError(str(err)) from err


def read_indexes(cfg: TrainConfig) -> dict[str, ShardIndex]:
    indexes = {}
    for split in ("train", "val", "test"):
        url = getattr(cfg.data, split)
        if not url:
            if split == "test":
                continue
            raise ConfigError(f"data.{split} is empty: give the {split} shards' directory or URL")
        try:
            indexes[split] = read_index(url)
        except (ShardIndexError, FileNotFoundError, OSError) as err:
            raise ConfigError(f"data.{split}: {err}") from err
    return indexes


def check_data(cfg: TrainConfig, indexes: dict[str, ShardIndex]) -> None:
    """The shards hold the task's dataset, all splits were made alike (the index records how
    the frames and spectrograms were made: the one record of it), every shard is there, and
    an epoch can be planned with this batch size and layout."""
    dataset = get_task(cfg.task).dataset
    train = indexes["train"]
    for split, index in indexes.items():
        if index.dataset != dataset:
            raise ConfigError(f"data.{split}: shards hold dataset {index.dataset!r}, not what "
                              f"task {cfg.task!r} trains on")
        for what in ("num_frames", "image_size", "audio"):
            if getattr(index, what) != getattr(train, what):
                raise ConfigError(f"data.{split}: its shards were made with {what}={getattr(index, what)!r}, "
                                  f"the train shards with {getattr(train, what)!r}: shard all splits alike")
    for split, index in indexes.items():
        try:
            problems = check_shards_present(index)
        except storage.StorageAccessError as err:
            raise ConfigError(f"data.{split}: {err}") from err
        if problems and not cfg.data.allow_damaged:
            raise ConfigError(f"data.{split}: {len(problems)} of {len(index.shards)} shards are missing "
                              f"or not the size the index lists ({'; '.join(problems[:5])}"
                              f"{'; ...' if len(problems) > 5 else ''}); re-shard the split, or set "
                              f"data.allow_damaged=true to go on without them")
    # The largest world size the run may reach is the hardest to plan.
    slots = cfg.run.max_workers * max(cfg.data.loader_workers, 1)
    try:
        plan_epoch([s.samples for s in train.shards], slots=slots,
                   batch_size=cfg.data.batch_size, training=True, seed=cfg.data.seed, epoch=0)
    except ValueError as err:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: {err} (run.num_workers="
                          f"{cfg.run.max_workers} x data.loader_workers={cfg.data.loader_workers})") from err


def default_storage_path(path: str) -> str:
    """Where results go when no storage path is given.

    A relative path is kept, except inside `ray job submit --working-dir`: there the working
    directory is Ray's temporary copy, deleted with the Ray session, so results go to
    ~/avpea-runs on the node running the job instead.
    """
    if "://" in path or Path(path).is_absolute() or "runtime_resources" not in Path.cwd().parts:
        return path
    return str(Path.home() / "avpea-runs" / path)


def absolute(path: str) -> str:
    return path if not path or "://" in path else str(Path(path).resolve())


def check_storage(path: str) -> None:
    probe = storage.join(path, f".avpea-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        if "://" not in path:
            Path(path).mkdir(parents=True, exist_ok=True)
        storage.atomic_write_bytes(probe, b"ok")
        storage.remove(probe)
    except Exception as err:  # noqa: BLE001 - any failure means the same to the user
        raise ConfigError(f"run.storage_path {path!r} is not writable: {type(err).__name__}: {err}") from err


def check_storage_shared(storage_path: str, defaulted: bool, nodes: int,
                         unseen_by: Callable[[str], list[str]] | None = None) -> None:
    """Refuse a node-local storage folder on a multi-node cluster, before any worker starts:
    workers on other nodes would write checkpoints where the driver never looks, and a resume
    (or an elastic restart on other nodes) would not find them.

    The default local path is refused outright; a local path given explicitly may be a shared
    filesystem, so `unseen_by(path)` (`cluster.nodes_not_seeing`) asks every other node
    whether it sees a file written there, and any that does not is named.
    """
    if nodes <= 1 or not storage.is_local(storage_path):
        return
    advice = "give --storage-path s3://bucket/prefix or a filesystem every node shares (NFS, EFS, ...)"
    if defaulted:
        raise ConfigError(f"run.storage_path: the cluster has {nodes} nodes and no --storage-path was given "
                          f"(the default {storage_path} is local to this node); {advice}")
    unseen = unseen_by(storage.local_path(storage_path)) if unseen_by else []
    if unseen:
        raise ConfigError(f"run.storage_path: {storage_path} is a folder on this node only: "
                          f"{', '.join(unseen)} of the cluster's {nodes} nodes cannot see it, so their "
                          f"workers' checkpoints would be lost; {advice}")
