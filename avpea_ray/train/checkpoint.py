"""Training checkpoints: adapters + head, optimiser, schedule, reader position, RNG states.

Layout of one checkpoint directory (Ray Train merges the files every rank reports):

    config.json                resolved TrainConfig of the run
    adapters/                  current adapters + head (PEFT-style adapter files)
    best_adapters/             the best-on-validation adapters + head so far
        tokenizer/             (avr, avc) the caption tokenizer, as `save_pretrained` writes it
    train_state.pt             optimiser, scheduler, progress, best score, reader position
    rng-rank{R}.pt             each rank's Python / NumPy / torch RNG states

No frozen backbone weights are ever inside.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.adapter_io import load_adapters, read_adapter_config, save_adapters
from ..model.task_model import AVPEAModel


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0             # the epoch in progress (== epochs when training is done)
    batches_in_epoch: int = 0  # batches of `epoch` already trained
    global_step: int = 0
    best_score: float = float("-inf")
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)  # validation metrics of the best epoch


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(directory: Path, *, rank: int, model: AVPEAModel, config: dict,
                     optimizer, scheduler, progress: Progress, reader_state: dict,
                     best_state: dict[str, torch.Tensor] | None, tokenizer=None) -> None:
    """Write this rank's part of a checkpoint into `directory`.

    Rank 0 writes everything shared (DDP keeps the trainable state identical on all ranks);
    every rank writes its own RNG state. A task's tokenizer (retrieval, captioning) is saved
    beside the adapters so that they can be used without the training data.
    """
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / f"rng-rank{rank}.pt")
    if rank != 0:
        return
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_adapters(model, directory / "adapters")
    if best_state is not None:
        save_adapters(model, directory / "best_adapters", tensors=best_state,
                      extra={"best_epoch": progress.best_epoch, "best_score": progress.best_score})
    if tokenizer is not None:
        for folder in ("adapters", "best_adapters"):
            if (directory / folder).exists():
                tokenizer.save_pretrained(str(directory / folder / "tokenizer"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "progress": asdict(progress), "reader": reader_state},
               directory / "train_state.pt")


def read_checkpoint(directory: Path, *, rank: int, model: AVPEAModel, optimizer,
                    scheduler) -> tuple[Progress, dict, dict[str, torch.Tensor] | None]:
    """Restore a checkpoint into the model, optimiser and scheduler.

    Returns:
        (progress, reader state, best trainable state or None).

    Raises:
        AdapterMismatchError: the checkpoint was made by a different model architecture.
    """
    load_adapters(model, directory / "adapters")  # refuses a mismatched model, naming fields
    state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = directory / f"rng-rank{rank}.pt"
    if rng_file.exists():  # a different world size has no state for new ranks
        set_rng_state(torch.load(rng_file, weights_only=False))
    best_state = None
    if (directory / "best_adapters").exists():
        from safetensors.torch import load_file
        read_adapter_config(directory / "best_adapters")
        best_state = load_file(str(directory / "best_adapters" / "adapter_model.safetensors"))
    return Progress(**state["progress"]), state["reader"], best_state
