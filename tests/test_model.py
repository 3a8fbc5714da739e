"""The AV-PEA model core on tiny random ViTs: identity at init, cross-attention, what trains,
parameter counts, adapter files, weights, the input conventions (frame statistics, the audio
positional embedding) and the audio front end."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from safetensors.torch import save_file

from avpea_ray.__main__ import main as params_main
from avpea_ray.config import ConfigError, from_dict, load_config, to_dict
from avpea_ray.model import (AVPEA, DualStreamViT, ModelConfig, WeightsError, create_backbone,
                             load_adapters, save_adapters)
from avpea_ray.model.adapter_io import AdapterMismatchError
from avpea_ray.model.dual_stream import resample_pos_embed_linear_1d
from avpea_ray.data.audio import AudioConfig, waveform_to_windows, window_starts
from avpea_ray.model.params import count_parameters
from avpea_ray.tasks import build_model, load_model
from avpea_ray.train.checkpoint import Progress, read_checkpoint, write_checkpoint
from avpea_ray.train.config import TrainConfig
from avpea_ray.train.resume import check_resume
from tests.toy import TINY_KWARGS, TINY_VIT, clip_batch, tiny_backbone, tiny_config, tiny_model

SWITCHES = [  # (adapters, cross_attention, gating): the paper's Table 4 and our extra knobs
    ("both", True, "learned"),
    ("audio", True, "learned"),
    ("visual", True, "learned"),
    ("none", True, "learned"),
    ("both", False, "learned"),
    ("both", True, "open"),
]


def _inputs(batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randn(batch, 1, 64, 48, generator=gen)


# -- the adapter -------------------------------------------------------------------------

def test_adapter_parameters_are_named_as_algorithm_1_and_gates_start_at_zero():
    adapter = AVPEA(64, reduction_factor=8)
    names = {n.split(".")[0] for n, _ in adapter.named_parameters()}
    assert names == {"gate", "q_gate", "ln_before", "down_sampler", "bn_before", "up_sampler",
                     "bn_after", "ln_after"}
    assert adapter.gate.item() == 0 and adapter.q_gate.item() == 0
    assert adapter.gate.dtype == torch.float32 and adapter.gate.requires_grad
    assert adapter.down_sampler.weight.shape == (8, 64, 1, 1) and adapter.down_sampler.bias is None
    x, y = torch.randn(2, 5, 64), torch.randn(2, 9, 64)
    assert adapter(x, y).shape == x.shape
    assert torch.count_nonzero(adapter(x, y)) == 0  # gate 0: the adapter adds nothing


def test_adapter_matches_equations_5_to_8():
    torch.manual_seed(0)
    adapter = AVPEA(16, reduction_factor=4).eval()
    with torch.no_grad():
        adapter.gate.fill_(0.7)
        adapter.q_gate.fill_(0.3)
    x, y = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    # eq 7: CA = g * softmax(x_cls y^T) y, added to the CLS token (Algorithm 1)
    cls = x[:, :1] + 0.3 * torch.softmax(x[:, :1] @ y.transpose(1, 2), -1) @ y
    seq = torch.cat([cls, x[:, 1:]], 1)
    h = adapter.ln_before(seq) @ adapter.down_sampler.weight[:, :, 0, 0].T
    bn = adapter.bn_before
    h = torch.relu((h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    h = h @ adapter.up_sampler.weight[:, :, 0, 0].T
    bn = adapter.bn_after
    h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = 0.7 * adapter.ln_after(h)  # eq 5: h * f(CA || X_p)
    torch.testing.assert_close(adapter(x, y), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,factor", [(64, 3), (768, 5), (1024, 0), (100, 8)])
def test_reduction_factor_that_does_not_divide_the_width_is_refused(dim, factor):
    with pytest.raises(ValueError, match=rf"reduction_factor={factor}.*D={dim}"):
        AVPEA(dim, reduction_factor=factor)


def test_trunk_refuses_reduction_factor_for_its_width():
    with pytest.raises(ValueError, match=r"does not divide the backbone width D=64"):
        DualStreamViT(tiny_backbone(), reduction_factor=6)


# -- the dual-stream trunk ---------------------------------------------------------------

@pytest.mark.parametrize("adapters,cross_attention,gating", [s for s in SWITCHES if s[2] == "learned"])
def test_at_init_each_stream_equals_the_frozen_vit(adapters, cross_attention, gating):
    backbone = tiny_backbone()
    trunk = DualStreamViT(backbone, reduction_factor=8, adapters=adapters,
                          cross_attention=cross_attention, gating=gating).train()
    frames, audio = _inputs()
    visual_tokens, audio_tokens = trunk.forward_features(frames, audio)
    assert torch.equal(visual_tokens, backbone.forward_features(frames))
    # timm's own dynamic-size path resizes the positional embedding for the spectrogram grid
    reference = tiny_backbone(dynamic_img_size=True)
    reference.load_state_dict(backbone.state_dict())
    torch.testing.assert_close(audio_tokens, reference.forward_features(audio.expand(-1, 3, -1, -1)),
                               rtol=0, atol=1e-6)
    assert audio_tokens.shape == (3, 1 + (64 // 16) * (48 // 16), 64)


def test_trunk_from_timm_name():
    trunk = DualStreamViT(TINY_VIT, reduction_factor=4, adapters="visual", **TINY_KWARGS)
    assert len(trunk.adapters_visual) == 2 and len(trunk.adapters_audio) == 0
    assert trunk.adapters_visual[0].sampling_size == 16


def _open_bottleneck(trunk: DualStreamViT, q_gate: float) -> None:
    with torch.no_grad():
        for adapter in [*trunk.adapters_visual, *trunk.adapters_audio]:
            adapter.gate.fill_(1.0)
            adapter.q_gate.fill_(q_gate)


@pytest.mark.parametrize("q_gate,visual_depends_on_audio", [(0.0, False), (0.5, True)])
def test_cross_attention_gate_controls_dependence_on_the_other_stream(q_gate, visual_depends_on_audio):
    trunk = DualStreamViT(tiny_backbone(), reduction_factor=8).eval()
    _open_bottleneck(trunk, q_gate)
    frames, audio = _inputs()
    with torch.no_grad():
        visual_a, audio_a = trunk.forward_features(frames, audio)
        visual_b, _ = trunk.forward_features(frames, audio * 3 + 1)
        reference = tiny_backbone().forward_features(frames)
    assert (not torch.equal(visual_a, visual_b)) == visual_depends_on_audio
    assert not torch.equal(visual_a, reference)  # the open bottleneck changes the features


def test_cross_attention_off_makes_streams_independent():
    trunk = DualStreamViT(tiny_backbone(), reduction_factor=8, cross_attention=False).eval()
    with torch.no_grad():
        for adapter in trunk.adapters_visual:
            adapter.gate.fill_(1.0)
    frames, audio = _inputs()
    with torch.no_grad():
        assert torch.equal(trunk.forward_features(frames, audio)[0],
                           trunk.forward_features(frames, audio - 2)[0])


@pytest.mark.parametrize("task", ["avqa", "avel"])
def test_training_changes_only_adapters_and_head(task):
    model = tiny_model(task).train()
    frames, fbank = clip_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for _, p in model.trainable_named_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    gate_grads = []
    for _ in range(3):
        optimizer.zero_grad()
        if task == "avqa":
            outputs = model(frames, fbank, question_tokens=torch.tensor([[3, 4, 5], [6, 7, 0], [8, 0, 0]]),
                            question_video_index=torch.tensor([0, 1, 1]))
            loss, _ = model.head.loss(outputs, torch.tensor([1, 2, 3]))
        else:
            outputs = model(frames, fbank)
            loss, _ = model.head.loss(outputs, torch.tensor([[0, 4], [4, 1]]))
        loss.backward()
        adapter = model.trunk.adapters_visual[0]
        gate_grads.append((adapter.gate.grad.abs().item(), adapter.q_gate.grad.abs().item()))
        optimizer.step()

    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if name.startswith("trunk.backbone."):
            assert not changed, f"frozen backbone tensor {name} changed"
    assert all(not p.requires_grad for p in model.trunk.backbone.parameters())
    assert {n.split(".")[0] for n, _ in model.trainable_named_parameters()} == {"trunk", "head"}
    assert all(n.startswith(("trunk.adapters_visual.", "trunk.adapters_audio.", "head."))
               for n, _ in model.trainable_named_parameters())
    assert gate_grads[0][0] > 0  # the bottleneck gate learns from the first step
    assert gate_grads[-1][1] > 0  # the cross-attention gate once the bottleneck is open
    assert not model.trunk.backbone.training  # frozen backbone stays in eval mode


# -- parameter counts --------------------------------------------------------------------

@pytest.mark.parametrize("backbone,expected", [("vit_base_patch16_224", 3_654_192),
                                               ("vit_large_patch16_224", 12_890_208)])
def test_paper_adapter_counts(backbone, expected):
    model = build_model(ModelConfig(backbone=backbone, reduction_factor=8), "avel",
                        {"num_classes": 28}, meta=True)
    counts = count_parameters(model)
    assert counts.adapter == expected
    assert round(counts.adapter / 1e6, 1) == {3_654_192: 3.7, 12_890_208: 12.9}[expected]


@pytest.mark.parametrize("adapters,cross_attention,gating,per_adapter,num_adapters", [
    ("both", True, "learned", 152_258, 24),
    ("audio", True, "learned", 152_258, 12),
    ("visual", True, "learned", 152_258, 12),
    ("none", True, "learned", 0, 0),
    ("both", False, "learned", 152_257, 24),  # no q_gate
    ("both", True, "open", 152_256, 24),      # gates are fixed buffers
])
def test_table4_switch_counts(adapters, cross_attention, gating, per_adapter, num_adapters):
    config = ModelConfig(backbone="vit_base_patch16_224", adapters=adapters,
                         cross_attention=cross_attention, gating=gating)
    counts = count_parameters(build_model(config, "avel", {"num_classes": 28}, meta=True))
    assert counts.num_adapters == num_adapters
    assert counts.adapter == per_adapter * num_adapters
    assert counts.backbone == 85_798_656


@pytest.mark.parametrize("backbone,adapter_count", [("vit_base_patch16_224", "3,654,192"),
                                                    ("vit_large_patch16_224", "12,890,208")])
def test_params_command(backbone, adapter_count, capsys):
    assert params_main(["params", "--backbone", backbone, "--reduction-factor", "8", "--task", "avqa"]) == 0
    out = capsys.readouterr().out
    adapter_line = next(line for line in out.splitlines() if line.startswith("adapter"))
    assert adapter_count in adapter_line
    peft = re.search(r"^trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)$",
                     out, re.M)
    trainable, total = (int(peft.group(i).replace(",", "")) for i in (1, 2))
    assert float(peft.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)


@pytest.mark.parametrize("task", ["avqa", "avel", "avr", "avc"])
def test_params_command_for_every_task(task, capsys):
    assert params_main(["params", "--task", task, "head.hidden=64"] if task != "avr" else ["params", "--task", task]) == 0
    assert f"head params ({task})" in capsys.readouterr().out


def test_params_command_refuses_bad_factor(capsys):
    assert params_main(["params", "--reduction-factor", "7"]) == 2
    assert "reduction_factor=7" in capsys.readouterr().err


# -- adapter files ----------------------------------------------------------------------

@pytest.mark.parametrize("task", ["avqa", "avel"])
def test_save_load_round_trip_reproduces_outputs(tmp_path, task):
    model = tiny_model(task).train()
    frames, fbank = clip_batch()
    inputs = ({"question_tokens": torch.tensor([[3, 4], [5, 0]]), "question_video_index": torch.tensor([0, 1])}
              if task == "avqa" else {})
    optimizer = torch.optim.SGD([p for _, p in model.trainable_named_parameters()], lr=0.1)
    for _ in range(2):  # move gates and BatchNorm statistics away from their initial values
        optimizer.zero_grad()
        outputs = model(frames, fbank, **inputs)
        sum(v.float().mean() for v in outputs.values() if isinstance(v, torch.Tensor)).backward()
        optimizer.step()
    save_adapters(model.eval(), tmp_path / "adapters")

    files = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    assert not any(k.startswith("trunk.backbone.") for k in saved)
    assert any(k.endswith("bn_before.running_mean") for k in saved)

    fresh = build_model(model.config, task, model.head_spec["args"], backbone=tiny_backbone(0))
    load_adapters(fresh, tmp_path / "adapters").eval()
    with torch.no_grad():
        expected, got = model(frames, fbank, **inputs), fresh(frames, fbank, **inputs)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, got[key]), key


@pytest.mark.parametrize("change,message", [
    ({"reduction_factor": 4}, "model.reduction_factor: saved 8, model 4"),
    ({"adapters": "audio"}, "model.adapters: saved 'both', model 'audio'"),
    ({"cross_attention": False}, "model.cross_attention"),
    ({"backbone_kwargs": TINY_KWARGS | {"depth": 3}}, "model.backbone_kwargs"),
    ({"frame_stats": "imagenet"}, "model.frame_stats: saved 'timm', model 'imagenet'"),
    ({"audio_pos_interp": "linear_1d"}, "model.audio_pos_interp: saved 'bicubic_2d', model 'linear_1d'"),
])
def test_mismatched_model_is_refused(tmp_path, change, message):
    save_adapters(tiny_model("avel"), tmp_path)
    other = build_model(tiny_config(**change), "avel", {"num_classes": 4, "hidden": 32})
    with pytest.raises(AdapterMismatchError, match=re.escape(message)):
        load_adapters(other, tmp_path)


def test_mismatched_task_and_head_are_refused(tmp_path):
    save_adapters(tiny_model("avqa"), tmp_path)
    with pytest.raises(AdapterMismatchError, match="task: saved 'avqa', model 'avel'"):
        load_adapters(tiny_model("avel"), tmp_path)
    wider_vocab = build_model(tiny_config(), "avqa", {"vocab_size": 30, "num_answers": 5, "hidden": 32})
    with pytest.raises(AdapterMismatchError, match="head.vocab_size: saved 20, model 30"):
        load_adapters(wider_vocab, tmp_path)


def test_load_model_builds_from_the_saved_config(tmp_path):
    model = tiny_model("avel").eval()
    save_file(model.trunk.backbone.state_dict(), str(tmp_path / "backbone.safetensors"))
    save_adapters(model, tmp_path / "adapters")
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["model"]["reduction_factor"] == 8 and config["task"] == "avel"
    loaded = load_model(tmp_path / "adapters", weights=str(tmp_path / "backbone.safetensors")).eval()
    frames, fbank = clip_batch()
    with torch.no_grad():
        assert torch.equal(model(frames, fbank)["class_logits"], loaded(frames, fbank)["class_logits"])


# -- input conventions: frame statistics, the audio positional embedding -----------------

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# (frame_stats, (mean, std) the frames must be normalised with) for the tiny ViT, whose
# pretrained config says (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5) as the augreg_in21k ViTs' do
FRAME_STATS = [("timm", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))), ("imagenet", IMAGENET)]


@pytest.mark.parametrize("frame_stats,stats", FRAME_STATS)
def test_frames_are_normalised_with_the_chosen_statistics(frame_stats, stats):
    assert tiny_backbone().pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    trunk = DualStreamViT(tiny_backbone(), reduction_factor=8, frame_stats=frame_stats)
    pixels = [[0, 255], [51, 102], [204, 153]]  # one 1x2 image, per channel
    frames = torch.tensor(pixels, dtype=torch.uint8).view(1, 3, 1, 2)
    (mean, std) = stats
    expected = [[(v / 255 - mean[c]) / std[c] for v in row] for c, row in enumerate(pixels)]
    torch.testing.assert_close(trunk.normalize_frames(frames).view(3, 2), torch.tensor(expected))


def test_frame_statistics_differ_and_reach_the_model_from_its_config():
    frames = clip_batch()[0]
    normalised = {}
    for frame_stats, (mean, _) in FRAME_STATS:
        model = tiny_model("avel", frame_stats=frame_stats)
        assert model.trunk.frame_mean.flatten().tolist() == pytest.approx(mean)
        normalised[frame_stats] = model.trunk.normalize_frames(frames.flatten(0, 1))
    assert not torch.allclose(normalised["timm"], normalised["imagenet"], atol=0.1)


def _linear_by_hand(sequence: torch.Tensor, length: int) -> torch.Tensor:
    """`(L, D)` -> `(length, D)`: output i reads source position (i + 0.5) L / length - 0.5,
    clamped to [0, L - 1], between its two neighbours (F.interpolate's "linear" with
    align_corners False)."""
    size = sequence.shape[0]
    rows = []
    for i in range(length):
        x = min(max((i + 0.5) * size / length - 0.5, 0.0), size - 1.0)
        left = int(x)
        right = min(left + 1, size - 1)
        rows.append((1 - (x - left)) * sequence[left] + (x - left) * sequence[right])
    return torch.stack(rows)


@pytest.mark.parametrize("size,length", [
    (197, 49),   # ViT-B/16 at 224 -> a 102 x 128 AVE spectrogram (6 x 8 patches + CLS)
    (197, 97),   # -> a 192 x 128 MUSIC-AVQA spectrogram (12 x 8 + CLS)
    (5, 7),      # the tiny test ViT (2 x 2 + CLS) -> 48 x 32 (3 x 2 + CLS)
    (17, 97),    # the demo's ViT at 64 px (4 x 4 + CLS) -> 192 x 128
    (197, 197),  # the same length: the identity
])
def test_linear_1d_resamples_the_whole_sequence_linearly(size, length):
    pos_embed = torch.randn(1, size, 6, generator=torch.Generator().manual_seed(size + length))
    resampled = resample_pos_embed_linear_1d(pos_embed, length)
    # F.interpolate computes the source positions in float32: differences of ~1e-5
    torch.testing.assert_close(resampled[0], _linear_by_hand(pos_embed[0], length), rtol=0, atol=1e-4)
    if size == length:
        assert resampled is pos_embed
    if (size, length) == (197, 49):  # the CLS slot: a blend of patches 0 and 1, not its own
        torch.testing.assert_close(resampled[0, 0], (1 - 0.5102) * pos_embed[0, 1] + 0.5102 * pos_embed[0, 2],
                                   rtol=0, atol=1e-3)


def test_audio_tokens_get_the_chosen_positional_embedding():
    backbone = tiny_backbone()
    audio = torch.randn(2, 1, 48, 32, generator=torch.Generator().manual_seed(3))  # 3 x 2 patches
    patches = backbone.patch_embed.proj(audio.expand(-1, 3, -1, -1)).flatten(2).transpose(1, 2)
    tokens = torch.cat([backbone.cls_token.expand(2, -1, -1), patches], 1)
    frames = _inputs()[0]
    embedded, visual = {}, {}
    for interp in ("bicubic_2d", "linear_1d"):
        trunk = DualStreamViT(backbone, reduction_factor=8, audio_pos_interp=interp).eval()
        with torch.no_grad():
            embedded[interp], visual[interp] = trunk.embed_audio(audio), trunk.embed_visual(frames)
    with torch.no_grad():
        by_hand = tokens + _linear_by_hand(backbone.pos_embed[0], 7)  # 2 x 2 + CLS -> 3 x 2 + CLS
    torch.testing.assert_close(embedded["linear_1d"], by_hand, rtol=0, atol=1e-4)
    assert not torch.allclose(embedded["linear_1d"], embedded["bicubic_2d"], atol=1e-3)
    assert torch.equal(visual["linear_1d"], visual["bicubic_2d"])  # the visual stream: not affected


@pytest.mark.parametrize("interp", ["bicubic_2d", "linear_1d"])
@pytest.mark.parametrize("backbone,kwargs,spectrogram,tokens", [
    ("vit_base_patch16_224.augreg_in21k", {}, (102, 128), 1 + 6 * 8),     # AVE
    ("vit_base_patch16_224.augreg_in21k", {}, (192, 128), 1 + 12 * 8),    # MUSIC-AVQA
    ("vit_base_patch16_224", {"depth": 4, "embed_dim": 96, "num_heads": 3, "img_size": 64},
     (192, 128), 1 + 12 * 8),                                             # the demo's ViT
])
def test_audio_token_shapes(interp, backbone, kwargs, spectrogram, tokens):
    with torch.device("meta"):
        trunk = DualStreamViT(backbone, 8, audio_pos_interp=interp, **kwargs)
        audio = trunk.embed_audio(torch.empty(2, 1, *spectrogram))
    assert audio.shape == (2, tokens, trunk.dim)


def test_audio_pos_interp_reaches_the_model_from_its_config():
    model = tiny_model("avel", audio_pos_interp="linear_1d")
    assert model.trunk.audio_pos_interp == "linear_1d"
    frames, fbank = clip_batch()
    with torch.no_grad():
        audio = model.forward_features(frames, fbank)[1]
        default = tiny_model("avel").forward_features(frames, fbank)[1]
    assert not torch.allclose(audio, default, atol=1e-3)


@pytest.mark.parametrize("name,frame_stats,audio_pos_interp", [
    # the paper follows its peers' feature extraction (sec. 4): LAVISH's on the same ViTs
    ("avel_vit_b16.yaml", "imagenet", "linear_1d"),
    ("avel_vit_l16.yaml", "imagenet", "linear_1d"),
    ("avqa_vit_b16.yaml", "imagenet", "linear_1d"),
    ("avqa_vit_l16.yaml", "imagenet", "linear_1d"),
    # the paper's AVR/AVC rows use VALOR's model and inputs: the weights' own statistics
    ("avr_vit_b16.yaml", "timm", "bicubic_2d"),
    ("avc_vit_b16.yaml", "timm", "bicubic_2d"),
])
def test_paper_configs_state_their_input_conventions(name, frame_stats, audio_pos_interp):
    path = Path(__file__).resolve().parents[1] / "configs" / name
    model = load_config(TrainConfig, path).model
    assert (model.frame_stats, model.audio_pos_interp) == (frame_stats, audio_pos_interp)
    assert re.search(rf"^  frame_stats: {frame_stats} +#", path.read_text(), re.M)  # set, with a reason
    assert re.search(rf"^  audio_pos_interp: {audio_pos_interp} +#", path.read_text(), re.M)

INPUT_CONVENTIONS = [("model.frame_stats", "timm", "imagenet"),
                     ("model.audio_pos_interp", "bicubic_2d", "linear_1d")]


@pytest.mark.parametrize("field,default,other", INPUT_CONVENTIONS)
def test_resume_with_other_input_conventions_is_refused(tmp_path, field, default, other):
    name = field.split(".")[1]
    # the run-level check: the saved run config against the new one
    saved = {"config": to_dict(from_dict(TrainConfig, {"task": "avel", "model": {name: default}})),
             "data_ids": {}}
    new = to_dict(from_dict(TrainConfig, {"task": "avel", "model": {name: other}}))
    with pytest.raises(ConfigError, match=re.escape(f"{field}: {default!r} -> {other!r}")):
        check_resume(saved, new, {})
    # a run saved before the field existed used the default: that is no change, another value is
    del saved["config"]["model"][name]
    assert check_resume(saved, to_dict(from_dict(TrainConfig, {"task": "avel"})), {}) == {}
    with pytest.raises(ConfigError, match=re.escape(f"{field}: None -> {other!r}")):
        check_resume(saved, new, {})
    # the checkpoint-level check: its adapters into a model with the other value
    model = tiny_model("avqa")
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    write_checkpoint(tmp_path / "ckpt", rank=0, world_size=1, model=model, config={}, optimizer=optimizer,
                     scheduler=scheduler, progress=Progress(epoch=0, batches_in_epoch=1, global_step=1, best_score=0.5, best_epoch=0),
                     reader_state={}, best_state=None)
    other_model = tiny_model("avqa", **{name: other})
    with pytest.raises(AdapterMismatchError, match=re.escape(f"{field}: saved {default!r}, model {other!r}")):
        read_checkpoint(tmp_path / "ckpt", rank=0, model=other_model, optimizer=optimizer, scheduler=scheduler)


@pytest.mark.parametrize("field,default,other", INPUT_CONVENTIONS)
def test_adapters_saved_before_the_input_conventions_existed(tmp_path, field, default, other):
    """Such adapters were trained with the defaults: they load into a default model and are
    refused by one with the other value."""
    name = field.split(".")[1]
    save_adapters(tiny_model("avel"), tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["model"][name] == default
    del config["model"][name]
    config_file.write_text(json.dumps(config))
    load_adapters(tiny_model("avel", seed=1), tmp_path)
    with pytest.raises(AdapterMismatchError, match=re.escape(f"{field}: saved {default!r}, model {other!r}")):
        load_adapters(tiny_model("avel", **{name: other}), tmp_path)


# -- weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix,wrap", [(".safetensors", None), (".pth", None), (".pth", "state_dict"),
                                         (".bin", "model")])
def test_local_weights_files(tmp_path, suffix, wrap):
    source = tiny_backbone(seed=5)
    state = source.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap else state, path)
    loaded = create_backbone(TINY_VIT, weights=str(path), **TINY_KWARGS)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("weights,message", [("missing.safetensors", "does not exist"),
                                             ("other.pth", "does not fit the backbone")])
def test_bad_weights_files_are_named(tmp_path, weights, message):
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1).state_dict(),
               tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=message):
        create_backbone(TINY_VIT, weights=str(tmp_path / weights), **TINY_KWARGS)


@pytest.mark.slow  # a fresh interpreter importing timm
def test_pretrained_offline_without_cache_fails_fast(tmp_path):
    code = ("from avpea_ray.model import create_backbone\n"
            "create_backbone('vit_base_patch16_224.augreg_in21k', weights='timm')")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    # Fails rather than hangs in network retries; the bound leaves room for the interpreter's
    # imports on a loaded machine (tests run in parallel processes).
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "could not load pretrained weights for 'vit_base_patch16_224.augreg_in21k'" in result.stderr
    assert "model.weights=" in result.stderr


# -- audio front end ---------------------------------------------------------------------

def test_window_starts_spread_evenly():
    assert window_starts(10 * 16000, 16000, 10).tolist() == [i * 16000 for i in range(10)]
    assert window_starts(8000, 16000, 3).tolist() == [0, 0, 0]


def test_audio_front_end_matches_kaldi_recipe():
    cfg = AudioConfig(window_seconds=1.0, target_frames=102)
    rng = np.random.default_rng(0)
    wav = rng.standard_normal(10 * 16000).astype(np.float32) * 0.1
    windows = waveform_to_windows(wav, 10, cfg)
    assert windows.shape == (10, 1, 102, 128)
    second = torch.from_numpy(wav[3 * 16000:4 * 16000])
    fbank = kaldi.fbank((second - second.mean()).unsqueeze(0), htk_compat=True, sample_frequency=16000,
                        use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0,
                        frame_shift=10)
    expected = torch.nn.functional.pad(fbank, (0, 0, 0, 102 - fbank.shape[0]))
    torch.testing.assert_close(windows[3, 0], (expected - cfg.mean) / (2 * cfg.std))
    assert torch.all(windows[3, 0, fbank.shape[0]:] == -cfg.mean / (2 * cfg.std))  # padded rows


def test_audio_front_end_refuses_stereo():
    with pytest.raises(ValueError, match="mono"):
        waveform_to_windows(np.zeros((16000, 2), np.float32), 2, AudioConfig())


# -- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("data,message", [
    ({"reduction_factr": 8}, "unknown config key reduction_factr"),
    ({"reduction_factor": "8"}, "reduction_factor must be an integer"),
    ({"adapters": "left"}, "model.adapters must be one of"),
    ({"audio": {"mean": -4.0}}, "unknown config key audio"),  # the shard index records it
    ({"cross_attention": 1}, "cross_attention must be true or false"),
    ({"frame_stats": "inception"}, "model.frame_stats must be one of ['timm', 'imagenet'], got 'inception'"),
    ({"audio_pos_interp": "bilinear"},
     "model.audio_pos_interp must be one of ['bicubic_2d', 'linear_1d'], got 'bilinear'"),
])
def test_model_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(ModelConfig, data)


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"reduction_factor": 4, "backbone_kwargs": {"img_size": 32}}))
    cfg = load_config(ModelConfig, tmp_path / "c.json", ["reduction_factor=16", "backbone_kwargs.depth=2"])
    assert (cfg.reduction_factor, cfg.backbone_kwargs) == (16, {"img_size": 32, "depth": 2})


def _bf16_naive_cross_attention(cls, y):
    """The cross-attention with autocast deciding its precision (bf16 logits and softmax)."""
    return torch.bmm(F.softmax(torch.bmm(cls, y.transpose(1, 2)), dim=-1), y)


@pytest.mark.parametrize("attend,matches", [("fp32", True), ("bf16", False)])
def test_cross_attention_under_bf16_autocast_matches_fp32(monkeypatch, attend, matches):
    """ViT-like tokens (a shared direction plus per-token variation, norms ~58, logits in the
    thousands): under bf16 autocast the adapter's output matches fp32 within bf16's own
    rounding of the rest of the adapter (~0.4%); with bf16 logits and softmax the attention
    goes to other tokens and the CLS output moves by ~5%."""
    import avpea_ray.model.adapter as adapter_module

    generator = torch.Generator().manual_seed(0)
    common = 2.0 * torch.randn(4, 1, 768, generator=generator)
    x, y = (common + 0.6 * torch.randn(4, 197, 768, generator=generator) for _ in range(2))
    adapter = AVPEA(768, 8, gating="open").eval()
    reference = adapter(x, y)[:, 0]
    if attend == "bf16":
        monkeypatch.setattr(adapter_module, "cross_attention", _bf16_naive_cross_attention)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = adapter(x, y)[:, 0].float()
    relative_error = ((output - reference).norm() / reference.norm()).item()
    assert (relative_error < 0.02) == matches, relative_error
