"""The synthetic MUSIC-AVQA-style dataset: release layout, determinism, balance, and that
the audio-visual questions really need both modalities."""
from __future__ import annotations

import ast
import collections
import json
import os

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import media
from sharding import synth

RECORD_FIELDS = {"video_id", "question_id", "type", "question_content", "templ_values",
                 "question_deleted", "anser"}
TYPES = {("Audio", "Counting"), ("Audio", "Comparative"), ("Visual", "Counting"),
         ("Visual", "Location"), ("Audio-Visual", "Existential"), ("Audio-Visual", "Counting"),
         ("Audio-Visual", "Location"), ("Audio-Visual", "Comparative"),
         ("Audio-Visual", "Temporal")}
SMALL = {"train": 6, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("release"))
    synth.write_dataset(out, SMALL, seed=0, seconds=10, frame_size=(48, 32), workers=1)
    return out


def musicavqa_question(record: dict) -> list[str]:
    """The question words the way MUSIC-AVQA's own loader builds them: split on spaces, drop
    the final '?', replace each word containing '<' by the next literal_eval'd value."""
    words = record["question_content"].rstrip().split(" ")
    words[-1] = words[-1][:-1]
    values = ast.literal_eval(record["templ_values"])
    p = 0
    for i, word in enumerate(words):
        if "<" in word:
            words[i] = values[p]
            p += 1
    assert p == len(values)
    return words


def test_release_layout_and_records(release):
    ids = {}
    qids = set()
    for split, videos in SMALL.items():
        with open(os.path.join(release, f"avqa-{split}.json")) as f:
            records = json.load(f)
        ids[split] = {r["video_id"] for r in records}
        assert len(ids[split]) == videos
        for r in records:
            assert set(r) == RECORD_FIELDS
            assert isinstance(r["type"], str) and isinstance(r["templ_values"], str)
            assert tuple(ast.literal_eval(r["type"])) in TYPES
            assert r["question_deleted"] == 0 and isinstance(r["question_id"], int)
            assert r["video_id"].startswith("syn") and r["anser"]
            words = musicavqa_question(r)
            assert len(words) <= 14 and not any("<" in w for w in words)
            assert " ".join(words) + "?" == synth.fill_question(
                r["question_content"], json.loads(r["templ_values"]))
            qids.add(r["question_id"])
    assert sum(len(v) for v in ids.values()) == len(set().union(*ids.values()))  # disjoint
    assert len(qids) == sum(len(json.load(open(os.path.join(release, f"avqa-{s}.json"))))
                            for s in SMALL)
    for vid in set().union(*ids.values()):
        names = sorted(os.listdir(os.path.join(release, "frames", vid)))
        assert names == [f"{t:06d}.jpg" for t in range(1, 11)]
        with Image.open(os.path.join(release, "frames", vid, names[0])) as img:
            assert img.size == (48, 32) and img.mode == "RGB"
        wave, rate = sf.read(os.path.join(release, "audio", f"{vid}.wav"))
        assert rate == 16_000 and wave.ndim == 1 and len(wave) == 10 * 16_000


def test_same_seed_same_bytes_other_seed_other_data(release, tmp_path):
    again = str(tmp_path / "again")
    synth.write_dataset(again, SMALL, seed=0, seconds=10, frame_size=(48, 32), workers=2)
    assert media.tree_digest(again) == media.tree_digest(release)
    _, other = synth.generate(SMALL, seed=1)
    _, same = synth.generate(SMALL, seed=0)
    assert other != same


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_splits_are_balanced(seed):
    _, records = synth.generate({"train": 240, "val": 60, "test": 60}, seed=seed)
    for split, recs in records.items():
        answers = collections.Counter(r["anser"] for r in recs)
        assert answers.most_common(1)[0][1] / len(recs) < 0.25, (split, answers.most_common(3))
        assert 4 <= len(recs) / len({r["video_id"] for r in recs}) <= 5
    assert {tuple(json.loads(r["type"])) for r in records["train"]} == TYPES


def test_no_question_type_is_answered_by_its_majority():
    _, records = synth.generate({"train": 2000}, seed=11)
    by_type: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in records["train"]:
        by_type[tuple(json.loads(r["type"]))][r["anser"]] += 1
    assert set(by_type) == TYPES
    for qtype, answers in by_type.items():
        assert answers.most_common(1)[0][1] / sum(answers.values()) < 0.6, (qtype, answers)


# --- which modality carries the answer ----------------------------------------------------

def canonical(scene: synth.Scene, record: dict, modality: str) -> tuple[tuple, str]:
    """(what a model with only `modality` knows + the question, the answer), with instrument
    names relabelled by order of appearance in that modality. The generator treats all
    instruments alike, so the relabelling loses nothing and makes keys repeat often enough
    for a lookup table to estimate the best possible accuracy."""
    seen = [scene.layout[p] for p in synth.POSITIONS if p in scene.layout]
    heard = [s.instrument for s in scene.sounds]
    names = {"visual": seen, "audio": heard, "both": seen + heard}[modality]
    labels: dict[str, str] = {}
    for name in names:
        labels.setdefault(name, f"I{len(labels)}")
    unknown: dict[str, str] = {}

    def label(word: str) -> str:
        if word in labels:
            return labels[word]
        return unknown.setdefault(word, f"X{len(unknown)}") if word in synth.BY_NAME else word

    values = tuple(label(v) for v in json.loads(record["templ_values"]))
    visual = tuple(label(scene.layout[p]) if p in scene.layout else None
                   for p in synth.POSITIONS) if modality != "audio" else ()
    audio = tuple((label(s.instrument), s.level) for s in scene.sounds) \
        if modality != "visual" else ()
    return (record["question_content"], values, visual, audio), label(record["anser"])


def best_accuracy(modality: str) -> dict[tuple, float]:
    """Per question type, the accuracy of the best predictor that sees only `modality`:
    majority answer per key on 2000 videos, scored on 2000 others (unseen keys count wrong)."""
    scenes, records = synth.generate({"fit": 2000, "score": 2000}, seed=7)
    by_id = {s.video_id: s for ss in scenes.values() for s in ss}
    table: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in records["fit"]:
        key, answer = canonical(by_id[r["video_id"]], r, modality)
        table[key][answer] += 1
    hits: dict[tuple, list[bool]] = collections.defaultdict(list)
    for r in records["score"]:
        key, answer = canonical(by_id[r["video_id"]], r, modality)
        guess = table[key].most_common(1)[0][0] if key in table else None
        hits[tuple(json.loads(r["type"]))].append(guess == answer)
    return {t: sum(h) / len(h) for t, h in hits.items()}


def test_audio_visual_questions_need_both_modalities():
    visual, audio = best_accuracy("visual"), best_accuracy("audio")
    for qtype in TYPES:
        group = qtype[0]
        if group == "Audio":
            assert audio[qtype] == 1.0 and visual[qtype] < 0.6, qtype
        elif group == "Visual":
            assert visual[qtype] == 1.0 and audio[qtype] < 0.6, qtype
        else:
            assert max(visual[qtype], audio[qtype]) < 0.75, (qtype, visual[qtype], audio[qtype])


def test_answers_are_a_function_of_both_modalities():
    scenes, records = synth.generate({"train": 1500}, seed=3)
    by_id = {s.video_id: s for s in scenes["train"]}
    answers: dict[tuple, set] = collections.defaultdict(set)
    for r in records["train"]:
        key, answer = canonical(by_id[r["video_id"]], r, "both")
        answers[key].add(answer)
    assert all(len(a) == 1 for a in answers.values())


# --- the media carry the facts ------------------------------------------------------------

def test_frames_and_audio_show_the_facts(release):
    from avpea_ray.data.audio import AudioConfig, waveform_to_windows

    with open(os.path.join(release, "synth_facts.json")) as f:
        facts = json.load(f)
    cfg = AudioConfig()
    mel_hz = 700 * (10 ** (np.linspace(2595 * np.log10(1 + 20 / 700),
                                       2595 * np.log10(1 + 8000 / 700), 130)[1:-1] / 2595) - 1)
    for vid, fact in facts.items():
        with Image.open(os.path.join(release, "frames", vid, "000003.jpg")) as img:
            frame = np.asarray(img.convert("RGB")).astype(int)
        for col, pos in enumerate(synth.POSITIONS):
            centre = frame[16, int(48 / 3 * (col + 0.5))]
            expected = (synth.BY_NAME[fact["layout"][pos]].rgb if pos in fact["layout"]
                        else (96, 96, 96))
            assert np.abs(centre - np.array(expected)).max() < 24, (vid, pos)
        wave, _ = sf.read(os.path.join(release, "audio", f"{vid}.wav"), dtype="float32")
        fbank = waveform_to_windows(wave, 10, cfg)[:, 0].mean(dim=1).numpy()  # (T, mel)
        starts = {s["instrument"]: s["start"] for s in fact["sounds"]}
        first_window = {}
        for inst in synth.INSTRUMENTS:
            band = fbank[:, int(np.argmin(np.abs(mel_hz - inst.hz)))]
            active = np.flatnonzero(band > -1.0)
            assert (len(active) > 0) == (inst.name in starts), (vid, inst.name, band)
            if len(active):
                first_window[inst.name] = active[0]
        order = sorted(starts, key=starts.get)
        assert [first_window[n] for n in order] == sorted(first_window[n] for n in order)


def test_release_goes_through_the_musicavqa_sharder(release, tmp_path):
    from avpea_ray.data.reader import ShardStream
    from sharding import musicavqa

    out = str(tmp_path / "shards")
    assert musicavqa.main(["--annotations", release, "--frames", os.path.join(release, "frames"),
                           "--audio", os.path.join(release, "audio"), "--out", out,
                           "--split", "val", "--image-size", "32", "--no-progress"]) == 0
    with open(os.path.join(release, "avqa-val.json")) as f:
        records = json.load(f)
    metas = [m for batch in ShardStream(out, batch_size=2, training=False, num_workers=0)
             for m in batch["meta"]]
    assert sorted(m["video_id"] for m in metas) == sorted({r["video_id"] for r in records})
    questions = [q for m in metas for q in m["questions"]]
    assert len(questions) == len(records)
    assert all(q["answer_index"] >= 0 for q in questions)
    assert {q["question_type"] for q in questions} <= {"-".join(t) for t in TYPES}
