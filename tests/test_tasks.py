"""The task registry and typed head configs: a task is one module + one registry line, a head
typo names the field, and "trainable" has one definition (requires_grad) for the optimiser,
the counts and what is saved."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avpea_ray.config import ConfigError, load_config, to_dict
from avpea_ray.model.params import count_parameters
from avpea_ray.tasks import TASKS, Batch, Task, register
from avpea_ray.tasks.base import CountEvaluator, to_device
from avpea_ray.train.config import TrainConfig
from tests.toy import train_overrides


@pytest.mark.parametrize("head,message", [
    ({"hiddn": 64}, "unknown config key head.hiddn"),
    ({"hidden": "64"}, "head.hidden must be an integer"),
    ({"hidden": 30, "num_heads": 4}, "head.hidden=30 must be >= 4 and divisible by head.num_heads=4"),
])
def test_head_config_is_typed_per_task(head, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, values={"task": "avqa", "head": head})


def test_each_task_declares_what_a_run_needs():
    for name, task in TASKS.items():
        assert task.name == name
        assert task.dataset and task.primary_metric and task.primary_metric_label
        assert task.head_class.__module__.startswith("avpea_ray.heads.")
        cfg = load_config(TrainConfig, values={"task": name})
        assert isinstance(cfg.head, task.head_config) and to_dict(cfg)["head"]  # saved as a mapping


@pytest.mark.parametrize("freeze_text", [False, True])
def test_trainable_is_requires_grad_for_optimiser_counts_and_saving(freeze_text):
    model = _avr(freeze_text)
    trainable = dict(model.trainable_named_parameters())
    saved = model.trainable_state_dict()
    assert all(p.requires_grad for p in trainable.values())
    assert set(trainable) <= set(saved)  # every trainable parameter is saved ...
    assert not any(k.startswith("trunk.backbone.") for k in saved)  # ... the frozen ViT never
    text = [k for k in saved if k.startswith("head.text_encoder.")]
    assert bool(text) is not freeze_text  # a frozen text encoder is not saved either
    assert any(k.endswith("bn_before.running_mean") for k in saved)  # buffers of trained modules are
    counts = count_parameters(model)
    assert counts.trainable == sum(p.numel() for p in trainable.values())


def _avr(freeze_text: bool):
    from avpea_ray.tasks import build_model
    from tests.toy import TINY_HEADS, tiny_backbone, tiny_config

    head = TINY_HEADS["avr"] | {"freeze_text": freeze_text}
    return build_model(tiny_config(), "avr", head, backbone=tiny_backbone(0))


# -- a task from a test file alone, through the real loop ---------------------------------------

class FirstAnswerHead(nn.Module):
    """Answers a clip's first question from the mean visual CLS token (no question input)."""

    def __init__(self, dim: int, num_answers: int, hidden: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, num_answers))

    def forward(self, visual, audio):
        return {"logits": self.mlp(torch.cat([visual[:, :, 0].mean(1), audio[:, :, 0].mean(1)], -1))}


@dataclass
class FirstAnswerHeadConfig:
    hidden: int = 16


class FirstAnswerTask(Task):
    """A toy task on MUSIC-AVQA shards: each clip's first answer, accuracy over clips."""

    name = "first-answer"
    dataset = "musicavqa"
    head_class = FirstAnswerHead
    head_config = FirstAnswerHeadConfig
    primary_metric = "accuracy"
    primary_metric_label = "first-answer accuracy, %"

    def data_head_args(self):
        return {"num_answers": 64}

    def make_batch(self, raw, device, training=True) -> Batch:
        answers = [max(meta["questions"][0]["answer_index"], 0) for meta in raw["meta"]]
        return to_device(raw, device, {}, {"answer": torch.tensor(answers, device=device)})

    def loss(self, head, outputs, batch):
        return F.cross_entropy(outputs["logits"], batch.targets["answer"]), {}

    def counts(self, outputs, batch):
        right = (outputs["logits"].argmax(-1) == batch.targets["answer"]).sum()
        return torch.stack([right, torch.tensor(len(batch.targets["answer"]))]).long()

    def empty_counts(self, device):
        return torch.zeros(2, dtype=torch.long, device=device)

    def metrics(self, counts):
        right, total = counts.tolist()
        return {"accuracy": 100.0 * right / total} if total else {}

    def evaluator(self, final=False):
        return CountEvaluator(self)


@pytest.mark.slow
def test_a_task_registered_in_a_test_file_trains_through_the_real_loop(avqa_shards, tmp_path, ray_local):
    from ray import cloudpickle

    from avpea_ray.cli import parse_job_args, resolve_config
    from avpea_ray.train.fit import run_training

    register(FirstAnswerTask)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    try:
        cfg = resolve_config(parse_job_args("", train_overrides(avqa_shards, tmp_path, **{
            "task": "first-answer", "head": {"hidden": 8}, "optim.epochs": 1, "run.name": "toy-task",
            "run.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})), None)[0]
        summary = run_training(cfg)
    finally:
        TASKS.pop("first-answer")
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert summary["task"] == "first-answer" and summary["evaluated_on"] == "test"
    assert 0 <= summary["metrics"]["accuracy"] <= 100
    assert summary["parameters"]["head"] == (2 * 64) * 8 + 8 + 8 * 64 + 64


def _avqa_stage(stage: str, seed: int, **head):
    from avpea_ray.tasks import build_model
    from tests.toy import TINY_HEADS, tiny_backbone, tiny_config

    torch.manual_seed(seed)
    args = TINY_HEADS["avqa"] | {"stage": stage} | head
    return build_model(tiny_config(), "avqa", args, backbone=tiny_backbone(0))


def test_grounding_stage_weights_initialise_the_qa_stage(tmp_path):
    """AVST's two stages: what the grounding stage trained (adapters, audio/visual projections,
    grounding fusion, match classifier) starts the QA stage; the QA modules start fresh."""
    from avpea_ray.model.adapter_io import AdapterMismatchError, initialise_from, save_adapters
    from avpea_ray.train.checkpoint import read_adapter_source

    grounding = _avqa_stage("grounding", seed=1)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for _, p in grounding.trainable_named_parameters():
            p.add_(0.5)
    save_adapters(grounding, tmp_path / "best_adapters")
    saved, tensors = read_adapter_source(str(tmp_path / "best_adapters"))
    assert not any(k.startswith("head.question_encoder") for k in tensors)  # frozen there: not saved

    qa = _avqa_stage("qa", seed=2)
    fresh_before = {k: v.clone() for k, v in qa.trainable_state_dict().items()}
    loaded, fresh = initialise_from(qa, saved, tensors, "grounding run")
    state = qa.trainable_state_dict()
    assert set(loaded) == set(tensors) and any(k.startswith("trunk.") for k in loaded)
    for name in loaded:
        torch.testing.assert_close(state[name], tensors[name])
    assert {k.split(".")[1] for k in fresh} == {"question_encoder", "audio_temporal", "visual_temporal",
                                                "fusion", "answer_classifier"}
    for name in fresh:
        torch.testing.assert_close(state[name], fresh_before[name])

    with pytest.raises(AdapterMismatchError, match=r"model.init_from: 'grounding run' does not fit.*head.hidden"):
        initialise_from(_avqa_stage("qa", seed=2, hidden=64), saved, tensors, "grounding run")
    with pytest.raises(ConfigError, match="model.init_from: .* is not an adapter directory"):
        read_adapter_source(str(tmp_path / "nowhere"))
