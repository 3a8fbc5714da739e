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
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from ..config import from_dict
from ..data.reader import ShardStream
from ..data.shards import read_index
from ..model.task_model import AVPEAModel
from .checkpoint import Progress, read_checkpoint, write_checkpoint
from .config import TrainConfig
from .tasks import make_task
from .tracking import MetricLogger


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. `loop_config`: {"config": resolved TrainConfig dict,
    "mlflow": {"uri", "run_id"}, "dry_run": bool}."""
    cfg: TrainConfig = from_dict(TrainConfig, loop_config["config"])
    dry_run = loop_config.get("dry_run", False)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.data.seed)  # identical initial adapters/head on every rank
    # Host-side randomness (e.g. which caption of a clip a step trains on) differs per rank but
    # repeats from run to run; checkpoints carry these states on.
    random.seed(f"avpea/{cfg.data.seed}/{rank}")
    np.random.seed((cfg.data.seed * 1_000_003 + rank) % 2**32)

    task = make_task(cfg, read_index(cfg.data.train))
    model = AVPEAModel(cfg.model, cfg.task, task.head_kwargs() | cfg.head).to(device)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    optimizer = _optimizer(model, cfg)

    def stream(url: str, training: bool) -> ShardStream:
        return ShardStream(url, rank=rank, world_size=world_size, training=training,
                           batch_size=cfg.data.batch_size if training else cfg.data.eval_batch_size,
                           num_workers=cfg.data.loader_workers, seed=cfg.data.seed,
                           shuffle_buffer=cfg.data.shuffle_buffer)

    train_stream = stream(cfg.data.train, training=True)
    steps_per_epoch = 1 if dry_run else train_stream.steps_per_epoch
    scheduler = _schedule(optimizer, cfg, steps_per_epoch)
    progress, best_state = Progress(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint and not dry_run:
        with checkpoint.as_directory() as directory:
            progress, reader_state, best_state = read_checkpoint(
                Path(directory), rank=rank, model=model, optimizer=optimizer, scheduler=scheduler)
        train_stream.load_state_dict(reader_state)
        _log(rank, f"resumed at epoch {progress.epoch}, batch {progress.batches_in_epoch} "
                   f"(global step {progress.global_step})")

    logger = MetricLogger(loop_config["mlflow"]["uri"], loop_config["mlflow"]["run_id"],
                          enabled=rank == 0 and not dry_run)
    autocast = _autocast(cfg, device)
    ledger = _ledger(cfg, rank) if cfg.run.sample_ledger and not dry_run else None

    def save_and_report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint(Path(directory), rank=rank, model=model, config=loop_config["config"],
                             optimizer=optimizer, scheduler=scheduler, progress=progress,
                             reader_state=train_stream.state_dict(), best_state=best_state,
                             tokenizer=getattr(task, "tokenizer", None))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    while progress.epoch < cfg.optim.epochs:
        train_stream.set_epoch(progress.epoch)
        model.train()
        window = _Window()
        wait_start = time.perf_counter()
        for raw in train_stream:
            window.wait += time.perf_counter() - wait_start
            _maybe_inject_failure(cfg, rank, progress.global_step)
            batch = task.make_batch(raw, device, training=True)
            with autocast:
                outputs = ddp_model(batch.frames, batch.fbank, **batch.head_inputs)
                loss, parts = task.loss(model.head, outputs, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            progress.global_step += 1
            progress.batches_in_epoch += 1
            window.add(loss.item(), len(raw["meta"]))
            if ledger:
                ledger.write(json.dumps({"epoch": progress.epoch, "batch": progress.batches_in_epoch,
                                         "rank": rank, "ids": list(raw["key"])}) + "\n")
                ledger.flush()
            if progress.global_step % cfg.run.log_every_steps == 0:
                step_metrics = window.metrics(world_size) | {"lr": scheduler.get_last_lr()[0]}
                logger.log(step_metrics, progress.global_step)
                if rank == 0:
                    _log(rank, f"epoch {progress.epoch} step {progress.batches_in_epoch}/{steps_per_epoch}: "
                               f"loss {step_metrics['train_loss']:.3f}, lr {step_metrics['lr']:.2e}, "
                               f"{step_metrics['samples_per_s']:.1f} clips/s, "
                               f"{step_metrics['data_wait_s']:.2f} s waiting for data")
                window = _Window()
            if dry_run:
                break
            if (cfg.run.checkpoint_every_steps and progress.global_step % cfg.run.checkpoint_every_steps == 0
                    and progress.batches_in_epoch < steps_per_epoch):
                # No validation score mid-epoch: NaN ranks these below every epoch-end
                # checkpoint, so top-k keeps the best epochs (Ray always keeps the latest).
                save_and_report({"epoch": progress.epoch, "step": progress.global_step,
                                 "val_score": float("nan")})
            wait_start = time.perf_counter()

        val = _evaluate(model, task, stream(cfg.data.val, training=False), device, autocast,
                        max_batches=1 if dry_run else None)
        score = val.get(task.primary_metric, float("nan"))
        if rank == 0:
            _log(rank, f"epoch {progress.epoch}: val {task.primary_metric} {score:.2f} "
                       f"({', '.join(f'{k} {v:.1f}' for k, v in val.items() if k != task.primary_metric)})")
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
                         **{f"val_{k}": v for k, v in val.items()}})

    final = {"epoch": progress.epoch - 1, "step": progress.global_step, "val_score": progress.best_score,
             "best_epoch": progress.best_epoch, **{f"val_{k}": v for k, v in progress.best_metrics.items()}}
    if cfg.data.test and best_state is not None:
        model.load_state_dict(best_state, strict=False)
        test = _evaluate(model, task, stream(cfg.data.test, training=False), device, autocast, final=True)
        final |= {f"test_{k}": v for k, v in test.items()}
        logger.log({f"test_{k}": v for k, v in test.items()}, progress.global_step)
    save_and_report(final)


# -- pieces --------------------------------------------------------------------------------

class _Window:
    """Running step metrics between two logs."""

    def __init__(self):
        self.start, self.wait, self.loss, self.steps, self.samples = time.perf_counter(), 0.0, 0.0, 0, 0

    def add(self, loss: float, samples: int) -> None:
        self.loss, self.steps, self.samples = self.loss + loss, self.steps + 1, self.samples + samples

    def metrics(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"train_loss": self.loss / max(self.steps, 1),
                "samples_per_s": self.samples * world_size / elapsed,
                "data_wait_s": self.wait}


@torch.no_grad()
def _evaluate(model, task, eval_stream: ShardStream, device, autocast,
              max_batches: int | None = None, final: bool = False) -> dict[str, float]:
    """The task's metrics over a split, every sample exactly once across ranks.

    `final` marks the test evaluation (captioning adds METEOR there by default).
    """
    model.eval()
    evaluator = task.evaluator(final=final)
    for i, raw in enumerate(eval_stream):
        if max_batches is not None and i >= max_batches:
            break
        with autocast:
            evaluator.update(model, task.make_batch(raw, device, training=False))
    metrics = evaluator.compute(device)
    model.train()
    return metrics


def _optimizer(model: AVPEAModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Gates, norms and biases (ndim <= 1) take no weight decay.
    params = [p for _, p in model.trainable_named_parameters()]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr)


def _schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(cfg.optim.epochs * steps_per_epoch, 1)
    warmup = min(cfg.optim.warmup_steps, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(cfg: TrainConfig, device: torch.device):
    precision = cfg.optim.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _ledger(cfg: TrainConfig, rank: int):
    folder = Path(cfg.run.storage_path) / cfg.run.name / "ledger"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"rank{rank}.jsonl", "a")


def _maybe_inject_failure(cfg: TrainConfig, rank: int, global_step: int) -> None:
    """Test hook: rank `run.fail_rank` dies (SIGKILL, no clean-up) once at `run.fail_at_step`."""
    if not cfg.run.fail_at_step or rank != cfg.run.fail_rank or global_step != cfg.run.fail_at_step:
        return
    marker = Path(cfg.run.storage_path) / cfg.run.name / f"failure-injected-at-{global_step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    _log(rank, f"fault injection: killing rank {rank} at global step {global_step}")
    os.kill(os.getpid(), signal.SIGKILL)


_logger = logging.getLogger("avpea_ray.train")


def _log(rank: int, message: str) -> None:
    # Not print(): Ray Train patches print in workers and would show each line twice.
    _logger.info("[avpea-ray rank %d] %s", rank, message)
