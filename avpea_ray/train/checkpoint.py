"""Training checkpoints: adapters + head, optimiser, schedule, reader position, RNG states.

Layout of one checkpoint directory (Ray Train merges the files every rank reports):

    config.json                resolved TrainConfig of the run
    adapters/                  current adapters + head (PEFT-style adapter files)
    best_adapters/             the best-on-validation adapters + head so far
        tokenizer/             (avr, avc) the caption tokenizer, as `save_pretrained` writes it
        inputs.json            how the training clips were made (frames, image size, fbank
                               settings), the seed a random backbone was drawn with
        vocab.json             (avqa) the question and answer vocabularies; (avel) classes.json
    train_state.pt             optimiser, scheduler (tensors and plain data only)
    rng-rank{R}.json           each rank's Python / NumPy / torch RNG states, as plain JSON
    avpea_checkpoint.json      the manifest: progress, reader position (with the shard index's
                               identity), every file's size and sha256; uploaded last, so a
                               checkpoint without it is partial

No frozen backbone weights are ever inside, and nothing read back is unpickled:
`train_state.pt` loads with `weights_only=True`, everything else is JSON or safetensors.

A resume takes the newest checkpoint in the run folder whose files all match its manifest
(`latest_intact`), not simply the latest one Ray registered: a checkpoint cut short by a kill
or damaged in storage is skipped for the one before it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..model.adapter_io import load_adapters, read_adapter_config, save_adapters
from ..model.task_model import AVPEAModel

MANIFEST = "avpea_checkpoint.json"
FORMAT = "avpea-checkpoint/2"
log = logging.getLogger(__name__)


class CheckpointDamaged(ValueError):
    """A checkpoint's files do not match its manifest (message names the file)."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0             # the epoch in progress (== epochs when training is done)
    batches_in_epoch: int = 0  # batches of `epoch` already trained
    global_step: int = 0       # steps of this run (each rank runs the same number)
    samples: int = 0           # clips trained by all ranks together (the schedule's clock)
    best_score: float = float("-inf")
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)  # validation metrics of the best epoch


# -- RNG states as plain data -------------------------------------------------------------

def _tensor_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _text_to_tensor(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states as JSON-able data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _tensor_to_text(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_text_to_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_tensor(s) for s in state["cuda"]])


# -- writing --------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


INPUTS_NAME = "inputs.json"
INPUTS_FORMAT = "avpea-inputs/1"


def inputs_json(cfg, train_index) -> bytes:
    """`inputs.json` of a run's adapter folders: the train split's clip settings (a video
    given to `predict` is made into the same clip), where that split is, and the seed a random
    backbone was drawn with (`torch.manual_seed(data.seed)` right before the model is built)."""
    from ..data.media import ClipSpec

    doc = {"format": INPUTS_FORMAT, "clips": ClipSpec.from_index(train_index).to_json(),
           "seed": cfg.data.seed, "train": cfg.data.train}
    return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")


def write_checkpoint(directory: Path, *, rank: int, world_size: int, model: AVPEAModel,
                     config: dict, optimizer, scheduler, progress: Progress, reader_state: dict,
                     best_state: dict[str, torch.Tensor] | None, tokenizer=None,
                     files: dict[str, bytes] | None = None) -> None:
    """Write this rank's part of a checkpoint into the local `directory`.

    Rank 0 writes everything shared (DDP keeps the trainable state identical on all ranks)
    and the manifest; every rank writes its own RNG state. A task's tokenizer (retrieval,
    captioning) is saved beside the adapters so that they can be used without the data, and so
    are `files` (`inputs.json`, a task's vocabulary): what prediction needs besides the weights.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))
    if rank != 0:
        return
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_adapters(model, directory / "adapters")
    if best_state is not None:
        save_adapters(model, directory / "best_adapters", tensors=best_state,
                      extra={"best_epoch": progress.best_epoch, "best_score": progress.best_score})
    for folder in ("adapters", "best_adapters"):
        if (directory / folder).exists():
            if tokenizer is not None:
                tokenizer.save_pretrained(str(directory / folder / "tokenizer"))
            for name, data in (files or {}).items():
                (directory / folder / name).write_bytes(data)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               directory / "train_state.pt")
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith("rng-rank")}
    manifest = {"format": FORMAT, "progress": asdict(progress), "reader": reader_state,
                "world_size": world_size, "files": files,
                "rank_files": [f"rng-rank{r}.json" for r in range(world_size)]}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def upload_files(local_dir: Path, files: list[str], put: Callable[[Path, str], None],
                 before_each: Callable[[int], None] | None = None) -> None:
    """Copy `local_dir`'s files with `put(local_file, relative_name)`, the manifest last, so
    that a copy cut short leaves a checkpoint that `verify` recognises as partial.

    Args:
        before_each: called with the file number before each copy (fault injection in tests).
    """
    ordered = sorted(f for f in files if f != MANIFEST) + [f for f in files if f == MANIFEST]
    for number, name in enumerate(ordered):
        if before_each:
            before_each(number)
        put(local_dir / name, name)


# -- reading --------------------------------------------------------------------------------

def read_manifest(directory: Path) -> dict:
    """The manifest of a checkpoint directory. Raises CheckpointDamaged if absent/unreadable."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointDamaged(f"{directory}: no readable {MANIFEST} ({err}): a partial checkpoint")
    if manifest.get("format") != FORMAT:
        raise CheckpointDamaged(f"{directory}: {MANIFEST} has format {manifest.get('format')!r}, "
                                f"expected {FORMAT!r}")
    return manifest


def verify(directory: Path) -> dict:
    """Check every file against the manifest; return the manifest.

    Raises:
        CheckpointDamaged: naming the first missing, short or altered file.
    """
    manifest = read_manifest(directory)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointDamaged(f"{directory}: {name} is missing")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointDamaged(f"{directory}: {name} does not match the manifest "
                                    f"({path.stat().st_size} of {expected['bytes']} bytes)")
    for name in manifest["rank_files"]:
        try:
            json.loads((directory / name).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointDamaged(f"{directory}: {name} is missing or unreadable ({err})")
    return manifest


def read_checkpoint(directory: Path, *, rank: int, model: AVPEAModel, optimizer,
                    scheduler) -> tuple[Progress, dict, dict[str, torch.Tensor] | None]:
    """Restore a verified checkpoint into the model, optimiser and scheduler.

    Returns:
        (progress, reader state, best trainable state or None).

    Raises:
        AdapterMismatchError: the checkpoint was made by a different model architecture.
    """
    manifest = read_manifest(directory)
    load_adapters(model, directory / "adapters")  # refuses a mismatched model, naming fields
    state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = directory / f"rng-rank{rank}.json"
    if rng_file.exists():  # a different world size has no state for new ranks
        set_rng_state(json.loads(rng_file.read_text()))
    best_state = None
    if (directory / "best_adapters").exists():
        from safetensors.torch import load_file
        read_adapter_config(directory / "best_adapters")
        best_state = load_file(str(directory / "best_adapters" / "adapter_model.safetensors"))
    return Progress(**manifest["progress"]), manifest["reader"], best_state


def latest_intact(names: list[str], read_text: Callable[[str], str],
                  fetch: Callable[[str, Path], None], workdir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint folder whose files all match its manifest.

    Args:
        names: checkpoint folder names in the run folder.
        read_text: `read_text("name/file")` -> the file's text (to read manifests cheaply).
        fetch: `fetch(name, local_dir)` copies a whole folder into `local_dir`.
        workdir: scratch space for the fetched copies.

    Returns:
        (local directory, manifest) of the newest intact checkpoint by global step, or None.
        Partial or damaged ones are logged and skipped.
    """
    found = []
    for name in names:
        try:
            manifest = json.loads(read_text(f"{name}/{MANIFEST}"))
            step = (manifest["progress"]["global_step"], manifest["progress"]["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("checkpoint %s skipped: no readable manifest (%s)", name, err)
            continue
        found.append((step, name))
    for _, name in sorted(found, reverse=True):
        local = workdir / name
        try:
            fetch(name, local)
            return local, verify(local)
        except (CheckpointDamaged, OSError) as err:
            log.warning("checkpoint %s is damaged, falling back to the one before: %s", name, err)
    return None


def read_adapter_source(url: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter directory's `adapter_config.json` and tensors, local or in object storage
    (`model.init_from`); JSON and safetensors only, nothing unpickled.

    Raises:
        ConfigError: naming `model.init_from` when the directory or a file is missing or of
            another format.
    """
    from safetensors.torch import load as load_safetensors

    from ..config import ConfigError
    from ..data import storage
    from ..model.adapter_io import CONFIG_NAME, FORMAT, WEIGHTS_NAME

    try:
        saved = json.loads(storage.read_bytes(storage.join(url, CONFIG_NAME)))
        tensors = load_safetensors(storage.read_bytes(storage.join(url, WEIGHTS_NAME)))
    except FileNotFoundError as err:
        raise ConfigError(f"model.init_from: {url!r} is not an adapter directory (expected "
                          f"{CONFIG_NAME} and {WEIGHTS_NAME}, e.g. a run's best_adapters/): {err}") from err
    except (ValueError, OSError) as err:
        raise ConfigError(f"model.init_from: cannot read the adapters in {url!r}: {err}") from err
    if saved.get("format") != FORMAT:
        raise ConfigError(f"model.init_from: {url}/{CONFIG_NAME} has format {saved.get('format')!r}, "
                          f"expected {FORMAT!r}")
    return saved, tensors


__all__ = ["CheckpointDamaged", "MANIFEST", "Progress", "latest_intact", "read_adapter_source", "read_checkpoint",
           "read_manifest", "rng_state", "set_rng_state", "upload_files", "verify",
           "write_checkpoint"]

