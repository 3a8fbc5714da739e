"""CMBS's supervised AVE model as the avel head (avpea_ray/heads/cmbs.py): shapes and parameter
counts at the paper's widths (meta device, no weights), losses, the prediction rule, the
choice of head by configuration, and the parameter report beside Table 1."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from avpea_ray.__main__ import main as cli_main
from avpea_ray.config import ConfigError, load_config
from avpea_ray.heads import CMBSHead, CompactAVELHead, avel_predict, build_avel_head
from avpea_ray.heads.cmbs import (
    CMBS_UNUSED_PARAMETERS,
    cmbs_parameter_count,
    cmbs_unused_parameter_count,
    top_k_mean,
)
from avpea_ray.tasks import build_model
from avpea_ray.train.config import TrainConfig
from tests.toy import clip_batch, tiny_model

# Toy tensors: extra intra-op threads only spin-wait on a busy 2-core box.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

AVE_CLASSES = 28
# Trunk width, patch tokens of a 224 px frame, tokens of a 1 s / 102-frame fbank window.
PAPER_WIDTHS = {"ViT-B/16": (768, 196, 48), "ViT-L/16": (1024, 196, 48)}

# Toy CMBS: every width CMBS fixes, shrunk.
TOY = dict(hidden=16, num_heads=4, feedforward=24, visual_width=20, audio_width=12, attention_width=8)
TOY_DIM, TOY_CLASSES = 16, 5


def toy_head(**overrides) -> CMBSHead:
    torch.manual_seed(0)
    return CMBSHead(TOY_DIM, TOY_CLASSES, **(TOY | overrides))


def toy_tokens(b: int, t: int, n: int = 6, m: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, n + 1, TOY_DIM, generator=gen), torch.randn(b, t, m + 1, TOY_DIM, generator=gen)


# -- shapes and counts at the paper's widths ---------------------------------------------------

@pytest.mark.parametrize("backbone", sorted(PAPER_WIDTHS))
def test_forward_shapes_at_paper_widths_on_meta(backbone):
    dim, patches, audio_tokens = PAPER_WIDTHS[backbone]
    with torch.device("meta"):
        head = CMBSHead(dim, AVE_CLASSES)
        out = head(torch.empty(2, 10, patches + 1, dim), torch.empty(2, 10, audio_tokens + 1, dim))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "event_logits": (2, 10), "class_logits": (2, AVE_CLASSES),
        "cas_logits": (2, AVE_CLASSES), "av_gate": (2, 10)}


# What each component has at CMBS's widths (d_model 256, 512-d map, 128-d audio): the count of
# the module in marmot-xy/CMBS's supv_main_model minus what its forward never uses (template
# layers, decoder self-attention, ave_bottleneck). `inputs` is new: the trunk width D in two layers.
COMPONENTS = {
    "guided_attention": 1_545_474 - 131_328,           # spatial_channel_att - ave_bottleneck
    "audio_lstm": 264_192, "visual_lstm": 1_576_960,   # audio_visual_rnn_layer: 1,841,152
    "visual_encoder": 2_500_608 - 789_760,             # video_encoder - template EncoderLayer
    "audio_encoder": 2_435_072 - 789_760,
    "visual_decoder": 2_237_184 - 1_052_928 - 263_168,  # - template DecoderLayer - self_attn
    "audio_decoder": 2_171_648 - 1_052_928 - 263_168,
    "audio_gate": 257, "visual_gate": 257,
    "audio_cas": 7_196, "visual_cas": 7_196,
    "visual_audio_inter": 263_680, "audio_visual_inter": 263_680,  # AVInter, VAInter
    "event_classifier": 257, "class_classifier": 7_196,  # localize_module: 7,453
}


@pytest.mark.parametrize("backbone,head_params,table1_head", [
    ("ViT-B/16", 9_429_977, 17.8e6 - 3.7e6),
    ("ViT-L/16", 9_593_817, 27.2e6 - 12.9e6),
])
def test_parameter_counts_component_by_component(backbone, head_params, table1_head):
    dim = PAPER_WIDTHS[backbone][0]
    with torch.device("meta"):
        head = CMBSHead(dim, AVE_CLASSES)
    children = {name: sum(p.numel() for p in child.parameters()) for name, child in head.named_children()}
    inputs = {"visual_fc": dim * 512 + 512, "audio_fc": dim * 128 + 128}
    assert {k: v for k, v in children.items() if v} == COMPONENTS | inputs
    total = sum(p.numel() for p in head.parameters())
    assert total == head_params == cmbs_parameter_count(dim)
    # Counted as CMBS's code counts (its unused parameters too): within 3% of Table 1's head.
    assert head.reference_unused_parameters == CMBS_UNUSED_PARAMETERS == 4_344_064
    assert abs(total + CMBS_UNUSED_PARAMETERS - table1_head) / table1_head < 0.03


def test_width_dependent_parameters_match_table1_difference():
    """B/16 -> L/16 adds 256 input dimensions to the two layers that read the trunk: 640
    weights each, as Table 1's heads differ: (27.2M - 17.8M) - (12,890,208 - 3,654,192)."""
    grown = cmbs_parameter_count(1024) - cmbs_parameter_count(768)
    assert grown == 256 * (512 + 128)
    table1 = (27.2e6 - 17.8e6) - (12_890_208 - 3_654_192)
    assert abs(grown - table1) < 0.1e6  # Table 1 rounds to 0.1M


@pytest.mark.parametrize("widths", [TOY, dict(TOY, hidden=8, num_heads=2, feedforward=4), {}])
def test_analytic_count_matches_the_module(widths):
    head = CMBSHead(TOY_DIM, TOY_CLASSES, **widths) if widths else CMBSHead(TOY_DIM, TOY_CLASSES)
    assert sum(p.numel() for p in head.parameters()) == cmbs_parameter_count(TOY_DIM, TOY_CLASSES, **{
        k: v for k, v in widths.items() if k != "num_heads"})
    if not widths:
        assert head.reference_unused_parameters == cmbs_unused_parameter_count()


# -- losses and gradients ----------------------------------------------------------------------

BG = TOY_CLASSES
LABELS = {
    "mixed": [[BG, 2, 2, BG], [1, 1, 1, 1], [BG, BG, 4, 4]],
    "one clip without events": [[BG, 0, 0, BG], [BG, BG, BG, BG], [3, BG, BG, BG]],
    "all background": [[BG] * 4] * 3,
}


@pytest.mark.parametrize("case", sorted(LABELS))
def test_loss_is_finite_and_reaches_every_parameter(case):
    head = toy_head().train()
    labels = torch.tensor(LABELS[case])
    loss, parts = head.loss(head(*toy_tokens(3, 4)), labels)
    assert torch.isfinite(loss) and set(parts) == {"event_loss", "gate_loss", "class_loss", "cas_loss"}
    assert loss.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)
    loss.backward()
    no_grad = [name for name, p in head.named_parameters() if p.grad is None]
    assert not no_grad  # DDP needs a gradient for every parameter, every step
    if case == "all background":
        assert parts["class_loss"].item() == parts["cas_loss"].item() == 0.0
    else:
        silent = [name for name, p in head.named_parameters() if not torch.count_nonzero(p.grad)]
        assert not silent


def test_loss_by_hand():
    """Clip 0: seconds [bg, 2, 2, bg]; clip 1: all background (no class terms)."""
    head = toy_head()
    l3 = math.log(3.0)
    labels = torch.tensor([[BG, 2, 2, BG], [BG, BG, BG, BG]])
    class_logits = torch.zeros(2, TOY_CLASSES)
    class_logits[0, 2] = math.log(TOY_CLASSES - 1)  # p(class 2) = 1/2
    class_logits[1] = torch.tensor([100.0, -100.0, 0.0, 0.0, 0.0])  # would dominate if used
    cas_logits = torch.zeros(2, TOY_CLASSES)  # uniform: ln 5
    outputs = {"event_logits": torch.tensor([[0.0, l3, l3, 0.0], [0.0] * 4]),
               "class_logits": class_logits, "cas_logits": cas_logits,
               "av_gate": torch.full((2, 4), 0.25)}
    loss, parts = head.loss(outputs, labels)
    expected = {
        # BCE: logit 0 costs ln 2 whatever the label; logit ln 3 on an event costs ln(4/3).
        "event_loss": (6 * math.log(2) + 2 * math.log(4 / 3)) / 8,
        # CMBS: the gate probability 0.25 taken as a logit.
        "gate_loss": (6 * -math.log(1 - torch.sigmoid(torch.tensor(0.25)).item())
                      + 2 * -math.log(torch.sigmoid(torch.tensor(0.25)).item())) / 8,
        "class_loss": math.log(2),
        "cas_loss": math.log(TOY_CLASSES),
    }
    assert {k: v.item() for k, v in parts.items()} == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(sum(expected.values()), rel=1e-5)


@pytest.mark.parametrize("bad", [[[0, BG + 1]], [[-1, 0]]])
def test_loss_rejects_out_of_range_labels(bad):
    out = {"event_logits": torch.zeros(1, 2), "class_logits": torch.zeros(1, TOY_CLASSES),
           "cas_logits": torch.zeros(1, TOY_CLASSES), "av_gate": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="labels"):
        toy_head().loss(out, torch.tensor(bad))


def test_every_trainable_parameter_of_the_model_gets_a_gradient():
    """Adapters and CMBS head together (the head does not read the visual CLS token)."""
    model = tiny_model("avel").train()
    frames, fbank = clip_batch()
    loss, _ = model.head.loss(model(frames, fbank), torch.tensor([[4, 4], [4, 4]]))  # all background
    loss.backward()
    assert isinstance(model.head, CMBSHead)
    assert not [name for name, p in model.trainable_named_parameters() if p.grad is None]


# -- prediction ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scores,k,expected", [
    ([[1.0, 5.0, 3.0, 2.0]], 2, 4.0),   # the two largest seconds
    ([[1.0, 5.0, 3.0, 2.0]], 4, 2.75),  # all four
    ([[1.0, 5.0]], 4, 3.0),             # fewer seconds than k: all of them
])
def test_top_k_mean(scores, k, expected):
    per_class = torch.tensor(scores).T.unsqueeze(0)  # (1, T, 1)
    assert top_k_mean(per_class, k).item() == pytest.approx(expected)


def test_class_logits_add_gamma_times_cas_and_predict_by_the_cmbs_rule():
    head = toy_head(gamma=0.3).eval()
    raw = {}
    head.class_classifier.register_forward_hook(lambda module, args, out: raw.setdefault("logits", out))
    with torch.no_grad():
        out = head(*toy_tokens(2, 4))
    torch.testing.assert_close(out["class_logits"], raw["logits"] + 0.3 * out["cas_logits"])
    # The rule on these outputs: event seconds where sigmoid > 0.5, the clip's argmax class.
    pred = avel_predict(out)
    category = out["class_logits"].argmax(-1, keepdim=True).expand(-1, 4)
    assert torch.equal(pred, torch.where(out["event_logits"] > 0, category, torch.full_like(category, BG)))


def test_prediction_rule_on_hand_built_outputs():
    """CMBS (supv_main.py compute_accuracy_supervised): the CAS scores count only through the
    class logits they were added to; the gate plays no part."""
    outputs = {"event_logits": torch.tensor([[0.0, 0.01, -0.01, 5.0]]),
               "class_logits": torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]),
               "cas_logits": torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0]]),
               "av_gate": torch.ones(1, 4)}
    assert avel_predict(outputs).tolist() == [[BG, 3, BG, 3]]


def test_toy_cmbs_overfits_four_clips():
    head = toy_head(dropout=0.0)
    labels = torch.tensor([[BG, 0, 0, BG], [1, 1, 1, 1], [BG, BG, 2, 2], [BG, 3, BG, BG]])
    visual, audio = toy_tokens(4, 4, seed=5)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(60):  # exact from step ~40 on (seeds 0-2)
        optimizer.zero_grad()
        loss, _ = head.loss(head(visual, audio), labels)
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        assert torch.equal(avel_predict(head(visual, audio)), labels)


# -- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("head,built", [({}, CMBSHead),
                                        ({"architecture": "compact", "hidden": 32}, CompactAVELHead)])
def test_architecture_is_chosen_by_configuration(head, built):
    cfg = load_config(TrainConfig, values={"task": "avel", "head": head})
    args = {"num_classes": TOY_CLASSES} | vars(cfg.head)
    assert type(build_avel_head(TOY_DIM, **args)) is built


@pytest.mark.parametrize("head,message", [
    ({"architecture": "transformer"}, "head.architecture must be one of"),
    ({"architecture": "compact", "gamma": 0.5}, "head.gamma applies to head.architecture 'cmbs' only"),
    ({"visual_width": 30}, "head.visual_width=30 must be divisible by 4"),
    ({"top_k": 0}, "head.top_k=0 must be positive"),
    ({"hidden": 30}, "head.hidden=30 must be even and divisible by head.num_heads=4"),
])
def test_bad_head_settings_name_the_field(head, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, values={"task": "avel", "head": head})


@pytest.mark.parametrize("name", ["avel_vit_b16.yaml", "avel_vit_l16.yaml"])
def test_paper_configs_build_cmbs_with_cmbs_values(name):
    cfg = load_config(TrainConfig, Path(__file__).resolve().parent.parent / "configs" / name)
    assert vars(cfg.head) == {"architecture": "cmbs", "hidden": 256, "num_heads": 4, "alpha": 0.1,
                              "dropout": 0.2, "gamma": 0.3, "beta": 0.4, "feedforward": 1024,
                              "visual_width": 512, "audio_width": 128, "attention_width": 256, "top_k": 4}
    model = build_model(cfg.model, "avel", {"num_classes": AVE_CLASSES} | vars(cfg.head), meta=True)
    assert isinstance(model.head, CMBSHead)


# -- parameter report ------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,lines", [
    ("vit_base_patch16_224", ["head params (avel): 9,429,977 (9.4M)",
                              "paper (Table 1): trainable 17.8M = adapters 3.7M + head 14.1M; "
                              "this model: trainable 13.1M = adapters 3.7M + head 9.4M",
                              "head 13,774,041 (13.8M), trainable 17,428,233 (17.4M)"]),
    ("vit_large_patch16_224", ["head params (avel): 9,593,817 (9.6M)",
                               "paper (Table 1): trainable 27.2M = adapters 12.9M + head 14.3M; "
                               "this model: trainable 22.5M = adapters 12.9M + head 9.6M",
                               "head 13,937,881 (13.9M), trainable 26,828,089 (26.8M)"]),
])
def test_params_command_reports_table1(backbone, lines, capsys):
    assert cli_main(["params", "--task", "avel", "--backbone", backbone]) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out


def test_params_command_counts_the_compact_head_as_built(capsys):
    assert cli_main(["params", "--task", "avel", "head.architecture=compact"]) == 0
    out = capsys.readouterr().out
    assert "paper (Table 1): trainable 17.8M" in out and "reference code" not in out

