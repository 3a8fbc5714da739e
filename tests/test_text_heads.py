"""Retrieval (AVR) and captioning (AVC) heads, the text models and the shared distributed
gather, on tiny models."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from avpea_ray.heads.avc import AVCHead
from avpea_ray.heads.avr import AVRHead
from avpea_ray.heads.text import TextModelError, build_text_encoder, load_tokenizer
from avpea_ray.model.adapter_io import save_adapters
from avpea_ray.tasks import load_model
from avpea_ray.tasks.valor_clips import read_vocab_words
from tests.toy import TINY_TEXT, clip_batch, free_port, tiny_backbone, tiny_model

WORDS = ["a", "guitar", "piano", "plays", "on", "the", "left", "right", "is", "heard", ",", "."]


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return str(path)


# -- text models -------------------------------------------------------------------------

def test_random_tokenizer_reads_the_shard_vocabulary(vocab_file):
    tokenizer = load_tokenizer("random", read_vocab_words(vocab_file))
    ids = tokenizer("A guitar plays on the left.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id == 2 and ids[-1] == tokenizer.sep_token_id == 3
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a guitar plays on the left."


@pytest.mark.parametrize("load,message", [
    (lambda: load_tokenizer("random", None), "needs the train split's vocab.txt"),
    (lambda: read_vocab_words("/nonexistent/vocab.txt"), "does not exist"),
])
def test_tokenizer_errors_name_what_is_missing(load, message):
    with pytest.raises(TextModelError, match=message):
        load()


def test_text_model_from_a_local_directory(tmp_path, vocab_file):
    saved = build_text_encoder("random", 17, TINY_TEXT)
    saved.save_pretrained(tmp_path / "bert")
    load_tokenizer("random", read_vocab_words(vocab_file)).save_pretrained(tmp_path / "bert")
    loaded = build_text_encoder(str(tmp_path / "bert"), 0)
    assert torch.equal(loaded.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight)
    assert len(load_tokenizer(str(tmp_path / "bert"))) == len(WORDS) + 5


@pytest.mark.slow  # a fresh interpreter importing transformers
def test_hub_text_model_offline_without_cache_fails_fast(tmp_path):
    code = ("from avpea_ray.heads.text import build_text_encoder\n"
            "build_text_encoder('bert-base-uncased', 0)")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    # Fails rather than hangs in network retries; the bound leaves room for the interpreter's
    # imports on a loaded machine (tests run in parallel processes).
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "'bert-base-uncased' is neither a local directory nor in the Hugging Face cache" in result.stderr
    assert "head.text_model=" in result.stderr


def test_text_config_is_checked():
    with pytest.raises(TextModelError, match="head.text_config"):
        build_text_encoder("random", 10, {"hidden_size": 30, "num_attention_heads": 4})


# -- AVR -----------------------------------------------------------------------------------

def test_infonce_prefers_matching_pairs_and_is_symmetric():
    torch.manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    aligned, parts = AVRHead.loss(video, video.clone(), scale)
    shuffled, _ = AVRHead.loss(video, video.roll(1, 0), scale)
    assert aligned < shuffled
    assert parts["t2v_loss"] == pytest.approx(parts["v2t_loss"], rel=1e-5)  # same matrix, transposed


def test_avr_head_embeddings_are_unit_vectors_and_temperature_is_capped():
    model = tiny_model("avr")
    frames, fbank = clip_batch(batch=3)
    tokens = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0], [2, 8, 9, 3]])
    outputs = model(frames, fbank, caption_tokens=tokens, caption_mask=(tokens != 0).long())
    assert outputs["video_embedding"].shape == outputs["text_embedding"].shape == (3, 16)
    assert torch.allclose(outputs["video_embedding"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert outputs["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.head.logit_scale.fill_(10.0)
    assert model(frames, fbank, caption_tokens=tokens, caption_mask=tokens != 0)["logit_scale"].item() == \
        pytest.approx(100.0, rel=1e-5)


def test_avr_training_moves_only_adapters_and_head_and_freeze_text_keeps_the_encoder():
    model = tiny_model("avr")
    model.head.text_encoder.requires_grad_(False)  # what head.freeze_text=true does
    frames, fbank = clip_batch(batch=3)
    tokens = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0], [2, 8, 9, 3]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        outputs = model(frames, fbank, caption_tokens=tokens, caption_mask=tokens != 0)
        loss, _ = AVRHead.loss(outputs["video_embedding"], outputs["text_embedding"], outputs["logit_scale"])
        loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("trunk.adapters_") for k in changed) and "head.logit_scale" in changed
    assert not any(k.startswith(("trunk.backbone.", "head.text_encoder.")) for k in changed)


# -- AVC -----------------------------------------------------------------------------------

def _greedy_by_hand(head: AVCHead, visual, audio, steps: int) -> list[list[int]]:
    memory = head.memory(visual, audio)
    out = []
    for row in range(memory.shape[0]):
        tokens = [head.bos_id]
        for _ in range(steps - 1):
            logits = head.logits(memory[row:row + 1], torch.tensor([tokens]))[0, -1]
            logits[head.pad_id] = float("-inf")
            tokens.append(int(logits.argmax()))
            if tokens[-1] == head.eos_id:
                break
        out.append([t for t in tokens if t not in (head.bos_id, head.eos_id, head.pad_id)])
    return out


def _best_caption_by_brute_force(head: AVCHead, memory, row: int, length_penalty: float) -> list[int]:
    """The best caption of at most 2 generated tokens, scored as `generate` scores beams."""
    vocab = head.token_embed.num_embeddings
    first = head.logits(memory[row:row + 1], torch.tensor([[head.bos_id]]))[0, -1]
    first[head.pad_id] = float("-inf")
    first = first.log_softmax(-1)
    best, best_ids = float("-inf"), None
    for t1 in range(vocab):
        if t1 == head.pad_id:
            continue
        if t1 == head.eos_id:
            candidates = [(float(first[t1]), 1, [t1])]
        else:
            second = head.logits(memory[row:row + 1], torch.tensor([[head.bos_id, t1]]))[0, -1]
            second[head.pad_id] = float("-inf")
            second = second.log_softmax(-1)
            candidates = [(float(first[t1] + second[t2]), 2, [t1, t2]) for t2 in range(vocab) if t2 != head.pad_id]
        for score, length, ids in candidates:
            if score / length ** length_penalty > best:
                best, best_ids = score / length ** length_penalty, ids
    return [t for t in best_ids if t not in (head.bos_id, head.eos_id, head.pad_id)]


def test_avc_teacher_forcing_ignores_padding_and_gathers_each_captions_clip():
    model = tiny_model("avc").eval()
    frames, fbank = clip_batch(batch=2)
    captions = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0], [2, 8, 9, 10, 3]])
    outputs = model(frames, fbank, caption_tokens=captions, caption_video_index=torch.tensor([0, 0, 1]))
    assert outputs["logits"].shape == (3, 4, 30) and torch.equal(outputs["targets"], captions[:, 1:])
    loss, parts = model.head.loss(outputs)
    assert torch.isfinite(loss) and 0 <= parts["token_accuracy"] <= 1
    # The first caption's logits do not depend on its padding or on the other clip's captions.
    alone = model(frames, fbank, caption_tokens=captions[:1, :4], caption_video_index=torch.tensor([0]))
    assert torch.allclose(alone["logits"][0], outputs["logits"][0, :3], atol=1e-5)


def test_avc_greedy_is_argmax_decoding():
    torch.manual_seed(3)
    model = tiny_model("avc").eval()
    visual, audio = model.forward_features(*clip_batch(batch=3))
    assert model.head.generate(visual, audio, beam_size=1) == \
        _greedy_by_hand(model.head, visual, audio, model.head.max_length)


@pytest.mark.parametrize("seed,length_penalty,beats_greedy", [(1, 0.0, True), (1, 1.0, False), (0, 1.0, True)])
def test_avc_beam_search_wide_enough_is_exhaustive_search(seed, length_penalty, beats_greedy):
    """With more beams than 2-token captions, beam search must find the best one (which is
    sometimes not greedy's, and sometimes the empty caption: an end token first)."""
    model = tiny_model("avc").eval()
    torch.manual_seed(seed)
    with torch.no_grad():  # a peaky random decoder, so that captions differ between clips
        for p in model.head.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
        visual, audio = model.forward_features(*clip_batch(batch=8))
        beams = model.head.generate(visual, audio, beam_size=900, max_length=3, length_penalty=length_penalty)
        greedy = model.head.generate(visual, audio, beam_size=1, max_length=3, length_penalty=length_penalty)
        memory = model.head.memory(visual, audio)
        assert beams == [_best_caption_by_brute_force(model.head, memory, row, length_penalty) for row in range(8)]
    assert (beams != greedy) == beats_greedy


def test_avc_learns_to_caption_a_clip():
    """A few hundred steps on two clips with different captions: greedy decoding returns each
    clip's own caption."""
    torch.manual_seed(0)
    model = tiny_model("avc")
    frames, fbank = clip_batch(batch=2)
    captions = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]])
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        loss, _ = model.head.loss(model(frames, fbank, caption_tokens=captions,
                                        caption_video_index=torch.tensor([0, 1])))
        loss.backward()
        optimizer.step()
    model.eval()
    visual, audio = model.forward_features(frames, fbank)
    assert model.head.generate(visual, audio, beam_size=2) == [[5, 6, 7], [8, 9]]


# -- save -> load ----------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["avr", "avc"])
def test_heads_save_and_load(tmp_path, task):
    model = tiny_model(task).eval()
    with torch.no_grad():  # move the head away from its initialisation
        for p in model.head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapters(model, tmp_path / "adapters")
    loaded = load_model(tmp_path / "adapters").eval()
    loaded.trunk.backbone.load_state_dict(tiny_backbone(0).state_dict())  # the same frozen ViT
    frames, fbank = clip_batch()
    with torch.no_grad():
        if task == "avr":
            tokens = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
            inputs = {"caption_tokens": tokens, "caption_mask": tokens != 0}
            expected, got = model(frames, fbank, **inputs), loaded(frames, fbank, **inputs)
            assert all(torch.equal(expected[k], got[k]) for k in expected)
        else:
            expected = model.head.generate(*model.forward_features(frames, fbank), beam_size=2)
            assert loaded.head.generate(*loaded.forward_features(frames, fbank), beam_size=2) == expected


# -- the gather behind contrastive negatives ---------------------------------------------------

def _gather_on_this_rank(rank: int) -> tuple:
    from avpea_ray.tasks.distributed import gather_objects, gather_with_local_grad

    local = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)  # sizes 1 and 2
    gathered = gather_with_local_grad(local)
    (gathered * torch.arange(1.0, 4.0)[:, None]).sum().backward()
    return gathered.detach().tolist(), local.grad.tolist(), gather_objects(f"r{rank}")


def _two_rank_worker(rank: int, port: int, queue) -> None:
    """One of two gloo ranks: what each two-rank test checks, computed in one spawn (a fresh
    interpreter per rank is the expensive part)."""
    import datetime
    import traceback

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=120))
        gather = _gather_on_this_rank(rank)
        # Uneven halves, in batches, in another order than the single-process run.
        parts = [["v9", "v2", "v4"], ["v0"]] if rank == 0 else [["v7", "v1"], ["v3", "v8", "v5", "v6"]]
        queue.put((rank, {"gather": gather, "retrieval": _evaluate_retrieval(parts)}))
        dist.destroy_process_group()
    except BaseException:  # the test shows why, instead of waiting for a result that never comes
        queue.put((rank, {"error": traceback.format_exc()}))


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> dict[str, dict]:
    """Two spawned gloo ranks run `_two_rank_worker` (once a session); their results by rank
    ("0", "1")."""
    from tests.toy import once_per_session

    def spawn(_folder) -> dict[str, dict]:
        ctx = mp.get_context("spawn")
        queue, port = ctx.Queue(), free_port()
        workers = [ctx.Process(target=_two_rank_worker, args=(r, port, queue)) for r in range(2)]
        for w in workers:
            w.start()
        results = {}
        try:
            while len(results) < len(workers):
                rank, result = queue.get(timeout=300)
                assert "error" not in result, f"rank {rank}: {result['error']}"
                results[str(rank)] = result
        finally:
            for w in workers:
                w.join(timeout=60)
                if w.is_alive():  # its peer failed: it waits for a rank that never comes
                    w.kill()
        return results

    return once_per_session(tmp_path_factory, "two-gloo-ranks", spawn)


@pytest.mark.slow  # two spawned gloo ranks
def test_gather_with_local_grad_across_two_ranks(two_ranks):
    results = {rank: two_ranks[str(rank)]["gather"] for rank in range(2)}
    for rank in range(2):
        gathered, grad, objects = results[rank]
        assert gathered == [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]  # rank 0's row, then rank 1's two
        assert objects == ["r0", "r1"]
    assert results[0][1] == [[1.0, 1.0]]                # only the local rows get gradients
    assert results[1][1] == [[2.0, 2.0], [3.0, 3.0]]


# -- retrieval evaluation over a test set split across ranks ---------------------------------

def _retrieval_batch(video_ids: list[str]):
    """Clips and two captions each, deterministic per video id (whichever rank holds it)."""
    from avpea_ray.tasks import Batch

    seeds = [int(v[1:]) for v in video_ids]
    clips = [clip_batch(batch=1, seed=s) for s in seeds]
    frames, fbank = torch.cat([c[0] for c in clips]), torch.cat([c[1] for c in clips])
    tokens = torch.tensor([[2, 5 + (s + k) % 20, 6 + s % 7, 3] for s in seeds for k in (0, 1)])
    owners = torch.arange(len(seeds)).repeat_interleave(2)
    return Batch(frames, fbank, {"caption_tokens": tokens, "caption_mask": tokens != 0},
                 {"video_ids": video_ids, "caption_video_index": owners})


VIDEOS = [f"v{i}" for i in range(10)]


def _evaluate_retrieval(parts: list[list[str]]) -> dict[str, float]:
    from avpea_ray.tasks.avr import RetrievalEvaluator

    torch.manual_seed(0)
    model = tiny_model("avr").eval()
    evaluator = RetrievalEvaluator()
    with torch.no_grad():
        for part in parts:
            evaluator.update(model, _retrieval_batch(part))
    return evaluator.compute(torch.device("cpu"))


@pytest.mark.slow  # two spawned gloo ranks
def test_retrieval_over_a_test_set_split_across_two_ranks_equals_one_process(two_ranks):
    expected = _evaluate_retrieval([VIDEOS[:4], VIDEOS[4:]])
    assert expected["num_videos"] == 10 and expected["num_captions"] == 20
    for rank in range(2):
        assert two_ranks[str(rank)]["retrieval"] == pytest.approx(expected)
