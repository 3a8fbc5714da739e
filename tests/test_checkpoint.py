"""Checkpoint files: a round trip restores everything, a partial or altered checkpoint is
recognised, the newest intact one is chosen, and nothing read back is unpickled."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from avpea_ray.train.checkpoint import (MANIFEST, CheckpointDamaged, Progress, latest_intact,
                                        read_checkpoint, verify, write_checkpoint)
from tests.toy import tiny_model


def _parts(seed: int = 0):
    model = tiny_model("avqa", seed=seed)
    params = [p for _, p in model.trainable_named_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    return model, optimizer, scheduler


def _write(directory: Path, step: int, world_size: int = 1) -> dict:
    model, optimizer, scheduler = _parts()
    loss = sum(p.sum() for _, p in model.trainable_named_parameters())
    loss.backward()
    optimizer.step()
    scheduler.step()
    progress = Progress(epoch=1, batches_in_epoch=step, global_step=step, best_score=0.5, best_epoch=0)
    for rank in range(world_size):
        write_checkpoint(directory, rank=rank, world_size=world_size, model=model, config={"x": 1},
                         optimizer=optimizer, scheduler=scheduler, progress=progress,
                         reader_state={"epoch": 1, "batches_consumed": step}, best_state=None)
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def test_round_trip_restores_adapters_optimiser_progress_reader_and_rng(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = _write(tmp_path / "ckpt", step=7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())  # the draws after saving

    model, optimizer, scheduler = _parts(seed=3)
    progress, reader, best = read_checkpoint(tmp_path / "ckpt", rank=0, model=model, optimizer=optimizer,
                                             scheduler=scheduler)
    assert (progress.global_step, progress.best_score) == (7, 0.5)
    assert reader == {"epoch": 1, "batches_consumed": 7} and best is None
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    for name, value in model.trainable_state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert optimizer.state_dict()["state"][0]["step"].item() == 1 and scheduler.last_epoch == 1


@pytest.mark.parametrize("damage", ["no manifest", "truncated", "altered", "missing rank file"])
def test_partial_or_altered_checkpoints_are_recognised(tmp_path, damage):
    folder = tmp_path / "ckpt"
    _write(folder, step=3, world_size=2)
    verify(folder)
    state = folder / "train_state.pt"
    if damage == "no manifest":
        (folder / MANIFEST).unlink()
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "altered":
        data = bytearray(state.read_bytes())
        data[-10] ^= 0xFF
        state.write_bytes(bytes(data))
    else:
        (folder / "rng-rank1.json").unlink()
    with pytest.raises(CheckpointDamaged):
        verify(folder)


def test_newest_intact_checkpoint_is_chosen(tmp_path):
    run = tmp_path / "run"
    for step in (3, 6, 9):
        _write(run / f"checkpoint_{step}", step=step)
    (run / "checkpoint_9" / "adapters" / "adapter_model.safetensors").write_bytes(b"cut short")
    (run / "checkpoint_12").mkdir()  # an upload that never got to its manifest

    def read_text(name):
        return (run / name).read_text()

    def fetch(name, local):
        shutil.copytree(run / name, local)

    local, manifest = latest_intact(sorted(p.name for p in run.iterdir()), read_text, fetch, tmp_path / "work")
    assert manifest["progress"]["global_step"] == 6 and local.name == "checkpoint_6"


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {}


def test_checkpoint_files_are_never_unpickled(tmp_path):
    folder = tmp_path / "ckpt"
    _write(folder, step=2)
    # Whoever can write to the storage path plants an object whose unpickling runs code.
    torch.save({"optimizer": _Payload(), "scheduler": {}}, folder / "train_state.pt")
    manifest = json.loads((folder / MANIFEST).read_text())
    model, optimizer, scheduler = _parts()
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        read_checkpoint(folder, rank=0, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not _Payload.ran
    assert manifest["format"]


def test_unregistered_folders_are_removed_and_an_unreadable_ray_snapshot_is_set_aside(tmp_path):
    from avpea_ray.train.resume import RAY_SNAPSHOT, tidy_run_folder

    run = tmp_path / "run"
    for name in ("checkpoint_000000003_step_a", "checkpoint_000000006_step_a", "checkpoint_000000009_step_b"):
        (run / name).mkdir(parents=True)
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_000000003_step_a"}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000000006_step_a"},
                "pending_training_results": []}
    (run / RAY_SNAPSHOT).write_text(json.dumps(snapshot))
    (run / "notes.txt").write_text("mine")
    assert tidy_run_folder(str(run)) == ["checkpoint_000000009_step_b"]  # never registered
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint_000000003_step_a", "checkpoint_000000006_step_a", RAY_SNAPSHOT, "notes.txt"]

    # A snapshot cut short would stop Ray before any worker: it is set aside (not deleted), and
    # with nothing known to be unregistered, every folder stays for the resume to choose from.
    (run / RAY_SNAPSHOT).write_text(json.dumps(snapshot)[:40])
    assert tidy_run_folder(str(run)) == []
    names = sorted(p.name for p in run.iterdir())
    assert RAY_SNAPSHOT not in names and any(n.startswith(RAY_SNAPSHOT + ".unreadable-") for n in names)
    assert {"checkpoint_000000003_step_a", "checkpoint_000000006_step_a"} <= set(names)
