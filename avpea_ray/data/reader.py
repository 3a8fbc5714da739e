"""Exact-epoch streaming reader: tar shards -> batches on every Ray Train rank.

Guarantees (docs/data_format.md, "The reader's contract"):

- Evaluation (`training=False`) yields every sample of the split exactly once across all
  ranks and DataLoader workers: no drops, no padding duplicates (ranks may get unequal
  counts, differing by at most one sample per slot).
- Training: every rank runs the same number of steps per epoch. Each sample is seen at
  most once per epoch; the only samples left out are the truncation remainders
  (`dropped_per_epoch`), fewer than `slots * batch_size` with `drop_last=True` (fewer than
  `slots` with `drop_last=False`), where `slots = world_size * max(num_workers, 1)`. Which
  ones are dropped changes from epoch to epoch with the shard order.
- The order is a function of (seed, epoch, world_size, num_workers, batch_size,
  shuffle_buffer, drop_last) only.
- Mid-epoch resume: `state_dict()` records (epoch, batches consumed) and `index_id`, the
  identity of the shard set (`shards.index_id`); loading it and iterating yields exactly
  the batches not yet consumed in that epoch, in the order the uninterrupted epoch would
  have had. The state is the same on every rank in training, so rank 0's checkpoint
  resumes all ranks. A state from another shard set (re-sharded data), a training state
  without `index_id`, and other settings are refused with a message.
- Elastic resume: a training state loaded at another world size or loader-worker count
  re-plans the rest of the epoch (`replan_epoch`). The positions the old layout had
  consumed are replayed from its plan into a bitmap over the epoch's N positions (in the
  state, independent of the layout); the positions not consumed, R, are cut into `slots`
  contiguous runs of len(R) // slots, each cut to whole batches. So every sample not yet
  trained on in the epoch is trained on once, none twice, every rank runs the same number
  of steps, and the remainder rule holds for the new slots (fewer than `slots *
  batch_size` of R left out; none at all when R divides). A run resized again re-plans
  again (segment 2, ...). Evaluation is never resumed: each pass reads the whole split,
  exactly once at any layout.
- Damage (a missing, truncated or corrupt shard, a sample with missing members or bytes
  that do not decode) raises `DataDamageError` in the caller's process by default, naming
  the shard URL (or sample key and URL) and the reason: a split is never read partially
  without saying so. With `allow_damaged=True` it is logged by name, counted in `stats`
  (`samples_lost` counts every sample not delivered) and skipped (the rest of the shard);
  in training its lost samples are replaced by reading on past the slot's range, so steps
  stay equal across ranks. `check_shards_present` finds missing or resized shards before
  a run starts, from one listing.
- Storage errors are never taken for damage. Permission/credential errors and an endpoint
  that never answered raise `storage.StorageAccessError` at once. Transient errors
  (throttling, 5xx, dropped connections, timeouts, a restarting server) are retried by the
  storage library (s3fs, see `storage`: a ranged read whose body breaks off is re-fetched,
  so the tar stream continues where it was and nothing is delivered twice); one that
  outlasts its retries is raised as it is (an outage, not damage).

Design. Per epoch the shard order is a seeded permutation (training) or the index order
(evaluation); concatenated, the shards form a virtual sequence of N sample positions.
There are `slots = world_size * W` readers (slot = rank * W + loader worker id), and each
slot owns a contiguous range of positions, so it opens only the shards that overlap it
(fewer shards than slots is fine: slots share a shard and skip to their part). Training
cuts every slot to the same count q = N // slots, then to whole batches. A slot shuffles
its RAW samples (bytes) in a bounded buffer seeded by (seed, epoch, slot) and decodes
after, so memory holds compressed samples only. Each worker forms whole batches itself
(the DataLoader runs with batch_size=None) and PyTorch hands out worker batches
round-robin in worker order, so after k consumed batches worker w has produced a known
number of them; on resume each slot regenerates its deterministic raw stream, skips that
many samples without decoding them, and continues. Because the DataLoader always starts a
pass with worker 0, the resumed pass rotates the workers' roles by k % W so that the
batches keep their uninterrupted order (checked batch by batch in training). The epoch
and resume point reach persistent workers through a shared-memory tensor.

Known limit (allow_damaged only): resume skips raw samples without decoding them, so if a
sample with intact tar members fails to *decode* (corrupt JPEG/npy bytes) before the resume
point, that slot's resumed stream is shifted by one sample per such failure (counted in
`stats["decode_errors"]`). Truncated or missing shards are detected without decoding and
do not shift anything. Eval resume assumes the nominal per-worker batch counts (exact
when no shard of the split is damaged). An elastic re-plan replays the old layout's
shuffles on positions, so it is exact when no sample before the resume point was lost to
damage (a lost sample was replaced by one read past the slot's range, which the replay does
not know about).
"""
from __future__ import annotations

import base64
import bisect
import itertools
import logging
import random
import sys
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from avpea_ray.data import shards, storage

log = logging.getLogger(__name__)

STATE_VERSION = 3
# Counters each worker reports (as deltas) with its batches; summed in `ShardStream.stats`.
COUNTERS = ("raw_read", "decoded", "samples_lost", "decode_errors", "incomplete_samples",
            "refilled", "retries", "skipped_for_resume")


# --- the plan: pure functions of the index and the settings ------------------------------

@dataclass(frozen=True)
class EpochPlan:
    """Which positions of the epoch's virtual sample sequence each slot reads.

    Args:
        shard_order: indices into the index's shard list, in this epoch's order.
        shard_starts: position of each ordered shard's first sample (len = shards + 1).
        ranges: per slot, the [start, stop) positions it reads.
        take: per slot, how many samples it yields (training: equal for all slots).
        batches: per slot, how many batches it yields.
        segment: 0 for the epoch as first planned; n > 0 for the rest of an epoch re-planned
            after its n-th change of layout (see `replan_epoch`).
        picks: re-planned segments only: per slot, the sorted positions it reads (its range
            also holds positions consumed before the re-plan, which it skips).
    """

    shard_order: tuple[int, ...]
    shard_starts: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    take: tuple[int, ...]
    batches: tuple[int, ...]
    segment: int = 0
    picks: tuple[tuple[int, ...], ...] = ()

    @property
    def total(self) -> int:
        return self.shard_starts[-1]

    def slot_positions(self, slot: int) -> Sequence[int]:
        """The positions slot `slot` reads, in reading order (before its shuffle buffer)."""
        return self.picks[slot] if self.segment else range(*self.ranges[slot])


def _shard_layout(shard_samples: list[int], training: bool, seed: int,
                  epoch: int) -> tuple[list[int], list[int]]:
    """The epoch's shard order (seeded permutation in training) and each one's first position."""
    order = list(range(len(shard_samples)))
    if training:
        random.Random(f"avpea-order/{seed}/{epoch}").shuffle(order)
    starts = [0]
    for i in order:
        starts.append(starts[-1] + shard_samples[i])
    return order, starts


def _training_take(available: int, batch_size: int, drop_last: bool) -> int:
    """A training slot's sample count: whole batches (drop_last) or all `available`."""
    return (available // batch_size) * batch_size if drop_last else available


def plan_epoch(shard_samples: list[int], *, slots: int, batch_size: int, training: bool,
               seed: int, epoch: int, drop_last: bool = True) -> EpochPlan:
    """Lay out one epoch.

    Args:
        shard_samples: samples per shard, in index order.
        slots: world_size * loader workers.
        batch_size: samples per batch.
        training: permute shards and equalise slots (True) or read everything once (False).
        seed, epoch: the permutation's seed.
        drop_last: training only; cut each slot to whole batches (True) or keep a last
            partial batch of the same size on every slot (False).

    Returns:
        The plan. Raises ValueError when training would give a slot no batch at all.
    """
    order, starts = _shard_layout(shard_samples, training, seed, epoch)
    total = starts[-1]
    if training:
        q = total // slots
        take = _training_take(q, batch_size, drop_last)
        if take == 0:
            raise ValueError(
                f"{total} samples cannot give every one of {slots} reader slots (ranks x "
                f"loader workers) a batch of {batch_size}; lower batch_size or num_workers")
        ranges = [(s * q, (s + 1) * q) for s in range(slots)]
        takes = [take] * slots
    else:
        # Balanced contiguous split: slot sizes differ by at most one.
        ranges = [(s * total // slots, (s + 1) * total // slots) for s in range(slots)]
        takes = [stop - start for start, stop in ranges]
    batches = [-(-t // batch_size) for t in takes]
    return EpochPlan(tuple(order), tuple(starts), tuple(ranges), tuple(takes), tuple(batches))


def replan_epoch(shard_samples: list[int], *, consumed: bytes, segment: int, slots: int,
                 batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> EpochPlan:
    """Lay out the rest of a training epoch after a change of layout (world size or loader
    workers), over the positions not consumed yet.

    The remaining positions R (in the epoch's position order) are cut into `slots`
    contiguous runs of q = len(R) // slots, each cut to whole batches as in `plan_epoch`;
    so every rank again runs the same number of steps and fewer than `slots * batch_size`
    remaining samples (fewer than `slots` without drop_last) are left out of the epoch. A
    contiguous run keeps each slot's reads to the few shards it overlaps. It is a function
    of (shard sizes, seed, epoch, consumed, segment, slots, batch size) only, so every rank
    and loader worker computes the same plan; the shuffle buffers of segment n are seeded by
    (seed, epoch, n, slot), unlike segment 0's, so a re-plan never replays an old order.

    Args:
        consumed: the bitmap (`ConsumedBits`) of positions trained on before this segment.
        segment: n >= 1: this is the n-th re-plan of the epoch.
        slots, batch_size, seed, epoch, drop_last: as for `plan_epoch`.

    Returns:
        The plan; slots may get no batch at all (the rest of the epoch is shorter than one
        step on every slot; the caller moves to the next epoch).
    """
    if segment < 1:
        raise ValueError(f"segment must be >= 1 for a re-plan, got {segment}")
    order, starts = _shard_layout(shard_samples, True, seed, epoch)
    total = starts[-1]
    bits = ConsumedBits(total, consumed)
    remaining = [p for p in range(total) if not bits[p]]
    q = len(remaining) // slots
    take = _training_take(q, batch_size, drop_last)
    picks = tuple(tuple(remaining[s * q:s * q + take]) for s in range(slots))
    ranges = tuple((p[0], p[-1] + 1) if p else (0, 0) for p in picks)
    return EpochPlan(tuple(order), tuple(starts), ranges, (take,) * slots,
                     (-(-take // batch_size),) * slots, segment, picks)


def shuffle_rng(seed: int, epoch: int, segment: int, slot: int) -> random.Random:
    """The slot's shuffle-buffer generator (segment 0 keeps the original seeding, so the
    order of an epoch that never changes layout is what it always was)."""
    if segment == 0:
        return random.Random(f"avpea-shuffle/{seed}/{epoch}/{slot}")
    return random.Random(f"avpea-shuffle/{seed}/{epoch}/segment{segment}/{slot}")


class ConsumedBits:
    """Which of an epoch's N positions were trained on: a bitmap, independent of the world
    size and the loader workers. Stored in the reader state as zlib + base64 text (plain
    bytes: nothing read from a checkpoint is ever unpickled)."""

    def __init__(self, total: int, data: bytes = b""):
        self.total = total
        self.bits = bytearray(data) if data else bytearray((total + 7) // 8)
        if len(self.bits) != (total + 7) // 8:
            raise ValueError(f"consumed bitmap of {len(self.bits)} bytes does not fit an "
                             f"epoch of {total} samples")

    def __getitem__(self, position: int) -> bool:
        return bool(self.bits[position >> 3] >> (position & 7) & 1)

    def add(self, position: int) -> None:
        if self[position]:
            raise ValueError(f"position {position} consumed twice in one epoch")
        self.bits[position >> 3] |= 1 << (position & 7)

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)

    def to_text(self) -> str:
        return base64.b64encode(zlib.compress(bytes(self.bits))).decode("ascii")

    @classmethod
    def from_text(cls, total: int, text: str) -> "ConsumedBits":
        return cls(total, zlib.decompress(base64.b64decode(text)) if text else b"")


def consumed_positions(plan: EpochPlan, batches_done: Sequence[int], *, batch_size: int,
                       shuffle_buffer: int, seed: int, epoch: int) -> list[int]:
    """The positions a training plan's slots had handed out after `batches_done[slot]`
    batches each: the first batches x batch_size of each slot's shuffled stream, replayed
    on positions instead of samples (the shuffle draws the same numbers for any items).

    Exact when no sample before the resume point was lost to damage (`allow_damaged`: a lost
    sample is replaced by reading on, which this replay does not see).
    """
    out: list[int] = []
    for slot, done in enumerate(batches_done):
        wanted = min(done * batch_size, plan.take[slot])
        stream = shuffled(plan.slot_positions(slot), shuffle_buffer,
                          shuffle_rng(seed, epoch, plan.segment, slot))
        out += itertools.islice(stream, wanted)
    return out


def batches_done_per_worker(consumed: int, batches_per_worker: list[int]) -> list[int]:
    """How many batches each DataLoader worker had produced when `consumed` were handed out.

    PyTorch's DataLoader (in_order=True) takes batches from its workers in turn, 0, 1, ...,
    skipping workers that are exhausted; so the consumed batches are the first `consumed`
    of the sequence ordered by (batch number within worker, worker id).

    Args:
        consumed: batches the training loop received.
        batches_per_worker: batches each worker yields in the epoch.

    Returns:
        Per worker, its batches among the consumed ones.
    """
    done = [0] * len(batches_per_worker)
    left = consumed
    for j in range(max(batches_per_worker, default=0)):
        for w, n in enumerate(batches_per_worker):
            if left == 0:
                return done
            if j < n:
                done[w] += 1
                left -= 1
    if left:
        raise ValueError(f"{consumed} batches consumed but the epoch has only "
                         f"{sum(batches_per_worker)}")
    return done


def ray_train_rank_and_world() -> tuple[int, int]:
    """(world rank, world size) inside a Ray Train worker, else (0, 1).

    Ray is only consulted when it is already imported (a Ray Train worker always has it),
    so plain scripts and tests do not pay for importing Ray.
    """
    if "ray" not in sys.modules:
        return 0, 1
    try:
        import ray.train

        ctx = ray.train.get_context()
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    except Exception:  # noqa: BLE001 - outside a Train worker get_context raises
        return 0, 1


# --- reading a slot's samples (runs in the loader workers) -------------------------------

def shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Bounded-buffer shuffle: hold at most `size` items, emit a random one per new item.

    Args:
        items: the stream.
        size: buffer capacity (<= 1 passes the stream through).
        rng: the deterministic generator.

    Yields:
        The items, locally shuffled.
    """
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _stack(tensors: list[torch.Tensor], shared: bool) -> torch.Tensor:
    """torch.stack, into shared memory when `shared` (saves the copy PyTorch would make
    when it sends the batch from a loader worker to the training process)."""
    if not shared:
        return torch.stack(tensors)
    out = torch.empty((len(tensors),) + tuple(tensors[0].shape), dtype=tensors[0].dtype)
    return torch.stack(tensors, out=out.share_memory_())


def collate(samples: list[dict]) -> dict:
    """Stack decoded samples into a batch.

    Args:
        samples: `shards.decode_sample` outputs of equal shapes.

    Returns:
        `{"frames": uint8 (B, T, 3, H, W), "fbank": float32 (B, T, 1, F, M),
        "meta": [dict] * B, "key": [str] * B}`; frames stay uint8 (the model normalises).
    """
    shared = get_worker_info() is not None
    return {
        "frames": _stack([s["frames"] for s in samples], shared),
        "fbank": _stack([s["fbank"] for s in samples], shared),
        "meta": [s["meta"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class DataDamageError(RuntimeError):
    """The split has a missing, truncated or corrupt shard, or a sample that does not decode.

    Raised by default (`allow_damaged=False`); the message names the shard URL (or the
    sample key and its shard) and the reason, and says what to do.
    """


def what_to_do(root: str) -> str:
    """The advice every damage message ends with."""
    return (f"re-shard the split, check it with `python -m sharding.validate {root}`, or set "
            "data.allow_damaged=true to train/evaluate without the damaged samples")


class _Corrupt(Exception):
    """A shard cannot be read further (its name and the reason are in the message)."""


class _Damaged(Exception):
    """Damage was found with allow_damaged=False: the slot stops and reports it."""


def _open_shard(url: str) -> BinaryIO:
    """The default shard opener (remote reads are retried by the storage library)."""
    return storage.open_url(url, "rb")


class _SlotReader:
    """Reads one slot's positions of an epoch, tracking what went wrong.

    Args:
        urls: absolute shard URLs in index order.
        counts: declared samples per shard (index order).
        num_frames: frames every sample must have.
        open_shard: opens a URL for binary reading.
        allow_damaged: skip damage (count and record it) instead of stopping at the first.
    """

    def __init__(self, urls: list[str], counts: list[int], num_frames: int,
                 open_shard: Callable[[str], BinaryIO], allow_damaged: bool):
        self.urls, self.counts, self.num_frames = urls, counts, num_frames
        self.open_shard, self.allow_damaged = open_shard, allow_damaged
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._retries_before = storage.retries_so_far()
        # Not yet reported: damaged shards (url, reason) and bad samples (key, "url: reason").
        self.corrupt: list[tuple[str, str]] = []
        self.bad_samples: list[tuple[str, str]] = []

    def positions(self, plan: EpochPlan, start: int, stop: int) -> Iterator[dict]:
        """Raw samples at virtual positions [start, stop) of `plan`, in order.

        Positions past the end wrap around (used to refill training slots).
        """
        total = plan.total
        pos = start
        while pos < stop and total > 0:
            p = pos % total
            k = bisect.bisect_right(plan.shard_starts, p) - 1  # the shard holding position p
            lo = p - plan.shard_starts[k]
            hi = min(plan.shard_starts[k + 1] - plan.shard_starts[k], lo + (stop - pos))
            for raw in self.shard_samples(plan.shard_order[k], lo, hi):
                del raw["__number__"]
                yield raw
            pos += hi - lo

    def picked(self, plan: EpochPlan, start: int, stop: int,
               wanted: Sequence[int]) -> Iterator[dict]:
        """Raw samples at those positions of [start, stop) (wrapping past the end) that are
        in `wanted` (sorted), in order; shards or parts of them holding none are not read.

        A re-planned segment reads this way: its slot's range also holds positions consumed
        before the re-plan. A sample's position comes from its number in its shard, so a
        damaged shard's lost samples shift nothing.
        """
        total = plan.total
        pos = start
        while pos < stop and total > 0:
            p = pos % total
            k = bisect.bisect_right(plan.shard_starts, p) - 1
            first = plan.shard_starts[k]
            lo, hi = p - first, min(plan.shard_starts[k + 1] - first, p - first + (stop - pos))
            # The wanted positions inside [first + lo, first + hi): read only from the first
            # to the last of them.
            a = bisect.bisect_left(wanted, first + lo)
            b = bisect.bisect_left(wanted, first + hi)
            if a < b:
                for raw in self.shard_samples(plan.shard_order[k], wanted[a] - first,
                                              wanted[b - 1] - first + 1):
                    number = raw.pop("__number__")
                    i = bisect.bisect_left(wanted, first + number)
                    if i < len(wanted) and wanted[i] == first + number:
                        yield raw
            pos += hi - lo

    def count_retries(self) -> None:
        """Bring `counters["retries"]` up to date: transient storage errors the storage
        library retried in this process since this reader was made."""
        self.counters["retries"] = storage.retries_so_far() - self._retries_before

    def shard_samples(self, shard: int, lo: int, hi: int) -> Iterator[dict]:
        """Raw samples number lo..hi-1 of one shard.

        Transient storage errors are retried by the storage library underneath the open
        shard; one that outlasts its retries is raised (an outage: fail loudly, resume from
        a checkpoint). Access errors raise `StorageAccessError`. Damage (missing, truncated
        or corrupt shard, incomplete sample) is recorded; then the rest of the shard is
        skipped (allow_damaged) or `_Damaged` stops the slot.
        """
        url = self.urls[shard]
        done = lo  # next sample number we still have to deliver
        samples = self._read_tar(url, lo)
        try:
            for number, raw in samples:
                if number >= hi:
                    break
                done = number + 1
                missing = self._missing_members(raw)
                if missing:
                    self.counters["incomplete_samples"] += 1
                    self.bad_sample(raw["__key__"], f"{url}: incomplete sample ({missing})")
                    continue
                self.counters["raw_read"] += 1
                raw["__number__"] = number  # its position in the shard (see `picked`)
                yield raw
            else:
                if done < hi:
                    raise _Corrupt(f"ends after sample {done - 1} of the "
                                   f"{self.counts[shard]} the index lists (truncated)")
        except (_Damaged, storage.StorageAccessError):
            raise
        except _Corrupt as exc:
            self._lose(url, str(exc), hi - done)
        except Exception as exc:  # noqa: BLE001 - classified here
            kind = storage.classify(exc, url)
            if kind == "access":
                raise storage.access_error(exc, url) from exc
            if kind == "transient":
                raise  # retried below us already: an outage, not damage
            what = "missing" if isinstance(exc, FileNotFoundError) else "unreadable"
            self._lose(url, f"{what} ({type(exc).__name__}: {exc})", hi - done)
        finally:
            samples.close()  # closes the shard now, also when we stop early
            self.count_retries()

    def _lose(self, url: str, reason: str, lost: int) -> None:
        self.counters["samples_lost"] += lost
        self.corrupt.append((url, reason))
        if not self.allow_damaged:
            raise _Damaged

    def bad_sample(self, key: str, reason: str) -> None:
        """Record one sample that cannot be used (incomplete, or its bytes do not decode)."""
        self.counters["samples_lost"] += 1
        self.bad_samples.append((key, reason))
        if not self.allow_damaged:
            raise _Damaged

    def _read_tar(self, url: str, first: int) -> Iterator[tuple[int, dict]]:
        """(sample number, raw sample) from sample `first` on.

        webdataset splits the tar stream into members and groups them by key (members as
        raw bytes: no webdataset decoder runs, so nothing read is ever unpickled). Samples
        before `first` are dropped as they pass. Corruption inside the tar raises `_Corrupt`.
        """
        started = [-1]  # number of the sample whose members are streaming (-1: none yet)
        with self.open_shard(url) as f:
            try:
                members = tar_file_iterator(f)  # one forward pass, no seeks (object stores)
                samples = group_by_keys(_numbered(members, url, started), lcase=False)
                for number, sample in enumerate(samples):
                    if number >= first:
                        yield number, sample
            except (tarfile.TarError, EOFError) as exc:
                if started[0] < 0:
                    raise _Corrupt(f"not a tar file ({exc})") from None
                raise _Corrupt(f"unreadable after sample {started[0]} ({exc})") from None

    def _missing_members(self, sample: dict) -> str:
        """What the sample lacks of its members (T frames, fbank, json); "" if nothing."""
        frames = len(shards.frame_members(sample))
        missing = [f"{frames} of {self.num_frames} frames"] if frames != self.num_frames else []
        missing += [m for m in (shards.FBANK_MEMBER, shards.META_MEMBER) if m not in sample]
        return ", ".join(missing)


def _numbered(members: Iterable[dict], url: str, started: list[int]) -> Iterator[dict]:
    """Tar members as `group_by_keys` takes them (each names its shard); `started[0]`
    follows the number of the sample the latest member belongs to (for error messages)."""
    key = None
    for member in members:
        name_key = member["fname"].partition(".")[0]
        if name_key != key:
            key, started[0] = name_key, started[0] + 1
        member["__url__"] = url
        yield member


def shard_samples(url: str) -> Iterator[dict]:
    """Every raw sample of one shard, in order, parsed as the reader parses shards (members as
    raw bytes, nothing unpickled): for tools that read whole shards (batch inference).

    Raises:
        tarfile.TarError, EOFError, OSError: the shard is damaged or unreadable.
    """
    with _open_shard(url) as f:
        yield from group_by_keys(_numbered(tar_file_iterator(f), url, [-1]), lcase=False)


class _EpochDataset(IterableDataset):
    """What each DataLoader worker iterates: its slot's batches for the current epoch.

    The epoch and the resume point live in a shared-memory tensor so that persistent
    workers (which keep their copy of this object across epochs) see updates.
    """

    def __init__(self, *, root: str, urls: list[str], counts: list[int], num_frames: int,
                 rank: int, world_size: int, num_workers: int, batch_size: int, training: bool,
                 seed: int, shuffle_buffer: int, drop_last: bool,
                 open_shard: Callable[[str], BinaryIO], allow_damaged: bool):
        super().__init__()
        self.root, self.urls, self.counts, self.num_frames = root, urls, counts, num_frames
        self.rank, self.world_size, self.workers = rank, world_size, max(num_workers, 1)
        self.batch_size, self.training, self.seed = batch_size, training, seed
        self.shuffle_buffer, self.drop_last, self.open_shard = shuffle_buffer, drop_last, open_shard
        self.allow_damaged = allow_damaged
        # Endpoints that answered the main process (it read the index): a refused connection
        # to one of them is a restart, also in a spawned worker (see storage.classify).
        self.answered = set(storage.ANSWERED_ENDPOINTS)
        # epoch, batches consumed, segment; and the bitmap of positions consumed before the
        # segment (see `replan_epoch`); shared so that persistent workers see updates.
        self.control = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.consumed_bits = torch.zeros((sum(counts) + 7) // 8, dtype=torch.uint8).share_memory_()
        self._plans: dict[tuple, EpochPlan] = {}

    def plan(self, epoch: int, segment: int = 0, consumed: bytes = b"",
             slots: int | None = None) -> EpochPlan:
        """The epoch's plan (segment 0), or its re-plan number `segment` over the positions
        not in `consumed`; for this layout's slots unless `slots` is given (an old layout)."""
        slots = slots or self.world_size * self.workers
        key = (epoch, segment, consumed if segment else b"", slots)
        if key not in self._plans:
            if len(self._plans) > 8:
                self._plans.clear()
            if segment:
                self._plans[key] = replan_epoch(
                    self.counts, consumed=consumed, segment=segment, slots=slots,
                    batch_size=self.batch_size, seed=self.seed, epoch=epoch,
                    drop_last=self.drop_last)
            else:
                self._plans[key] = plan_epoch(
                    self.counts, slots=slots, batch_size=self.batch_size, training=self.training,
                    seed=self.seed, epoch=epoch, drop_last=self.drop_last)
        return self._plans[key]

    def rank_batches(self, plan: EpochPlan) -> list[int]:
        """Batches of each of this rank's workers."""
        first = self.rank * self.workers
        return list(plan.batches[first:first + self.workers])

    def __iter__(self) -> Iterator[dict]:
        storage.ANSWERED_ENDPOINTS.update(self.answered)
        info = get_worker_info()
        epoch, consumed, segment = (int(v) for v in self.control.tolist())
        plan = self.plan(epoch, segment, self.consumed_bits.numpy().tobytes() if segment else b"")
        # The DataLoader always asks worker 0 first, but after k consumed batches the
        # uninterrupted epoch would continue with worker k % W: rotate the roles so that
        # the resumed batches come in exactly the uninterrupted order.
        worker = ((info.id if info is not None else 0) + consumed) % self.workers
        slot = self.rank * self.workers + worker
        skip_batches = batches_done_per_worker(consumed, self.rank_batches(plan))[worker]
        reader = _SlotReader(self.urls, self.counts, self.num_frames, self.open_shard,
                             self.allow_damaged)
        sent = dict.fromkeys(COUNTERS, 0)

        def report() -> dict:
            reader.count_retries()
            delta = {k: reader.counters[k] - sent[k] for k in COUNTERS}
            sent.update(reader.counters)
            delta["corrupt"], reader.corrupt = reader.corrupt, []
            delta["bad_samples"], reader.bad_samples = reader.bad_samples, []
            return {"slot": slot, "epoch": epoch, "access_error": "", **delta}

        start, stop = plan.ranges[slot]
        take = plan.take[slot]
        if self.training:
            rng = shuffle_rng(self.seed, epoch, plan.segment, slot)
            if plan.segment:
                # Its run of the remaining positions; refills come from the other remaining
                # positions (never from those consumed before the re-plan).
                remaining = [p for run in plan.picks for p in run]
                raw = shuffled(reader.picked(plan, start, stop, plan.picks[slot]),
                               self.shuffle_buffer, rng)
                refill = reader.picked(plan, stop, stop + plan.total, remaining)
            else:
                raw = shuffled(reader.positions(plan, start, stop), self.shuffle_buffer, rng)
                # Refill: samples lost to damage are replaced by reading on past the range
                # (wrapping), at most one full pass, so every slot still yields `take`.
                refill = reader.positions(plan, stop, stop + plan.total)
        else:
            raw, refill = reader.positions(plan, start, stop), iter(())

        skip_raw = skip_batches * self.batch_size
        reader.counters["skipped_for_resume"] = skip_raw
        wanted = take - skip_raw

        def decoded() -> Iterator[dict]:
            pulled = 0
            for source in (raw, refill):
                for sample in source:
                    pulled += 1
                    if pulled <= skip_raw:
                        continue  # consumed before the checkpoint: regenerated, not decoded
                    if source is refill:
                        reader.counters["refilled"] += 1
                    try:
                        out = shards.decode_sample(sample)
                    except Exception as exc:  # noqa: BLE001 - bad bytes in one sample
                        reader.counters["decode_errors"] += 1
                        reader.bad_sample(sample["__key__"], f"{sample['__url__']}: does not "
                                          f"decode ({type(exc).__name__}: {exc})")
                        continue
                    reader.counters["decoded"] += 1
                    yield out

        access_error = ""
        try:
            samples = decoded()
            batch: list[dict] = []
            batch_number, produced = skip_batches, 0
            while produced < wanted:
                sample = next(samples, None)
                if sample is None:
                    break
                batch.append(sample)
                produced += 1
                if len(batch) == self.batch_size or produced == wanted:
                    out = collate(batch)
                    out["_reader"] = {"slot": slot, "batch": batch_number, "stats": report()}
                    batch_number += 1
                    batch = []
                    yield out
            samples.close()
            if self.training and produced < wanted:
                raise DataDamageError(
                    f"reader slot {slot}: only {produced} of {wanted} samples readable in the "
                    "whole split (see the damaged shards logged); " + what_to_do(self.root))
            if batch:  # eval: the last partial batch
                out = collate(batch)
                out["_reader"] = {"slot": slot, "batch": batch_number, "stats": report()}
                yield out
        except _Damaged:
            pass  # recorded by the reader: the report below takes it to the main process
        except storage.StorageAccessError as exc:
            access_error = str(exc)  # raised in the main process, without a worker wrapper
        # The last report; the main process raises on damage (unless allowed) or an access
        # error in it, so that the message naming the shard reaches the caller as it is.
        final = {**report(), "access_error": access_error}
        if (access_error or final["corrupt"] or final["bad_samples"]
                or any(final[k] for k in COUNTERS)):
            yield {"_reader": {"slot": slot, "batch": None, "stats": final}}


def _passthrough(item: Any) -> Any:
    """The DataLoader's per-item convert: batches are already tensors."""
    return item


class ShardStream:
    """Exact-epoch batches from an avpea shard set for one rank.

    Args:
        index_url: the split's directory/prefix (or its shards.json), or a read ShardIndex.
        batch_size: samples per batch.
        training: True for training (shuffled, equal steps on every rank), False for
            evaluation (index order, every sample exactly once).
        rank, world_size: this rank and the number of ranks; default to Ray Train's context
            inside a Train worker, else 0 and 1.
        num_workers: DataLoader worker processes per rank (0 reads in the main process).
        seed: seed of the shard permutation and shuffle buffers.
        shuffle_buffer: raw samples held per worker for shuffling (training); memory is
            about shuffle_buffer x compressed sample size (~0.6 MB at T=10, 224 px).
        epoch: the epoch to start at.
        drop_last: training: cut each slot to whole batches (see the module docstring).
        persistent_workers, pin_memory, prefetch_factor, multiprocessing_context: passed to
            the DataLoader.
        open_shard: opens a shard URL for binary reading (default: `storage.open_url`;
            the storage library retries transient errors underneath).
        allow_damaged: False (default): a missing, truncated or corrupt shard, or a sample
            that does not decode, raises `DataDamageError` naming it. True: such damage is
            logged, counted in `stats` and skipped (training refills the lost samples).
    """

    def __init__(self, index_url: str | shards.ShardIndex, *, batch_size: int, training: bool,
                 rank: int | None = None, world_size: int | None = None, num_workers: int = 2,
                 seed: int = 0, shuffle_buffer: int = 256, epoch: int = 0,
                 drop_last: bool = True, persistent_workers: bool = False,
                 pin_memory: bool = False, prefetch_factor: int | None = None,
                 multiprocessing_context: Any = None,
                 open_shard: Callable[[str], BinaryIO] | None = None,
                 allow_damaged: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rank is None or world_size is None:
            ray_rank, ray_world = ray_train_rank_and_world()
            rank = ray_rank if rank is None else rank
            world_size = ray_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.index = (index_url if isinstance(index_url, shards.ShardIndex)
                      else shards.read_index(index_url))
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.batch_size, self.training, self.seed = batch_size, training, seed
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.epoch, self.batches_consumed = epoch, 0
        # A resumed epoch whose layout changed: re-plan number `segment` of the positions not
        # in `consumed` (segment 0 with nothing consumed: the epoch as first planned).
        self.segment, self.consumed = 0, ConsumedBits(self.index.total_samples)
        self.allow_damaged = allow_damaged
        self.index_id = shards.index_id(self.index)
        self._dataset = _EpochDataset(
            root=self.index.root, urls=self.index.shard_urls(),
            counts=[s.samples for s in self.index.shards], num_frames=self.index.num_frames,
            rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size, training=training, seed=seed,
            shuffle_buffer=shuffle_buffer if training else 0, drop_last=drop_last,
            open_shard=open_shard or _open_shard, allow_damaged=allow_damaged)
        self._plan(epoch)  # fail early on an impossible layout
        loader_kw: dict[str, Any] = {}
        if num_workers > 0:
            loader_kw.update(persistent_workers=persistent_workers,
                             multiprocessing_context=multiprocessing_context)
            if prefetch_factor is not None:
                loader_kw["prefetch_factor"] = prefetch_factor
        # Its own generator: each new iterator draws the workers' base seed from it, not from
        # the global torch RNG, so starting an epoch (or resuming one) leaves the training RNG
        # (dropout, checkpointed per rank) where it was.
        self._loader = DataLoader(self._dataset, batch_size=None, num_workers=num_workers,
                                  collate_fn=_passthrough, pin_memory=pin_memory,
                                  generator=torch.Generator().manual_seed(seed), **loader_kw)
        self._stats = dict.fromkeys(COUNTERS, 0)
        self._corrupt: dict[str, str] = {}
        self._bad_samples: dict[str, str] = {}

    # -- layout -------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """Reader slots in the job: world_size x loader workers."""
        return self.world_size * max(self.num_workers, 1)

    def _plan(self, epoch: int | None = None) -> EpochPlan:
        if epoch is None or epoch == self.epoch:
            return self._dataset.plan(self.epoch, self.segment, bytes(self.consumed.bits))
        return self._dataset.plan(epoch)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch's layout (for inspection and tests)."""
        return self._plan(epoch)

    @property
    def steps_per_epoch(self) -> int:
        """Batches this rank yields per epoch (the same on every rank in training)."""
        return sum(self._dataset.rank_batches(self._plan()))

    @property
    def steps_left(self) -> int:
        """Batches this rank still yields in the current epoch (after a resume at another
        layout: of the re-planned rest, not `steps_per_epoch` minus the steps done)."""
        return self.steps_per_epoch - self.batches_consumed

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of the split the epoch leaves out (training; 0 in evaluation)."""
        plan = self._plan()
        return plan.total - sum(plan.take)

    # -- iteration ----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (from its start, unless it is already the current epoch)."""
        if epoch != self.epoch:
            self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_consumed = epoch, 0
        self.segment, self.consumed = 0, ConsumedBits(self.index.total_samples)

    def loader(self) -> DataLoader:
        """The underlying DataLoader (iterate the stream itself to count batches)."""
        return self._loader

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        """The current epoch's remaining batches (one iteration at a time per stream).

        Batches are dicts (see `collate`). Each handed-out batch counts as consumed, so a
        checkpoint taken after processing it resumes after it; once the epoch's last batch
        is handed out the position moves to the start of the next epoch (so a checkpoint
        taken then resumes there, and the next iteration reads that epoch).

        Raises `DataDamageError` (naming the shard or sample) at the first damage unless
        allow_damaged, and `storage.StorageAccessError` on permission, credential or
        endpoint errors, also when a loader worker met them.
        """
        epoch = self.epoch
        per_worker = self._dataset.rank_batches(self._plan())
        steps = sum(per_worker)
        self._dataset.control.copy_(torch.tensor([self.epoch, self.batches_consumed, self.segment]))
        if self.consumed.bits:
            self._dataset.consumed_bits.copy_(torch.frombuffer(bytearray(self.consumed.bits),
                                                               dtype=torch.uint8))
        order = self._expected_order(per_worker)
        for item in self._loader:
            info = item.pop("_reader")
            self._absorb(info["stats"])
            if info["batch"] is None:
                continue  # a worker's last report, no data
            expected = next(order, None)
            # Training slots yield exactly their planned batches, so the DataLoader's
            # round-robin is fully predictable; check it (eval counts may shrink on damage).
            if self.training and (info["slot"], info["batch"]) != expected:
                raise RuntimeError(
                    f"reader: got batch {info['batch']} of slot {info['slot']}, expected "
                    f"{expected}; the DataLoader must hand out worker batches in order "
                    "(in_order=True) for exact resume")
            self.batches_consumed += 1
            if self.batches_consumed == steps:
                self._start_epoch(epoch + 1)
            yield item
        if self.epoch == epoch:
            # Ended early: evaluation over damaged shards yields fewer than the nominal steps.
            self._start_epoch(epoch + 1)

    def _expected_order(self, per_worker: list[int]) -> Iterator[tuple[int, int]]:
        """(slot, batch number) of the batches still to come, in DataLoader order."""
        done = batches_done_per_worker(self.batches_consumed, per_worker)
        first = self.rank * max(self.num_workers, 1)
        for j in range(max(per_worker, default=0)):
            for w, n in enumerate(per_worker):
                if done[w] <= j < n:
                    yield first + w, j

    def _absorb(self, report: dict) -> None:
        """Add a worker's report to `stats`; raise what it says went wrong (unless allowed)."""
        for k in COUNTERS:
            self._stats[k] += report[k]
        if report["access_error"]:
            raise storage.StorageAccessError(report["access_error"])
        if not self.allow_damaged and (report["corrupt"] or report["bad_samples"]):
            found = [f"shard {url} is damaged: {reason}" for url, reason in report["corrupt"]]
            found += [f"sample {key} is damaged ({reason})"
                      for key, reason in report["bad_samples"]]
            raise DataDamageError("; ".join(found) + "; " + what_to_do(self.index.root))
        for url, reason in report["corrupt"]:
            if url not in self._corrupt:
                log.warning("skipped damaged shard %s: %s", url, reason)
            self._corrupt.setdefault(url, reason)
        for key, reason in report["bad_samples"]:
            log.warning("skipped damaged sample %s (%s)", key, reason)
            self._bad_samples.setdefault(key, reason)

    @property
    def stats(self) -> dict:
        """Counters since this object was made, summed over this rank's workers.

        Keys: the `COUNTERS` (raw_read, decoded, samples_lost, decode_errors,
        incomplete_samples, refilled, retries, skipped_for_resume), `corrupt_shards` (URLs,
        first seen first), `corrupt_reasons` (URL -> reason) and `bad_samples` (key ->
        reason: samples that are incomplete or whose bytes did not decode).

        Damage is only counted with allow_damaged=True (otherwise it raises). samples_lost
        counts every sample not delivered because of damage: the rest of a missing,
        truncated or corrupt shard, and each incomplete or undecodable sample (also counted
        in incomplete_samples / decode_errors). In evaluation that is exactly the samples of
        this rank's share of the split that were not evaluated (sum it over ranks); in
        training lost samples are replaced (`refilled`), and a damaged shard met again
        while refilling counts again.
        """
        return {**self._stats, "corrupt_shards": list(self._corrupt),
                "corrupt_reasons": dict(self._corrupt), "bad_samples": dict(self._bad_samples)}

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position, for a checkpoint (identical on every rank in training).

        `index_id` (`shards.index_id`) names the shard set the position refers to. Within
        the epoch, `consumed` (a `ConsumedBits` text) holds the positions trained on before
        the current `segment` (0: none, the epoch as first planned); with `batches_consumed`
        and the layout (world_size, num_workers) of the segment, that says exactly which
        samples the epoch has consumed, whatever layout resumes it.
        """
        return {"version": STATE_VERSION, "index_id": self.index_id, "epoch": self.epoch,
                "batches_consumed": self.batches_consumed, "seed": self.seed,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "training": self.training, "drop_last": self.drop_last,
                "total_samples": self.index.total_samples, "segment": self.segment,
                "consumed": self.consumed.to_text() if self.segment else ""}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`.

        The same layout (world size and loader workers) continues the segment batch by batch
        in the uninterrupted order. A training state from another layout re-plans the rest of
        the epoch (`replan_epoch`): the positions its segment had consumed (replayed from its
        plan) join `consumed`, and the remaining ones are spread over this layout's slots, so
        each sample not yet trained on in the epoch is trained on once and none again.

        Raises ValueError when the shard set is not the checkpoint's (its `index_id`
        differs: re-sharded data; or, in training, the state has none to compare), and
        naming each other setting that differs (batch size, seed, shuffle buffer, drop_last;
        in evaluation also the layout).
        """
        mine = self.state_dict()
        theirs = state.get("index_id")
        if theirs is None and self.training:
            raise ValueError(
                "cannot verify that the checkpoint's data position refers to the shards at "
                f"{self.index.root}: the state has no index_id (written by an older reader). "
                "Restart the epoch with set_epoch(), or start a new run.")
        if theirs is not None and theirs != self.index_id:
            raise ValueError(
                f"the shard set changed since the checkpoint (re-sharded data?): the "
                f"checkpoint's index_id is {theirs}, the index at {self.index.root} has "
                f"{self.index_id}, so its positions name other samples. Resume on the shards "
                "the checkpoint was taken on, or restart the epoch with set_epoch().")
        keys = ("batch_size", "seed", "shuffle_buffer", "training", "drop_last", "total_samples")
        if not self.training:
            keys += ("world_size", "num_workers")
        diffs = [f"{k}: checkpoint {state[k]!r}, now {mine[k]!r}"
                 for k in keys if k in state and state[k] != mine[k]]
        if diffs:
            raise ValueError(
                "cannot resume the data position exactly; the reader settings differ from "
                "the checkpoint's (" + "; ".join(diffs) + "). Resume with the same settings "
                "or restart the epoch with set_epoch().")
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        segment = int(state.get("segment", 0))
        bits = ConsumedBits.from_text(self.index.total_samples, state.get("consumed", "") if segment else "")
        world, workers = int(state["world_size"]), max(int(state["num_workers"]), 1)
        old = self._dataset.plan(epoch, segment, bytes(bits.bits), slots=world * workers)
        old_steps = sum(old.batches[:workers])  # every rank's step count in training
        if consumed > old_steps:
            raise ValueError(f"checkpoint consumed {consumed} batches of an epoch that has "
                             f"{old_steps}")
        self._start_epoch(epoch)
        if consumed == old_steps:  # a finished epoch (segment): continue with the next
            self._start_epoch(epoch + 1)
            return
        if (world, workers) == (self.world_size, max(self.num_workers, 1)):
            self.segment, self.consumed, self.batches_consumed = segment, bits, consumed
            return
        # Another layout: which positions did the old one's slots hand out? Every rank had
        # consumed the same number of batches, spread over its workers round-robin.
        done = [d for rank in range(world)
                for d in batches_done_per_worker(consumed, list(old.batches[rank * workers:(rank + 1) * workers]))]
        for position in consumed_positions(old, done, batch_size=self.batch_size,
                                           shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                                           epoch=epoch):
            bits.add(position)
        self.segment, self.consumed = segment + 1, bits
        if self.steps_per_epoch == 0:
            # What is left gives no slot a whole batch: it is the epoch's remainder (fewer
            # than slots x batch_size samples), dropped as the remainder always is.
            self._start_epoch(epoch + 1)


def check_shards_present(index: shards.ShardIndex | str) -> list[str]:
    """A cheap pre-run check: is every shard the index lists there, with its listed size?

    Lists each folder holding shards once (normally only the index's root) and reads no
    shard, so the driver can call it before any worker starts.

    Args:
        index: a read index, or the split's URL.

    Returns:
        One problem per listed shard that is missing or whose size differs from the
        index's `bytes`, naming its URL; [] when all are there. Permission, credential and
        endpoint errors raise `storage.StorageAccessError`.
    """
    if isinstance(index, str):
        index = shards.read_index(index)
    listings: dict[str, dict[str, int]] = {}
    problems = []
    for url, info in zip(index.shard_urls(), index.shards):
        folder, _, name = url.rpartition("/")
        if folder not in listings:
            listings[folder] = storage.list_sizes(folder or ".")
        size = listings[folder].get(name)
        if size is None:
            problems.append(f"{url}: missing (listed in the index, not on storage)")
        elif size != info.bytes:
            problems.append(f"{url}: {size} bytes, the index lists {info.bytes} "
                            "(truncated or replaced?)")
    return problems


__all__ = ["ShardStream", "DataDamageError", "check_shards_present", "EpochPlan",
           "plan_epoch", "replan_epoch", "consumed_positions", "ConsumedBits", "shuffle_rng", "batches_done_per_worker", "collate", "shuffled",
           "ray_train_rank_and_world", "what_to_do", "COUNTERS"]
