"""Check a sharded split before training on it.

    python -m sharding.validate URL [--ranks R] [--loader-workers W]

Checks the index (shards.json) and every shard it lists: present, size and sha256 as listed,
a readable tar whose members are grouped per sample and complete (frame00.jpg ...
frame{T-1}.jpg, fbank.npy, json), every JPEG/npy/json decodable with the shapes the index
promises, the json's dataset-specific fields (VALOR: video_id, captions), sample counts as
listed, no key twice; side files (vocab.json, vocab.txt) match their sha256.
Prints one line per problem naming the shard; exit 1 if any, 0 if none.

With fewer shards than R ranks x W loader workers it also prints a warning (exit status
unchanged): the reader handles that layout (readers then share a shard, each skipping to
its own part), but each shared shard is read from its start by every reader that shares it,
which costs extra reading; a smaller --max-shard-bytes gives every reader a shard of its own.

Only files under the index's directory are read: a shard url (or side file name) that is
empty, absolute, has a scheme or a '..' component is reported and never opened, and so is a
local file that is not a regular file (a device, a FIFO, a symlink to /dev/zero). A shard is
read up to one byte past its listed size, never further.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
from typing import Iterator, Sequence

from avpea_ray.data import shards, storage
from sharding import common


class _HashingReader:
    """A read-only stream wrapper that hashes and counts the bytes read through it.

    Reads stop after `limit` bytes (then read() returns b"" as at the end of the file).
    """

    def __init__(self, f, limit: int):
        self._f = f
        self.limit = limit
        self.sha256 = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        left = self.limit - self.count
        if left <= 0:
            return b""
        data = self._f.read(left if size is None or size < 0 else min(size, left))
        self.sha256.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (or the limit) so that the digest covers the whole file."""
        while self.read(1 << 20):
            pass


def iter_samples(tar: tarfile.TarFile, problems: list[str]) -> Iterator[tuple[str, dict]]:
    """Group a tar's members into samples by key (the name up to the first dot).

    Members of one sample must be adjacent (webdataset reads them in one pass); a key that
    comes back after another key is reported.
    """
    current, members, done = None, {}, set()
    for info in tar:
        if not info.isfile():
            continue
        key, dot, member = info.name.partition(".")
        if not dot:
            problems.append(f"member {info.name!r} has no '.<member>' suffix")
            continue
        data = tar.extractfile(info).read()
        if key != current:
            if current is not None:
                yield current, members
                done.add(current)
            if key in done:
                problems.append(f"sample {key}: members are not adjacent in the tar")
            current, members = key, {}
        members[member] = data
    if current is not None:
        yield current, members


def check_valor_meta(meta: dict) -> list[str]:
    """VALOR: a non-empty string `video_id` and a non-empty list of non-empty captions."""
    problems = []
    if not isinstance(meta.get("video_id"), str) or not meta["video_id"]:
        problems.append("'video_id' should be a non-empty string, got "
                        f"{meta.get('video_id')!r:.40}")
    captions = meta.get("captions")
    if not (isinstance(captions, list) and captions
            and all(isinstance(c, str) and c.strip() for c in captions)):
        problems.append("'captions' should be a non-empty list of non-empty strings, got "
                        f"{captions!r:.60}")
    return problems


# index.dataset -> the checks of its samples' json (beyond being an object).
META_CHECKS = {"valor": check_valor_meta}


def check_sample(key: str, members: dict, index: shards.ShardIndex) -> list[str]:
    """Problems with one sample's members (missing, undecodable, wrong shape)."""
    problems = []
    t = index.num_frames
    expected = [f"frame{i:02d}.jpg" for i in range(t)] + [shards.FBANK_MEMBER, shards.META_MEMBER]
    missing = [m for m in expected if m not in members]
    if missing:
        problems.append(f"sample {key}: missing member(s) {', '.join(missing)}")
    for name in expected[:t]:
        if name not in members:
            continue
        try:
            frame = shards.decode_jpeg(members[name])
        except Exception as exc:  # noqa: BLE001 - PIL error types vary
            problems.append(f"sample {key}: {name} is not a decodable JPEG ({exc})")
            continue
        size = index.image_size
        if frame.shape[:2] != (size, size):
            problems.append(f"sample {key}: {name} is {frame.shape[1]}x{frame.shape[0]}, "
                            f"the index says {size}x{size}")
    if shards.FBANK_MEMBER in members:
        try:
            fbank = shards.decode_npy(members[shards.FBANK_MEMBER])
            want = (t, index.audio.get("target_frames"), index.audio.get("num_mel_bins"))
            if fbank.shape != want or fbank.dtype.name != "float16":
                problems.append(f"sample {key}: fbank.npy is {fbank.dtype} {fbank.shape}, "
                                f"expected float16 {want}")
        except Exception as exc:  # noqa: BLE001 - numpy raises ValueError/OSError/...
            problems.append(f"sample {key}: fbank.npy is not a readable .npy ({exc})")
    if shards.META_MEMBER in members:
        try:
            meta = json.loads(members[shards.META_MEMBER].decode("utf-8"))
            if not isinstance(meta, dict):
                problems.append(f"sample {key}: json is not an object")
            elif index.dataset in META_CHECKS:
                problems.extend(f"sample {key}: json {p}"
                                for p in META_CHECKS[index.dataset](meta))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"sample {key}: json is not valid JSON ({exc})")
    return problems


def _not_regular(url: str) -> bool:
    """Whether `url` is a local path to something other than a regular file (or a link to one)."""
    return storage.is_local(url) and not os.path.isfile(storage.local_path(url))


def check_shard(url: str, info: shards.ShardInfo, index: shards.ShardIndex,
                seen: dict[str, str]) -> list[str]:
    """Problems with one shard (each line without the shard's name; the caller adds it).

    Args:
        url: the shard's absolute URL.
        info: what the index says about it.
        index: the index (shapes).
        seen: key -> shard name, across shards, to find duplicate keys.
    """
    if not storage.exists(url):
        return ["missing (listed in the index but not on storage)"]
    if _not_regular(url):
        # A device, FIFO or directory: reading /dev/zero never ends, opening a FIFO blocks.
        return ["not a regular file; not opened"]
    problems: list[str] = []
    actual = storage.size(url)
    if actual != info.bytes:
        problems.append(f"size is {actual} bytes, the index says {info.bytes} "
                        "(truncated or replaced?)")
    keys: list[str] = []
    with storage.open_url(url, "rb") as f:
        # One byte past the listed size tells a longer file from a complete one without
        # reading an unbounded stream.
        reader = _HashingReader(f, limit=info.bytes + 1)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for key, members in iter_samples(tar, problems):
                    keys.append(key)
                    if key in seen:
                        problems.append(f"sample {key}: also in {seen[key]}")
                    seen[key] = info.url
                    problems.extend(check_sample(key, members, index))
        except (tarfile.TarError, EOFError, OSError) as exc:
            problems.append(f"not a readable tar ({type(exc).__name__}: {exc}); "
                            f"read {len(keys)} sample(s) before that")
        reader.drain()
    if reader.count > info.bytes and actual <= info.bytes:  # else the size line said it
        problems.append(f"longer than the {info.bytes} bytes the index says "
                        "(grew while being read?)")
    if reader.sha256.hexdigest() != info.sha256:
        problems.append(f"sha256 mismatch: file {reader.sha256.hexdigest()[:16]}..., "
                        f"index {info.sha256[:16]}...")
    if len(keys) != info.samples:
        problems.append(f"holds {len(keys)} samples, the index says {info.samples}")
    if info.keys_sha256:
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        if digest != info.keys_sha256:
            problems.append("sample keys differ from those the index recorded")
    return problems


def validate(url: str, ranks: int = 1, loader_workers: int = 1, progress: bool = False) -> list[str]:
    """All problems of a sharded split, one line each naming the shard or file.

    Args:
        url: the split's directory/prefix or its shards.json.
        ranks, loader_workers: accepted for callers that pass the training layout; a layout
            with more readers than shards is not a problem (see `layout_warnings`).
        progress: a bar over the shards (bytes read, rate, ETA) on stderr.

    Returns:
        Problem lines; empty if the split is good.
    """
    try:
        index = shards.read_index(url)
    except shards.ShardIndexError as exc:
        return [str(exc)]
    from tqdm import tqdm

    problems = []
    seen: dict[str, str] = {}
    bar = tqdm(total=sum(s.bytes for s in index.shards), desc="validating", unit="B", unit_scale=True,
               disable=not progress)
    for i, (shard_url, info) in enumerate(zip(index.shard_urls(), index.shards)):
        reason = shards.url_problem(info.url)
        if reason:
            problems.append(f"shards[{i}] {info.url!r}: {reason}, not a plain name under "
                            f"{index.root}; not opened")
        else:
            problems.extend(f"{info.url}: {p}" for p in check_shard(shard_url, info, index, seen))
        bar.update(info.bytes)
    bar.close()
    for name, digest in (index.extra.get("files") or {}).items():
        reason = shards.url_problem(name)
        if reason:
            problems.append(f"extra.files {name!r}: {reason}, not a plain name under "
                            f"{index.root}; not opened")
            continue
        file_url = storage.join(index.root, name)
        if not storage.exists(file_url):
            problems.append(f"{name}: missing (the index records it)")
            continue
        if _not_regular(file_url):
            problems.append(f"{name}: not a regular file; not opened")
            continue
        data = storage.read_bytes(file_url)
        if hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{name}: sha256 differs from the index (written by another run?)")
    return problems


def layout_warnings(index: shards.ShardIndex, ranks: int = 1,
                    loader_workers: int = 1) -> list[str]:
    """Notes on a split that works but reads more than it needs to (not problems).

    Args:
        index: the split's index.
        ranks: training ranks that will read it.
        loader_workers: DataLoader workers per rank.

    Returns:
        One line if the split has fewer shards than readers, else nothing.
    """
    readers = max(1, ranks) * max(1, loader_workers)
    if len(index.shards) >= readers:
        return []
    return [f"{index.root}: {len(index.shards)} shard(s) for {ranks} rank(s) x "
            f"{loader_workers} loader worker(s) = {readers} readers: readers share shards, "
            f"each reading a shared shard from its start up to its own part (extra reading, "
            f"no error); a smaller --max-shard-bytes gives every reader its own shard"]


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Validate a split; print problems (or a one-line OK). Returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog or "python -m sharding.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the split's directory/prefix (or its shards.json)")
    parser.add_argument("--ranks", type=common.positive_int, default=1,
                        help="training ranks (default %(default)s)")
    parser.add_argument("--loader-workers", type=common.positive_int, default=1,
                        help="DataLoader workers per rank (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none when stderr is not a terminal)")
    args = parser.parse_args(argv)
    problems = validate(args.url, args.ranks, args.loader_workers,
                        progress=not args.no_progress and sys.stderr.isatty())
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {args.url}", file=sys.stderr)
        return 1
    index = shards.read_index(args.url)
    for line in layout_warnings(index, args.ranks, args.loader_workers):
        print(f"warning: {line}")
    total = sum(s.bytes for s in index.shards)
    print(f"OK {args.url}: {len(index.shards)} shards, {index.total_samples} samples, "
          f"{total} bytes ({index.dataset} {index.split})")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
