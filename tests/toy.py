"""Tiny models for tests: depth-2, width-64 ViTs at 32 px with random weights."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from avpea_ray.data.audio import AudioConfig
from avpea_ray.model import AVPEAModel, ModelConfig
from avpea_ray.tasks import build_model

TINY_VIT = "vit_base_patch16_224"
TINY_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32}
TINY_AUDIO = AudioConfig(window_seconds=0.5, target_frames=48, num_mel_bins=32)


def tiny_backbone(seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny timm ViT (no classifier), deterministic for `seed`."""
    torch.manual_seed(seed)
    return timm.create_model(TINY_VIT, pretrained=False, num_classes=0, **(TINY_KWARGS | overrides))


def tiny_config(**overrides) -> ModelConfig:
    """ModelConfig of the tiny ViT (random weights), with field overrides."""
    fields = dict(backbone=TINY_VIT, weights="random", backbone_kwargs=dict(TINY_KWARGS))
    return ModelConfig(**(fields | overrides))


TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 16}
TINY_HEADS = {
    "avqa": {"vocab_size": 20, "num_answers": 5, "hidden": 32},
    "avel": {"num_classes": 4, "hidden": 32},
    "avr": {"vocab_size": 30, "embed_dim": 16, "text_model": "random", "text_config": TINY_TEXT},
    "avc": {"vocab_size": 30, "bos_id": 2, "eos_id": 3, "pad_id": 0, "hidden": 32, "layers": 1,
            "num_heads": 2, "max_length": 8, "memory_patches": 2},
}


def tiny_model(task: str = "avqa", seed: int = 0, **overrides) -> AVPEAModel:
    """A tiny AVPEAModel with a small head."""
    head = TINY_HEADS[task]
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides), task, head, backbone=tiny_backbone(seed))


def clip_batch(batch: int = 2, steps: int = 2, seed: int = 1):
    """Random uint8 frames `(B, T, 3, 32, 32)` and spectrograms `(B, T, 1, 48, 32)`."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, steps, 3, 32, 32), generator=gen, dtype=torch.uint8)
    fbank = torch.randn(batch, steps, 1, 48, 32, generator=gen)
    return frames, fbank


def train_overrides(shards: dict[str, str], storage, **extra) -> list[str]:
    """`section.key=value` overrides of a tiny 2-layer ViT run on the test shards."""
    base = {
        "model.backbone": "vit_base_patch16_224", "model.weights": "random",
        "model.backbone_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32},
        "head.hidden": 64, "data.train": shards["train"], "data.val": shards["val"], "data.test": shards["test"],
        "data.batch_size": 4, "data.eval_batch_size": 8, "data.loader_workers": 1, "data.shuffle_buffer": 16,
        "optim.lr": 4e-3, "optim.warmup_steps": 5, "run.storage_path": str(storage),
        "run.cpus_per_worker": 0.5, "run.log_every_steps": 2,
    } | extra
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def free_port() -> int:
    """A TCP port nothing listens on right now (for servers a test starts on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, args: list[str] | None = None, port: int | None = None,
                  env: dict[str, str] | None = None):
    """A real `mlflow server` on 127.0.0.1, up and answering; yields its URL and stops it (and
    its workers) on exit.

    Args:
        folder: where its log goes (and, by default, its sqlite store and artifacts).
        args: the arguments after `mlflow server` (default: those stores, on `port`);
            `--workers 1` is added (a small machine).
        port: the port `args` names (default: a free one).
        env: the server's environment (default: this process's).
    """
    import requests

    port = port or free_port()
    args = args or ["--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
                    f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "server-artifacts")]
    log = folder / "mlflow-server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *args, "--workers", "1"], stdin=subprocess.DEVNULL,
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env=(os.environ if env is None else env) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner
    url = f"http://127.0.0.1:{port}"
    # Up in seconds on an idle machine, over a minute on a busy one: wait for it, and say so if
    # it never comes (the runs would only fail later with "connection refused").
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited {server.returncode}:\n" + log.read_text()[-3000:])
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server not up in 240 s:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def once_per_session(tmp_path_factory, name: str, build) -> dict:
    """`build(folder)`'s result (a JSON-able dict), computed once for the whole session: with
    parallel test processes, the first to ask builds it under a file lock in the session's
    shared temporary folder and the others read it (xdist_group cannot be relied on to put the
    tests that share it in one process: with pytest 9.2 it silently groups nothing,
    https://github.com/pytest-dev/pytest-xdist/issues/1386)."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    result = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not result.is_file():
            folder = shared / name
            folder.mkdir()
            result.write_text(json.dumps(build(folder)))
    return json.loads(result.read_text())
