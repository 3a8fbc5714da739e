"""Auditing the sample ledger (`run.sample_ledger`): what a run trained on, across attempts.

Each rank appends to `<run>/ledger/rank{R}.jsonl`: per attempt (a process start) one line with
the point it restored from, then one line per step. An attempt's steps after the next
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


def effective_batches(run_dir: Path) -> dict[tuple[int, int, int], list[str]]:
    """(epoch, batch, rank) -> sample ids, the training the run's checkpoints hold.

    Raises AssertionError if an attempt trained a step twice (an audit failure by itself).
    """
    batches: dict[tuple[int, int, int], list[str]] = {}
    for rank, runs in attempts(run_dir).items():
        by_step: dict[int, dict] = {}
        for attempt in runs:
            cut = attempt.restored["global_step"]
            by_step = {s: e for s, e in by_step.items() if s <= cut}  # rolled back by the crash
            for entry in attempt.steps:
                assert entry["global_step"] not in by_step, f"rank {rank} trained step {entry['global_step']} twice"
                by_step[entry["global_step"]] = entry
        for entry in by_step.values():
            batches[(entry["epoch"], entry["batch"], rank)] = entry["ids"]
    return batches


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
