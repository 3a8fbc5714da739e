"""TrainConfig: everything a training run needs, as one typed, resolvable config.

    task        a registered task: avqa | avel | avr | avc (avpea_ray.tasks)
    model       ModelConfig       the frozen ViT and its adapters
    head        the task's head config (a dataclass its task module declares: AVQAHeadConfig, ...)
    data        DataConfig        shard locations and the reader
    optim       OptimConfig       AdamW, warm-up + cosine schedule, clipping, precision
    run         RunConfig         Ray, storage, checkpoints, tracking
    evaluation  EvaluationConfig  caption decoding and scoring (avc)

Files (JSON or YAML) and `section.key=value` overrides resolve into it (see `avpea_ray.config`);
the resolved config is saved with every run and checkpoint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, from_dict
from ..model.config import ModelConfig
from ..tasks import get_task
from .tracking import redact_uri


@dataclass
class DataConfig:
    """Where the shards are and how they are read.

    Attributes:
        train, val, test: shard directories/prefixes (local path or s3://...), each holding a
            `shards.json`. An empty `test` skips the final test evaluation.
        vocab: AVQA vocabularies (`vocab.json` from `sharding.musicavqa`) or the caption
            tokenizer's WordPiece vocabulary for `head.text_model=random` (`vocab.txt` from
            `sharding.valor`); default: beside the train shards.
        batch_size: clips per rank per step.
        eval_batch_size: clips per rank per evaluation step.
        loader_workers: DataLoader worker processes per rank.
        shuffle_buffer: samples held by each loader worker's shuffle buffer.
        seed: the base seed of shuffling, initialisation and dropout.
        max_caption_tokens: captions are cut to this many tokens, [CLS] and [SEP] included
            (avr, avc).
        captions_per_clip: captions of a clip trained on per step (avc; a random subset
            when a clip has more). Retrieval always pairs a clip with one caption.
        allow_damaged: go on past missing or damaged shards and undecodable samples
            (training replaces them, evaluation scores what is left) and report how many
            samples were lost; by default any damage stops the run, naming the shard.
    """

    train: str = ""
    val: str = ""
    test: str = ""
    vocab: str = ""
    batch_size: int = 8
    eval_batch_size: int = 16
    loader_workers: int = 2
    shuffle_buffer: int = 256
    seed: int = 0
    max_caption_tokens: int = 32
    captions_per_clip: int = 5
    allow_damaged: bool = False

    def __post_init__(self):
        for name in ("batch_size", "eval_batch_size", "captions_per_clip"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_caption_tokens < 3:
            raise ConfigError(f"data.max_caption_tokens must be >= 3 ([CLS], a word, [SEP]), "
                              f"got {self.max_caption_tokens!r}")
        if self.loader_workers < 0:
            raise ConfigError(f"data.loader_workers must be >= 0, got {self.loader_workers!r}")


@dataclass
class OptimConfig:
    """The optimiser and schedule (the paper: lr 3e-4 everywhere).

    Attributes:
        epochs: passes over the training split.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay (not applied to gates, norms and biases).
        warmup_steps: linear warm-up from 0 to `lr`, then cosine decay to `min_lr_ratio * lr`
            over `epochs` x the training split's clips. The schedule follows the clips trained by
            all ranks together, so a resize (run.num_workers) does not move it; the warm-up
            lasts this many steps of the run's full size (batch_size x max workers each).
        grad_clip: max global gradient norm (0 turns clipping off).
        precision: "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32".
    """

    epochs: int = 10
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    precision: str = "auto"

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"optim.precision must be one of ['auto', 'bf16', 'fp32'], got {self.precision!r}")


CHECKPOINT_UPLOADS = ("sync", "async")


@dataclass
class RunConfig:
    """How and where the run executes.

    Attributes:
        name: the run's name; running the same name (and storage path) again resumes it.
        storage_path: where Ray Train keeps checkpoints and results (local dir or s3://).
        num_workers: Ray Train workers (DDP ranks): N, or [min, max] for elastic training
            (`--num-workers 2-8`): Ray Train starts with as many as the cluster has room for
            (up to max), goes on with fewer when a node is lost (at least min; each restart
            counts against max_failures) and grows again when nodes return. Each worker keeps
            `data.batch_size` clips per step, so the global batch is batch_size x the current
            workers; the learning-rate schedule follows the samples trained, not the steps (see
            optim.warmup_steps). A resume may also change N (the rest of the epoch is re-planned
            over the new ranks, each remaining sample exactly once).
        use_gpu: one GPU per worker, NCCL; otherwise CPU and gloo.
        cpus_per_worker: CPUs each worker reserves (fractions let a 2-core laptop run 2 workers
            beside a driver).
        checkpoint_every_steps: also checkpoint mid-epoch every this many steps (0: only at
            epoch ends); the reader's position is inside, so a resume continues mid-epoch.
        keep_checkpoints: how many checkpoints to keep, best by validation metric (the latest
            is always kept too).
        max_failures: worker-group restarts Ray Train attempts after a worker dies.
        tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else a sqlite file in
            the storage path (or ./runs when storage is remote).
        experiment: MLflow experiment name.
        log_every_steps: per-step metrics cadence.
        sample_ledger: write the sample ids each rank trains on per step (resume tests, audits).
        verbose: show Ray Train's own per-report lines (each report's full metric dict), which
            the console leaves out by default (`--verbose`).
        progress: a progress bar per epoch (rank 0's steps, loss, clips/s, ETA) when the
            job's console is a terminal (`--no-progress`: never).
        system_metrics_every_s: CPU, memory, disk, network (and GPU where present) of every
            node of the run, sampled this often into the MLflow run as
            `system/node<i>/...` (0: off).
        compile: `torch.compile` the trunk for the training steps (the first step pays the
            compilation; `bench/train_step.py --compile` reports how long it takes).
        checkpoint_upload: "sync" (default): the step waits while a checkpoint is copied to
            storage; "async": Ray Train uploads it in the background and the steps go on
            (the checkpoint is written locally first, so it is a snapshot either way).
        fail_at_step: fault injection for tests: rank `fail_rank` kills itself once at this
            global step (0: never).
        fail_in_checkpoint_at_step: fault injection for tests: rank `fail_rank` kills itself
            half-way through uploading the checkpoint of this global step (0: never).
        pause_at_step: for tests that kill the driver: rank `fail_rank` stops once at this
            global step (a marker file says so) until it is killed (0: never).
        hold_upload_at_step: for tests of `checkpoint_upload`: rank `fail_rank` holds the
            upload of this global step's checkpoint (once per run) until its loop has run 2
            more steps, at most 20 s, and records the loop's step before and after in
            `<run>/upload-held-at-<step>` (0: never).
    """

    name: str = ""
    storage_path: str = "runs"
    num_workers: int | list[int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    max_failures: int = 2
    tracking_uri: str = ""
    experiment: str = "avpea-ray"
    log_every_steps: int = 10
    sample_ledger: bool = False
    verbose: bool = False
    progress: bool = True
    system_metrics_every_s: float = 10.0
    compile: bool = False
    checkpoint_upload: str = "sync"
    fail_at_step: int = 0
    fail_in_checkpoint_at_step: int = 0
    pause_at_step: int = 0
    hold_upload_at_step: int = 0
    fail_rank: int = 0

    def __post_init__(self):
        if self.name and not RUN_NAME.fullmatch(self.name):
            raise ConfigError(f"run.name must be letters, digits, '.', '_' or '-' (it names folders "
                              f"and the MLflow run), starting with a letter or digit; got {self.name!r}")
        if redact_uri(self.tracking_uri) != self.tracking_uri:
            # The config is saved with every run and checkpoint: no place for a secret.
            raise ConfigError("run.tracking_uri must not hold credentials (user:token@...): set "
                              "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
        if isinstance(self.num_workers, (list, tuple)):
            if (len(self.num_workers) != 2 or not all(isinstance(n, int) for n in self.num_workers)
                    or not 1 <= self.num_workers[0] <= self.num_workers[1]):
                raise ConfigError(f"run.num_workers must be N or [min, max] with 1 <= min <= max "
                                  f"(--num-workers N or MIN-MAX), got {list(self.num_workers)!r}")
            self.num_workers = list(self.num_workers)
        elif self.num_workers < 1:
            raise ConfigError(f"run.num_workers must be >= 1 (or [min, max]), got {self.num_workers!r}")
        if self.keep_checkpoints < 2:
            raise ConfigError(f"run.keep_checkpoints must be >= 2 (a resume falls back to the previous "
                              f"checkpoint when the latest is unreadable), got {self.keep_checkpoints!r}")
        for name in ("log_every_steps",):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("checkpoint_every_steps", "fail_at_step", "fail_in_checkpoint_at_step",
                     "pause_at_step", "hold_upload_at_step", "fail_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_failures < -1:
            raise ConfigError(f"run.max_failures must be >= 0 (or -1: retry forever), got {self.max_failures!r}")
        if ((self.fail_at_step or self.fail_in_checkpoint_at_step or self.pause_at_step or self.hold_upload_at_step)
                and self.fail_rank >= self.min_workers):
            raise ConfigError(f"run.fail_rank={self.fail_rank} but there may be only {self.min_workers} workers")
        if self.system_metrics_every_s < 0:
            raise ConfigError(f"run.system_metrics_every_s must be >= 0 (0 turns it off), got "
                              f"{self.system_metrics_every_s!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"run.compile must be true or false, got {self.compile!r}")
        if self.checkpoint_upload not in CHECKPOINT_UPLOADS:
            raise ConfigError(f"run.checkpoint_upload must be one of {list(CHECKPOINT_UPLOADS)}, "
                              f"got {self.checkpoint_upload!r}")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"run.cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def scaling_workers(self) -> int | tuple[int, int]:
        """What Ray Train's `ScalingConfig(num_workers=...)` takes: N, or (min, max) when
        elastic."""
        return (self.min_workers, self.max_workers) if self.min_workers < self.max_workers else self.max_workers


@dataclass
class EvaluationConfig:
    """How captions are decoded and scored (avc).

    Attributes:
        beam_size: beams of the caption search (1: greedy).
        length_penalty: beams rank by log-probability / length ** length_penalty.
        meteor: when to compute METEOR (Java, a few seconds per call): "test" (the final test
            evaluation only), "always" (every validation too) or "never".
    """

    beam_size: int = 3
    length_penalty: float = 1.0
    meteor: str = "test"

    def __post_init__(self):
        if self.length_penalty < 0:
            raise ConfigError(f"evaluation.length_penalty must be >= 0, got {self.length_penalty!r}")
        if self.beam_size < 1:
            raise ConfigError(f"evaluation.beam_size must be >= 1, got {self.beam_size!r}")
        if self.meteor not in ("test", "always", "never"):
            raise ConfigError(f"evaluation.meteor must be one of ['test', 'always', 'never'], "
                              f"got {self.meteor!r}")


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

@dataclass
class TrainConfig:
    """The whole run: task, model, head, data, optimiser and run settings."""

    task: str = "avqa"
    model: ModelConfig = field(default_factory=ModelConfig)
    head: Any = field(default_factory=dict)  # a dict in files; the task's head config after init
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        head_config = get_task(self.task).head_config
        if isinstance(self.head, dict):
            self.head = from_dict(head_config, self.head, "head.")
        elif not isinstance(self.head, head_config):
            raise ConfigError(f"head: task {self.task!r} takes a {head_config.__name__}, got "
                              f"{type(self.head).__name__}")
