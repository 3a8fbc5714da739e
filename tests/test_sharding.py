"""Sharding MUSIC-AVQA and AVE into avpea-shards/1 and validating the result.

Real parts throughout: JPEG/WAV/MP4 files written by tests/media.py, tar shards on local disk
and on a moto S3 server (tests/conftest.py), webdataset reading them back.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import webdataset as wds

import media
from avpea_ray.data import shards, storage
from avpea_ray.data.audio import AudioConfig, waveform_to_windows
from sharding import ave, common, musicavqa, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# linspace(0, 11, 10) rounded: which of 12 source frames a T=10 sample holds.
PICKED_OF_12 = [0, 1, 2, 4, 5, 6, 7, 9, 10, 11]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(module, argv) -> int:
    """A sharding CLI in-process, through the same wrapper `python -m` uses."""
    return common.run_main(module.main, argv)


def frame_colors(frames: torch.Tensor) -> np.ndarray:
    """Mean RGB of each (3, H, W) frame -> (T, 3)."""
    return frames.float().mean(dim=(2, 3)).numpy()


def read_back(url: str) -> list[dict]:
    """Every sample of a split, in index order, read through webdataset and decoded."""
    storage.register_webdataset_schemes()
    index = shards.read_index(url)
    dataset = wds.WebDataset(index.shard_urls(), shardshuffle=False, empty_check=False)
    return [shards.decode_sample(s) for s in dataset]


# -- small pure pieces, table-driven -----------------------------------------------------

@pytest.mark.parametrize("base,name,expected", [
    ("/data/out", "a.tar", "/data/out/a.tar"),
    ("s3://bucket/prefix/", "a.tar", "s3://bucket/prefix/a.tar"),
    ("s3://bucket/prefix", "s3://other/x.tar", "s3://other/x.tar"),
    ("memory://root", "/abs/x.tar", "/abs/x.tar"),
])
def test_join(base, name, expected):
    assert storage.join(base, name) == expected


@pytest.mark.parametrize("video_id,key", [
    ("00000093", "00000093"), ("-0A9suni5YA", "-0A9suni5YA"), ("a.b c/d", "a_b_c_d"),
])
def test_sample_key_has_no_dots(video_id, key):
    assert shards.sample_key(video_id) == key


@pytest.mark.parametrize("content,templ,question,tokens", [
    ("How many instruments are sounding?", [], "How many instruments are sounding?",
     ["how", "many", "instruments", "are", "sounding"]),
    ("Is the <Object> on the <LR> louder\uff1f", ["cello", "left"],
     "Is the cello on the left louder\uff1f",
     ["is", "the", "cello", "on", "the", "left", "louder"]),
    ("Where is the <FL> sounding <Object>?", ["first", "acoustic guitar"],
     "Where is the first sounding acoustic guitar?",
     ["where", "is", "the", "first", "sounding", "acoustic", "guitar"]),
])
def test_fill_question_and_tokenize(content, templ, question, tokens):
    filled = musicavqa.fill_question(content, templ)
    assert filled == question
    assert musicavqa.tokenize(filled) == tokens


@pytest.mark.parametrize("record,message", [
    (media.avqa_record("v", 1, content="Is the <Object> louder?"), "placeholder"),
    ({**media.avqa_record("v", 1), "type": "Audio Counting"}, "'type'"),
    ({k: v for k, v in media.avqa_record("v", 1).items() if k != "anser"}, "anser"),
])
def test_malformed_avqa_record(record, message):
    with pytest.raises(musicavqa.MalformedRecord, match=message):
        musicavqa.parse_record(record)


@pytest.mark.parametrize("index,start,end,labels", [
    (3, 2, 5, [28, 28, 3, 3, 3, 28, 28, 28, 28, 28]),
    (0, 0, 10, [0] * 10),
    (7, 9, 10, [28] * 9 + [7]),
    (1, 4, 4, [28] * 10),
])
def test_ave_second_labels(index, start, end, labels):
    assert ave.second_labels(index, start, end) == labels


@pytest.mark.parametrize("exc,transient", [
    (ConnectionResetError(), True), (TimeoutError(), True), (OSError(16, "SlowDown"), True),
    (FileNotFoundError(), False), (ConnectionRefusedError(), False), (ValueError(), False),
])
def test_transient_errors(exc, transient):
    assert storage.is_transient(exc) is transient


# -- storage: retries are s3fs's --------------------------------------------------------

def test_s3_requests_are_retried_by_s3fs_with_our_classification(s3):
    import s3fs.core
    from botocore.exceptions import ClientError

    fs, _ = storage.filesystem(s3.make_bucket("retry-config") + "/x")
    assert fs.retries == storage.S3_RETRIES
    assert s3fs.core.CUSTOM_ERROR_HANDLER is storage._s3fs_should_retry

    def error(code, status):
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    before = storage.retries_so_far()
    assert storage._s3fs_should_retry(error("InternalError", 500))
    assert not storage._s3fs_should_retry(error("AccessDenied", 403))
    assert not storage._s3fs_should_retry(error("NoSuchKey", 404))
    assert storage.retries_so_far() == before + 1


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_s3_endpoint_comes_from_the_environment(s3, monkeypatch, variable):
    import s3fs

    bucket = s3.make_bucket("endpoint-check")
    storage.atomic_write_bytes(bucket + "/probe.txt", b"ok")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name)
    monkeypatch.setenv(variable, s3.endpoint)
    # s3fs/botocore on their own (no endpoint argument) and through our storage layer.
    assert s3fs.S3FileSystem(skip_instance_cache=True).cat_file("endpoint-check/probe.txt") == b"ok"
    assert storage.read_bytes(bucket + "/probe.txt") == b"ok"


# -- the shard writer and index ----------------------------------------------------------

def _sample(key: str, rng: np.random.Generator, frames: int = 2, side: int = 16) -> dict:
    imgs = [rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(frames)]
    return shards.encode_sample(key, imgs, rng.standard_normal((frames, 8, 4)), {"id": key})


def test_writer_bounds_shards_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    samples = [_sample(f"s{i}", rng) for i in range(12)]
    big = _sample("big", rng, side=160)  # larger than the bound on its own
    limit = 30_000
    with shards.ShardWriter(str(tmp_path), split="train", dataset="toy", num_frames=2,
                            image_size=16, audio={}, max_shard_bytes=limit) as writer:
        for s in samples[:6] + [big] + samples[6:]:
            writer.write(s)
    index = shards.read_index(str(tmp_path))
    assert index.total_samples == 13 and len(index.shards) > 2
    for info, url in zip(index.shards, index.shard_urls()):
        assert os.path.getsize(url) == info.bytes
        assert info.bytes <= limit or info.samples == 1
    decoded = read_back(str(tmp_path))
    assert [d["key"] for d in decoded] == [f"s{i}" for i in range(6)] + ["big"] + \
        [f"s{i}" for i in range(6, 12)]
    assert decoded[0]["frames"].shape == (2, 3, 16, 16)
    assert decoded[0]["frames"].dtype == torch.uint8
    assert decoded[0]["fbank"].shape == (2, 1, 8, 4) and decoded[0]["fbank"].dtype == torch.float32
    assert decoded[0]["meta"] == {"id": "s0"}


def _raw_sample(key: str, sizes: list[int], rng: np.random.Generator) -> dict:
    """A sample with members of the given byte sizes (frames..., fbank, json); the writer
    does not decode members, so their content can be any bytes."""
    *frames, fbank, meta = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    sample = {"__key__": key, shards.FBANK_MEMBER: fbank, shards.META_MEMBER: meta}
    sample.update({f"frame{t:02d}.jpg": data for t, data in enumerate(frames)})
    return sample


def _sample_spans(path) -> list[tuple[str, int, int]]:
    """(key, start, end) of every sample in a tar, in order: from its first header (extended
    headers included) to the end of its last member's block-padded content."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            spans.setdefault(m.name.split(".", 1)[0], [m.offset, end])[1] = end
    return [(key, start, end) for key, (start, end) in spans.items()]


def test_same_input_gives_byte_identical_shards(tmp_path):
    """Two runs (two run ids, written seconds apart) give the same bytes for the same input:
    fixed mtime, uid/gid, uname/gname and mode, members in the order the writer got them."""
    rng = np.random.default_rng(3)
    samples = [_sample(f"s{i}", rng) for i in range(7)] + [_sample("k" * 120, rng)]
    runs = []
    for run in ("a", "b"):
        with shards.ShardWriter(str(tmp_path / run), split="train", dataset="toy", num_frames=2,
                                image_size=16, audio={}, max_shard_bytes=20_000) as writer:
            for s in samples:
                writer.write(s)
        runs.append(shards.read_index(str(tmp_path / run)))
        time.sleep(1.1)  # a clock-derived mtime would differ between the runs
    first, second = runs
    assert first.run != second.run and len(first.shards) > 2
    assert [(s.samples, s.bytes, s.sha256, s.keys_sha256) for s in first.shards] == \
        [(s.samples, s.bytes, s.sha256, s.keys_sha256) for s in second.shards]
    for a, b in zip(first.shard_urls(), second.shard_urls()):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()
    with tarfile.open(first.shard_urls()[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:4] == [f"s0.{n}" for n in ("frame00.jpg", "frame01.jpg",
                                                                 "fbank.npy", "json")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == \
        {(0, 0, 0, "", "", 0o644)}


@pytest.mark.parametrize("limit", [1, 10_240, 20_480, 30_000, 30_720, 51_200, 100_000])
def test_no_shard_exceeds_max_bytes(tmp_path, limit):
    """Members of many sizes (block boundaries among them) and long keys (extended headers of
    one and of several blocks): every shard of more than one sample stays within the limit,
    and a shard is closed only when the next sample would not have fit."""
    rng = np.random.default_rng(limit)
    edge = [0, 1, 511, 512, 513, 1023, 1024, 1025, 9_216, 10_240]
    samples = []
    for i in range(60):
        if i % 3 == 0:
            sizes = [int(rng.choice(edge)) for _ in range(4)]
        else:
            sizes = [int(n) for n in rng.integers(0, 6_000 if i % 3 == 1 else 24_000, 4)]
        key = f"s{i:02d}" + ("k" * (97 if i % 7 == 0 else 700 if i % 11 == 0 else 0))
        samples.append(_raw_sample(key, sizes, rng))
    with shards.ShardWriter(str(tmp_path), split="train", dataset="toy", num_frames=2,
                            image_size=16, audio={}, max_shard_bytes=limit) as writer:
        for s in samples:
            writer.write(s)
    index = shards.read_index(str(tmp_path))
    assert index.total_samples == len(samples)
    record, end_of_archive = tarfile.RECORDSIZE, 2 * tarfile.BLOCKSIZE

    def closed(offset: int) -> int:
        return -(-(offset + end_of_archive) // record) * record

    spans = [_sample_spans(url) for url in index.shard_urls()]
    assert [key for shard in spans for key, _, _ in shard] == [s["__key__"] for s in samples]
    for i, (info, url) in enumerate(zip(index.shards, index.shard_urls())):
        size = os.path.getsize(url)
        assert size == info.bytes == closed(spans[i][-1][2]), info.url
        assert size <= limit or info.samples == 1, (info.url, size, limit)
        if i + 1 < len(spans):
            _, start, end = spans[i + 1][0]
            assert start == 0
            assert closed(spans[i][-1][2] + end) > limit, f"{info.url} had room for one more"


def _tar_size(sample: dict) -> int:
    """The bytes a sample's members take in a tar, measured here with tarfile itself."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, value in sample.items():
            if not name.startswith("__"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
        return tar.offset


@pytest.mark.parametrize("key_len", [3, 120, 700])
@pytest.mark.parametrize("over", [-1024, -512, 0, 512, 1024])
def test_a_shard_is_filled_exactly_up_to_the_limit(tmp_path, key_len, over):
    """Two samples that, with the end-of-archive blocks, take the limit plus `over` bytes:
    they share a shard when that is at most the limit, and not when it is one block more."""
    rng = np.random.default_rng(key_len)
    limit = 4 * tarfile.RECORDSIZE
    end_of_archive = 2 * tarfile.BLOCKSIZE
    key = "k" * (key_len - 1)
    first = _raw_sample("a" + key, [700, 5000, 300, 40], rng)
    base = _raw_sample("b" + key, [0, 100, 30, 20], rng)
    room = limit + over - end_of_archive - _tar_size(first) - _tar_size(base)
    # frame00 of room - 300 bytes takes `room` bytes once padded to whole blocks
    second = _raw_sample("b" + key, [room - 300, 100, 30, 20], rng)
    assert room > 512 and _tar_size(second) == _tar_size(base) + room
    with shards.ShardWriter(str(tmp_path), split="train", dataset="toy", num_frames=2,
                            image_size=16, audio={}, max_shard_bytes=limit) as writer:
        for s in (first, second, _raw_sample("c", [10, 10, 10, 10], rng)):
            writer.write(s)
    index = shards.read_index(str(tmp_path))
    assert index.shards[0].samples == (2 if over <= 0 else 1)
    alone = -(-(_tar_size(first) + end_of_archive) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    assert index.shards[0].bytes == (limit if over <= 0 else alone)
    assert all(s.bytes <= limit for s in index.shards)


@pytest.mark.parametrize("content,message", [
    (None, "no shard index"),
    (b"{not json", "not valid JSON"),
    (b'{"format": "avpea-shards/1", "dataset": "x", "shards": []}', "'split' is missing"),
    (b'{"format": "other/2"}', "'format'"),
])
def test_read_index_errors_name_the_problem(tmp_path, content, message):
    if content is not None:
        (tmp_path / "shards.json").write_bytes(content)
    with pytest.raises(shards.ShardIndexError, match=message) as err:
        shards.read_index(str(tmp_path))
    assert "shards.json" in str(err.value)


def _write_split(out, split: str = "train", n: int = 3, seed: int = 0) -> shards.ShardIndex:
    """A toy split of `n` one-sample shards written into `out` by a `ShardWriter` run."""
    rng = np.random.default_rng(seed)
    with shards.ShardWriter(str(out), split=split, dataset="toy", num_frames=2, image_size=16,
                            audio={}, max_shard_bytes=1) as writer:
        for i in range(n):
            writer.write(_sample(f"{split}{i}", rng))
    return shards.read_index(str(out))


def _urls(index: shards.ShardIndex) -> set:
    return {s.url for s in index.shards}


# Files a train-split writer did not write, however much they look like shards or temp files.
FOREIGN = ["imagenet-000000.tar", "shard-000123.tar", "val-000001.tar", "train-000007.tar",
           "train-0123abcd-000000.tar", ".notes.tmp-abc", ".vocab.json.tmp-abcd1234",
           ".val-0123abcd-000000.tar.tmp-abcd1234", ".train-0123abcd-000000.tar.tmp-abc"]


def test_rerun_removes_only_the_shards_its_previous_index_listed(tmp_path):
    for name in FOREIGN:
        (tmp_path / name).write_bytes(name.encode())
    first = _write_split(tmp_path)
    assert set(os.listdir(tmp_path)) == set(FOREIGN) | _urls(first) | {shards.INDEX_NAME}
    second = _write_split(tmp_path)
    assert not _urls(first) & _urls(second)
    # The first run's shards are gone; every file no index of this writer listed stays.
    assert set(os.listdir(tmp_path)) == set(FOREIGN) | _urls(second) | {shards.INDEX_NAME}
    for name in FOREIGN:
        assert (tmp_path / name).read_bytes() == name.encode()


def test_rerun_removes_this_splits_temp_files_only(tmp_path):
    # What a killed train writer leaves: temp files named by the writer's own naming.
    for name in ["train-0123abcd-000004.tar", shards.INDEX_NAME]:
        storage.local_temp_path(str(tmp_path / name))
    theirs = [".notes.tmp-abc", ".val-0123abcd-000000.tar.tmp-abcd1234",
              ".train-0123abcd-000000.tar.tmp-ABCD1234", ".shards.json.tmp-abc", "notes.txt"]
    for name in theirs:
        (tmp_path / name).write_bytes(b"x")
    assert len(os.listdir(tmp_path)) == len(theirs) + 2
    index = _write_split(tmp_path)
    assert set(os.listdir(tmp_path)) == set(theirs) | _urls(index) | {shards.INDEX_NAME}


def test_another_splits_shards_survive(tmp_path):
    train = _write_split(tmp_path, "train")
    val = _write_split(tmp_path, "val")  # replaces the train index: it listed another split
    val_again = _write_split(tmp_path, "val", seed=1)
    names = set(os.listdir(tmp_path))
    assert _urls(train) <= names and _urls(val_again) <= names
    assert not _urls(val) & names  # the val rerun still drops val's previous shards


@pytest.mark.parametrize("previous", [None, b"{not json", b'{"format": "other/2"}'])
def test_missing_or_unreadable_previous_index_removes_nothing(tmp_path, previous):
    first = _write_split(tmp_path)
    os.remove(tmp_path / shards.INDEX_NAME)
    if previous is not None:
        (tmp_path / shards.INDEX_NAME).write_bytes(previous)
    second = _write_split(tmp_path)
    assert set(os.listdir(tmp_path)) == _urls(first) | _urls(second) | {shards.INDEX_NAME}


def test_previous_index_urls_outside_the_folder_are_not_deleted(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    _write_split(out)
    outside.mkdir()
    doc = json.loads((out / shards.INDEX_NAME).read_text())
    victims = [outside / "train-0123abcd-000000.tar", outside / "train-0123abcd-000001.tar",
               out / "sub" / "train-0123abcd-000002.tar"]
    urls = [str(victims[0]), "../outside/train-0123abcd-000001.tar",
            "sub/train-0123abcd-000002.tar"]
    for i, (victim, url) in enumerate(zip(victims, urls)):
        os.makedirs(victim.parent, exist_ok=True)
        victim.write_bytes(b"keep")
        doc["shards"][i]["url"] = url
    (out / shards.INDEX_NAME).write_text(json.dumps(doc))
    _write_split(out)
    assert all(victim.read_bytes() == b"keep" for victim in victims)


# -- MUSIC-AVQA ------------------------------------------------------------------------------

AVQA_TRAIN = [
    media.avqa_record("00000001", 1, "one"),
    media.avqa_record("00000001", 2, "left", content="Is the <Object> on the <LR>\uff1f",
                      templ=["cello", "left"], qtype=("Visual", "Location")),
    media.avqa_record("00000002", 3, "two"),
    media.avqa_record("sa000003", 4, "yes", content="Is there a <Object> sounding?",
                      templ=["piano"], qtype=("Audio-Visual", "Existential")),
]


def test_avqa_to_s3_and_back(s3, tmp_path):
    layout = media.make_avqa(str(tmp_path), {"train": AVQA_TRAIN})
    # One folder numbered without zero padding: 1.jpg, 2.jpg, ..., 12.jpg (natural order).
    shutil.rmtree(os.path.join(layout.frames, "00000002"))
    media.write_frames(os.path.join(layout.frames, "00000002"), 12, pattern="{}.jpg")
    out = s3.make_bucket("avqa-shards") + "/musicavqa/train"

    assert run(musicavqa, layout.args(out, "train", "--max-shard-bytes", "1")) == 0

    index = shards.read_index(out)
    assert (index.dataset, index.split, index.total_samples, len(index.shards)) == \
        ("musicavqa", "train", 3, 3)
    vocab = json.loads(storage.read_bytes(out + "/vocab.json"))
    assert vocab["question_words"][:4] == ["<pad>", "<unk>", "how", "many"]
    assert vocab["answers"] == ["one", "left", "two", "yes"]
    samples = read_back(out)
    assert [s["key"] for s in samples] == ["00000001", "00000002", "sa000003"]
    for i, sample in enumerate(samples):
        vid = sample["meta"]["video_id"]
        assert sample["frames"].shape == (10, 3, 32, 32)
        expected = np.array([media.frame_color(j) for j in PICKED_OF_12])
        assert np.abs(frame_colors(sample["frames"]) - expected).max() < 8
        wave, _ = media.sf.read(os.path.join(layout.audio, f"{vid}.wav"), dtype="float32")
        assert torch.allclose(sample["fbank"], waveform_to_windows(wave, 10, AudioConfig()),
                              atol=5e-3)
    q = samples[0]["meta"]["questions"][1]
    assert q["question"] == "Is the cello on the left\uff1f"
    assert q["question_tokens"] == [vocab["question_words"].index(w)
                                    for w in ["is", "the", "cello", "on", "the", "left"]]
    assert (q["answer_index"], q["question_type"], q["anser"]) == (1, "Visual-Location", "left")
    assert samples[2]["meta"]["questions"][0]["question_type"] == "Audio-Visual-Existential"
    assert validate.validate(out) == []

    # A rerun into the same prefix (now one shard) replaces the split and drops old shards.
    assert run(musicavqa, layout.args(out, "train")) == 0
    index = shards.read_index(out)
    assert len(index.shards) == 1 and index.total_samples == 3
    assert storage.list_names(out) == sorted([index.shards[0].url, "report.json",
                                              "shards.json", "vocab.json"])


def test_avqa_val_uses_train_vocabulary(tmp_path):
    val = [media.avqa_record("00000005", 10, "two",
                             content="How many <Object> are xylophonic?", templ=["cello"]),
           media.avqa_record("00000005", 11, "seven")]
    layout = media.make_avqa(str(tmp_path), {"train": AVQA_TRAIN, "val": val})
    out = str(tmp_path / "val")
    assert run(musicavqa, layout.args(out, "val")) == 0
    (sample,) = read_back(out)
    vocab = json.loads((tmp_path / "val" / "vocab.json").read_text())
    q0, q1 = sample["meta"]["questions"]
    assert "xylophonic" not in vocab["question_words"]
    assert q0["question_tokens"][-1] == 1  # unknown word
    assert q0["answer_index"] == vocab["answers"].index("two")
    assert q1["answer_index"] == -1
    report = json.loads((tmp_path / "val" / "report.json").read_text())
    assert report["counts"]["unknown_answers"] == 1 and report["questions"] == 2


def _broken_avqa(root: str) -> media.AvqaLayout:
    """Two good videos (one with a stereo 44.1 kHz WAV) and one of every problem."""
    train = [media.avqa_record(v, i, "one") for i, v in
             enumerate(["good1", "good2", "noframes", "nowav", "badjpeg"])]
    train += [media.avqa_record("good1", 7, "two", deleted=1),
              media.avqa_record("good2", 99, "one", content="Is the <Object> here?")]
    layout = media.make_avqa(root, {"train": train})
    shutil.rmtree(os.path.join(layout.frames, "noframes"))
    os.remove(os.path.join(layout.audio, "nowav.wav"))
    with open(os.path.join(layout.frames, "badjpeg", "0005.jpg"), "wb") as f:
        f.write(b"\xff\xd8 this is not a JPEG")
    stereo = np.stack([media.tone(2.0, 440, 44_100)] * 2, axis=1)
    media.write_wav(os.path.join(layout.audio, "good2.wav"), stereo, 44_100)
    return layout


def test_avqa_bad_media_is_reported(tmp_path, capsys):
    layout = _broken_avqa(str(tmp_path / "data"))
    out = tmp_path / "out"
    assert run(musicavqa, layout.args(str(out))) == 0
    report = json.loads((out / "report.json").read_text())
    skipped = {(s["id"], s["reason"]) for s in report["skipped"]}
    assert skipped == {("noframes", "missing_frames"), ("nowav", "missing_audio"),
                       ("badjpeg", "unreadable_frame"), ("7", "question_deleted"),
                       ("99", "malformed_record")}
    assert report["samples"] == 2 and report["questions"] == 2
    printed = capsys.readouterr().out
    for video_id, reason in skipped:
        assert f"{video_id}: {reason}" in printed
    assert [s["key"] for s in read_back(str(out))] == ["good1", "good2"]


@pytest.mark.parametrize("problem,where", [
    ("missing_frames", "noframes"), ("missing_audio", "nowav"),
    ("unreadable_frame", "badjpeg"), ("malformed_record", "99"),
])
def test_avqa_strict_fails_naming_id_and_reason(tmp_path, capsys, problem, where):
    layout = _broken_avqa(str(tmp_path / "data"))
    records = json.loads(open(os.path.join(layout.annotations, "avqa-train.json")).read())
    keep = [r for r in records if r["video_id"] in ("good1", "good2") and r["question_id"] != 99
            or str(r["question_id"]) == where or r["video_id"] == where]
    with open(os.path.join(layout.annotations, "avqa-train.json"), "w") as f:
        json.dump(keep, f)
    out = tmp_path / "out"
    assert run(musicavqa, layout.args(str(out), "train", "--strict")) == 1
    err = capsys.readouterr().err
    assert where in err and problem in err and "Traceback" not in err
    # Nothing published: no index, and the aborted run removed the shards it had written.
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("flag,split,needle", [
    ("--annotations", "train", "--annotations"),  # no such directory
    (None, "test", "avqa-test.json"),               # the split's file is missing
    ("--frames", "train", "--frames"),
])
def test_avqa_usage_errors_exit_2(tmp_path, capsys, flag, split, needle):
    layout = media.make_avqa(str(tmp_path), {"train": AVQA_TRAIN[:1]})
    argv = layout.args(str(tmp_path / "o"), split)
    if flag:
        argv[argv.index(flag) + 1] = str(tmp_path / "nowhere")
    assert run(musicavqa, argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--max-shard-bytes", "lots"], ["--split", "dev"],
                                  ["--num-frames", "0"]])
def test_bad_flags_exit_2(tmp_path, capsys, argv):
    layout = media.make_avqa(str(tmp_path), {"train": AVQA_TRAIN[:1]})
    with pytest.raises(SystemExit) as exit_:
        run(musicavqa, layout.args(str(tmp_path / "o")) + argv)
    assert exit_.value.code == 2 and argv[0] in capsys.readouterr().err


def test_invalid_annotation_json_exit_2(tmp_path, capsys):
    layout = media.make_avqa(str(tmp_path), {"train": AVQA_TRAIN[:1]})
    with open(os.path.join(layout.annotations, "avqa-train.json"), "w") as f:
        f.write("[{")
    assert run(musicavqa, layout.args(str(tmp_path / "o"))) == 2
    assert "avqa-train.json is not valid JSON" in capsys.readouterr().err


# -- AVE ------------------------------------------------------------------------------------

AVE_ROWS = [("Church bell", "vidA", "good", 2, 5), ("Dog bark", "vid-B", "good", 0, 10),
            ("Church bell", "vidC", "bad", 7, 10),
            ("Male speech, man speaking", "vidD", "good", 1, 3)]


@pytest.mark.parametrize("header,workers", [(True, "0"), (False, "2")])
def test_ave_labels_by_rule(tmp_path, header, workers):
    layout = media.make_ave(str(tmp_path), AVE_ROWS, {"train": [1, 2], "test": [3]},
                            header=header)
    out = str(tmp_path / "train")
    assert run(ave, layout.args(out, "train", "--workers", workers)) == 0
    samples = read_back(out)
    metas = [(s["meta"]["video_id"], s["meta"]["category_index"], s["meta"]["labels"])
             for s in samples]
    assert metas == [("vid-B", 1, [1] * 10), ("vidC", 0, [28] * 7 + [0] * 3)]
    assert samples[0]["fbank"].shape == (10, 1, 102, 128)
    index = shards.read_index(out)
    assert index.extra["categories"] == ["Church bell", "Dog bark", "Male speech, man speaking"]
    assert index.audio["window_seconds"] == 1.0 and index.audio["target_frames"] == 102
    assert run(ave, layout.args(str(tmp_path / "test"), "test")) == 0
    (test_sample,) = read_back(str(tmp_path / "test"))
    assert test_sample["meta"]["labels"] == [28, 2, 2] + [28] * 7


def test_ave_from_mp4(tmp_path):
    layout = media.make_ave(str(tmp_path), AVE_ROWS[:3], {"val": [0, 1, 2]}, frames=False,
                            mp4=True)
    with open(os.path.join(layout.videos, "vidC.mp4"), "r+b") as f:
        f.write(b"\0" * 4096)  # header destroyed
    out = str(tmp_path / "val")
    assert run(ave, layout.args(out, "val", mp4=True)) == 0
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert [(s["id"], s["reason"]) for s in report["skipped"]] == [("vidC-r2", "unreadable_video")]
    samples = read_back(out)
    assert [s["meta"]["video_id"] for s in samples] == ["vidA", "vid-B"]
    for sample in samples:
        # Frame t comes from second t of the video (H.264 is lossy: loose tolerance).
        expected = np.array([media.frame_color(t) for t in range(10)])
        assert np.abs(frame_colors(sample["frames"]) - expected).max() < 12
        # Silent for 5 s, then a tone: the audio landed at the right seconds, at 16 kHz.
        loudest = sample["fbank"][:, 0, :90].amax(dim=(1, 2))  # frames 90+ may be padding
        assert loudest[5:].min() > loudest[:5].max() + 2.0, loudest
        assert sample["fbank"].shape == (10, 1, 102, 128)


def test_ave_missing_media_and_flags(tmp_path, capsys):
    layout = media.make_ave(str(tmp_path), AVE_ROWS[:3], {"train": [0, 1, 2]})
    os.remove(os.path.join(layout.audio, "vidC.wav"))
    with open(os.path.join(layout.splits, "trainSet.txt"), "a") as f:
        f.write("Unknown thing&vidZ&good&0&10\nbroken row\n")
    out = tmp_path / "out"
    assert run(ave, layout.args(str(out))) == 0
    report = json.loads((out / "report.json").read_text())
    assert {(s["id"], s["reason"]) for s in report["skipped"]} == {
        ("vidC-r2", "missing_audio"), ("trainSet.txt:5", "malformed_record"),
        ("trainSet.txt:6", "malformed_record")}
    assert run(ave, layout.args(str(out), "train", "--strict")) == 1
    assert "--strict" in capsys.readouterr().err
    argv = layout.args(str(out)) + ["--videos", layout.videos]
    assert run(ave, argv) == 2
    assert "--videos" in capsys.readouterr().err


# A video with two rows (two events, as 45 videos of the real Annotations.txt have) and the
# same clip labelled twice with different categories over the same seconds.
AVE_SAME_VIDEO = [("Male speech, man speaking", "vidM", "good", 5, 10),
                  ("Church bell", "vidA", "good", 2, 5),
                  ("Female speech, woman speaking", "vidM", "good", 5, 10),
                  ("Church bell", "vidM", "good", 0, 3)]
MALE, BELL, FEMALE = ([28] * 5 + [0] * 5, [28] * 2 + [1] * 3 + [28] * 5, [28] * 5 + [2] * 5)


def _ave_line(i: int) -> str:
    return "&".join(map(str, AVE_SAME_VIDEO[i]))


@pytest.mark.parametrize("header,split_lines,samples,skipped", [
    (True, [_ave_line(0), _ave_line(1), _ave_line(2)],
     [("vidM-r0", MALE), ("vidA-r1", BELL), ("vidM-r2", FEMALE)], []),
    # the id is the row of Annotations.txt, whatever the split list's order or header
    (False, [_ave_line(3), _ave_line(0)],
     [("vidM-r3", [1, 1, 1] + [28] * 7), ("vidM-r0", MALE)], []),
    # the same row however its numbers and spaces are written
    (True, ["Male speech, man speaking & vidM & good & 5.0 & 10"], [("vidM-r0", MALE)], []),
    # a row listed twice is one sample
    (True, [_ave_line(2), _ave_line(2)], [("vidM-r2", FEMALE)],
     [("vidM-r2", "duplicate_key")]),
    # a known category and video, but not a row of Annotations.txt
    (True, ["Church bell&vidM&good&1&2", _ave_line(1)], [("vidA-r1", BELL)],
     [("trainSet.txt:2", "malformed_record")]),
])
def test_ave_sample_per_annotation_row(tmp_path, header, split_lines, samples, skipped):
    layout = media.make_ave(str(tmp_path), AVE_SAME_VIDEO, {}, header=header)
    with open(os.path.join(layout.splits, "trainSet.txt"), "w") as f:
        f.write("\n".join(([media.AVE_HEADER] if header else []) + split_lines) + "\n")
    out = str(tmp_path / "out")
    assert run(ave, layout.args(out)) == 0
    written = read_back(out)
    assert [(s["key"], s["meta"]["labels"]) for s in written] == samples
    for s in written:
        assert s["key"] == f"{s['meta']['video_id']}-r{s['meta']['row']}"
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert [(s["id"], s["reason"]) for s in report["skipped"]] == skipped
    assert report["samples"] == len(samples)


def test_ave_rows_of_one_video_share_its_media_and_keep_their_ids(tmp_path):
    layout = media.make_ave(str(tmp_path), AVE_SAME_VIDEO, {"train": [0, 1, 2, 3]})
    runs = {}
    for name, workers in (("first", "0"), ("again", "0"), ("workers", "2")):
        out = str(tmp_path / name)
        assert run(ave, layout.args(out, "train", "--workers", workers)) == 0
        runs[name] = (read_back(out), [s.keys_sha256 for s in shards.read_index(out).shards])
    samples, keys_sha256 = runs["first"]
    assert [s["key"] for s in samples] == ["vidM-r0", "vidA-r1", "vidM-r2", "vidM-r3"]
    for other, other_sha256 in (runs["again"], runs["workers"]):
        assert [s["key"] for s in other] == [s["key"] for s in samples]
        assert other_sha256 == keys_sha256
    rows = [s for s in samples if s["meta"]["video_id"] == "vidM"]
    assert [s["meta"]["category"] for s in rows] == [
        "Male speech, man speaking", "Female speech, woman speaking", "Church bell"]
    for s in rows[1:]:  # decoded from vidM's one frame folder and WAV
        assert torch.equal(s["frames"], rows[0]["frames"])
        assert torch.equal(s["fbank"], rows[0]["fbank"])
    assert validate.validate(str(tmp_path / "first")) == []


# -- crash safety ------------------------------------------------------------------------------

@pytest.mark.slow  # a sharder subprocess killed mid-run
def test_sigkill_keeps_previous_index_and_rerun_replaces(tmp_path):
    records = [media.avqa_record(f"{i:08d}", i, "one") for i in range(40)]
    layout = media.make_avqa(str(tmp_path / "data"), {"train": records}, frames_per_video=3,
                             seconds=1.0)
    out = tmp_path / "out"
    argv = layout.args(str(out), "train", "--max-shard-bytes", "1")  # one sample per shard
    assert run(musicavqa, argv) == 0
    before_index = (out / "shards.json").read_bytes()
    before = set(os.listdir(out))

    def published_shards() -> set:
        # (name, inode): a shard published under an existing name still shows up as new.
        return {(n, os.stat(out / n).st_ino) for n in os.listdir(out)
                if shards.SHARD_NAME.match(n)}

    before_shards = published_shards()

    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "sharding.musicavqa", *argv], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if published_shards() - before_shards:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    left = set(os.listdir(out)) - before
    assert left, "the killed run should have left a shard behind"
    assert (out / "shards.json").read_bytes() == before_index
    assert validate.validate(str(out)) == []  # every listed shard complete, checksums match
    listed = {s.url for s in shards.read_index(str(out)).shards}
    assert not listed & left

    assert run(musicavqa, argv) == 0
    index = shards.read_index(str(out))
    assert index.total_samples == 40 and validate.validate(str(out)) == []
    # The previous run's shards, the killed run's temp files and the shards it had published
    # (named in its run record) are gone; nothing else was there to keep.
    assert set(os.listdir(out)) == {s.url for s in index.shards} | {"shards.json", "vocab.json", "report.json"}


# -- validate ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_split(tmp_path_factory):
    """An AVE split with 3 shards (one clip each)."""
    root = tmp_path_factory.mktemp("ave")
    layout = media.make_ave(str(root), AVE_ROWS[:3], {"train": [0, 1, 2]})
    assert run(ave, layout.args(str(root / "out"), "train", "--max-shard-bytes", "1")) == 0
    return root / "out"


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _flip_fbank_byte(path):
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".fbank.npy"))
    with open(path, "r+b") as f:
        f.seek(member.offset_data + 1000)
        byte = f.read(1)
        f.seek(member.offset_data + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage,ranks,workers,expected", [
    (None, 1, 3, None),
    (_truncate, 1, 1, "size is"),
    (_flip_fbank_byte, 1, 1, "sha256 mismatch"),
    (os.remove, 1, 1, "missing"),
    (None, 2, 2, "4 readers"),
])
def test_validate(good_split, tmp_path, capsys, damage, ranks, workers, expected):
    split = tmp_path / "split"
    shutil.copytree(good_split, split)
    index = shards.read_index(str(split))
    target = index.shards[1].url
    if damage is not None:
        damage(str(split / target))
    code = validate.main([str(split), "--ranks", str(ranks), "--loader-workers", str(workers)])
    printed = capsys.readouterr().out
    if expected is None:
        assert code == 0 and printed.startswith("OK")
        return
    if damage is None:  # more readers than shards: the reader copes, so a warning, exit 0
        assert len(index.shards) < ranks * workers
        lines = printed.splitlines()
        assert code == 0 and lines[-1].startswith("OK"), printed
        assert any(line.startswith("warning:") and expected in line for line in lines), printed
        return
    assert code == 1
    problem_lines = [line for line in printed.splitlines() if expected in line]
    assert problem_lines, printed
    if damage is not None:  # the line names the damaged shard, and only that one
        assert all(line.startswith(target) for line in printed.splitlines())
    if damage is _truncate:
        assert any("not a readable tar" in line for line in printed.splitlines())


def _list_as(split, target: str, url: str) -> None:
    """Rewrite the index so that the entry of shard `target` says `url`."""
    doc = json.loads((split / shards.INDEX_NAME).read_text())
    (entry,) = [e for e in doc["shards"] if e["url"] == target]
    entry["url"] = url
    (split / shards.INDEX_NAME).write_text(json.dumps(doc))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("url,why", [
    ("/dev/zero", "absolute path"), ("/etc/passwd", "absolute path"),
    ("../other/x.tar", "'..' path component"), ("sub/../../other/x.tar", "'..' path component"),
    ("file:///dev/zero", "scheme"), ("", "empty url"),
])
def test_validate_never_opens_shards_outside_the_split(good_split, tmp_path, capsys, url, why):
    split = tmp_path / "split"
    shutil.copytree(good_split, split)
    target = shards.read_index(str(split)).shards[1].url
    # A complete, checksum-correct shard out there: only its place is wrong.
    os.makedirs(tmp_path / "other")
    shutil.move(split / target, tmp_path / "other" / "x.tar")
    _list_as(split, target, url)
    started = time.monotonic()
    code = validate.main([str(split)])
    printed = capsys.readouterr().out.splitlines()
    assert time.monotonic() - started < 10
    assert code == 1
    assert len(printed) == 1 and repr(url) in printed[0] and why in printed[0], printed
    assert "not opened" in printed[0]


@pytest.mark.timeout(30)
def test_validate_never_reads_a_device(good_split, tmp_path, capsys):
    split = tmp_path / "split"
    shutil.copytree(good_split, split)
    target = shards.read_index(str(split)).shards[1].url
    os.remove(split / target)
    os.symlink("/dev/zero", split / target)
    assert validate.main([str(split)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{target}: not a regular file; not opened"]


def test_validate_reports_a_shard_longer_than_listed(good_split, tmp_path, capsys, monkeypatch):
    split = tmp_path / "split"
    shutil.copytree(good_split, split)
    info = shards.read_index(str(split)).shards[1]
    with open(split / info.url, "ab") as f:
        f.write(b"\0" * (8 << 20))
    assert validate.main([str(split)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{info.url}: size is") for line in printed), printed
    # A file that grows after its size was taken: the read stops one byte past the listing.
    opened = []
    real_open = storage.open_url
    monkeypatch.setattr(storage, "size", lambda url: info.bytes)
    monkeypatch.setattr(storage, "open_url",
                        lambda url, mode="rb": opened.append(_CountingFile(real_open(url, mode)))
                        or opened[-1])
    problems = validate.validate(str(split))
    assert f"{info.url}: longer than the {info.bytes} bytes the index says " \
        "(grew while being read?)" in problems, problems
    assert len(opened) == 3 and opened[1].count == info.bytes + 1


class _CountingFile:
    """A file that counts the bytes read from it."""

    def __init__(self, f):
        self._f, self.count = f, 0

    def read(self, size=-1):
        data = self._f.read(size)
        self.count += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_validate_on_s3_names_the_shard(s3, good_split):
    out = s3.make_bucket("validate-shards") + "/ave/train"
    fs, path = storage.filesystem(out)
    fs.put(str(good_split) + "/", path, recursive=True)
    assert validate.validate(out) == []
    name = shards.read_index(out).shards[0].url
    data = (good_split / name).read_bytes()
    fs.pipe_file(f"{path}/{name}", data[: len(data) // 3])
    problems = validate.validate(out)
    assert problems and all(p.startswith(name) for p in problems)
