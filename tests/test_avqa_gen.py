"""Generative AVQA (the paper's Table 3 AVQA column): the exact-match metric on hand-built
answers, the decoder continuing a question prefix, and a demo-size run through the real job
that answers better than always giving the most frequent train answer."""
from __future__ import annotations

import json

import pytest
import torch

from avpea_ray.heads.avc import AVCHead
from avpea_ray.metrics.answers import exact_matches, normalize_answer
from avpea_ray.tasks import TASKS
from avpea_ray.tasks.avqa_gen import AVQAGenTask, vocabulary_words
from avpea_ray.tasks.base import Batch

VOCAB = {"question_words": ["<pad>", "<unk>", "how", "many", "instruments", "is", "the", "left",
                            "louder", "?"],
         "answers": ["two", "yes", "no", "left"], "answer_counts": [5, 9, 2, 1]}


@pytest.mark.parametrize("predicted,reference,equal", [
    ("Two.", "two", True),
    ("  left  ", "left", True),
    ("yes!", "YES", True),
    ("simultaneously ", "simultaneously", True),
    ("more  than one", "more than one", True),     # inner whitespace collapsed
    ("two\uff1f", "two", True),                    # full-width question mark
    ("2", "two", False),                           # numbers are not spelled out
    ("yes it is", "yes", False),                   # a longer answer is wrong
    ("", "yes", False),
    ("le ft", "left", False),
])
def test_normalised_exact_match(predicted, reference, equal):
    assert exact_matches([predicted], [reference]) == [equal]
    assert (normalize_answer(predicted) == normalize_answer(reference)) is equal


def test_exact_match_refuses_unequal_lengths():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_matches(["a", "b"], ["a"])


def _batch(answers, types):
    return Batch(frames=torch.zeros(1), fbank=torch.zeros(1), head_inputs={},
                 targets={"answers": answers, "question_types": types})


def test_accuracy_per_type_group_and_avg_from_hand_built_answers():
    """6 questions over 3 groups; Avg is the mean of the group accuracies (not the overall
    accuracy), and the majority train answer ("yes") is scored in the same conventions."""
    task = AVQAGenTask(None, VOCAB)
    types = ["Audio-Counting", "Audio-Counting", "Audio-Comparative",
             "Visual-Location", "Audio-Visual-Existential", "Audio-Visual-Existential"]
    references = ["two", "three", "yes", "left", "yes", "no"]
    decoded = ["Two.", "two", " YES", "right", "yes", "yes"]
    # Audio: 2/3 right, Visual: 0/1, Audio-Visual: 1/2.
    metrics = task.metrics(task.counts_of(decoded, _batch(references, types)))
    assert metrics["Audio-Counting"] == pytest.approx(50.0)
    assert metrics["Audio-Comparative"] == pytest.approx(100.0)
    assert metrics["Audio"] == pytest.approx(200 / 3)
    assert metrics["Visual"] == pytest.approx(0.0)
    assert metrics["Audio-Visual"] == pytest.approx(50.0)
    assert metrics["avg"] == pytest.approx((200 / 3 + 0 + 50) / 3)
    assert metrics["overall"] == pytest.approx(50.0)
    # "yes" is right for the Audio-Comparative and first Audio-Visual question.
    assert metrics["majority_avg"] == pytest.approx((100 / 3 + 0 + 50) / 3)
    assert metrics["majority_acc"] == pytest.approx(100 * 2 / 6)
    assert "Visual-Counting" not in metrics  # no questions: omitted, not 0


def test_the_tokenizer_knows_every_question_word_and_answer():
    task = AVQAGenTask(None, VOCAB)
    words = vocabulary_words(VOCAB)
    assert words[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "?" in words
    ids, prefix = task.encode(["How many instruments?"], ["two"], "cpu")
    tok = task.tokenizer
    assert ids[0].tolist() == [tok.cls_token_id, *tok.convert_tokens_to_ids(["how", "many", "instruments", "?"]),
                               tok.sep_token_id, tok.convert_tokens_to_ids("two"), tok.sep_token_id]
    assert prefix.tolist() == [6] and tok.unk_token_id not in ids[0].tolist()


def test_loss_is_on_the_answer_only():
    """Changing what the decoder predicts for question positions leaves the loss unchanged;
    changing the answer's logits changes it."""
    task = AVQAGenTask(None, VOCAB)
    ids, prefix = task.encode(["how many instruments ?"], ["two"], "cpu")
    head = AVCHead(8, vocab_size=len(task.tokenizer), bos_id=2, eos_id=3, pad_id=0, hidden=8,
                   layers=1, num_heads=2)
    logits = torch.randn(1, ids.shape[1] - 1, len(task.tokenizer))
    batch = Batch(torch.zeros(1), torch.zeros(1), {}, {"prefix_lengths": prefix})
    loss = task.loss(head, {"logits": logits, "targets": ids[:, 1:]}, batch)[0]
    question_part = logits.clone()
    question_part[:, :int(prefix) - 1] += torch.randn_like(question_part[:, :int(prefix) - 1])
    assert task.loss(head, {"logits": question_part, "targets": ids[:, 1:]}, batch)[0] == pytest.approx(loss.item())
    answer_part = logits.clone()
    answer_part[:, int(prefix) - 1] += 5 * torch.randn(len(task.tokenizer))
    assert task.loss(head, {"logits": answer_part, "targets": ids[:, 1:]}, batch)[0] != pytest.approx(loss.item())


@pytest.mark.parametrize("beam_size", [1, 3])
def test_generate_continues_the_prefix_of_its_clip(beam_size):
    """Decoding after a prefix returns only the continuation, and prefix i reads clip
    video_index[i]: the same prefix on a repeated clip decodes the same text."""
    torch.manual_seed(0)
    head = AVCHead(16, vocab_size=12, bos_id=1, eos_id=2, pad_id=0, hidden=16, layers=1, num_heads=2,
                   max_length=8, memory_patches=1).eval()
    visual, audio = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 4, 16)
    prefix = torch.tensor([[1, 5, 6], [1, 5, 6], [1, 7, 8]])
    index = torch.tensor([1, 1, 0])
    out = head.generate(visual, audio, beam_size=beam_size, prefix=prefix, video_index=index)
    assert len(out) == 3 and out[0] == out[1]
    assert all(len(row) <= 8 - 3 for row in out)
    # The same as decoding each clip's prefix on its own.
    alone = head.generate(visual[:1], audio[:1], beam_size=beam_size, prefix=prefix[2:])
    assert alone[0] == out[2]


@pytest.mark.slow
def test_demo_run_answers_better_than_the_majority_answer(avqa_shards, tmp_path, ray_local):
    """A tiny ViT and answer decoder on the session's synthetic MUSIC-AVQA shards, through the
    real job (Ray Train, MLflow): the generated answers beat always giving the most frequent
    train answer on the test split."""
    from avpea_ray.cli import run_job
    from tests.toy import train_overrides

    overrides = train_overrides(avqa_shards, tmp_path, **{
        "task": "avqa_gen", "head.text_model": "random", "head.hidden": 64, "head.layers": 1,
        "head.num_heads": 2, "head.memory_patches": 2, "data.max_caption_tokens": 24,
        "data.batch_size": 8, "optim.epochs": 3, "optim.lr": 3e-3, "evaluation.beam_size": 1,
        "run.name": "avqa-gen-demo", "run.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    summary_json = tmp_path / "summary.json"
    assert run_job("avqa_gen", "", [*overrides, "--summary-json", str(summary_json)]) == 0
    summary = json.loads(summary_json.read_text())
    metrics = summary["metrics"]
    print(f"generative AVQA demo: avg {metrics['avg']:.2f} vs majority {metrics['majority_avg']:.2f}; "
          f"overall {metrics['overall']:.2f} vs {metrics['majority_acc']:.2f}")
    assert summary["task"] == "avqa_gen" and summary["evaluated_on"] == "test"
    assert metrics["avg"] > metrics["majority_avg"] + 5, metrics


def test_registered_with_its_demo_config():
    assert TASKS["avqa_gen"] is AVQAGenTask
    assert AVQAGenTask.dataset == "musicavqa"


def test_predict_refuses_generative_avqa_adapters_naming_the_task(tmp_path):
    """predict/infer do not decode answers yet: a clear refusal, not another task's code path."""
    from avpea_ray.config import ConfigError
    from avpea_ray.infer.predictor import Predictor
    from avpea_ray.model.adapter_io import CONFIG_NAME, FORMAT

    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "task": "avqa_gen", "model": {}}))
    with pytest.raises(ConfigError, match="adapters for task 'avqa_gen'; predict and infer serve avqa, avel"):
        Predictor.load(tmp_path)
