"""Tests of the AVQA (AVST-style) and compact AVEL (CMBS-style) heads and their metrics (CMBS's
own head: tests/test_cmbs_head.py).

Tiny dimensions throughout: D=64 tokens, head width 32, a few patches and time steps.
"""
from __future__ import annotations

import math

import pytest
import torch

from avpea_ray.heads import (
    GROUPS,
    QUESTION_TYPES,
    AVQAHead,
    CompactAVELHead,
    avel_predict,
    avqa_accuracies,
    avqa_counts,
)
from avpea_ray.tasks.avel import AVELTask
from avpea_ray.tasks.base import Batch

DIM, HIDDEN, VOCAB, ANSWERS, CLASSES = 64, 32, 20, 7, 5

# (B clips, T steps, N visual patches, M audio patches)
SHAPES = [(1, 1, 4, 3), (1, 4, 4, 6), (2, 1, 9, 2), (2, 4, 4, 3), (3, 4, 1, 6)]


def tokens(b: int, t: int, n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (visual, audio) trunk outputs of shapes (b, t, n+1, D) and (b, t, m+1, D)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, n + 1, DIM, generator=gen), torch.randn(b, t, m + 1, DIM, generator=gen)


def questions(q: int, length: int = 6, seed: int = 1) -> torch.Tensor:
    """(q, length) right-padded word indices, varied lengths >= 2."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(1, VOCAB, (q, length), generator=gen)
    for i in range(q):
        words[i, 2 + i % (length - 2):] = 0
    return words


def avqa_head(**kwargs) -> AVQAHead:
    torch.manual_seed(0)
    return AVQAHead(DIM, VOCAB, num_answers=ANSWERS, hidden=HIDDEN, **kwargs)


def avel_head() -> CompactAVELHead:
    torch.manual_seed(0)
    return CompactAVELHead(DIM, num_classes=CLASSES, hidden=HIDDEN)


# ----------------------------------------------------------------------------- AVQA head


@pytest.mark.parametrize("b,t,n,m", SHAPES)
def test_avqa_forward_shapes(b, t, n, m):
    visual, audio = tokens(b, t, n, m)
    q_index = torch.arange(2 * b) % b  # two questions per clip
    out = avqa_head()(visual, audio, questions(2 * b), q_index)
    assert out["answer_logits"].shape == (2 * b, ANSWERS)
    if b == 1:
        assert out["match_logits"] is None and out["match_labels"] is None
    else:
        assert out["match_logits"].shape == (2 * b * t, 2)
        expected = torch.cat([torch.ones(b * t), torch.zeros(b * t)]).long()
        assert torch.equal(out["match_labels"], expected)


@pytest.mark.parametrize("b,t,n,m", SHAPES)
def test_avqa_loss_backward_reaches_parameters(b, t, n, m):
    head = avqa_head().train()
    visual, audio = tokens(b, t, n, m)
    out = head(visual, audio, questions(b + 1), torch.arange(b + 1) % b)
    loss, parts = head.loss(out, torch.arange(b + 1) % ANSWERS)
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        if b == 1 and name.startswith("match_classifier"):
            # No other clip, no match loss: a zero gradient keeps DDP's reducer in step.
            assert torch.count_nonzero(param.grad) == 0, name
        else:
            assert torch.count_nonzero(param.grad) > 0, name
    if b == 1:
        assert parts["match_loss"].item() == 0.0
        assert loss.item() == pytest.approx(parts["answer_loss"].item())
    else:
        assert parts["match_loss"].item() > 0.0


def test_avqa_loss_weights_match_term():
    head = avqa_head(match_weight=0.25)
    visual, audio = tokens(2, 3, 4, 3)
    out = head(visual, audio, questions(3), torch.tensor([0, 1, 1]))
    loss, parts = head.loss(out, torch.tensor([1, 2, 3]))
    assert loss.item() == pytest.approx(parts["answer_loss"].item() + 0.25 * parts["match_loss"].item())


def test_avqa_gather_matches_per_clip_runs():
    """Per-clip features computed once and gathered give what each clip alone gives."""
    head = avqa_head().eval()
    visual, audio = tokens(3, 4, 4, 3)
    words = questions(4)
    q_index = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        batched = head(visual, audio, words, q_index)["answer_logits"]
        for i, clip in enumerate(q_index.tolist()):
            alone = head(visual[clip : clip + 1], audio[clip : clip + 1], words[i : i + 1], torch.tensor([0]))
            torch.testing.assert_close(batched[i], alone["answer_logits"][0], atol=1e-5, rtol=1e-5)


def test_avqa_same_question_same_clip_same_logits():
    head = avqa_head().eval()
    visual, audio = tokens(2, 4, 4, 3)
    words = questions(1).repeat(3, 1)
    with torch.no_grad():
        logits = head(visual, audio, words, torch.tensor([0, 0, 1]))["answer_logits"]
    # Equal up to float rounding: BLAS kernels may sum a batch's rows in different orders.
    torch.testing.assert_close(logits[0], logits[1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits[0], logits[2])  # other clip, other answer scores


def test_avqa_question_padding_does_not_change_logits():
    head = avqa_head().eval()
    visual, audio = tokens(1, 2, 4, 3)
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0, 0]])
    with torch.no_grad():
        a = head(visual, audio, short, torch.tensor([0]))["answer_logits"]
        b = head(visual, audio, padded, torch.tensor([0]))["answer_logits"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_avqa_match_negatives_are_other_videos_at_random_seconds():
    """AVST's negatives: second t of clip b is paired with a frame of another clip (another
    video) at a random second; every other clip and every second gets drawn; eval repeats."""
    head = avqa_head()
    b, t = 4, 5
    # Entry (clip, second) holds the value 100 * clip + second in every patch and channel.
    patches = (100 * torch.arange(b).view(b, 1, 1, 1) + torch.arange(t).view(1, t, 1, 1)).float()
    patches = patches.expand(b, t, 3, 8)
    drawn = set()
    for _ in range(50):
        negative = head._negative_patches(patches)[..., 0, 0].long()  # (B, T) codes
        clip, second = negative // 100, negative % 100
        assert (clip != torch.arange(b).view(b, 1)).all()  # never the clip's own video
        drawn |= {(i, int(c), int(s)) for i in range(b) for c, s in zip(clip[i], second[i])}
    assert drawn == {(i, c, s) for i in range(b) for c in range(b) if c != i for s in range(t)}
    head.eval()
    torch.testing.assert_close(head._negative_patches(patches), head._negative_patches(patches))


def test_avqa_match_pairs_are_positives_then_negatives_and_differ():
    head = avqa_head().eval()
    b, t = 3, 2
    visual, audio = tokens(b, t, 4, 3)
    with torch.no_grad():
        out = head(visual, audio, questions(1), torch.tensor([0]))
    positive, negative = out["match_logits"].view(2, b, t, 2)
    assert out["match_labels"].tolist() == [1] * (b * t) + [0] * (b * t)
    assert not torch.allclose(negative, positive)


def test_avqa_grounding_stage_trains_only_the_match_task():
    head = avqa_head(stage="grounding")
    qa_only = {n for n, _ in head.named_parameters()
               if n.split(".")[0] in ("question_encoder", "audio_temporal", "visual_temporal", "fusion",
                                      "answer_classifier")}
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert qa_only and not qa_only & trainable
    assert {n.split(".")[0] for n in trainable} == {"audio_proj", "visual_proj", "grounding_fuse",
                                                   "match_classifier"}
    visual, audio = tokens(3, 2, 4, 3)
    out = head(visual, audio)  # no questions needed
    assert out["answer_logits"] is None and out["match_logits"].shape == (12, 2)
    loss, parts = head.loss(out, torch.empty(0, dtype=torch.long))
    loss.backward()
    assert all(p.grad is not None for n, p in head.named_parameters() if n in trainable)
    assert set(parts) == {"match_loss"}
    with pytest.raises(ValueError, match="data.batch_size >= 2"):
        head.loss(head(*tokens(1, 2, 4, 3)), torch.empty(0, dtype=torch.long))


def test_avqa_audio_pooling_mean_reads_the_mean_audio_patch_token():
    torch.manual_seed(0)
    cls_head = avqa_head()
    mean_head = avqa_head(audio_pooling="mean")
    mean_head.load_state_dict(cls_head.state_dict())
    visual, audio = tokens(2, 3, 4, 3)
    # The mean head on tokens whose CLS is the patches' mean == the CLS head on the same.
    as_cls = audio.clone()
    as_cls[:, :, 0] = audio[:, :, 1:].mean(2)
    with torch.no_grad():
        mean_out = mean_head.eval()(visual, audio, questions(2), torch.tensor([0, 1]))["answer_logits"]
        cls_out = cls_head.eval()(visual, as_cls, questions(2), torch.tensor([0, 1]))["answer_logits"]
        plain = cls_head(visual, audio, questions(2), torch.tensor([0, 1]))["answer_logits"]
    torch.testing.assert_close(mean_out, cls_out)
    assert not torch.allclose(mean_out, plain)


def test_avqa_rejects_bad_config_and_shapes():
    with pytest.raises(ValueError, match="num_heads"):
        AVQAHead(DIM, VOCAB, hidden=30, num_heads=4)
    visual, _ = tokens(2, 3, 4, 3)
    _, audio = tokens(2, 2, 4, 3)
    with pytest.raises(ValueError, match="disagree"):
        avqa_head()(visual, audio, questions(1), torch.tensor([0]))


def test_avqa_overfits_four_samples():
    torch.manual_seed(0)
    head = avqa_head()
    visual, audio = tokens(4, 2, 4, 3, seed=3)
    words = questions(4, seed=4)
    target = torch.tensor([0, 3, 5, 3])
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        loss, _ = head.loss(head(visual, audio, words, torch.arange(4)), target)
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        pred = head(visual, audio, words, torch.arange(4))["answer_logits"].argmax(-1)
    assert torch.equal(pred, target)


# ----------------------------------------------------------------------------- AVQA metrics


def test_question_types_and_groups():
    assert len(QUESTION_TYPES) == 9 and GROUPS == ("Audio", "Visual", "Audio-Visual")


# Hand-made predictions: (type, n questions, n correct).
METRIC_CASE = [
    ("Audio-Counting", 3, 3),
    ("Audio-Comparative", 1, 0),
    ("Visual-Counting", 2, 1),
    ("Visual-Location", 2, 2),
    ("Audio-Visual-Existential", 1, 1),
    ("Audio-Visual-Temporal", 4, 1),
]


def metric_inputs() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    types, pred, target = [], [], []
    for name, total, correct in METRIC_CASE:
        for i in range(total):
            types.append(name)
            target.append(i % 3)
            pred.append(i % 3 if i < correct else (i % 3) + 1)
    return torch.tensor(pred), torch.tensor(target), types


def test_avqa_counts_and_micro_averaged_accuracies():
    pred, target, types = metric_inputs()
    counts = avqa_counts(pred, target, types)
    assert counts.shape == (9, 2) and counts.dtype == torch.long
    assert counts[QUESTION_TYPES.index("Audio-Counting")].tolist() == [3, 3]
    assert counts[QUESTION_TYPES.index("Audio-Visual-Temporal")].tolist() == [1, 4]
    assert counts[QUESTION_TYPES.index("Audio-Visual-Counting")].tolist() == [0, 0]

    acc = avqa_accuracies(counts)
    expected = {
        "Audio-Counting": 100.0,
        "Audio-Comparative": 0.0,
        "Visual-Counting": 50.0,
        "Visual-Location": 100.0,
        "Audio-Visual-Existential": 100.0,
        "Audio-Visual-Temporal": 25.0,
        "Audio": 75.0,  # 3/4; the mean of the two types would be 50
        "Visual": 75.0,
        "Audio-Visual": 40.0,  # 2/5; the mean of the two types would be 62.5
        "avg": (75.0 + 75.0 + 40.0) / 3,  # the paper's Avg: each group weighs the same
        "overall": 100.0 * 8 / 13,  # over all questions: 61.54, not the Avg's 63.33
    }
    assert acc.keys() == expected.keys()  # types without questions are omitted
    for key, value in expected.items():
        assert acc[key] == pytest.approx(value), key


def test_avqa_task_reports_avg_and_majority_baseline_in_both_conventions():
    from avpea_ray.tasks.avqa import AVQATask

    pred, target, types = metric_inputs()
    # Train answer counts make answer 0 the majority answer. It is right where the target is 0
    # here (targets i % 3 == 0): Audio 2/4, Visual 2/4, Audio-Visual 3/5, 7 of 13 in all.
    task = AVQATask(cfg=None, vocab={"question_words": ["<pad>"], "answers": ["a", "b", "c", "d"],
                                     "answer_counts": [9, 1, 1, 1]})
    logits = torch.nn.functional.one_hot(pred, 4).float()
    batch = Batch(frames=None, fbank=None, head_inputs={},
                  targets={"answer_index": target, "question_types": types})
    metrics = task.metrics(task.counts({"answer_logits": logits}, batch))
    assert metrics["avg"] == pytest.approx((75.0 + 75.0 + 40.0) / 3)
    assert metrics["overall"] == pytest.approx(100.0 * 8 / 13)
    assert metrics["majority_avg"] == pytest.approx((50.0 + 50.0 + 60.0) / 3)
    assert metrics["majority_acc"] == pytest.approx(100.0 * 7 / 13)
    assert AVQATask.primary_metric == "avg"  # checkpoints and sweeps select on the paper's Avg


def test_avqa_grounding_stage_is_scored_and_selected_on_match_accuracy():
    from avpea_ray.config import ConfigError, load_config
    from avpea_ray.tasks.avqa import AVQATask
    from avpea_ray.train.config import TrainConfig
    from avpea_ray.train.preflight import default_run_name

    cfg = load_config(TrainConfig, values={"task": "avqa", "head": {"stage": "grounding"}})
    task = AVQATask(cfg, vocab={"question_words": ["<pad>"], "answers": ["a"], "answer_counts": [1]})
    assert AVQATask.selection(cfg)[0] == "match_acc" and "grounding" in default_run_name(cfg)
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # says 1, 1, 0, 1
    batch = Batch(frames=torch.zeros(2), fbank=None, head_inputs={}, targets={})
    outputs = {"match_logits": logits, "match_labels": torch.tensor([1, 1, 0, 0])}
    assert task.metrics(task.counts(outputs, batch)) == {"match_acc": 75.0}
    one_clip = {"match_logits": None, "match_labels": None}  # a last eval batch of one clip
    assert task.counts(one_clip, batch).sum() == 0
    with pytest.raises(ConfigError, match="data.batch_size must be >= 2 for head.stage=grounding"):
        AVQATask(load_config(TrainConfig, values={"task": "avqa", "head": {"stage": "grounding"},
                                                  "data": {"batch_size": 1}}), task.vocab).check(None)
    with pytest.raises(ConfigError, match="head.stage must be one of"):
        load_config(TrainConfig, values={"task": "avqa", "head": {"stage": "pretrain"}})


def test_avqa_counts_sum_like_an_all_reduce():
    pred, target, types = metric_inputs()
    half = len(types) // 2
    summed = avqa_counts(pred[:half], target[:half], types[:half]) + avqa_counts(
        pred[half:], target[half:], types[half:]
    )
    assert torch.equal(summed, avqa_counts(pred, target, types))


def test_avqa_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown"):
        avqa_counts(torch.tensor([0]), torch.tensor([0]), ["Audio-Location"])
    with pytest.raises(ValueError, match="length Q"):
        avqa_counts(torch.tensor([0, 1]), torch.tensor([0, 1]), ["Audio-Counting"])
    assert avqa_accuracies(torch.zeros(9, 2, dtype=torch.long)) == {}


# ----------------------------------------------------------------------------- AVEL head


@pytest.mark.parametrize("b,t,n,m", SHAPES)
def test_avel_forward_loss_backward(b, t, n, m):
    head = avel_head().train()
    visual, audio = tokens(b, t, n, m)
    out = head(visual, audio)
    assert out["event_logits"].shape == (b, t)
    assert out["class_logits"].shape == (b, CLASSES)
    labels = torch.full((b, t), CLASSES)
    labels[:, 0] = torch.arange(b) % CLASSES  # every clip has an event in its first second
    loss, parts = head.loss(out, labels)
    assert torch.isfinite(loss) and parts["class_loss"] > 0
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        if t == 1 and "rnn.weight_hh" in name:
            # One step from a zero state: the recurrent weights legitimately get no signal.
            continue
        assert torch.count_nonzero(param.grad) > 0, name


def test_avel_loss_by_hand():
    """Clip 0: seconds [bg, 2, 2, bg]; clip 1: all background (no class loss)."""
    head = avel_head()
    bg, l3 = CLASSES, math.log(3.0)
    labels = torch.tensor([[bg, 2, 2, bg], [bg, bg, bg, bg]])
    event_logits = torch.tensor([[0.0, l3, l3, 0.0], [0.0, 0.0, 0.0, 0.0]])
    class_logits = torch.zeros(2, CLASSES)
    class_logits[0, 2] = math.log(CLASSES - 1)  # p(class 2) = 1/2
    class_logits[1] = torch.tensor([100.0, -100.0, 0.0, 0.0, 0.0])  # would dominate if used
    loss, parts = head.loss({"event_logits": event_logits, "class_logits": class_logits}, labels)
    # BCE: logit 0 costs ln 2 whatever the label; logit ln 3 on an event costs ln(4/3).
    expected_event = (6 * math.log(2) + 2 * math.log(4 / 3)) / 8
    assert parts["event_loss"].item() == pytest.approx(expected_event, rel=1e-5)
    assert parts["class_loss"].item() == pytest.approx(math.log(2), rel=1e-5)
    assert loss.item() == pytest.approx(expected_event + math.log(2), rel=1e-5)


def test_avel_loss_all_background_batch_still_reaches_class_head():
    head = avel_head()
    visual, audio = tokens(2, 3, 4, 3)
    loss, parts = head.loss(head(visual, audio), torch.full((2, 3), CLASSES))
    assert parts["class_loss"].item() == 0.0
    loss.backward()
    assert head.class_classifier.weight.grad is not None


@pytest.mark.parametrize("bad", [[[0, CLASSES + 1]], [[-1, 0]]])
def test_avel_loss_rejects_out_of_range_labels(bad):
    out = {"event_logits": torch.zeros(1, 2), "class_logits": torch.zeros(1, CLASSES)}
    with pytest.raises(ValueError, match="labels"):
        avel_head().loss(out, torch.tensor(bad))


# ----------------------------------------------------------------------------- AVEL metrics


def test_avel_predict_cmbs_rule_around_one_half():
    bg = CLASSES
    outputs = {
        # sigmoid: 0.5 (not > 0.5), 0.5025, 0.4975, 0.993 | 0.047, 0.88, 0.5, 0.50025
        "event_logits": torch.tensor([[0.0, 0.01, -0.01, 5.0], [-3.0, 2.0, 0.0, 1e-3]]),
        "class_logits": torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0, 1.0]]),
    }
    pred = avel_predict(outputs)
    assert pred.dtype == torch.long
    assert pred.tolist() == [[bg, 3, bg, 3], [bg, 1, bg, 1]]


def avel_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (pred == labels).float().mean().item()


def test_avel_counts_and_accuracy_by_hand():
    """The AVE task's per-class counts and accuracy (the CMBS rule) on predictions by hand."""
    task = AVELTask(None, ["Church bell", "Dog bark"])
    bg = task.num_classes
    # Clip 0 predicts category 3 at seconds 1 and 3, clip 1 category 1 at seconds 1 and 3.
    event_logits = torch.tensor([[-9.0, 9, -9, 9], [-9, 9, -9, 9]])
    class_logits = torch.full((2, bg), -9.0)
    class_logits[0, 3] = class_logits[1, 1] = 9.0
    labels = torch.tensor([[bg, 3, 3, 3], [bg, 2, bg, bg]])
    counts = task.counts({"event_logits": event_logits, "class_logits": class_logits},
                         Batch(None, None, {}, {"labels": labels}))
    # Correct: clip 0 seconds 0, 1, 3; clip 1 seconds 0, 2 -> 5 of 8.
    assert counts.sum(0).tolist() == [5, 8]
    assert counts[bg].tolist() == [3, 4] and counts[3].tolist() == [2, 3] and counts[2].tolist() == [0, 1]
    metrics = task.metrics(counts)
    assert metrics["accuracy"] == pytest.approx(62.5)
    assert metrics["background"] == pytest.approx(75.0) and "Church bell" not in metrics


def test_avel_overfits_four_clips():
    head = avel_head()
    bg = CLASSES
    visual, audio = tokens(4, 4, 4, 3, seed=5)
    labels = torch.tensor([[bg, 0, 0, bg], [1, 1, 1, 1], [bg, bg, bg, bg], [bg, bg, 3, 3]])
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss, _ = head.loss(head(visual, audio), labels)
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        assert avel_accuracy(avel_predict(head(visual, audio)), labels) == 100.0
