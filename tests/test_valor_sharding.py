"""VALOR-32K: the synthetic release (sharding.synth_valor) through sharding.valor, read back
with the training reader, validated; both captions-file forms, audio formats, bad inputs, and
the vocab.txt that a BERT tokenizer loads without a download.

Real parts throughout: JPEG/WAV/FLAC/MP3/M4A files on disk, tar shards on local disk and on a
moto S3 server (tests/conftest.py), ShardStream reading them back.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import media
from avpea_ray.data import shards, storage
from avpea_ray.data.reader import ShardStream
from avpea_ray.data.audio import waveform_to_windows
from sharding import common, synth, synth_valor, valor, validate

SIZES = {"train": 5, "val": 3, "test": 3}
SECONDS = 4            # clip length of the synthetic release (4 frames at 1 fps)
FRAMES, SIDE = 4, 32   # --num-frames, --image-size of the shards
CAPTION_CHARS = re.compile(r"^[a-z]+([ ,;:.()]+[a-z]+)*[.)]?$")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> str:
    """The synthetic VALOR release, written through the CLI entry point."""
    out = str(tmp_path_factory.mktemp("valor") / "release")
    synth_valor.main(["--out", out, "--train", str(SIZES["train"]), "--val", str(SIZES["val"]),
                      "--test", str(SIZES["test"]), "--seconds", str(SECONDS),
                      "--frame-size", "48x32", "--seed", "5", "--workers", "1"])
    return out


def load(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def facts_of(release: str) -> dict:
    return load(os.path.join(release, "synth_facts.json"))


def valor_args(release: str, split: str, out: str, *extra: str, ids: str | None = None,
               captions: str | None = None, frames: str | None = None,
               audio: str | None = None) -> list[str]:
    """CLI arguments for sharding.valor on (a modified copy of) the release."""
    return ["--ids", ids or os.path.join(release, f"ids_{split}.json"),
            "--captions", captions or os.path.join(release, "captions.json"),
            "--frames", frames or os.path.join(release, "frames"),
            "--audio", audio or os.path.join(release, "audio"),
            "--out", out, "--split", split, "--num-frames", str(FRAMES),
            "--image-size", str(SIDE), "--no-progress", *extra]


def run(argv: list[str]) -> int:
    """sharding.valor in-process, through the same wrapper `python -m` uses."""
    return common.run_main(valor.main, argv)


def read_all(url: str) -> list[dict]:
    """Every sample of a split through the training reader (evaluation order), unbatched."""
    stream = ShardStream(url, batch_size=2, training=False, num_workers=0)
    samples = []
    for batch in stream:
        assert batch["frames"].dtype == torch.uint8
        assert batch["frames"].shape[1:] == (FRAMES, 3, SIDE, SIDE)
        assert batch["fbank"].shape[1:] == (FRAMES, 1, valor.AUDIO.target_frames,
                                            valor.AUDIO.num_mel_bins)
        for i, meta in enumerate(batch["meta"]):
            samples.append({"meta": meta, "frames": batch["frames"][i],
                            "fbank": batch["fbank"][i], "key": batch["key"][i]})
    return samples


def bert_tokenizer(vocab_txt: str):
    """A BERT WordPiece tokenizer over vocab.txt (transformers is optional for the project).

    Positional: it is `vocab_file` in transformers 4 and `vocab` in 5; the keyword
    `vocab_file=` is ignored by transformers 5's constructor (every word becomes [UNK]).
    """
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast(vocab_txt)


# -- the synthetic release -------------------------------------------------------------------

def test_release_layout_and_captions(release):
    captions = load(os.path.join(release, "captions.json"))
    facts = facts_of(release)
    ids = {split: load(os.path.join(release, f"ids_{split}.json")) for split in SIZES}
    assert {s: len(v) for s, v in ids.items()} == SIZES
    all_ids = [v for split in SIZES for v in ids[split]]
    assert len(set(all_ids)) == len(all_ids) and set(all_ids) == set(captions) == set(facts)
    for split, video_ids in ids.items():
        for vid in video_ids:
            assert facts[vid]["split"] == split
            caps = captions[vid]
            assert 2 <= len(caps) <= 4 and len(set(caps)) == len(caps), caps
            visible = set(facts[vid]["layout"].values())
            heard = {s["instrument"] for s in facts[vid]["sounds"]}
            for caption in caps:
                assert CAPTION_CHARS.match(caption), caption
                words = set(re.findall(r"[a-z]+", caption))
                assert visible | heard <= words, (caption, visible, heard)
                assert not (set(synth.BY_NAME) - visible - heard) & words, caption
            names = sorted(os.listdir(os.path.join(release, "frames", vid)))
            assert names == [f"{t:06d}.jpg" for t in range(1, SECONDS + 1)]
            wave, rate = sf.read(os.path.join(release, "audio", f"{vid}.wav"))
            assert rate == 16_000 and wave.ndim == 1 and len(wave) == SECONDS * 16_000


def test_same_seed_same_bytes_other_seed_other_captions(release, tmp_path):
    again = str(tmp_path / "again")
    synth_valor.write_dataset(again, SIZES, seed=5, seconds=SECONDS, frame_size=(48, 32),
                              workers=2)  # a process pool this time
    assert media.tree_digest(again) == media.tree_digest(release)
    assert synth_valor.generate(SIZES, seed=6)[1] != synth_valor.generate(SIZES, seed=5)[1]


def test_default_captions_are_varied_and_identify_their_video():
    scenes, captions = synth_valor.generate({"train": 200, "val": 40, "test": 40}, seed=0)
    counts = collections.Counter(len(c) for by_video in captions.values()
                                 for c in by_video.values())
    assert set(counts) == {2, 3, 4}
    # Phrasings: captions with instrument, colour and number words blanked out.
    blanks = set(synth.BY_NAME) | set(synth_valor.COLOURS.values()) | set(
        synth_valor.NUMBER_WORDS)
    shapes = {" ".join("_" if w in blanks else w for w in re.findall(r"[a-z]+|[^a-z ]", c))
              for by_video in captions.values() for caps in by_video.values() for c in caps}
    assert len(shapes) >= 30, len(shapes)
    for split in ("val", "test"):
        # Every caption names what is seen and what is heard; among the split's videos,
        # nearly all are the only one with their (seen, heard) instruments.
        signature = collections.Counter(
            (frozenset(s.layout.values()), frozenset(s.sounding)) for s in scenes[split])
        unique = sum(signature[(frozenset(s.layout.values()), frozenset(s.sounding))] == 1
                     for s in scenes[split])
        assert unique / len(scenes[split]) >= 0.9, (split, unique)


# -- BERT basic tokenization -----------------------------------------------------------------

TOKENIZE_CASES = [
    ("A red guitar on the left; only the guitar can be heard.",
     ["a", "red", "guitar", "on", "the", "left", ";", "only", "the", "guitar", "can", "be",
      "heard", "."]),
    ("  Don't   stop\tthe  MUSIC!! ", ["don", "'", "t", "stop", "the", "music", "!", "!"]),
    ("Café naïve — 3.5 kHz (a/b)", ["cafe", "naive", "—", "3", ".", "5", "khz", "(", "a", "/",
                                    "b", ")"]),
    ("a 钢琴 plays\u200b$5^", ["a", "钢", "琴", "plays", "$", "5", "^"]),
]


@pytest.mark.parametrize("text,tokens", TOKENIZE_CASES)
def test_basic_tokenize(text, tokens):
    assert valor.basic_tokenize(text) == tokens


@pytest.mark.parametrize("text", [t for t, _ in TOKENIZE_CASES] + ["Ünïcode ÀÉÎ ǅ ﬁ x\x00y"])
def test_basic_tokenize_is_berts(text):
    """The same words as BertTokenizer's normalizer and pre-tokenizer (tokenizers library)."""
    tokenizers = pytest.importorskip("tokenizers")
    normalizer = tokenizers.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    words = tokenizers.pre_tokenizers.BertPreTokenizer().pre_tokenize_str(
        normalizer.normalize_str(text))
    assert valor.basic_tokenize(text) == [w for w, _ in words]


def test_build_vocab_orders_by_count_then_alphabet():
    assert valor.build_vocab(["b a, c", "a b", "a [MASK]"]) == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", ",", "[", "]", "c", "mask"]


# -- sharding --------------------------------------------------------------------------------

def as_records(captions: dict, pad: bool) -> list[dict]:
    """VALOR's own annotation form: one {"video_id", "desc"} record per caption (file order
    interleaved across videos); `pad` adds whitespace and an empty desc to each video."""
    records = []
    longest = max(map(len, captions.values()))
    for i in range(longest):
        for vid, caps in captions.items():
            if i < len(caps):
                records.append({"video_id": vid, "desc": f"  {caps[i]}\n" if pad else caps[i]})
    if pad:
        records += [{"video_id": vid, "desc": " "} for vid in captions]
    return records


@pytest.mark.parametrize("split,form,extra", [
    ("train", "mapping", ["--max-shard-bytes", "1"]),  # one video per shard
    ("val", "records", ["--workers", "2"]),
])
def test_release_to_shards_and_back(release, tmp_path, capsys, split, form, extra):
    captions = load(os.path.join(release, "captions.json"))
    captions_file = None
    if form == "records":
        captions_file = str(tmp_path / "desc_val.json")
        with open(captions_file, "w") as f:
            json.dump(as_records(captions, pad=True), f)  # other splits' videos too
    out = str(tmp_path / split)

    assert run(valor_args(release, split, out, *extra, captions=captions_file)) == 0

    ids = load(os.path.join(release, f"ids_{split}.json"))
    expected = {vid: captions[vid] for vid in ids}
    index = shards.read_index(out)
    assert (index.dataset, index.split, index.total_samples) == ("valor", split, len(ids))
    assert len(index.shards) == (len(ids) if "--max-shard-bytes" in extra else 1)
    assert index.audio["window_seconds"] == 1.0 and index.audio["target_frames"] == 102
    num_captions = sum(map(len, expected.values()))
    assert index.extra["vocab"] == "vocab.txt" and index.extra["num_captions"] == num_captions
    report = load(os.path.join(out, "report.json"))
    assert report["skipped"] == [] and report["captions"] == num_captions
    if form == "records":
        assert report["counts"] == {"empty_captions_dropped": len(ids)}
    assert f"captions {num_captions}" in capsys.readouterr().out

    samples = read_all(out)
    assert [s["meta"]["video_id"] for s in samples] == ids  # evaluation order = index order
    facts = facts_of(release)
    for sample in samples:
        vid = sample["meta"]["video_id"]
        assert sample["meta"] == {"video_id": vid, "captions": expected[vid]}
        assert sample["key"] == shards.sample_key(vid)
        scene = synth.Scene(vid, facts[vid]["layout"])
        for col, pos in enumerate(synth.POSITIONS):  # each third shows its instrument
            colour = (synth.BY_NAME[scene.layout[pos]].rgb if pos in scene.layout
                      else (96, 96, 96))
            centre = sample["frames"][:, :, SIDE // 2, int(SIDE / 3 * (col + 0.5))].float()
            assert (centre - torch.tensor(colour)).abs().max() < 24, (vid, pos)
        wave, _ = sf.read(os.path.join(release, "audio", f"{vid}.wav"), dtype="float32")
        assert torch.allclose(sample["fbank"], waveform_to_windows(wave, FRAMES, valor.AUDIO),
                              atol=5e-3)
    assert validate.validate(out) == []

    # vocab.txt: specials, then the split's words by count then alphabet; BERT loads it.
    vocab_txt = os.path.join(out, "vocab.txt")
    with open(vocab_txt, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = collections.Counter(w for caps in expected.values() for c in caps
                                for w in valor.basic_tokenize(c))
    assert lines[5:-1] == sorted(words, key=lambda w: (-words[w], w))
    assert index.extra["vocab_size"] == len(lines) - 1
    tokenizer = bert_tokenizer(vocab_txt)
    assert len(tokenizer) == len(lines) - 1
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id, tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
    for caps in expected.values():
        for caption in caps:
            ids_ = tokenizer(caption)["input_ids"]
            assert tokenizer.unk_token_id not in ids_, caption
            assert tokenizer.convert_ids_to_tokens(ids_) == [
                "[CLS]", *valor.basic_tokenize(caption), "[SEP]"]


def test_release_to_s3(s3, release):
    out = s3.make_bucket("valor-shards") + "/valor/test"
    assert run(valor_args(release, "test", out)) == 0
    assert validate.validate(out) == []
    ids = load(os.path.join(release, "ids_test.json"))
    assert sorted(s["meta"]["video_id"] for s in read_all(out)) == sorted(ids)
    captions = load(os.path.join(release, "captions.json"))
    vocab = storage.read_bytes(out + "/vocab.txt").decode("utf-8").split("\n")[:-1]
    assert vocab == valor.build_vocab(c for vid in ids for c in captions[vid])
    assert sorted(storage.list_names(out)) == sorted(
        [s.url for s in shards.read_index(out).shards] + ["report.json", "shards.json",
                                                          "vocab.txt"])


# -- audio formats ---------------------------------------------------------------------------

def write_m4a(path: str, wave: np.ndarray, rate: int = media.RATE) -> None:
    """AAC in an MP4 container (.m4a), mono."""
    import av

    with av.open(path, "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, len(wave), 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[None, start:start + 1024]), format="fltp",
                layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


AUDIO_WRITERS = {
    "wav": lambda path, wave: media.write_wav(path, wave),
    "flac": lambda path, wave: sf.write(path, wave, media.RATE, format="FLAC"),
    "mp3": lambda path, wave: sf.write(path, wave, media.RATE, format="MP3"),
    "m4a": write_m4a,
}


def small_layout(root: str, video_ids: list[str], captions: dict | list | None = None,
                 audio_format: str = "wav") -> tuple[str, str, str, str]:
    """ids.json, captions.json, frames/, audio/ for `video_ids` with media.py's files: 6
    solid-colour frames and a 4 s clip, silent for 2 s then a 440 Hz tone."""
    ids_path, captions_path = os.path.join(root, "ids.json"), os.path.join(root, "caps.json")
    frames, audio = os.path.join(root, "frames"), os.path.join(root, "audio")
    os.makedirs(audio, exist_ok=True)
    with open(ids_path, "w") as f:
        json.dump(video_ids, f)
    if captions is None:
        captions = {vid: [f"a clip called {vid}", "a tone after two seconds"]
                    for vid in video_ids}
    with open(captions_path, "w") as f:
        json.dump(captions, f)
    for vid in video_ids:
        media.write_frames(os.path.join(frames, vid), 6)
        AUDIO_WRITERS[audio_format](os.path.join(audio, f"{vid}.{audio_format}"),
                                    media.tone(4.0, 440.0, silent_until=2.0))
    return ids_path, captions_path, frames, audio


def small_args(layout: tuple[str, str, str, str], out: str, *extra: str) -> list[str]:
    ids, captions, frames, audio = layout
    return valor_args("", "train", out, *extra, ids=ids, captions=captions, frames=frames,
                      audio=audio)


@pytest.mark.parametrize("audio_format,atol", [("flac", 0.1), ("mp3", 0.1), ("m4a", 0.2)])
def test_audio_formats(tmp_path, audio_format, atol):
    layout = small_layout(str(tmp_path), ["clip-1"], audio_format=audio_format)
    out = str(tmp_path / "out")
    assert run(small_args(layout, out)) == 0
    (sample,) = read_all(out)
    reference = waveform_to_windows(media.tone(4.0, 440.0, silent_until=2.0), FRAMES,
                                    valor.AUDIO)
    # Lossy codecs change details, not where the sound is: per-window loudness agrees.
    got, want = sample["fbank"].mean(dim=(1, 2, 3)), reference.mean(dim=(1, 2, 3))
    assert (got - want).abs().max() < atol, (got, want)
    assert want[2:].min() > want[:2].max() + 0.2  # the tone starts at 2 s


# -- bad input -------------------------------------------------------------------------------

def _write(path: str, content: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)


USAGE_ERRORS = [
    # (name, how to break the layout: ids, captions, frames, audio -> argv changes, needles)
    ("missing --ids file", lambda l: {"ids": l[0] + ".absent"}, ["--ids", "ids.json.absent",
                                                                 "not found", "JSON list"]),
    ("ids not JSON", lambda l: _write(l[0], "[\"a\","), ["--ids", "ids.json",
                                                         "not valid JSON"]),
    ("ids not a list", lambda l: _write(l[0], '{"a": ["x"]}'), ["--ids", "JSON list",
                                                                 "got a JSON dict"]),
    ("id not a string", lambda l: _write(l[0], '["a", 7]'), ["--ids", "ids.json[1]",
                                                              "non-empty string"]),
    ("captions not JSON", lambda l: _write(l[1], "{"), ["--captions", "caps.json",
                                                        "not valid JSON"]),
    ("captions neither form", lambda l: _write(l[1], '"a caption"'),
     ["--captions", "caps.json", "got a JSON str", '"desc"']),
    ("record not an object", lambda l: _write(l[1], '[{"video_id": "a", "desc": "x"}, "b"]'),
     ["--captions", "caps.json[1]", "got a JSON str"]),
    ("record without desc", lambda l: _write(l[1], '[{"video_id": "a"}]'),
     ["--captions", "caps.json[0]", "missing field 'desc'"]),
    ("record id not a string", lambda l: _write(l[1], '[{"video_id": 3, "desc": "x"}]'),
     ["--captions", "caps.json[0]", "'video_id'", "non-empty string"]),
    ("missing --frames dir", lambda l: {"frames": l[2] + ".absent"},
     ["--frames", "frames.absent", "not a directory"]),
    ("missing --audio dir", lambda l: {"audio": l[3] + ".absent"},
     ["--audio", "audio.absent", "not a directory"]),
]


@pytest.mark.parametrize("name,breaks,needles", USAGE_ERRORS, ids=[c[0] for c in USAGE_ERRORS])
def test_usage_errors_exit_2(tmp_path, capsys, name, breaks, needles):
    layout = small_layout(str(tmp_path), ["a"])
    changes = breaks(layout) or {}
    ids, captions, frames, audio = (changes.get(k, v) for k, v in
                                    zip(("ids", "captions", "frames", "audio"), layout))
    out = tmp_path / "out"
    assert run(small_args((ids, captions, frames, audio), str(out))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


def _broken_layout(root: str) -> tuple[tuple, dict]:
    """Two good videos and one of every per-video problem; returns (layout, id -> reason)."""
    problems = {"nocaps": "no_captions", "emptycaps": "no_captions", "intcaps": "no_captions",
                "noframes": "missing_frames", "noaudio": "missing_audio",
                "badaudio": "unreadable_audio", "badjpeg": "unreadable_frame"}
    video_ids = ["good1", *problems, "good2", "good1"]  # good1 listed twice
    captions = {vid: [f"  video {vid} ", ""] for vid in video_ids if vid != "nocaps"}
    captions.update(emptycaps=[" ", ""], intcaps=["fine", 3])
    layout = small_layout(root, video_ids[:-1], captions)
    with open(layout[0], "w") as f:
        json.dump(video_ids, f)
    shutil.rmtree(os.path.join(layout[2], "noframes"))
    os.remove(os.path.join(layout[3], "noaudio.wav"))
    _write(os.path.join(layout[3], "badaudio.wav"), "RIFF but not really a wav")
    _write(os.path.join(layout[2], "badjpeg", "0001.jpg"), "\xff\xd8 not a JPEG")
    return layout, {**problems, "good1": "duplicate_key"}


def test_per_video_problems_are_skipped_and_reported(tmp_path, capsys):
    layout, problems = _broken_layout(str(tmp_path / "data"))
    out = tmp_path / "out"
    assert run(small_args(layout, str(out))) == 0
    report = load(str(out / "report.json"))
    assert sorted((s["id"], s["reason"]) for s in report["skipped"]) == sorted(problems.items())
    details = {s["id"]: s["detail"] for s in report["skipped"]}
    assert "caps.json" in details["nocaps"] and "caption 1" in details["intcaps"]
    assert report["skipped_by_reason"]["no_captions"] == 3
    assert report["samples"] == 2 and report["captions"] == 2
    # Counted for every video whose captions were usable (here all with media problems too).
    assert report["counts"] == {"empty_captions_dropped": 6}
    printed = capsys.readouterr().out
    for vid, reason in problems.items():
        assert f"{vid}: {reason}" in printed
    samples = read_all(str(out))
    assert [s["meta"] for s in samples] == [{"video_id": "good1", "captions": ["video good1"]},
                                            {"video_id": "good2", "captions": ["video good2"]}]
    assert shards.read_index(str(out)).extra["num_captions"] == 2
    with open(out / "vocab.txt") as f:
        assert f.read().split("\n")[5:-1] == ["video", "good1", "good2"]


@pytest.mark.parametrize("problem", ["nocaps", "intcaps", "noframes", "badaudio"])
def test_strict_fails_naming_id_and_reason(tmp_path, capsys, problem):
    layout, problems = _broken_layout(str(tmp_path / "data"))
    with open(layout[0], "w") as f:
        json.dump(["good1", problem, "good2"], f)
    out = tmp_path / "out"
    assert run(small_args(layout, str(out), "--strict")) == 1
    err = capsys.readouterr().err
    assert f"--strict: {problem}: {problems[problem]}" in err and "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


# -- validate --------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,meta,needle", [
    ("valor", {"video_id": "v", "captions": ["a caption"]}, None),
    ("valor", {"video_id": "v"}, "'captions'"),
    ("valor", {"video_id": "v", "captions": []}, "'captions'"),
    ("valor", {"video_id": "v", "captions": ["ok", 3]}, "'captions'"),
    ("valor", {"video_id": "v", "captions": "a caption"}, "'captions'"),
    ("valor", {"captions": ["a caption"]}, "'video_id'"),
    ("ave", {"video_id": "v"}, None),  # the check is VALOR's only
])
def test_validate_checks_valor_meta(tmp_path, dataset, meta, needle):
    out = str(tmp_path / "split")
    frames = [np.zeros((8, 8, 3), np.uint8)] * 2
    with shards.ShardWriter(out, split="train", dataset=dataset, num_frames=2, image_size=8,
                            audio={"target_frames": 4, "num_mel_bins": 3}) as writer:
        writer.write(shards.encode_sample("v", frames, np.zeros((2, 4, 3)), meta))
    problems = validate.validate(out)
    if needle is None:
        assert problems == []
    else:
        assert len(problems) == 1 and needle in problems[0] and "sample v" in problems[0]
