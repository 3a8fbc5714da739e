"""The per-worker training loop every task shares (Ray Train V2 `TorchTrainer`).

Each rank streams its part of the shards, trains the adapters + head under DDP, validates every
epoch with the task's metric (counts summed across ranks), checkpoints at epoch ends and every
`run.checkpoint_every_steps` steps (reader position inside, so a restart continues mid-epoch),
and finally evaluates the test split with the adapters chosen on validation.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import ray.train
import ray.train.torch
import torch

from ..config import from_dict
from ..data.reader import ShardStream
from ..data.shards import read_index
from ..model.adapter_io import initialise_from
from ..model.task_model import AVPEAModel
from ..tasks import build_model, make_task, register
from ..tasks.distributed import broadcast_object, gather_objects, is_distributed
from .checkpoint import (Progress, inputs_json, latest_intact, read_adapter_source, read_checkpoint, upload_files,
                         write_checkpoint)
from .config import TrainConfig
from .tracking import MetricLogger, start_system_metrics


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. `loop_config`: {"config": resolved TrainConfig dict, "task": its
    task class, "mlflow": {"uri", "run_id"}, "dry_run": bool}."""
    register(loop_config["task"])
    cfg: TrainConfig = from_dict(TrainConfig, loop_config["config"])
    if not cfg.run.verbose:
        _quiet_ray_report_dumps()
    dry_run = loop_config.get("dry_run", False)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.data.seed)  # identical initial adapters/head on every rank
    # Host-side randomness (e.g. which caption of a clip a step trains on) differs per rank but
    # repeats from run to run; checkpoints carry these states on.
    random.seed(f"avpea/{cfg.data.seed}/{rank}")
    np.random.seed((cfg.data.seed * 1_000_003 + rank) % 2**32)

    train_index = read_index(cfg.data.train)
    task = make_task(cfg, train_index)
    adapter_files = task.adapter_files() | {"inputs.json": inputs_json(cfg, train_index)}
    model = build_model(cfg.model, cfg.task, task.head_args()).to(device)
    init_tags = {}  # where the starting weights came from, for the MLflow run
    if cfg.model.init_from:  # a resume then restores its own checkpoint over it
        loaded, fresh = initialise_from(model, *read_adapter_source(cfg.model.init_from), cfg.model.init_from)
        modules = ", ".join(sorted({n.split(".")[1] if n.startswith("head.") else "adapters" for n in fresh}))
        if rank == 0:
            _log(rank, f"model.init_from: {len(loaded)} tensors from {cfg.model.init_from}; fresh: {modules or 'none'}")
        init_tags = {"avpea.init_from": cfg.model.init_from, "avpea.init_from.tensors": len(loaded),
                     "avpea.init_from.fresh": modules or "none"}
    if cfg.run.compile:
        model.compile_trunk()
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    optimizer = _optimizer(model, cfg)

    def stream(url: str, training: bool) -> ShardStream:
        return ShardStream(url, rank=rank, world_size=world_size, training=training,
                           batch_size=cfg.data.batch_size if training else cfg.data.eval_batch_size,
                           num_workers=cfg.data.loader_workers, seed=cfg.data.seed,
                           # Pinned batches copy to the GPU asynchronously (see `to_device`).
                           pin_memory=device.type == "cuda",
                           shuffle_buffer=cfg.data.shuffle_buffer, allow_damaged=cfg.data.allow_damaged)

    train_stream = stream(cfg.data.train, training=True)
    # Per rank `data.batch_size` clips a step, whatever the world size: the global batch is
    # batch_size x the ranks of this attempt, and the schedule follows the clips trained by
    # all ranks together, so a resize moves neither its warm-up nor its cosine.
    global_batch = cfg.data.batch_size * world_size
    scheduler = _schedule(optimizer, cfg, train_stream.index.total_samples, global_batch=global_batch,
                          full_batch=cfg.data.batch_size * cfg.run.max_workers)
    progress, best_state = Progress(), None
    with tempfile.TemporaryDirectory(prefix="avpea-resume-") as scratch:  # the fetched copy
        restored = None if dry_run else _latest_intact_checkpoint(Path(scratch))
        if restored:
            directory, _ = restored
            progress, reader_state, best_state = read_checkpoint(
                directory, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler)
            train_stream.load_state_dict(reader_state)
            line = (f"resumed from {directory.name} at epoch {progress.epoch}, batch "
                    f"{progress.batches_in_epoch} (global step {progress.global_step}, "
                    f"{progress.samples} clips trained)")
            resized = (reader_state.get("world_size"), reader_state.get("num_workers")) != (
                world_size, cfg.data.loader_workers)
            if resized and train_stream.epoch == progress.epoch:
                line += (f"; {reader_state.get('world_size')} -> {world_size} workers: the rest of the "
                         f"epoch is re-planned, {train_stream.steps_left} steps of {global_batch} clips")
            _log(rank, line)

    logger = MetricLogger(loop_config["mlflow"]["uri"], loop_config["mlflow"]["run_id"],
                          enabled=rank == 0 and not dry_run)
    logger.set_tags(init_tags)
    monitor = None  # one per node: its first rank samples the machine
    if context.get_local_rank() == 0 and loop_config["mlflow"]["run_id"] and cfg.run.system_metrics_every_s \
            and not dry_run:
        monitor = start_system_metrics(loop_config["mlflow"]["uri"], loop_config["mlflow"]["run_id"],
                                       context.get_node_rank(), cfg.run.system_metrics_every_s)
    show_progress = rank == 0 and loop_config.get("progress", False) and not dry_run
    autocast = _autocast(cfg, device)
    # One id for this attempt on every rank (rank 0's): the checkpoints' folder names and the
    # ledger's attempts.
    attempt = broadcast_object(uuid.uuid4().hex[:8])
    ledger = _Ledger(cfg, rank, world_size, attempt, progress) if cfg.run.sample_ledger and not dry_run else None
    damage = _DamageCounts(cfg.data.allow_damaged)

    def save_and_report(metrics: dict, kind: str) -> None:
        logger.flush()  # the steps a checkpoint covers are in MLflow before it exists
        upload_async = cfg.run.checkpoint_upload == "async" and kind != "final"
        # An asynchronous upload outlives this call: Ray deletes the local copy once uploaded.
        with contextlib.nullcontext(tempfile.mkdtemp(prefix="avpea-ckpt-")) if upload_async \
                else tempfile.TemporaryDirectory() as directory:
            write_checkpoint(Path(directory), rank=rank, world_size=world_size, model=model,
                             config=loop_config["config"], optimizer=optimizer, scheduler=scheduler,
                             progress=progress, reader_state=train_stream.state_dict(),
                             best_state=best_state, tokenizer=getattr(task, "tokenizer", None),
                             files=adapter_files)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             # Unique per attempt: a resumed attempt re-reaches the steps of
                             # checkpoints that still exist (Ray would delete the new one
                             # when it retires the old one of the same name).
                             checkpoint_dir_name=f"checkpoint_{progress.global_step:09d}_{kind}_{attempt}",
                             checkpoint_upload_fn=_uploader(cfg, rank, progress.global_step,
                                                             lambda: progress.global_step),
                             **({"checkpoint_upload_mode": ray.train.CheckpointUploadMode.ASYNC}
                                if upload_async else {}))

    while progress.epoch < cfg.optim.epochs:
        # A resume at another world size may find the rest of the epoch shorter than one step
        # on every rank (the remainder): the stream is then at the next epoch already.
        rest_is_empty = train_stream.epoch == progress.epoch + 1 and progress.batches_in_epoch > 0
        if not rest_is_empty:
            train_stream.set_epoch(progress.epoch)
        # This epoch's steps on each rank: those done plus what the stream has left (another
        # count than steps_per_epoch after a resume at another world size).
        epoch_steps = progress.batches_in_epoch + (
            0 if rest_is_empty else train_stream.steps_left)
        if dry_run:
            epoch_steps = 1
        model.train()
        window = _Window()
        bar = _EpochBar(progress.epoch, epoch_steps, progress.batches_in_epoch) if show_progress else None
        wait_start = time.perf_counter()
        for raw in (() if rest_is_empty else train_stream):
            window.wait += time.perf_counter() - wait_start
            _maybe_inject_failure(cfg, rank, progress.global_step)
            batch = task.make_batch(raw, device, training=True)
            loss = train_step(ddp_model, model, task, batch, optimizer, scheduler, autocast,
                              cfg.optim.grad_clip)
            progress.global_step += 1
            progress.batches_in_epoch += 1
            progress.samples += global_batch
            window.add(loss, len(raw["meta"]))
            if ledger:
                ledger.step(progress, raw["key"])
            if bar:
                bar.step(loss, len(raw["meta"]) * world_size)
            if progress.global_step % cfg.run.log_every_steps == 0:
                step_metrics = window.metrics(world_size) | {"lr": scheduler.get_last_lr()[0],
                                                             "samples": progress.samples, "workers": world_size}
                logger.log(step_metrics, progress.global_step)
                if rank == 0:
                    _log(rank, f"epoch {progress.epoch} step {progress.batches_in_epoch}/{epoch_steps}: "
                               f"loss {step_metrics['train_loss']:.3f}, lr {step_metrics['lr']:.2e}, "
                               f"{step_metrics['samples_per_s']:.1f} clips/s, "
                               f"{step_metrics['data_wait_s']:.2f} s waiting for data")
                window = _Window()
            if dry_run:
                break
            if (cfg.run.checkpoint_every_steps and progress.global_step % cfg.run.checkpoint_every_steps == 0
                    and train_stream.epoch == progress.epoch):  # not the epoch's last step
                # No validation score mid-epoch; checkpoints are kept newest first, and every
                # one carries the best adapters so far.
                save_and_report({"epoch": progress.epoch, "step": progress.global_step}, "step")
            wait_start = time.perf_counter()

        if bar:
            bar.close()
        damage.add("train", train_stream)
        val = _evaluate(model, task, stream(cfg.data.val, training=False), device, autocast,
                        max_batches=1 if dry_run else None, damage=damage, split="val")
        primary = task.selection(cfg)[0]
        score = val.get(primary, float("nan"))
        if rank == 0:
            _log(rank, f"epoch {progress.epoch}: val {primary} {score:.2f} "
                       f"({', '.join(f'{k} {v:.1f}' for k, v in val.items() if k != primary)})")
        if dry_run:
            ray.train.report({"dry_run": 1, **{f"val_{k}": v for k, v in val.items()}})
            return
        if not math.isnan(score) and score > progress.best_score:
            progress.best_score, progress.best_epoch, progress.best_metrics = score, progress.epoch, val
            best_state = {k: v.detach().clone().cpu() for k, v in model.trainable_state_dict().items()}
        logger.log({f"val_{k}": v for k, v in val.items()} | {"epoch": progress.epoch}, progress.global_step)
        progress.epoch += 1
        progress.batches_in_epoch = 0
        save_and_report({"epoch": progress.epoch - 1, "step": progress.global_step, "val_score": score,
                         **{f"val_{k}": v for k, v in val.items()}}, "epoch")

    final = {"epoch": progress.epoch - 1, "step": progress.global_step, "val_score": progress.best_score,
             "best_epoch": progress.best_epoch, **{f"val_{k}": v for k, v in progress.best_metrics.items()}}
    if cfg.data.test and best_state is not None:
        model.load_state_dict(best_state, strict=False)
        test = _evaluate(model, task, stream(cfg.data.test, training=False), device, autocast, final=True,
                         damage=damage, split="test")
        final |= {f"test_{k}": v for k, v in test.items()}
        logger.log({f"test_{k}": v for k, v in test.items()}, progress.global_step)
    final |= damage.totals(device)
    save_and_report(final, "final")
    if monitor:
        monitor.finish()


# -- pieces --------------------------------------------------------------------------------

def train_step(ddp_model, model: AVPEAModel, task, batch, optimizer, scheduler, autocast,
               grad_clip: float) -> torch.Tensor:
    """One optimisation step on one batch: forward, the task's loss, backward, clipping,
    AdamW and the schedule (what `bench/train_step.py` times, without Ray).

    Returns:
        The loss, detached and still on the device: reading it is a host synchronisation,
        left to whoever needs the number.
    """
    with autocast:
        outputs = ddp_model(batch.frames, batch.fbank, **batch.head_inputs)
        loss, _ = task.loss(model.head, outputs, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


class _EpochBar:
    """Rank 0's tqdm bar of one epoch (steps, ETA, loss, clips/s), shown on the job's console.

    A worker's output reaches the driver line by line, so each redraw goes out as its own line
    (tqdm's carriage returns become newlines), at most every `INTERVAL_S` seconds. The loss is
    read from the device only then, not every step."""

    INTERVAL_S = 10.0

    def __init__(self, epoch: int, total: int, done: int, stream=None):
        from tqdm import tqdm

        self.bar = tqdm(desc=f"epoch {epoch}", total=total, initial=done, unit="step",
                        file=_Lines(stream or sys.__stderr__),
                        mininterval=self.INTERVAL_S, maxinterval=self.INTERVAL_S, dynamic_ncols=False, ncols=100)
        self.samples, self.start = 0, time.perf_counter()

    def step(self, loss: torch.Tensor, samples: int) -> None:
        self.samples += samples
        if time.time() - self.bar.last_print_t >= self.INTERVAL_S:  # tqdm's clock: time.time
            self.bar.set_postfix(loss=f"{float(loss):.3f}", clips_per_s=f"{self.samples / (time.perf_counter() - self.start):.1f}",
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """A stream that ends tqdm's in-place redraws with a newline instead of starting them with
    a carriage return (a log streamed line by line has no "in place")."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _Window:
    """Running step metrics between two logs.

    The loss is summed on the device and read once, at log time: reading it every step
    would make the host wait for each step to finish before queueing the next one."""

    def __init__(self):
        self.start, self.wait, self.steps, self.samples = time.perf_counter(), 0.0, 0, 0
        self.loss: torch.Tensor | float = 0.0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss, self.steps, self.samples = self.loss + loss.detach(), self.steps + 1, self.samples + samples

    def metrics(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"train_loss": float(self.loss) / max(self.steps, 1),
                "samples_per_s": self.samples * world_size / elapsed,
                "data_wait_s": self.wait}


@torch.no_grad()
def _evaluate(model, task, eval_stream: ShardStream, device, autocast, max_batches: int | None = None,
              final: bool = False, damage: "_DamageCounts | None" = None,
              split: str = "val") -> dict[str, float]:
    """The task's metrics over a split, every sample exactly once across ranks.

    `final` marks the test evaluation (captioning adds METEOR there by default). With
    `data.allow_damaged`, the split's lost samples and damaged shards are added to the metrics
    (summed over ranks); without it, damage has already stopped the run in the reader.
    """
    model.eval()
    evaluator = task.evaluator(final=final)
    for i, raw in enumerate(eval_stream):
        if max_batches is not None and i >= max_batches:
            break
        with autocast:
            evaluator.update(model, task.make_batch(raw, device, training=False))
    metrics = evaluator.compute(device)
    if damage is not None and damage.enabled:
        damage.add(split, eval_stream)
        metrics |= damage.reduced(split, device)
    model.train()
    return metrics


class _DamageCounts:
    """Samples lost and shards found damaged per split, when `data.allow_damaged` lets a run
    go on past them (reported in the metrics, the summary and MLflow)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.lost: dict[str, int] = {}
        self.shards: dict[str, set] = {}

    def add(self, split: str, stream: ShardStream) -> None:
        if self.enabled:
            stats = stream.stats
            self.lost[split] = stats["samples_lost"] + stats["decode_errors"]
            self.shards.setdefault(split, set()).update(stats["corrupt_shards"])

    def reduced(self, split: str, device) -> dict[str, float]:
        # Samples are each read by one rank: their counts add up. A damaged shard may be met by
        # every rank that reads part of it: count the distinct ones.
        lost = torch.tensor([self.lost.get(split, 0)], dtype=torch.float64, device=device)
        if is_distributed():
            torch.distributed.all_reduce(lost)
        shards = set().union(*gather_objects(self.shards.get(split, set())))
        return {"samples_lost": lost.item(), "damaged_shards": float(len(shards))}

    def totals(self, device) -> dict[str, float]:
        """Training's counts (as train_* metrics) for the final report."""
        if not self.enabled:
            return {}
        return {f"train_{k}": v for k, v in self.reduced("train", device).items()}


def _optimizer(model: AVPEAModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Gates, norms and biases (ndim <= 1) take no weight decay.
    params = [p for _, p in model.trainable_named_parameters()]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr)


def _schedule(optimizer, cfg: TrainConfig, samples_per_epoch: int, global_batch: int = 1,
              full_batch: int | None = None) -> "SampleSchedule":
    """The run's learning-rate schedule (see `SampleSchedule`). With the defaults
    (`global_batch=1`) a "sample" is a step: `samples_per_epoch` steps per epoch."""
    return SampleSchedule(optimizer, cfg, samples_per_epoch, global_batch, full_batch or global_batch)


class SampleSchedule:
    """Linear warm-up to `optim.lr`, then cosine to `min_lr_ratio * lr`, as a function of the
    clips trained by all ranks together, not of the steps: a run that loses or gains workers
    (a smaller or larger global batch per step) stays on the same curve.

    The cosine spans `optim.epochs x samples_per_epoch` clips (the training split's size); the
    warm-up lasts `optim.warmup_steps` steps of the run's full size (`full_batch` = batch_size
    x run.num_workers, its max when elastic). A run that never resizes warms up exactly as the
    per-step schedule did (step s: (s + 1) / warmup_steps); its cosine now spans the whole
    split, the epoch's remainder (< slots x batch_size clips) included, so it ends a hair above
    min_lr_ratio. Its state (for checkpoints) is the clip count.

    Args:
        optimizer: its parameter groups' lr is set every step.
        samples_per_epoch: clips in one epoch (the schedule's length is epochs x this).
        global_batch: clips one step trains on all ranks together, in this attempt.
        full_batch: the global batch at the run's full size (the warm-up's unit).
    """

    def __init__(self, optimizer, cfg: TrainConfig, samples_per_epoch: int, global_batch: int,
                 full_batch: int):
        self.optimizer, self.global_batch, self.full_batch = optimizer, global_batch, full_batch
        self.lr, self.min_lr_ratio = cfg.optim.lr, cfg.optim.min_lr_ratio
        self.total = max(cfg.optim.epochs * samples_per_epoch, 1)
        self.warmup = min(cfg.optim.warmup_steps * full_batch, self.total // 2)
        self.samples = 0
        self._apply()

    def factor(self, samples: int) -> float:
        """The lr multiplier for the step that starts after `samples` clips."""
        if samples < self.warmup:
            return min((samples + self.full_batch) / self.warmup, 1.0)
        progress = min((samples - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.factor(self.samples)

    def step(self) -> None:
        """After an optimiser step: `global_batch` more clips trained."""
        self.samples += self.global_batch
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint of the per-step LambdaLR this replaced counts steps (`last_epoch`).
        self.samples = int(state["samples"]) if "samples" in state else int(state["last_epoch"]) * self.full_batch
        self._apply()


def _autocast(cfg: TrainConfig, device: torch.device):
    precision = cfg.optim.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Ledger:
    """What this rank trains on, appended to `<storage>/<run>/ledger/rank{R}.jsonl` (local
    storage only; for audits and the resume tests).

    Every attempt (a start of the worker group; one id on all its ranks) first writes where it
    restored from and its world size, then one line per step; nothing is ever overwritten, so
    an audit can tell a resume from a restart, also across world sizes: an attempt's lines
    after the next attempt's restore point were rolled back and re-done (`tests/ledger.py`).
    """

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, attempt: str, restored: Progress):
        folder = Path(cfg.run.storage_path) / cfg.run.name / "ledger"
        folder.mkdir(parents=True, exist_ok=True)
        self.attempt, self.rank, self.world_size = attempt, rank, world_size
        self.file = open(folder / f"rank{rank}.jsonl", "a")
        self._write({"restored": {"epoch": restored.epoch, "batch": restored.batches_in_epoch,
                                  "global_step": restored.global_step, "samples": restored.samples},
                     "time": time.time()})

    def step(self, progress: Progress, keys: list[str]) -> None:
        self._write({"epoch": progress.epoch, "batch": progress.batches_in_epoch,
                     "global_step": progress.global_step, "samples": progress.samples, "ids": list(keys)})

    def _write(self, entry: dict) -> None:
        self.file.write(json.dumps({"attempt": self.attempt, "rank": self.rank, "world_size": self.world_size,
                                    **entry}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())  # a SIGKILL right after must not lose the line


def _latest_intact_checkpoint(workdir: Path) -> tuple[Path, dict] | None:
    """The newest intact checkpoint in this run's folder (see `checkpoint.latest_intact`),
    fetched into `workdir`.

    Not `ray.train.get_checkpoint()`: that is the latest checkpoint Ray registered, whole or
    not, and a damaged one would end the run instead of falling back to the one before.
    """
    import pyarrow.fs

    store = ray.train.get_context().get_storage()
    fs, run_path = store.storage_filesystem, store.experiment_fs_path
    entries = fs.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True))
    names = [e.base_name for e in entries
             if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("checkpoint_")]

    def read_text(name: str) -> str:
        with fs.open_input_stream(f"{run_path}/{name}") as f:
            return f.read().decode()

    def fetch(name: str, local: Path) -> None:
        pyarrow.fs.copy_files(f"{run_path}/{name}", str(local), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())

    return latest_intact(names, read_text, fetch, workdir)


def _uploader(cfg: TrainConfig, rank: int, global_step: int, loop_step: Callable[[], int]):
    """Ray Train's `checkpoint_upload_fn`: copy the files into the run folder one by one, the
    manifest last (a copy cut short is recognisably partial). `loop_step()` reads the loop's
    global step now (an asynchronous upload runs beside the loop; a test hook watches it)."""
    import pyarrow.fs

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        _maybe_hold_upload(cfg, rank, global_step, loop_step)
        store = ray.train.get_context().get_storage()
        fs, dest = store.storage_filesystem, store.build_checkpoint_path_from_name(dir_name)
        fs.create_dir(dest)
        local = Path(checkpoint.path)
        files = [p.relative_to(local).as_posix() for p in sorted(local.rglob("*")) if p.is_file()]

        def put(path: Path, name: str) -> None:
            fs.create_dir(f"{dest}/{name}".rsplit("/", 1)[0])
            pyarrow.fs.copy_files(str(path), f"{dest}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)

        def maybe_fail(number: int) -> None:
            if number == len(files) // 2:
                _maybe_inject_failure(cfg, rank, global_step, during_checkpoint=True)

        upload_files(local, files, put, maybe_fail)
        return ray.train.Checkpoint(path=dest, filesystem=fs)

    return upload


def _maybe_hold_upload(cfg: TrainConfig, rank: int, global_step: int, loop_step: Callable[[], int]) -> None:
    """Test hook (`run.hold_upload_at_step`, once per run): hold this upload until the loop has
    run 2 more steps (at most 20 s) and write down the loop's step before and after. With
    `run.checkpoint_upload=async` the loop goes on meanwhile; with "sync" it waits in
    `ray.train.report` for this very upload, so the hold runs out with the loop where it was."""
    run = cfg.run
    if rank != run.fail_rank or not run.hold_upload_at_step or global_step != run.hold_upload_at_step:
        return
    marker = Path(run.storage_path) / run.name / f"upload-held-at-{global_step}"
    if marker.exists():
        return
    before, deadline = loop_step(), time.monotonic() + 20
    while loop_step() < global_step + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"loop_step_before": before, "loop_step_after": loop_step()}))
    _log(rank, f"test hook: upload of step {global_step} held; the loop went from step {before} "
               f"to {loop_step()}")


def _maybe_inject_failure(cfg: TrainConfig, rank: int, global_step: int,
                          during_checkpoint: bool = False) -> None:
    """Test hooks, each once per run (a marker file in the run folder remembers): rank
    `run.fail_rank` dies (SIGKILL, no clean-up) at `run.fail_at_step`, or half-way through
    uploading the checkpoint of `run.fail_in_checkpoint_at_step`; or it stops at
    `run.pause_at_step` until a test kills the driver."""
    run = cfg.run
    if rank != run.fail_rank or not (run.fail_at_step or run.fail_in_checkpoint_at_step or run.pause_at_step):
        return
    if during_checkpoint:
        hooks = [("failure-injected-in-checkpoint", run.fail_in_checkpoint_at_step)]
    else:
        hooks = [("failure-injected", run.fail_at_step), ("paused", run.pause_at_step)]
    for what, at in hooks:
        marker = Path(run.storage_path) / run.name / f"{what}-at-{global_step}"
        if not at or global_step != at or marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        _log(rank, f"test hook: {what} at global step {global_step} on rank {rank}")
        if what == "paused":
            while True:
                time.sleep(60)
        os.kill(os.getpid(), signal.SIGKILL)


_logger = logging.getLogger("avpea_ray.train")


class _DropReportDumps(logging.Filter):
    """Ray Train logs every `ray.train.report` in the worker at INFO with the whole metric
    dict ("Reporting training result N: TrainingReport(...metrics={...})"); the loop prints
    its own one-line summaries instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Reporting training result")


def _quiet_ray_report_dumps() -> None:
    # On the root logger's handlers: Ray's logger for it is named by its file path, not "ray.*".
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropReportDumps) for f in handler.filters):
            handler.addFilter(_DropReportDumps())


def _log(rank: int, message: str) -> None:
    # Not print(): Ray Train patches print in workers and would show each line twice.
    _logger.info("[avpea-ray rank %d] %s", rank, message)
