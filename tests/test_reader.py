"""The exact-epoch reader on real tar shards, with real DataLoader worker processes.

The split: 23 samples in 5 shards of 7, 3, 6, 2 and 5 samples (uneven on purpose), read by
2 ranks x 2 loader workers = 4 slots, so slots straddle shard boundaries and share shards.
"""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from avpea_ray.data import shards
from avpea_ray.data.reader import (DataDamageError, ShardStream, batches_done_per_worker,
                                   check_shards_present, plan_epoch, shuffled)

SHARD_SIZES = (7, 3, 6, 2, 5)
N = sum(SHARD_SIZES)
KEYS = [f"vid{i:03d}" for i in range(N)]
WORLD, WORKERS, BATCH = 2, 2, 2
SLOTS = WORLD * WORKERS


def write_split(out: str) -> shards.ShardIndex:
    """Write the 23-sample split with ShardWriter; the first sample of every shard is
    padded so that the writer's size limit starts a new shard exactly there."""
    firsts = set(np.cumsum((0,) + SHARD_SIZES[:-1]).tolist())
    with shards.ShardWriter(out, split="train", dataset="toy", num_frames=2, image_size=32,
                            audio={"num_mel_bins": 8}, max_shard_bytes=160_000) as writer:
        for i, key in enumerate(KEYS):
            frames = [np.full((32, 32, 3), (7 * i + 50 * t) % 256, np.uint8) for t in range(2)]
            fbank = np.full((2, 4, 8), i, np.float32)
            meta = {"video_id": key, "pad": "x" * (100_000 if i in firsts else 0)}
            writer.write(shards.encode_sample(key, frames, fbank, meta))
    index = shards.read_index(out)
    assert [s.samples for s in index.shards] == list(SHARD_SIZES)
    return index


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("split"))
    write_split(out)
    return out


def stream(url, rank=0, *, training, world=WORLD, workers=WORKERS, **kw) -> ShardStream:
    return ShardStream(url, rank=rank, world_size=world, num_workers=workers,
                       batch_size=BATCH, training=training, shuffle_buffer=4, **kw)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def epoch_keys(url, *, training, epoch=0, seed=0, **kw) -> list[list[str]]:
    """Per rank, the keys of one epoch in the order they arrive."""
    out = []
    for rank in range(WORLD):
        s = stream(url, rank, training=training, epoch=epoch, seed=seed, **kw)
        out.append(keys_of(s))
    return out


# --- the plan (pure) ----------------------------------------------------------------------

@pytest.mark.parametrize("sizes,slots,batch,drop_last", [
    ((7, 3, 6, 2, 5), 4, 2, True),
    ((7, 3, 6, 2, 5), 4, 2, False),
    ((100,), 6, 4, True),          # fewer shards than slots
    ((5, 5, 5), 3, 5, True),       # divides exactly: nothing dropped
    ((1, 1, 1, 1, 1, 1, 1), 2, 3, False),
])
def test_training_plan_equal_slots_and_bounded_drop(sizes, slots, batch, drop_last):
    plan = plan_epoch(list(sizes), slots=slots, batch_size=batch, training=True, seed=1,
                      epoch=3, drop_last=drop_last)
    assert len(set(plan.batches)) == 1 and len(set(plan.take)) == 1
    assert sorted(plan.shard_order) == list(range(len(sizes)))
    dropped = sum(sizes) - sum(plan.take)
    assert 0 <= dropped < (slots * batch if drop_last else slots)
    for (start, stop), take in zip(plan.ranges, plan.take):
        assert take <= stop - start
    assert all(a[1] == b[0] for a, b in zip(plan.ranges, plan.ranges[1:]))  # disjoint


@pytest.mark.parametrize("total,slots", [(23, 4), (3, 4), (100, 7), (0 + 8, 8)])
def test_eval_plan_partitions_everything(total, slots):
    plan = plan_epoch([total], slots=slots, batch_size=3, training=False, seed=0, epoch=0)
    covered = [p for start, stop in plan.ranges for p in range(start, stop)]
    assert covered == list(range(total))
    assert max(plan.take) - min(plan.take) <= 1


@pytest.mark.parametrize("consumed,per_worker,expected", [
    (0, [3, 3], [0, 0]),
    (1, [3, 3], [1, 0]),
    (5, [3, 3], [3, 2]),
    (4, [1, 3], [1, 3]),        # worker 0 exhausted after round 0
    (5, [2, 3, 1], [2, 2, 1]),
])
def test_batches_done_per_worker_follows_round_robin(consumed, per_worker, expected):
    assert batches_done_per_worker(consumed, per_worker) == expected


def test_shuffle_buffer_is_bounded_permutation():
    import random

    out = list(shuffled(range(50), 8, random.Random(0)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    # Bounded: the j-th output is emitted before input j + size arrives (holds <= 8).
    assert all(item <= j + 8 for j, item in enumerate(out))


# --- evaluation: every sample exactly once ------------------------------------------------

@pytest.mark.parametrize("world,workers,persistent", [
    (2, 2, False),
    (2, 2, True),   # a second pass through the same persistent workers, too
    (4, 2, False),  # 8 slots for 5 shards: slots share shards
    (1, 0, False),  # in the main process
])
def test_eval_sees_every_sample_exactly_once(split, world, workers, persistent):
    everything = []
    for rank in range(world):
        s = stream(split, rank, training=False, world=world, workers=workers,
                   persistent_workers=persistent)
        first = keys_of(s)
        if persistent:
            assert keys_of(s) == first
        assert first  # every rank gets a share
        everything += first
    assert sorted(everything) == KEYS  # no drop, no duplicate


def test_eval_batches_have_the_collated_layout(split):
    batch = next(iter(stream(split, training=False)))
    assert batch["frames"].shape == (BATCH, 2, 3, 32, 32) and str(batch["frames"].dtype) == "torch.uint8"
    assert batch["fbank"].shape == (BATCH, 2, 1, 4, 8) and str(batch["fbank"].dtype) == "torch.float32"
    assert [m["video_id"] for m in batch["meta"]] == batch["key"]
    # fbank value i identifies the sample: the decoded tensors belong to the key.
    assert [int(f[0, 0, 0, 0]) for f in batch["fbank"]] == [KEYS.index(k) for k in batch["key"]]


# --- training: equal steps, bounded drop, deterministic order ----------------------------

def test_training_equal_steps_bounded_drop_no_repeat(split):
    streams = [stream(split, r, training=True) for r in range(WORLD)]
    per_rank = [keys_of(s) for s in streams]
    steps = [s.steps_per_epoch for s in streams]
    assert steps[0] == steps[1] > 0
    assert [len(k) for k in per_rank] == [steps[0] * BATCH] * WORLD
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen))
    dropped = N - len(seen)
    assert dropped == streams[0].dropped_per_epoch < SLOTS * BATCH
    # Both streams moved on to the next epoch after a full pass.
    assert streams[0].state_dict()["epoch"] == 1 and streams[0].batches_consumed == 0


def test_training_order_is_a_function_of_seed_and_epoch(split):
    a = epoch_keys(split, training=True, epoch=2, seed=5)
    assert a == epoch_keys(split, training=True, epoch=2, seed=5)
    assert a != epoch_keys(split, training=True, epoch=3, seed=5)
    assert a != epoch_keys(split, training=True, epoch=2, seed=6)


def test_persistent_workers_follow_the_epoch(split):
    # Persistent workers keep their dataset copy; the epoch reaches them through shared
    # memory, so epoch 1 read through them equals epoch 1 read by fresh workers.
    s = stream(split, 0, training=True, persistent_workers=True)
    e0, e1 = keys_of(s), keys_of(s)
    assert s.epoch == 2 and e0 != e1
    assert e1 == keys_of(stream(split, 0, training=True, epoch=1))


def test_drop_last_false_keeps_all_but_the_remainder(split):
    seen = []
    for rank in range(WORLD):
        s = stream(split, rank, training=True, drop_last=False)
        seen += keys_of(s)
    assert len(seen) == len(set(seen)) == N - N % SLOTS


# --- mid-epoch resume ---------------------------------------------------------------------

@pytest.mark.parametrize("rank,k,persistent", [(0, 1, False), (1, 3, False), (0, 2, True)])
def test_resume_mid_epoch_yields_exactly_the_unseen(split, rank, k, persistent):
    full = keys_of(stream(split, rank, training=True, epoch=1, seed=3))
    s = stream(split, rank, training=True, epoch=1, seed=3, persistent_workers=persistent)
    before = []
    for batch in s:
        before += batch["key"]
        if s.batches_consumed == k:
            break
    state = s.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == k
    resumed = stream(split, rank, training=True, seed=3, persistent_workers=persistent)
    resumed.load_state_dict(state)
    after = keys_of(resumed)
    assert before + after == full          # same order, nothing repeated, nothing missed
    assert resumed.stats["skipped_for_resume"] == k * BATCH
    assert resumed.state_dict()["epoch"] == 2


def test_position_after_the_last_batch_is_the_next_epoch(split):
    s = stream(split, 0, training=True, epoch=4)
    for n, _ in enumerate(s, start=1):
        if n == s.steps_per_epoch:
            break  # stop right after the last batch, before the loop would end by itself
    assert (s.state_dict()["epoch"], s.state_dict()["batches_consumed"]) == (5, 0)
    assert keys_of(s) == keys_of(stream(split, 0, training=True, epoch=5))


@pytest.mark.parametrize("persistent", [False, True])
def test_breaking_out_and_iterating_again_continues_the_epoch(split, persistent):
    full = keys_of(stream(split, 0, training=True))
    s = stream(split, 0, training=True, persistent_workers=persistent)
    first = []
    for batch in s:
        first += batch["key"]
        break
    assert first + keys_of(s) == full


def test_resume_refuses_a_state_from_another_shard_set(split, tmp_path):
    s = stream(split, 0, training=True)
    for _ in zip(range(1), s):
        pass
    state = s.state_dict()
    resharded = str(tmp_path / "resharded")  # the same samples, sharded again: refused
    write_split(resharded)
    other = stream(resharded, 0, training=True)
    assert other.index.total_samples == s.index.total_samples
    with pytest.raises(ValueError, match="shard set changed since the checkpoint"):
        other.load_state_dict(state)
    assert state["index_id"] == shards.index_id(shards.read_index(split))
    copy = str(tmp_path / "copy")  # the same shards elsewhere: accepted
    shutil.copytree(split, copy)
    stream(copy, 0, training=True).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "index_id"}  # an older reader's state
    with pytest.raises(ValueError, match="no index_id"):
        stream(split, 0, training=True).load_state_dict(old)


@pytest.mark.parametrize("change,match", [
    ({"world": 4}, "world_size"),
    ({"workers": 1}, "num_workers"),
])
def test_eval_resume_refuses_a_different_layout(split, change, match):
    # Evaluation is never resumed mid-split by the trainer; a state from another layout is
    # refused rather than guessed at.
    state = stream(split, 0, training=False).state_dict()
    other = stream(split, 0, training=False, **change)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)


def test_resume_refuses_another_batch_size(split):
    state = stream(split, 0, training=True).state_dict()
    other = ShardStream(split, rank=0, world_size=WORLD, num_workers=WORKERS, batch_size=BATCH + 1,
                        training=True, shuffle_buffer=4)
    with pytest.raises(ValueError, match="batch_size: checkpoint 2, now 3"):
        other.load_state_dict(state)


# --- elastic resume: another world size / loader-worker count re-plans the epoch ----------

def _positions(plan, slot, first, stop, *, seed, epoch, buffer):
    """Positions slot `slot` hands out from its sample number `first` to `stop` (pure replay
    of what its loader worker reads: the shuffle draws the same numbers for any items)."""
    import itertools

    from avpea_ray.data.reader import shuffle_rng

    out = shuffled(plan.slot_positions(slot), buffer, shuffle_rng(seed, epoch, plan.segment, slot))
    return list(itertools.islice(out, first, min(stop, plan.take[slot])))


def simulate_epoch(index, layouts, *, batch, buffer, drop_last=True, seed=5, epoch=2):
    """Run one epoch through a chain of checkpoints without reading a shard: each attempt
    (world, workers, k) loads the previous attempt's state (through JSON, as a checkpoint
    holds it), trains k more batches per rank (None: to the epoch's end), and checkpoints.

    Returns:
        (positions trained, in order; per attempt the steps every rank ran; the last stream;
        how many samples the remainder rule leaves out: of the R samples not yet trained when
        the last layout took over, R - slots x (R // slots cut to whole batches)).
    """
    import json

    trained, steps_seen, state, s, segment = [], [], None, None, None
    for world, workers, k in layouts:
        s = ShardStream(index, rank=0, world_size=world, num_workers=workers, batch_size=batch,
                        training=True, shuffle_buffer=buffer, seed=seed, epoch=epoch, drop_last=drop_last)
        if state is not None:
            s.load_state_dict(json.loads(json.dumps(state)))
        if s.epoch != epoch or s.segment != segment:  # a new plan for the rest of the epoch
            # The remainder rule, as reader.py documents it: of the positions R not trained
            # yet (in position order), slot i gets run i of len(R) // slots, cut to whole
            # batches; the runs' cut tails and R's tail are left out.
            segment, untrained = s.segment, sorted(set(range(index.total_samples)) - set(trained))
            q = len(untrained) // s.slots
            take = (q // batch) * batch if drop_last else q
            left_out = set(untrained[s.slots * q:])
            for i in range(s.slots):
                left_out |= set(untrained[i * q + take:(i + 1) * q])
        if s.epoch != epoch:
            break
        plan, w = s.plan(), max(workers, 1)
        per_rank = [sum(plan.batches[r * w:(r + 1) * w]) for r in range(world)]
        steps_seen.append(per_rank)
        k = per_rank[0] - s.batches_consumed if k is None else k
        for rank in range(world):
            mine = list(plan.batches[rank * w:(rank + 1) * w])
            before = batches_done_per_worker(s.batches_consumed, mine)
            after = batches_done_per_worker(s.batches_consumed + k, mine)
            for worker in range(w):
                trained += _positions(plan, rank * w + worker, before[worker] * batch, after[worker] * batch,
                                      seed=seed, epoch=epoch, buffer=buffer)
        s.batches_consumed += k
        if s.batches_consumed == per_rank[0]:
            s.set_epoch(epoch + 1)
        state = s.state_dict()
    return trained, steps_seen, s, left_out


ELASTIC = [
    # shard sizes,      batch, buffer, drop_last, [(world, loader workers, batches per rank), ...]
    ((7, 3, 6, 2, 5),   2, 4, True,  [(2, 2, 1), (1, 1, None)]),            # shrink
    ((7, 3, 6, 2, 5),   2, 4, True,  [(1, 1, 3), (2, 2, None)]),            # grow
    ((7, 3, 6, 2, 5),   2, 4, True,  [(2, 2, 1), (1, 0, 2), (3, 1, None)]),  # twice in one epoch
    ((7, 3, 6, 2, 5),   2, 4, False, [(2, 1, 3), (1, 2, None)]),            # partial last batches
    ((7, 3, 6, 2, 5),   2, 4, True,  [(2, 2, 0), (1, 1, None)]),            # before the first step
    ((40, 40, 40),      4, 16, True, [(2, 2, 5), (4, 2, 1), (1, 2, 3), (2, 1, None)]),
    ((100,),            3, 1, True,  [(3, 1, 10), (2, 3, None)]),           # no shuffle buffer
    ((9, 9),            2, 4, True,  [(1, 1, 8), (2, 2, None)]),            # too little left: next epoch
    ((12, 12),          2, 4, True,  [(2, 1, 2), (1, 2, None)]),            # nothing left out
]


@pytest.mark.parametrize("sizes,batch,buffer,drop_last,layouts", ELASTIC)
def test_resize_trains_each_sample_of_the_epoch_at_most_once_and_all_but_the_remainder(
        split, sizes, batch, buffer, drop_last, layouts):
    index = _index_of(split, sizes)
    trained, steps_seen, last, left_out = simulate_epoch(index, layouts, batch=batch, buffer=buffer,
                                                        drop_last=drop_last)
    assert len(trained) == len(set(trained))                       # none repeated
    assert all(len(set(per_rank)) == 1 for per_rank in steps_seen)  # equal steps on every rank
    # None missed but the documented remainder, fewer than the last layout's slots x batch
    # (which samples those are is only known for a re-planned segment: segment 0's are the
    # tails of its shuffle buffers, see the tests above).
    missed = set(range(sum(sizes))) - set(trained)
    assert len(missed) == len(left_out) < (last.slots * batch if drop_last else last.slots)
    if last.segment or layouts[-1][:2] != layouts[0][:2]:
        assert missed == left_out
    assert last.epoch == 3 and last.batches_consumed == 0


def test_resize_replan_is_deterministic_and_world_size_independent(split):
    index = _index_of(split, (7, 3, 6, 2, 5))
    a = simulate_epoch(index, [(2, 2, 1), (1, 1, 2)], batch=2, buffer=4)[2].state_dict()
    b = simulate_epoch(index, [(2, 2, 1), (1, 1, 2)], batch=2, buffer=4)[2].state_dict()
    assert a == b and a["segment"] == 1 and a["consumed"]
    # The same state resumed by two layouts: both continue from the same consumed set.
    plans = []
    for world, workers in ((3, 1), (1, 2)):
        s = ShardStream(index, rank=0, world_size=world, num_workers=workers, batch_size=2, training=True,
                        shuffle_buffer=4, seed=5)
        s.load_state_dict(a)
        plans.append(s)
    assert plans[0].consumed.bits == plans[1].consumed.bits
    assert plans[0].consumed.count() == 2 * 1 * 2 + 1 * 2 * 2  # 2 ranks x 1 batch, then 1 rank x 2


def test_same_layout_resume_keeps_the_batch_skip(split):
    # An unchanged layout is not re-planned: the state stays segment 0 with nothing in
    # `consumed`, and resumes batch by batch (the order of test_resume_mid_epoch_...).
    index = _index_of(split, (7, 3, 6, 2, 5))
    s = simulate_epoch(index, [(2, 2, 1), (2, 2, 1)], batch=2, buffer=4)[2]
    assert (s.segment, s.batches_consumed, s.state_dict()["consumed"]) == (0, 2, "")


def _index_of(split, sizes) -> shards.ShardIndex:
    """The split's index with shards of these sample counts instead (for plans only: no
    shard is read)."""
    import dataclasses

    index = shards.read_index(split)
    listed = [dataclasses.replace(index.shards[0], url=f"x-{i:04d}.tar", samples=n) for i, n in enumerate(sizes)]
    return dataclasses.replace(index, shards=listed, total_samples=sum(sizes))


def test_resize_on_real_shards_trains_every_unseen_sample_once(split):
    """2 ranks x 2 loader workers stop after 2 batches each; rank 0's state resumes the epoch
    on 1 rank x 1 worker (real DataLoader workers, real tar shards): no sample twice, all but
    fewer than slots x batch_size."""
    before = []
    for rank in range(WORLD):
        s = stream(split, rank, training=True, epoch=1, seed=3)
        for batch in s:
            before += batch["key"]
            if s.batches_consumed == 2:
                break
        if rank == 0:
            state = s.state_dict()
    resumed = stream(split, 0, training=True, world=1, workers=1, seed=3)
    resumed.load_state_dict(state)
    after = keys_of(resumed)
    assert len(before) == WORLD * 2 * BATCH and after
    assert len(before + after) == len(set(before + after))
    assert 0 <= N - len(before + after) < 1 * BATCH
    assert resumed.state_dict()["epoch"] == 2


# --- damage ----------------------------------------------------------------------------

@pytest.fixture
def damaged_split(split, tmp_path) -> tuple[str, str, int]:
    """A copy of the split whose third shard (6 samples) is cut in the middle of sample 3."""
    out = str(tmp_path / "damaged")
    shutil.copytree(split, out)
    index = shards.read_index(out)
    victim = index.shard_urls()[2]
    with open(victim, "rb") as f:
        data = f.read()
    with open(victim, "wb") as f:
        f.write(data[: int(len(data) * 0.75)])
    return out, victim, sum(SHARD_SIZES[:2])


def test_truncated_shard_is_skipped_named_and_counted(damaged_split, caplog):
    url, victim, first_of_victim = damaged_split
    seen, lost, corrupt = [], 0, set()
    with caplog.at_level(logging.WARNING, logger="avpea_ray.data.reader"):
        for rank in range(WORLD):
            s = stream(url, rank, training=False, allow_damaged=True)
            seen += keys_of(s)
            lost += s.stats["samples_lost"]
            corrupt |= set(s.stats["corrupt_shards"])
    assert len(seen) == len(set(seen))
    missing = set(KEYS) - set(seen)
    victim_keys = set(KEYS[first_of_victim:first_of_victim + SHARD_SIZES[2]])
    assert missing and missing <= victim_keys and len(missing) == lost
    assert corrupt == {victim}
    assert os.path.basename(victim) in caplog.text


def test_training_over_a_damaged_shard_keeps_steps_equal(damaged_split):
    url, _, _ = damaged_split
    streams = [stream(url, r, training=True, epoch=e, allow_damaged=True)
               for r in range(WORLD) for e in (0, 1)]
    counts = [len(keys_of(s)) for s in streams]
    assert len(set(counts)) == 1 and counts[0] == streams[0].steps_per_epoch * BATCH
    assert any(s.stats["refilled"] for s in streams)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_fails_on_a_truncated_shard_by_default(damaged_split, workers):
    url, victim, _ = damaged_split
    with pytest.raises(DataDamageError) as err:
        for rank in range(WORLD):  # the victim lies in some rank's share in every epoch
            for epoch in (0, 1):
                keys_of(stream(url, rank, training=True, epoch=epoch, workers=workers))
    message = str(err.value)
    assert victim in message and ("truncated" in message or "unreadable" in message)
    assert f"python -m sharding.validate {url}" in message and "allow_damaged" in message


@pytest.fixture
def missing_shard_split(split, tmp_path) -> tuple[str, str]:
    """A copy of the split without its fourth shard (2 samples)."""
    out = str(tmp_path / "missing")
    shutil.copytree(split, out)
    victim = shards.read_index(out).shard_urls()[3]
    os.remove(victim)
    return out, victim


def test_eval_with_a_missing_shard_fails_naming_it(missing_shard_split):
    url, victim = missing_shard_split
    with pytest.raises(DataDamageError, match=r"missing.*re-shard the split") as err:
        for rank in range(WORLD):
            keys_of(stream(url, rank, training=False))
    assert victim in str(err.value)


def test_eval_with_allow_damaged_counts_every_lost_sample(missing_shard_split):
    url, victim = missing_shard_split
    seen, lost, corrupt = [], 0, set()
    for rank in range(WORLD):
        s = stream(url, rank, training=False, allow_damaged=True)
        seen += keys_of(s)
        lost += s.stats["samples_lost"]
        corrupt |= set(s.stats["corrupt_shards"])
    first = sum(SHARD_SIZES[:3])
    assert sorted(seen) == KEYS[:first] + KEYS[first + SHARD_SIZES[3]:]
    assert lost == SHARD_SIZES[3] == N - len(seen) and corrupt == {victim}


def test_check_shards_present_names_missing_and_resized_shards(split, tmp_path):
    assert check_shards_present(shards.read_index(split)) == []
    out = str(tmp_path / "copy")
    shutil.copytree(split, out)
    urls = shards.read_index(out).shard_urls()
    os.remove(urls[1])
    with open(urls[4], "ab") as f:
        f.write(b"\0" * 512)
    problems = check_shards_present(out)
    assert len(problems) == 2
    assert problems[0].startswith(urls[1]) and "missing" in problems[0]
    assert problems[1].startswith(urls[4]) and "the index lists" in problems[1]


@pytest.fixture(scope="module")
def undecodable_split(tmp_path_factory) -> tuple[str, str]:
    """6 samples in one shard; sample "bad02" has intact tar members but a frame that is
    not a JPEG."""
    out = str(tmp_path_factory.mktemp("undecodable"))
    with shards.ShardWriter(out, split="test", dataset="toy", num_frames=2, image_size=32,
                            audio={"num_mel_bins": 8}) as writer:
        for i in range(6):
            frames = [np.full((32, 32, 3), 10 * i, np.uint8)] * 2
            sample = shards.encode_sample(f"bad{i:02d}", frames, np.zeros((2, 4, 8)), {})
            if i == 2:
                sample["frame01.jpg"] = b"not a jpeg"
            writer.write(sample)
    return out, shards.read_index(out).shard_urls()[0]


def test_an_undecodable_sample_fails_naming_key_and_shard(undecodable_split):
    url, shard = undecodable_split
    with pytest.raises(DataDamageError) as err:
        keys_of(stream(url, training=False, world=1, workers=1))
    assert "sample bad02" in str(err.value) and shard in str(err.value)
    s = stream(url, training=False, world=1, workers=1, allow_damaged=True)
    assert keys_of(s) == ["bad00", "bad01", "bad03", "bad04", "bad05"]
    assert s.stats["decode_errors"] == s.stats["samples_lost"] == 1
    assert list(s.stats["bad_samples"]) == ["bad02"]


# --- object storage -----------------------------------------------------------------------

def test_reads_from_s3_exactly_once(s3, tmp_path):
    url = s3.make_bucket("reader-test") + "/tiny/train"
    write_split(url)
    seen = []
    for rank in range(WORLD):
        seen += keys_of(stream(url, rank, training=False))
    assert sorted(seen) == KEYS
    train = keys_of(stream(url, 1, training=True, seed=2))
    assert train == keys_of(stream(url, 1, training=True, seed=2))
