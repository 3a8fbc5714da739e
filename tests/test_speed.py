"""The training step's fast path computes what the research code's way computes.

Each execution option (`ModelConfig.fuse_streams`, `fused_attention`,
`activation_checkpointing`) is compared, one at a time and all together, against the
reference (every option off: each stream through each block separately, explicit softmax
attention, every activation kept): the trunk's outputs, the head's outputs, the loss, every
trainable gradient and the adapters' BatchNorm statistics after one training step.
"""
from __future__ import annotations

import pytest
import torch

from avpea_ray.config import ConfigError
from avpea_ray.model import ModelConfig
from tests.toy import clip_batch, tiny_model

REFERENCE = {"fuse_streams": False, "fused_attention": False, "activation_checkpointing": False}

# (what is switched on over the reference, the trunk's adapter placement)
OPTIONS = [
    ({"fuse_streams": True}, "both"),
    ({"fuse_streams": True}, "visual"),  # one stream without adapters: zeros in its rows
    ({"fuse_streams": True}, "none"),
    ({"fused_attention": True}, "both"),
    ({"fused_attention": True, "fuse_streams": True}, "both"),
    ({"activation_checkpointing": True}, "both"),
    ({"activation_checkpointing": True, "fuse_streams": True}, "audio"),
    ({"fuse_streams": True, "fused_attention": True, "activation_checkpointing": True}, "both"),
]


def _questions(batch: int):
    tokens = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0], [8, 9, 10, 11]])
    index = torch.tensor([0, 0, batch - 1])
    return tokens, index, torch.tensor([1, 2, 3])


def _one_step(options: dict, adapters: str):
    """A tiny AVQA model's forward, loss and backward in training mode, its gates open
    (at their initial 0 the adapters would add nothing and cross-attention would be dead)."""
    model = tiny_model("avqa", adapters=adapters, **options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.7)
    model.train()
    frames, fbank = clip_batch(batch=3, steps=2)
    tokens, index, answers = _questions(3)
    torch.manual_seed(5)  # the match task's negatives are drawn at random
    visual, audio = model.forward_features(frames, fbank)
    outputs = model.head(visual, audio, question_tokens=tokens, question_video_index=index)
    loss, _ = model.head.loss(outputs, answers)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.trainable_named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    return model, visual, audio, outputs["answer_logits"], loss, grads, buffers


@pytest.mark.parametrize("options,adapters", OPTIONS,
                         ids=[f"{'+'.join(o)}-{a}" for o, a in OPTIONS])
def test_option_gives_the_reference_outputs_and_gradients(options, adapters):
    _, *reference = _one_step(REFERENCE, adapters)
    _, *fast = _one_step(REFERENCE | options, adapters)
    names = ("visual tokens", "audio tokens", "answer logits", "loss")
    for name, ref, got in zip(names, reference[:4], fast[:4]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    ref_grads, fast_grads = reference[4], fast[4]
    assert ref_grads.keys() == fast_grads.keys() and ref_grads
    if adapters != "none":
        assert any(n.startswith("trunk.adapters") for n in ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"gradient of {name}: {m}")
    # BatchNorm statistics: updated once per step, recomputation or not.
    for name, ref in reference[5].items():
        torch.testing.assert_close(fast[5][name], ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_the_fast_path_is_the_default():
    config = ModelConfig()
    assert (config.fuse_streams, config.fused_attention, config.activation_checkpointing) == (True, True, False)
    assert tiny_model().trunk.fuse_streams


def test_frozen_backbone_gets_no_gradient_work():
    model, *_ = _one_step({}, "both")
    assert all(p.grad is None for p in model.trunk.backbone.parameters())
    frames, fbank = clip_batch(batch=2, steps=1)
    # No autograd graph below the first adapter: the embeddings need none.
    embedded = model.trunk.embed_visual(model.trunk.normalize_frames(frames.flatten(0, 1)))
    assert not embedded.requires_grad


@pytest.mark.parametrize("field", ["fuse_streams", "fused_attention", "activation_checkpointing"])
def test_execution_switch_must_be_a_bool(field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        ModelConfig(**{field: "yes"})
