"""The shard format (avpea-shards/1): sample encoding, the index, and the shard writer.

docs/data_format.md describes the layout; this module is its single implementation, shared by
the writers in `sharding/` and the reader in `avpea_ray/data/reader.py`.

Publication order is what makes a rerun safe: every shard is written under a temporary
name and published whole, shard names carry a per-run id (so a rerun never overwrites a
shard the current index lists), the index is replaced atomically only after all of its
shards exist, and only then are the previous run's shards deleted.

The writer deletes only what it can prove is its own: the shards that the index it replaces
listed for the same split (plain names directly in the output folder) and the new index no
longer lists, and locally the hidden temp files its own naming produces for this split's
shards and the index. Every other file in the output folder stays, however it is named
(a user's `imagenet-000000.tar`, another split's shards, shards a killed run published).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from webdataset import TarWriter

from avpea_ray.data import storage

INDEX_NAME = "shards.json"
FORMAT = "avpea-shards/1"
JPEG_QUALITY = 90
FBANK_MEMBER = "fbank.npy"
META_MEMBER = "json"

_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_FRAME_MEMBER = re.compile(r"^frame(\d+)\.jpg$")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
# Shards this module writes: <split>-<8 hex run id>-<6 digits>.tar (the run id is optional so
# that shards named by an older writer, listed by its index, are still cleaned up).
SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-(?:[0-9a-f]{8}-)?\d{6}\.tar$")
# The suffix storage.local_temp_path gives a temp file: tempfile.mkstemp's 8 random characters.
_TEMP_SUFFIX = r"\.tmp-[a-z0-9_]{8}"
# An index url's scheme ("s3:", "file:", "pipe:"): such a url leaves the index's root.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

# webdataset.TarWriter options: every member the writer passes is written as given (bytes, no
# encoder; keep_meta so that a member named "_x" is not dropped, "__key__" never becomes a
# member), with fixed header fields so that the same input gives the same bytes (uid and gid
# are tarfile's default 0: TarWriter does not set them).
_TAR_OPTIONS = {"encoder": False, "keep_meta": True, "mtime": 0, "user": "", "group": "",
                "mode": 0o644}
# What closing a TarWriter appends (tarfile's close): two zero blocks of end-of-archive,
# then zeros up to a multiple of the record size.
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE   # 1024
_RECORD = tarfile.RECORDSIZE              # 10240


class ShardIndexError(ValueError):
    """The shard index is missing or malformed (message names the URL and the field)."""


class ShardIndexNotFound(ShardIndexError, FileNotFoundError):
    """No shards.json at the given location."""


@dataclass
class ShardInfo:
    """One shard as the index lists it.

    Args:
        url: relative to the index's directory (or absolute).
        samples: samples in the shard.
        bytes: file size.
        sha256: hex digest of the whole file.
        keys_sha256: hex digest of the newline-joined sample keys, in order.
    """

    url: str
    samples: int
    bytes: int
    sha256: str
    keys_sha256: str = ""


@dataclass
class ShardIndex:
    """The content of shards.json plus where it was read from (`root`).

    Args:
        dataset, split: what the shards hold ("musicavqa", "train").
        num_frames: T, frames (and audio windows) per sample.
        image_size: frame side in pixels.
        audio: the `AudioConfig` fields the fbank windows were made with.
        shards: the shards, in order.
        total_samples: sum of the shards' samples.
        root: the directory/prefix holding shards.json.
        extra: dataset-specific facts (vocabulary file, category names, ...).
        created: UTC time the index was written.
        run: id of the writer run that produced the shards.
    """

    dataset: str
    split: str
    num_frames: int
    image_size: int
    audio: dict
    shards: list[ShardInfo]
    total_samples: int
    root: str
    extra: dict = field(default_factory=dict)
    created: str = ""
    run: str = ""

    def shard_urls(self) -> list[str]:
        """Absolute URLs (or paths) of the shards, in index order."""
        return [storage.join(self.root, s.url) for s in self.shards]

    def to_json(self) -> dict:
        """The shards.json document (without `root`, which is where it lives)."""
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "split": self.split,
            "created": self.created,
            "run": self.run,
            "num_frames": self.num_frames,
            "image_size": self.image_size,
            "audio": self.audio,
            "total_samples": self.total_samples,
            "shards": [asdict(s) for s in self.shards],
            "extra": self.extra,
        }


def url_problem(url: str) -> str:
    """Why an index's shard url is not a plain relative name under the index's root.

    Args:
        url: a `ShardInfo.url`.

    Returns:
        "" for a plain relative name ("train-3f9c2a1b-000000.tar", "part/x.tar"); otherwise
        the reason (empty, absolute path, url with a scheme, '..' path component).
    """
    if not url:
        return "empty url"
    if url.startswith("/") or os.path.isabs(url):
        return "absolute path"
    if _URL_SCHEME.match(url):
        return "url with a scheme"
    if ".." in url.split("/"):
        return "'..' path component"
    return ""


def index_location(url: str) -> tuple[str, str]:
    """Split a dataset URL into (root directory, index URL).

    Args:
        url: the directory/prefix, or the shards.json itself.

    Returns:
        `(root, index_url)`.
    """
    stripped = url.rstrip("/")
    if stripped.endswith("/" + INDEX_NAME) or stripped == INDEX_NAME:
        root = stripped[: -len(INDEX_NAME)].rstrip("/") or "."
        return root, stripped
    return stripped or url, storage.join(stripped or url, INDEX_NAME)


def _require(doc: dict, name: str, kind: type | tuple, where: str):
    if name not in doc:
        raise ShardIndexError(f"{where}: field '{name}' is missing")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ShardIndexError(f"{where}: field '{name}' should be {expected}, "
                              f"got {type(value).__name__} {value!r:.60}")
    return value


def parse_index(doc: Any, root: str, where: str) -> ShardIndex:
    """Check a decoded shards.json document and turn it into a `ShardIndex`.

    Args:
        doc: the decoded JSON.
        root: the directory holding it.
        where: the index URL, for messages.

    Returns:
        The index. Raises `ShardIndexError` naming the field on any problem.
    """
    if not isinstance(doc, dict):
        raise ShardIndexError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise ShardIndexError(f"{where}: field 'format' is {fmt!r}, expected {FORMAT!r} "
                              "(written by another tool or version?)")
    shards = []
    for i, entry in enumerate(_require(doc, "shards", list, where)):
        at = f"{where}: shards[{i}]"
        if not isinstance(entry, dict):
            raise ShardIndexError(f"{at}: expected an object")
        shards.append(ShardInfo(
            url=_require(entry, "url", str, at),
            samples=_require(entry, "samples", int, at),
            bytes=_require(entry, "bytes", int, at),
            sha256=_require(entry, "sha256", str, at),
            keys_sha256=entry.get("keys_sha256", "") or "",
        ))
    index = ShardIndex(
        dataset=_require(doc, "dataset", str, where),
        split=_require(doc, "split", str, where),
        num_frames=_require(doc, "num_frames", int, where),
        image_size=_require(doc, "image_size", int, where),
        audio=_require(doc, "audio", dict, where),
        shards=shards,
        total_samples=_require(doc, "total_samples", int, where),
        root=root,
        extra=doc.get("extra") or {},
        created=doc.get("created", ""),
        run=doc.get("run", ""),
    )
    counted = sum(s.samples for s in shards)
    if counted != index.total_samples:
        raise ShardIndexError(f"{where}: total_samples is {index.total_samples} but the shards "
                              f"list {counted} samples")
    return index


def read_index(url: str) -> ShardIndex:
    """Read and check a shard index.

    Args:
        url: the dataset directory/prefix, or its shards.json.

    Returns:
        The `ShardIndex`. Raises `ShardIndexNotFound` / `ShardIndexError` with a message
        naming the URL (and the field) when it is missing or malformed.
    """
    root, index_url = index_location(url)
    if "://" not in root:
        # Absolute, so that shard paths stay valid in processes with another working
        # directory (Ray workers, DataLoader workers).
        root, index_url = os.path.abspath(root), os.path.abspath(index_url)
    try:
        raw = storage.read_bytes(index_url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ShardIndexNotFound(
            f"{index_url}: no shard index here; expected the {INDEX_NAME} that "
            "python -m sharding.musicavqa / sharding.ave / sharding.synth writes") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardIndexError(f"{index_url}: not valid JSON ({exc})") from None
    return parse_index(doc, root, index_url)


def sample_key(video_id: str) -> str:
    """The `__key__` for a video: characters outside [A-Za-z0-9_-] become '_'.

    webdataset splits member names at the first dot, so keys must not contain dots.

    Args:
        video_id: the dataset's id ("00000093", "-0A9suni5YA").

    Returns:
        The key. Raises ValueError for an empty id.
    """
    video_id = str(video_id)
    if not video_id:
        raise ValueError("empty video id")
    return _KEY_BAD_CHARS.sub("_", video_id)


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 RGB frame."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 frame, got {frame.shape} {frame.dtype}")
    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_sample(key: str, frames: list[np.ndarray], fbank: np.ndarray | torch.Tensor,
                  meta: dict) -> dict:
    """Serialise one video into the members of a sample.

    Args:
        key: from `sample_key` (no dots).
        frames: T (H, W, 3) uint8 RGB frames, already resized.
        fbank: (T, F, M) or (T, 1, F, M) normalised log-mel windows; stored as float16.
        meta: JSON-serialisable metadata.

    Returns:
        `{"__key__": key, "frame00.jpg": bytes, ..., "fbank.npy": bytes, "json": bytes}`.
    """
    if not key or _KEY_BAD_CHARS.search(key):
        raise ValueError(f"sample key {key!r} must be non-empty [A-Za-z0-9_-] (see sample_key)")
    fb = fbank.detach().cpu().numpy() if isinstance(fbank, torch.Tensor) else np.asarray(fbank)
    if fb.ndim == 4 and fb.shape[1] == 1:
        fb = fb[:, 0]
    if fb.ndim != 3 or fb.shape[0] != len(frames):
        raise ValueError(f"fbank shape {fb.shape} does not match {len(frames)} frames "
                         "(expected (T, F, M) or (T, 1, F, M))")
    sample: dict = {"__key__": key}
    for t, frame in enumerate(frames):
        sample[f"frame{t:02d}.jpg"] = encode_jpeg(frame)
    buf = io.BytesIO()
    np.save(buf, fb.astype(np.float16), allow_pickle=False)
    sample[FBANK_MEMBER] = buf.getvalue()
    sample[META_MEMBER] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return sample


def frame_members(sample: dict) -> list[str]:
    """The sample's frame member names, ordered by frame number."""
    found = [(int(m.group(1)), name) for name in sample
             if (m := _FRAME_MEMBER.match(name))]
    return [name for _, name in sorted(found)]


def _as_bytes(value: Any, key: str, member: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"sample {key}: member {member} should be raw bytes, got "
                     f"{type(value).__name__} (decode_sample takes undecoded webdataset samples)")


def decode_jpeg(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of JPEG bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode_npy(data: bytes) -> np.ndarray:
    """The array in .npy bytes (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(sample: dict) -> dict:
    """Decode a raw webdataset sample (bytes members) into tensors.

    Args:
        sample: `{"__key__": str, "frame00.jpg": bytes, ..., "fbank.npy": bytes, "json": bytes}`
            (other keys such as "__url__" are ignored).

    Returns:
        `{"key": str, "frames": uint8 (T, 3, H, W), "fbank": float32 (T, 1, F, M),
        "meta": dict}`. Raises ValueError naming the key and member if one is missing.
    """
    key = sample.get("__key__", "?")
    names = frame_members(sample)
    missing = [m for m in (FBANK_MEMBER, META_MEMBER) if m not in sample]
    if not names:
        missing.insert(0, "frame00.jpg")
    if missing:
        raise ValueError(f"sample {key}: missing member(s) {', '.join(missing)}")
    frames = np.stack([decode_jpeg(_as_bytes(sample[n], key, n)) for n in names])
    fbank = decode_npy(_as_bytes(sample[FBANK_MEMBER], key, FBANK_MEMBER)).astype(np.float32)
    if fbank.ndim == 3:
        fbank = fbank[:, None]
    meta = json.loads(_as_bytes(sample[META_MEMBER], key, META_MEMBER).decode("utf-8"))
    return {
        "key": key,
        "frames": torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(),
        "fbank": torch.from_numpy(fbank),
        "meta": meta,
    }


def _closed_size(offset: int) -> int:
    """The file size of a tar that TarWriter has written `offset` bytes of, once closed."""
    return -(-(offset + _END_OF_ARCHIVE) // _RECORD) * _RECORD


class _NullSink:
    """A write-only file that drops what it is given: where `_tar_bytes` lets TarWriter write."""

    def write(self, data) -> int:
        return len(data)


def _write_members(tar: TarWriter, key: str, members: list[tuple[str, bytes]]) -> None:
    # One member per call: TarWriter.write sorts a sample's members by name, and the shard
    # keeps the order given (frames, fbank, json).
    for name, value in members:
        tar.write({"__key__": key, name: value})


def _tar_bytes(key: str, members: list[tuple[str, bytes]]) -> int:
    """The bytes TarWriter writes for these members (headers, extended headers for long
    names, content padded to whole blocks), measured by writing them to a sink."""
    probe = TarWriter(_NullSink(), **_TAR_OPTIONS)
    _write_members(probe, key, members)
    return probe.tarstream.offset


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def write(self, data) -> int:
        self._f.write(data)
        self.sha256.update(data)
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        self._f.flush()


class ShardWriter:
    """Writes encoded samples into size-bounded tar shards and publishes the index.

    Use as a context manager: a clean exit calls `close()`, an exception calls `abort()`
    (which leaves the previous output untouched). One writer per output location at a time.

    Args:
        out_url: directory or URL prefix (created if needed).
        split: split name, used in shard names ([A-Za-z0-9_]+).
        dataset: dataset name for the index.
        num_frames: T; every sample must have exactly T frames.
        image_size: frame side, recorded in the index.
        audio: the AudioConfig fields, recorded in the index.
        max_shard_bytes: a shard is closed before it would exceed this size (a single
            sample larger than this gets a shard of its own).
        extra: dataset-specific facts recorded under "extra" in the index.
    """

    def __init__(self, out_url: str, *, split: str, dataset: str, num_frames: int,
                 image_size: int, audio: dict, max_shard_bytes: int = 256 * 2**20,
                 extra: dict | None = None):
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split name {split!r} must match [A-Za-z0-9_]+")
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_url = out_url.rstrip("/") or out_url
        self.split = split
        self.dataset = dataset
        self.num_frames = num_frames
        self.image_size = image_size
        self.audio = dict(audio)
        self.max_shard_bytes = max_shard_bytes
        self.extra = dict(extra or {})
        self.run = secrets.token_hex(4)
        split_re = re.escape(split)
        # What this writer (any run of it, for this split) names its shards and temp files:
        # the only names it may ever delete that it did not write in this run.
        self._own_shard = re.compile(rf"^{split_re}-(?:[0-9a-f]{{8}}-)?\d{{6}}\.tar$")
        self._run_shard = re.compile(rf"^{split_re}-([0-9a-f]{{8}})-\d{{6}}\.tar$")
        self._own_temp = re.compile(rf"^\.(?:{split_re}-[0-9a-f]{{8}}-\d{{6}}\.tar|"
                                    rf"{re.escape(INDEX_NAME)}){_TEMP_SUFFIX}$")
        # A killed run's published shards are listed by no index: this record (written
        # before the first shard, removed when the run ends) is what lets the next run
        # recognise them as ours and remove them.
        self._run_record = re.compile(rf"^\.{split_re}-([0-9a-f]{{8}})\.writing$")
        self.shards: list[ShardInfo] = []
        self._keys: set[str] = set()
        self._local = storage.is_local(self.out_url)
        # Remote shards are assembled in a private local directory, then uploaded whole.
        self._staging = None if self._local else tempfile.mkdtemp(prefix="avpea-shards-")
        if self._local:
            os.makedirs(storage.local_path(self.out_url), exist_ok=True)
        storage.atomic_write_bytes(self._record_url(self.run), b"")
        self._tar: TarWriter | None = None
        self._file = None
        self._hash: _HashingFile | None = None
        self._tmp_path = ""
        self._shard_keys: list[str] = []
        self._done = False

    # -- shard lifecycle ----------------------------------------------------------------
    def _shard_name(self, number: int) -> str:
        return f"{self.split}-{self.run}-{number:06d}.tar"

    def _open_shard(self) -> None:
        name = self._shard_name(len(self.shards))
        if self._local:
            self._tmp_path = storage.local_temp_path(
                os.path.join(storage.local_path(self.out_url), name))
        else:
            self._tmp_path = os.path.join(self._staging, name)
        self._file = open(self._tmp_path, "wb")
        self._hash = _HashingFile(self._file)
        self._tar = TarWriter(self._hash, **_TAR_OPTIONS)
        self._shard_keys = []

    def _finish_shard(self) -> None:
        """Close the open shard and publish it under its final name."""
        assert self._tar is not None and self._hash is not None and self._file is not None
        expected = _closed_size(self._tar.tarstream.offset)
        self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
        if self._hash.offset != expected:
            # The size bound rests on this prediction: fail rather than publish a shard that
            # may be larger than max_shard_bytes.
            raise RuntimeError(f"shard {self._tmp_path}: TarWriter wrote {self._hash.offset} "
                               f"bytes, the size prediction says {expected}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._shard_name(len(self.shards))
        final_url = storage.join(self.out_url, name)
        if self._local:
            storage.publish_local(self._tmp_path, storage.local_path(final_url))
        else:
            storage.upload_file(self._tmp_path, final_url)
            os.remove(self._tmp_path)
        self.shards.append(ShardInfo(
            url=name, samples=len(self._shard_keys), bytes=self._hash.offset,
            sha256=self._hash.sha256.hexdigest(),
            keys_sha256=hashlib.sha256("\n".join(self._shard_keys).encode()).hexdigest()))
        self._tar = self._file = self._hash = None
        self._tmp_path = ""

    def _check_sample(self, sample: dict) -> str:
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or _KEY_BAD_CHARS.search(key):
            raise ValueError(f"sample key {key!r} must be non-empty [A-Za-z0-9_-]")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        expected = {f"frame{t:02d}.jpg" for t in range(self.num_frames)}
        frames = set(frame_members(sample))
        if frames != expected:
            raise ValueError(f"sample {key}: has {len(frames)} frame members, the writer "
                             f"expects num_frames={self.num_frames}")
        for member in (FBANK_MEMBER, META_MEMBER):
            if member not in sample:
                raise ValueError(f"sample {key}: missing member {member}")
        return key

    def write(self, sample: dict) -> None:
        """Append one `encode_sample()` dict, starting a new shard when this one is full."""
        if self._done:
            raise RuntimeError("ShardWriter is closed")
        key = self._check_sample(sample)
        members = [(name, value) for name, value in sample.items() if not name.startswith("__")]
        # Members in a fixed order: frames, fbank, json (readers group them by key anyway).
        members.sort(key=lambda kv: (kv[0] == META_MEMBER, kv[0] == FBANK_MEMBER, kv[0]))
        if self._tar is not None and self._shard_keys:
            # tarstream.offset counts what the tar holds so far; the file lags behind it by
            # what the tar stream still buffers.
            added = _tar_bytes(key, members)
            if _closed_size(self._tar.tarstream.offset + added) > self.max_shard_bytes:
                self._finish_shard()
        if self._tar is None:
            self._open_shard()
        _write_members(self._tar, key, members)
        self._shard_keys.append(key)
        self._keys.add(key)

    @property
    def total_samples(self) -> int:
        """Samples written so far."""
        return len(self._keys)

    def add_file(self, name: str, data: bytes) -> None:
        """Write a side file (e.g. vocab.json) atomically and record its sha256 in the index.

        Args:
            name: a plain file name beside the shards.
            data: the content.
        """
        storage.atomic_write_bytes(storage.join(self.out_url, name), data)
        self.extra.setdefault("files", {})[name] = hashlib.sha256(data).hexdigest()

    def close(self) -> ShardIndex:
        """Publish the last shard, then the index (atomically), then delete stale shards.

        Stale shards are those the replaced index listed for this split and the new one does
        not (see the module docstring); nothing else in the output folder is deleted.

        Returns:
            The index as written. Raises ValueError if no sample was written (an empty
            index would leave readers with zero shards).
        """
        if self._done:
            raise RuntimeError("ShardWriter is already closed")
        if not self._keys:
            self.abort()
            raise ValueError(f"no samples were written; {self.out_url} was left as it was")
        if self._tar is not None:
            self._finish_shard()
        index = ShardIndex(
            dataset=self.dataset, split=self.split, num_frames=self.num_frames,
            image_size=self.image_size, audio=self.audio, shards=list(self.shards),
            total_samples=sum(s.samples for s in self.shards), root=self.out_url,
            extra=self.extra, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            run=self.run)
        data = json.dumps(index.to_json(), indent=1).encode("utf-8")
        # Read before the new index replaces it: afterwards nothing says what it listed.
        stale = self._previous_shards() - {s.url for s in self.shards}
        storage.atomic_write_bytes(storage.join(self.out_url, INDEX_NAME), data)
        self._done = True
        self._cleanup_staging()
        self._remove_stale(stale)
        return index

    def _previous_shards(self) -> set[str]:
        """The shard names the index about to be replaced lists for this split.

        Returns:
            Plain names directly in the output folder, named as this writer names shards;
            empty when there is no previous index, it cannot be read, or it is another
            split's (an index lists only its own split, so its shards are not ours to drop).
        """
        try:
            previous = read_index(self.out_url)
        except Exception:  # noqa: BLE001 - whatever the reason, we cannot tell what it listed
            return set()
        if previous.split != self.split:
            return set()
        # _own_shard also rules out absolute urls, '..' and subfolders: only plain names here.
        return {s.url for s in previous.shards if self._own_shard.match(s.url)}

    def _record_url(self, run: str) -> str:
        return storage.join(self.out_url, f".{self.split}-{run}.writing")

    def _remove_stale(self, stale: set[str]) -> None:
        """Delete the given shards, the shards of killed runs of this split (named in their
        run records) and, locally, this split's temp files of killed runs."""
        names = storage.list_names(self.out_url)
        killed = {m.group(1) for m in map(self._run_record.match, names) if m and m.group(1) != self.run}
        stale |= {n for n in names if (m := self._run_shard.match(n)) and m.group(1) in killed}
        for name in sorted(stale):
            storage.remove(storage.join(self.out_url, name))
        if self._local:
            for name in names:
                if self._own_temp.match(name):
                    storage.remove(storage.join(self.out_url, name))
        for run_id in sorted(killed) + [self.run]:
            storage.remove(self._record_url(run_id))

    def _cleanup_staging(self) -> None:
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def abort(self) -> None:
        """Stop without publishing an index; the previous output stays valid.

        Shards this run already published are not listed anywhere, so they are deleted.
        (After a SIGKILL nothing runs: the next successful run of the split removes the
        killed run's temp files and, through its run record, the shards it had published.)
        """
        if self._tar is not None:
            # Close the tar stream into the temp file that is removed below: left open, it
            # would flush its buffer into the closed file when collected.
            for close in (self._tar.close, self._file.close):
                try:
                    close()
                except (OSError, ValueError):
                    pass
            if self._tmp_path:
                try:
                    os.remove(self._tmp_path)
                except FileNotFoundError:
                    pass
            self._tar = self._file = self._hash = None
        for shard in self.shards:
            storage.remove(storage.join(self.out_url, shard.url))
        storage.remove(self._record_url(self.run))
        self.shards = []
        self._done = True
        self._cleanup_staging()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()



def index_id(index: ShardIndex) -> str:
    """A digest of the shard set's identity: the writer run and each shard's url, sample
    count and sha256 (not where the set lives: a copied split keeps its id).

    The reader records it in its state; a checkpoint's data position is only meaningful for
    the shard set it was taken on (re-sharding changes which sample sits at each position).

    Args:
        index: a read index.

    Returns:
        16 hex digits.
    """
    identity = {"run": index.run,
                "shards": [[s.url, s.samples, s.sha256] for s in index.shards]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
