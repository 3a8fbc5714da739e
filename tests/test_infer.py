"""Using trained adapters: `predict` on real encoded videos gives what the model gives on the
same video's shard sample; `infer` over a split on a real local Ray Data pipeline writes one
row per question whose accuracy is the training job's test accuracy; bad inputs are named.

The fast tests use a tiny model saved as training saves it (adapters, `inputs.json`,
`vocab.json`); the slow ones train the demo-style AVQA model once for the whole module."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from avpea_ray.config import ConfigError
from avpea_ray.data.audio import AudioConfig
from avpea_ray.data.media import ClipSpec
from avpea_ray.infer import Media, MediaError, Predictor, predict
from avpea_ray.model import ModelConfig
from avpea_ray.model.adapter_io import save_adapters
from avpea_ray.tasks import build_model
from tests.media import frame_color, tone

T, SIZE = 4, 32
AUDIO = AudioConfig()  # MUSIC-AVQA's: 1.95 s windows, 192 fbank frames
VOCAB = {"question_words": ["<pad>", "<unk>", "is", "the", "violin", "playing", "how", "many",
                            "instruments", "are", "sounding", "where"],
         "answers": ["yes", "no", "one", "two", "left", "right"], "answer_counts": [5, 4, 3, 2, 1, 1]}
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32}


def write_video(path: Path, seconds: float = 5, fps: int = 5, audio: bool = True,
                codec: str = "libx264") -> Path:
    """A real encoded video (H.264 + AAC in MP4 by default): second s shows `frame_color(s)`
    with a moving bar, a 440 Hz tone from the middle on."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream("aac", rate=44_100, layout="stereo") if audio else None
        for i in range(int(seconds * fps)):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:] = frame_color(i // fps)
            img[:, (i * 3) % 64:(i * 3) % 64 + 6] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            wave = tone(seconds, 440.0, 44_100, silent_until=seconds / 2)
            stereo = np.stack([wave, wave])
            for start in range(0, stereo.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, start:start + 1024]),
                                                   format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = 44_100, start
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    return path


def save_tiny_adapters(folder: Path, task: str = "avqa", seed: int = 7) -> Path:
    """A tiny model's adapters saved as training saves them: the random backbone drawn right
    after `torch.manual_seed(seed)`, inputs.json and the task's files beside the weights."""
    from tests.toy import TINY_HEADS

    head = {"avqa": {"vocab_size": len(VOCAB["question_words"]), "num_answers": len(VOCAB["answers"]),
                     "hidden": 32},
            "avel": {"num_classes": 4, "hidden": 32, "architecture": "compact"}}.get(task) or TINY_HEADS[task]
    config = ModelConfig(backbone="vit_base_patch16_224", weights="random", backbone_kwargs=dict(TINY))
    torch.manual_seed(seed)
    model = build_model(config, task, head)
    with torch.no_grad():  # gates open and adapters non-trivial: the comparison exercises them
        for name, p in model.trainable_named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_adapters(model, folder)
    spec = ClipSpec("musicavqa" if task == "avqa" else "ave", T, SIZE, AUDIO)
    (folder / "inputs.json").write_text(json.dumps({"format": "avpea-inputs/1", "clips": spec.to_json(),
                                                    "seed": seed, "train": ""}))
    if task == "avqa":
        (folder / "vocab.json").write_text(json.dumps(VOCAB))
    elif task in ("avr", "avc"):
        from transformers import BertTokenizerFast

        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "guitar", "plays", "car",
                 "bell", "rings", "the", "on", "left", "right", "loud", "quiet", "man", "woman", "sings",
                 "piano", "drum", "street", "water", "bird", "wind", "night", "day"]
        BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(
            str(folder / "tokenizer"))
    else:
        (folder / "classes.json").write_text(json.dumps(["guitar", "dog", "car", "bell", "background"]))
    return folder


def shard_video_and_read_back(video: Path, out: Path, spec: ClipSpec, meta: dict) -> dict:
    """The video through the sharders' own path (`sharding.run.make_sample`, `ShardWriter`)
    and back through the training reader (`ShardStream`, eval order): the one-clip batch the
    evaluation would see."""
    from avpea_ray.data.reader import ShardStream
    from avpea_ray.data.shards import ShardWriter
    from sharding import run

    job = run.MediaJob(video.stem, meta, spec.num_frames, spec.image_size, spec.audio,
                       videos_dir=str(video.parent))
    with ShardWriter(str(out), split="test", dataset=spec.dataset, num_frames=spec.num_frames,
                     image_size=spec.image_size, audio=spec.audio.__dict__) as writer:
        writer.write(run.make_sample(job))
    (batch,) = list(ShardStream(str(out), batch_size=1, training=False, num_workers=0))
    return batch


def questions_meta(predictor: Predictor, questions: list[str]) -> list[dict]:
    return [{"question": q, "question_tokens": predictor.encode_question(q)[0], "answer_index": -1,
             "question_type": "Audio-Counting"} for q in questions]


def model_answers_on_batch(predictor: Predictor, batch: dict) -> torch.Tensor:
    """The answer probabilities the model gives on a reader batch, through the task's own
    `make_batch` and a plain forward: what the evaluation computes."""
    from avpea_ray.tasks.avqa import AVQATask

    made = AVQATask(None, predictor.vocab).make_batch(batch, predictor.device, training=False)
    with torch.no_grad():
        return predictor.model(made.frames, made.fbank, **made.head_inputs)["answer_logits"].softmax(-1)


QUESTIONS = ["Is the violin playing?", "How many instruments are sounding?", "Where is the banjo?"]


@pytest.fixture(scope="module")
def tiny_avqa(tmp_path_factory) -> Path:
    return save_tiny_adapters(tmp_path_factory.mktemp("tiny") / "best_adapters")


def test_predict_on_an_encoded_video_equals_the_model_on_its_shard_sample(tiny_avqa, tmp_path, one_torch_thread):
    video = write_video(tmp_path / "videos" / "concert.mp4")
    predictor = Predictor.load(str(tiny_avqa), device="cpu")
    result = predict(predictor, [Media(video=str(video))], questions=QUESTIONS, top_k=3)
    answers = result["results"][0]["answers"]

    batch = shard_video_and_read_back(video, tmp_path / "shards", predictor.clips,
                                      {"video_id": "concert", "questions": questions_meta(predictor, QUESTIONS)})
    probs = model_answers_on_batch(predictor, batch)
    assert [a["answer"] for a in answers] == [VOCAB["answers"][i] for i in probs.argmax(-1).tolist()]
    # Not just the same argmax: the very same numbers (same frames, same fbank windows).
    assert [a["probability"] for a in answers] == [float(p) for p in probs.max(-1).values]
    assert len(answers[0]["top_k"]) == 3
    assert answers[2]["unknown_words"] == ["banjo"] and answers[0]["unknown_words"] == []


def test_a_frames_folder_plus_audio_is_read_like_the_sharders_read_it(tiny_avqa, tmp_path, one_torch_thread):
    from tests.media import write_frames, write_wav

    write_frames(str(tmp_path / "frames" / "v1"), 6)
    write_wav(str(tmp_path / "v1.wav"), tone(6.0))
    predictor = Predictor.load(str(tiny_avqa), device="cpu")
    clip = predictor.clip(frames=str(tmp_path / "frames" / "v1"), audio=str(tmp_path / "v1.wav"))
    from avpea_ray.data.shards import decode_sample
    from sharding import run

    job = run.MediaJob("v1", {"video_id": "v1"}, T, SIZE, AUDIO, frames_dir=str(tmp_path / "frames"),
                       audio_dir=str(tmp_path))
    sharded = decode_sample(run.make_sample(job))
    assert torch.equal(clip["frames"], sharded["frames"]) and torch.equal(clip["fbank"], sharded["fbank"])


# -- bad input ---------------------------------------------------------------------------------

def test_a_video_without_sound_is_refused_naming_the_file_and_what_to_do(tiny_avqa, tmp_path):
    video = write_video(tmp_path / "silent.mp4", audio=False)
    with pytest.raises(MediaError, match=r"silent\.mp4: no audio stream .*missing_audio.*--frames DIR .*--audio FILE"):
        predict(str(tiny_avqa), [Media(video=str(video))], questions=QUESTIONS[:1], device="cpu")


def test_a_video_shorter_than_the_clips_is_refused(tiny_avqa, tmp_path):
    video = write_video(tmp_path / "short.mp4", seconds=2)
    with pytest.raises(MediaError, match=r"short\.mp4: 2\.\d+ s long, shorter than the 4 s .*give a longer clip"):
        predict(str(tiny_avqa), [Media(video=str(video))], questions=QUESTIONS[:1], device="cpu")


def test_an_unreadable_file_is_refused(tiny_avqa, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(MediaError, match=r"broken\.mp4: .*unreadable_video.*ffprobe"):
        predict(str(tiny_avqa), [Media(video=str(bad))], questions=QUESTIONS[:1], device="cpu")


def test_a_question_with_no_known_word_is_refused_before_any_video_is_read(tiny_avqa, tmp_path):
    with pytest.raises(ConfigError, match=r"'Qu est-ce\?': none of its words is in the vocabulary \(.*vocab\.json, 12 words"):
        predict(str(tiny_avqa), [Media(video=str(tmp_path / "never-read.mp4"))], questions=["Qu est-ce?"],
                device="cpu")


def test_mismatched_adapter_directories_are_refused(tiny_avqa, tmp_path):
    # Another task: AVE adapters asked a question.
    avel = save_tiny_adapters(tmp_path / "avel", task="avel")
    with pytest.raises(ConfigError, match=r"--question needs adapters trained for question answering .*holds "
                                          r"adapters for event localisation \(AVE\) \(avel\)"):
        predict(str(avel), [Media(video="x.mp4")], questions=QUESTIONS[:1], device="cpu")
    # Another backbone: weights of a wider ViT.
    import timm
    from safetensors.torch import save_file

    wide = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **(TINY | {"embed_dim": 96,
                                                                                              "num_heads": 3}))
    save_file(wide.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError, match=r"wide\.safetensors"):
        Predictor.load(str(tiny_avqa), weights=str(tmp_path / "wide.safetensors"), device="cpu")
    # Not an adapter directory at all.
    with pytest.raises(ConfigError, match=r"not an adapter directory .*best_adapters/"):
        Predictor.load(str(tmp_path), device="cpu")


def test_old_adapter_directories_without_a_vocabulary_point_at_vocab(tiny_avqa, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_avqa, old)
    (old / "vocab.json").unlink()
    with pytest.raises(ConfigError, match=r"no vocab\.json .*give --vocab PATH"):
        Predictor.load(str(old), device="cpu")
    assert Predictor.load(str(old), vocab=str(tiny_avqa / "vocab.json"), device="cpu").vocab == VOCAB


def test_the_cli_prints_a_table_or_json_and_exits_2_on_bad_input(tiny_avqa, tmp_path, capsys, one_torch_thread):
    from avpea_cli.main import main

    video = write_video(tmp_path / "concert.mp4")
    assert main(["predict", str(tiny_avqa), "--video", str(video), "--question", QUESTIONS[0],
                 "--question", QUESTIONS[2], "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "concert.mp4" in out.out and "Is the violin playing?" in out.out and "top answers" in out.out
    assert "'banjo' never appeared in the training questions" in out.err
    assert main(["predict", str(tiny_avqa), "--video", str(video), "--question", QUESTIONS[0], "--json",
                 "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "avqa" and doc["results"][0]["answers"][0]["answer"] in VOCAB["answers"]
    assert main(["predict", str(tiny_avqa), "--video", str(tmp_path / "nope.mp4"), "--question", "is it?"]) == 2
    assert capsys.readouterr().err.strip() == f"error: no video file {tmp_path / 'nope.mp4'} (missing_video): check the path"


def test_ave_adapters_label_every_second_and_give_the_segment(tmp_path, one_torch_thread):
    from avpea_ray.infer.predictor import localisation

    avel = save_tiny_adapters(tmp_path / "avel", task="avel")
    result = predict(str(avel), [Media(video=str(write_video(tmp_path / "clip.mp4")))], device="cpu")
    entry = result["results"][0]
    assert len(entry["labels"]) == T and set(entry["labels"]) <= {"guitar", "dog", "car", "bell", "background"}
    names = ["a", "b", "background"]
    assert localisation([2, 1, 1, 2, 1, 1, 1, 2], names) == {
        "labels": ["background", "b", "b", "background", "b", "b", "b", "background"], "event": "b", "segment": [4, 7]}
    assert localisation([2, 2], names)["segment"] is None


def _shard_videos(tmp_path: Path, names: list[str], predictor: Predictor, questions: list[str]) -> Path:
    """A test split of encoded videos sharded by the sharders' code, questions with answers."""
    from avpea_ray.data.shards import ShardWriter
    from sharding import run

    spec, out = predictor.clips, tmp_path / "shards"
    with ShardWriter(str(out), split="test", dataset=spec.dataset, num_frames=spec.num_frames,
                     image_size=spec.image_size, audio=spec.audio.__dict__) as writer:
        for name in names:
            video = write_video(tmp_path / "videos" / f"{name}.mp4")
            meta = {"video_id": name, "questions": [
                q | {"question_id": n, "answer_index": n % 2} for n, q in enumerate(questions_meta(predictor, questions))]}
            writer.write(run.make_sample(run.MediaJob(name, meta, spec.num_frames, spec.image_size, spec.audio,
                                                      videos_dir=str(video.parent))))
    return out


def test_the_actor_answers_every_question_of_a_shard_and_passes_damage_through(tiny_avqa, tmp_path, one_torch_thread):
    """The pipeline's two stages called directly (Ray runs them in tasks and actors): a row
    per question; a truncated shard becomes a failure row naming it, and strict raises."""
    from avpea_ray.data.shards import read_index
    from avpea_ray.infer.batch import PredictActor, ShardSamples, StrictError

    predictor = Predictor.load(str(tiny_avqa), device="cpu")
    index = read_index(str(_shard_videos(tmp_path, ["a", "b", "c"], predictor, QUESTIONS[:2])))
    (url,) = index.shard_urls()
    clips = list(ShardSamples(T, strict=False)({"url": url}))
    assert [c["id"] for c in clips] == ["a", "b", "c"] and not any(c["error"] for c in clips)
    actor = PredictActor(str(tiny_avqa), None, {"top_k": 2}, None)
    batch = {k: np.array([c[k] for c in clips], dtype=object) for k in clips[0]}
    out = actor(batch)
    assert out["id"] == [f"{v}/{n}" for v in "abc" for n in range(2)]
    assert out["target_index"] == [0, 1] * 3 and out["question"] == QUESTIONS[:2] * 3

    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(Path(url).read_bytes()[: Path(url).stat().st_size // 2])
    rows = list(ShardSamples(T, strict=False)({"url": str(damaged)}))
    assert rows[-1]["error"] == "damaged_shard" and "damaged.tar" in rows[-1]["detail"]
    out = actor({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    assert out["error"][-1] == "damaged_shard" and out["id"][-1] == str(damaged)
    with pytest.raises(StrictError, match=r"damaged\.tar: damaged_shard"):
        list(ShardSamples(T, strict=True)({"url": str(damaged)}))


def test_infer_refuses_bad_settings_before_ray_starts(tiny_avqa, tmp_path):
    from avpea_ray.infer.batch import InferConfig, infer

    with pytest.raises(ConfigError, match="give either --shards URL"):
        infer(str(tiny_avqa), str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="--batch-size must be at least 1"):
        InferConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"avqa on videos: give --question"):
        infer(str(tiny_avqa), str(tmp_path / "o"), videos=["x.mp4"])
    other = tmp_path / "other"
    from avpea_ray.data.shards import ShardWriter
    from avpea_ray.data.shards import encode_sample

    with ShardWriter(str(other), split="test", dataset="musicavqa", num_frames=2, image_size=SIZE,
                     audio=AUDIO.__dict__) as writer:
        writer.write(encode_sample("v", [np.zeros((SIZE, SIZE, 3), np.uint8)] * 2, np.zeros((2, 192, 128)),
                                   {"video_id": "v", "questions": []}))
    with pytest.raises(ConfigError, match=r"--shards .*other: clips made with .*num_frames=2.* the adapters were "
                                          r"trained on .*num_frames=4"):
        infer(str(tiny_avqa), str(tmp_path / "o"), shards_url=str(other))


# -- end to end: the session's trained DDP run (tests/conftest.py), a real local Ray Data pipeline --

def _read_rows(out: Path, fmt: str) -> list[dict]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(out)).to_pylist()
    return [json.loads(line) for f in sorted(out.glob("*.json*")) for line in f.read_text().splitlines() if line]


@pytest.mark.slow
def test_the_trained_adapters_in_batch_inference_and_predict(ddp_avqa_run, avqa_shards, tmp_path, one_torch_thread):
    """One training run serves both, and tests/test_train.py's checks of it."""
    _infer_over_the_damaged_test_split_reproduces_the_jobs_test_accuracy(ddp_avqa_run, tmp_path / "infer")
    _predict_with_the_trained_adapters_equals_the_model_on_the_shard_sample(ddp_avqa_run.summary, avqa_shards,
                                                                             tmp_path / "predict")


def _infer_over_the_damaged_test_split_reproduces_the_jobs_test_accuracy(run, tmp_path):
    """One row per test question through `map_batches` on the session's Ray cluster, over the
    split the job was tested on (a shard missing): the missing shard is one failed item, and the
    accuracy of the rows is the job's test accuracy (2 ranks, the same clips), to the last digit."""
    from avpea_ray.data.shards import read_index
    from avpea_ray.infer.batch import InferConfig, avqa_accuracy, infer

    trained = run.summary
    out = tmp_path / "preds"
    summary = infer(trained["best_adapters"], str(out), shards_url=run.damaged_test,
                    config=InferConfig(batch_size=5, concurrency=1, decode_cpus=0.5))
    rows = _read_rows(out, "parquet")
    index = read_index(run.damaged_test)
    assert len(rows) == index.extra["num_questions"] - run.lost_questions == summary["rows"]
    assert len({r["id"] for r in rows}) == len(rows)  # one row per question
    assert len({r["answer_index"] for r in rows}) > 1  # answers that differ: rows can be told apart
    accuracy = avqa_accuracy(rows)
    assert accuracy["avg"] == trained["avg_acc"] and accuracy["overall"] == trained["overall_acc"]
    for name, value in trained["accuracies"].items():
        assert accuracy[name] == value, name
    assert summary["accuracy"]["avg"] == trained["avg_acc"]
    report = json.loads(Path(summary["report"]).read_text())
    assert report["failed"] == 1 and report["items"][0]["reason"] == "damaged_shard", report["items"]
    assert run.lost_url in report["items"][0]["detail"] and report["rows_per_s"] > 0
    assert report["ray_data"] == {"batch_size": 5, "concurrency": 1, "num_gpus_per_actor": 0, "num_cpus_per_actor": 1.0}


def _predict_with_the_trained_adapters_equals_the_model_on_the_shard_sample(trained, avqa_shards, tmp_path):
    from avpea_ray.data.reader import ShardStream

    predictor = Predictor.load(trained["best_adapters"], device="cpu")
    video = write_video(tmp_path / "videos" / "duet.mp4", seconds=6)
    first = next(iter(ShardStream(avqa_shards["test"], batch_size=1, training=False, num_workers=0)))
    questions = [q["question"] for q in first["meta"][0]["questions"]]  # questions of the test split
    answers = predict(predictor, [Media(video=str(video))], questions=questions)["results"][0]["answers"]
    batch = shard_video_and_read_back(video, tmp_path / "shards", predictor.clips,
                                      {"video_id": "duet", "questions": questions_meta(predictor, questions)})
    probs = model_answers_on_batch(predictor, batch)
    assert [a["answer_index"] for a in answers] == probs.argmax(-1).tolist()
    assert [a["probability"] for a in answers] == [float(p) for p in probs.max(-1).values]


@pytest.mark.slow
def test_infer_on_videos_reports_bad_items_and_processes_the_rest(tiny_avqa, tmp_path, ray_local, s3):
    """Videos as an archive has them, some unusable; the output and the report go to object
    storage (the session's S3 server)."""
    from avpea_ray.data import storage
    from avpea_ray.infer.batch import InferConfig, StrictError, infer

    good = write_video(tmp_path / "v" / "good.mp4")
    silent = write_video(tmp_path / "v" / "silent.mp4", audio=False)
    short = write_video(tmp_path / "v" / "short.mp4", seconds=2)
    broken = tmp_path / "v" / "broken.mp4"
    broken.write_bytes(b"not a video" * 50)
    videos = [str(p) for p in (good, silent, short, broken)]
    out = s3.make_bucket("avpea-infer") + "/preds/videos"
    summary = infer(str(tiny_avqa), out, videos=videos, fmt="jsonl", questions=QUESTIONS[:2],
                    config=InferConfig(batch_size=2, decode_cpus=0.5))
    rows = [json.loads(line) for name in storage.list_names(out)
            for line in storage.read_bytes(storage.join(out, name)).decode().splitlines() if line]
    assert [(r["video_id"], r["question"]) for r in sorted(rows, key=lambda r: r["id"])] == [
        ("good", QUESTIONS[0]), ("good", QUESTIONS[1])]
    assert summary["report"] == out + ".report.json"
    report = json.loads(storage.read_bytes(summary["report"]))
    assert {i["id"]: i["reason"] for i in report["items"]} == {
        str(silent): "missing_audio", str(short): "too_short", str(broken): "unreadable_video"}
    assert all(i["id"].rsplit("/", 1)[-1] in i["detail"] for i in report["items"])
    with pytest.raises(StrictError, match=r"(silent|short|broken)\.mp4: (missing_audio|too_short|unreadable_video)"):
        infer(str(tiny_avqa), str(tmp_path / "strict"), videos=videos, fmt="jsonl", questions=QUESTIONS[:2],
              config=InferConfig(batch_size=2, decode_cpus=0.5, strict=True))


def test_captioning_and_retrieval_adapters_caption_and_rank_videos(tmp_path, one_torch_thread):
    videos = [Media(video=str(write_video(tmp_path / f"clip{i}.mp4", seconds=5 + i))) for i in range(2)]
    captions = predict(str(save_tiny_adapters(tmp_path / "avc", task="avc")), videos, beam_size=1, device="cpu")
    assert [r["input"] for r in captions["results"]] == [m.video for m in videos]
    assert all(isinstance(r["caption"], str) for r in captions["results"]) and captions["decoding"] == "greedy"

    avr = save_tiny_adapters(tmp_path / "avr", task="avr")
    texts = ["a dog barks", "the piano plays on the left", "water at night"]
    ranked = predict(str(avr), videos, texts=texts, device="cpu")
    predictor = Predictor.load(str(avr), device="cpu")
    similarity = predictor.embed_texts(texts) @ predictor.embed_videos(
        predictor.batch([predictor.clip(video=m.video) for m in videos])).t()
    for text, row, entry in zip(texts, similarity, ranked["texts"]):
        assert entry["text"] == text
        assert [r["input"] for r in entry["ranking"]] == [videos[j].video for j in row.argsort(descending=True).tolist()]
    assert [len(r["ranking"]) for r in ranked["results"]] == [3, 3]
    with pytest.raises(ConfigError, match=r"ranks videos for texts: give --texts FILE"):
        predict(predictor, videos, device="cpu")


def test_adapters_on_object_storage_are_fetched(tiny_avqa, s3, tmp_path, monkeypatch):
    """What actors on a cluster read: the adapter directory on s3:// (tokenizer folders too),
    fetched into a temporary folder that is gone once loaded (or refused)."""
    import tempfile

    from avpea_ray.data import storage

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = s3.make_bucket("avpea-adapters") + "/runs/demo/best_adapters"
    for path in sorted(p for p in tiny_avqa.rglob("*") if p.is_file()):
        storage.upload_file(str(path), storage.join(url, path.relative_to(tiny_avqa).as_posix()))
    predictor = Predictor.load(url, device="cpu")
    assert predictor.task == "avqa" and predictor.vocab == VOCAB and predictor.clips.num_frames == T
    assert predictor.directory == url and predictor.vocab_source == url + "/vocab.json"
    with pytest.raises(ConfigError, match=r"avpea-adapters/runs/nothing"):
        Predictor.load(s3.make_bucket("avpea-adapters") + "/runs/nothing", device="cpu")
    assert list(tmp_path.glob("avpea-adapters-*")) == []


@pytest.mark.parametrize("task,meta,check", [
    ("avel", {"labels": [0, 4, 4, 1]},
     lambda row, video: len(json.loads(row["labels"])) == T
     and json.loads(row["target_labels"]) == ["guitar", "background", "background", "dog"]),
    ("avc", {"captions": ["a dog barks"]},
     lambda row, video: isinstance(row["caption"], str) and row["caption"].strip()),
    ("avr", {"captions": ["a dog barks"]},
     lambda row, video: len(json.loads(row["embedding"])) == 16),
])
def test_the_actor_gives_one_row_per_clip_for_the_clip_tasks(task, meta, check, tmp_path, one_torch_thread):
    """AVE, captioning and retrieval adapters in the pipeline's actor: one row per clip of a
    shard, the task's columns filled, the clip's own labels beside AVE's predictions."""
    from avpea_ray.data.shards import ShardWriter
    from avpea_ray.infer.batch import PredictActor, ShardSamples
    from sharding import run

    adapters = save_tiny_adapters(tmp_path / task, task=task)
    spec, out = Predictor.load(str(adapters), device="cpu").clips, tmp_path / "shards"
    with ShardWriter(str(out), split="test", dataset=spec.dataset, num_frames=spec.num_frames,
                     image_size=spec.image_size, audio=spec.audio.__dict__) as writer:
        for name in ("a", "b"):
            video = write_video(tmp_path / "videos" / f"{name}.mp4")
            writer.write(run.make_sample(run.MediaJob(name, {"video_id": name} | meta, spec.num_frames,
                                                      spec.image_size, spec.audio, videos_dir=str(video.parent))))
    from avpea_ray.data.shards import read_index

    (url,) = read_index(str(out)).shard_urls()
    clips = list(ShardSamples(T, strict=False)({"url": url}))
    rows = PredictActor(str(adapters), None, {"beam_size": 1}, None)(
        {k: np.array([c[k] for c in clips], dtype=object) for k in clips[0]})
    assert rows["id"] == ["a", "b"] and rows["error"] == ["", ""]
    for i in range(2):
        row = {k: v[i] for k, v in rows.items()}
        assert check(row, i), row
