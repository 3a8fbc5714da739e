"""Auditing the sample ledger (`run.sample_ledger`): what a run trained on, across attempts.

Each rank appends to `<run>/ledger/rank{R}.jsonl`: per attempt (a start of the worker group, one
id on every rank) one line with the point it restored from and the world size, then one line per
step. An attempt's steps after the next
attempt's restore point were rolled back (the crash lost them) and are trained again, so the
run's effective training is: every attempt's steps up to the next attempt's restore point.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Attempt:
    rank: int
    restored: dict                       # {"epoch", "batch", "global_step"}
    steps: list[dict] = field(default_factory=list)


def attempts(run_dir: Path) -> dict[int, list[Attempt]]:
    """Per rank, its attempts in the order they ran."""
    out: dict[int, list[Attempt]] = {}
    for file in sorted((Path(run_dir) / "ledger").glob("rank*.jsonl")):
        current: dict[str, Attempt] = {}
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            if "restored" in entry:
                attempt = current[entry["attempt"]] = Attempt(entry["rank"], entry["restored"])
                out.setdefault(entry["rank"], []).append(attempt)
            else:
                current[entry["attempt"]].steps.append(entry)
    return out


@dataclass
class RunAttempt:
    """One start of the worker group: its id (the same on every rank), world size, restore
    point, and per rank the steps it logged."""

    attempt: str
    world_size: int
    restored: dict
    started: float
    steps: dict[int, list[dict]] = field(default_factory=dict)


def run_attempts(run_dir: Path) -> list[RunAttempt]:
    """The run's attempts across all ranks, in the order they started (whatever their world
    sizes: an attempt at 1 worker after one at 2 has no rank-1 lines)."""
    found: dict[str, RunAttempt] = {}
    for file in sorted((Path(run_dir) / "ledger").glob("rank*.jsonl")):
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            if "restored" in entry:
                run = found.setdefault(entry["attempt"], RunAttempt(
                    entry["attempt"], entry.get("world_size", 0), entry["restored"], entry.get("time", 0.0)))
                run.started = min(run.started, entry.get("time", 0.0))
                assert run.restored == entry["restored"], f"ranks of attempt {entry['attempt']} restored apart"
                run.steps.setdefault(entry["rank"], [])
            else:
                found[entry["attempt"]].steps[entry["rank"]].append(entry)
    return sorted(found.values(), key=lambda run: run.started)


def effective_batches(run_dir: Path) -> dict[tuple[int, int, int], list[str]]:
    """(epoch, batch, rank) -> sample ids, the training the run's checkpoints hold.

    Attempts are replayed in the order they started: each one first rolls back every rank's
    steps after its restore point (the crash lost them), then adds its own. So a rank that an
    attempt at a smaller world size no longer has still has its rolled-back steps removed.

    Raises AssertionError if an attempt trained a step twice (an audit failure by itself).
    """
    by_step: dict[tuple[int, int], dict] = {}  # (rank, global step) -> entry
    for run in run_attempts(run_dir):
        cut = run.restored["global_step"]
        by_step = {key: e for key, e in by_step.items() if key[1] <= cut}
        for rank, steps in run.steps.items():
            for entry in steps:
                key = (rank, entry["global_step"])
                assert key not in by_step, f"rank {rank} trained step {entry['global_step']} twice"
                by_step[key] = entry
    return {(e["epoch"], e["batch"], rank): e["ids"] for (rank, _), e in by_step.items()}


def trained_per_epoch(run_dir: Path) -> dict[int, list[str]]:
    """epoch -> every sample id the run's checkpoints were trained on in it, all ranks and
    attempts together (an id twice in a list is a sample trained twice)."""
    out: dict[int, list[str]] = {}
    for (epoch, _, _), ids in sorted(effective_batches(run_dir).items()):
        out.setdefault(epoch, []).extend(ids)
    return out


def planned_batches(train_url: str, *, world_size: int, epochs: int, batch_size: int, loader_workers: int,
                    shuffle_buffer: int, seed: int = 0) -> dict[tuple[int, int, int], list[str]]:
    """(epoch, batch, rank) -> sample ids an uninterrupted run trains on (the reader's plan)."""
    from avpea_ray.data.reader import ShardStream

    planned = {}
    for rank in range(world_size):
        stream = ShardStream(train_url, rank=rank, world_size=world_size, training=True, batch_size=batch_size,
                             num_workers=loader_workers, seed=seed, shuffle_buffer=shuffle_buffer)
        for epoch in range(epochs):
            stream.set_epoch(epoch)
            for number, batch in enumerate(stream, start=1):
                planned[(epoch, number, rank)] = list(batch["key"])
    return planned
