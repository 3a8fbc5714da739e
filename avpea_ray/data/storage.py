"""Storage helpers: one small API for local paths and fsspec URLs (s3://, gs://, memory://).

Everything the shard writer, the validator and the reader touch goes through here, so that
these properties hold in one place:

- atomic publication: `atomic_write_bytes` and `upload_file` never leave a half-written
  object under its final name (local: temp file + `os.replace`; object stores: one whole PUT
  or one multipart upload, which S3 only makes visible once it completes);
- errors are classified once (`classify`): a permission or credential error, or an endpoint
  that cannot be reached and has never answered in this process (a wrong AWS_ENDPOINT_URL),
  raises `StorageAccessError` at once, naming the URL and what to check; transient errors
  (throttling, 5xx, dropped connections, timeouts, and a refused connection once the
  endpoint has answered: a server restarting) are retried with capped exponential back-off
  (`RETRY_ATTEMPTS`, `retry_delay`; about 17 s in all); anything else is raised as it is;
- retried reads: `open_url` survives transient errors by reopening the object at the byte
  where the read broke off (the shard reader opens with `retry_reads=False` and retries
  itself, at the sample where it broke off, so a shard read has one retry loop);
- the S3 endpoint comes from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (MinIO, moto, Ceph).
  botocore already honours both variables; we also pass the endpoint explicitly so that it
  becomes part of fsspec's filesystem-instance cache key (an endpoint changed at runtime then
  gets a fresh client instead of a stale cached one). botocore's own retries are switched off
  (they would spend ~10 s retrying a wrong endpoint); s3fs keeps its short per-request ones.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
import time
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import fsspec

T = TypeVar("T")

# Retry policy for transient errors, the one place it is set: RETRY_ATTEMPTS tries in all,
# waiting retry_delay(0), retry_delay(1), ... in between (0.5, 1, 2, 4, 5, 5 s: about 17 s,
# enough to ride out an object store that restarts).
RETRY_ATTEMPTS = 7
RETRY_BASE_DELAY = 0.5
RETRY_MAX_DELAY = 5.0

# errno values s3fs and the OS use for conditions that go away on their own: s3fs maps
# SlowDown/ServiceUnavailable/503 to EBUSY and InternalError/500 to EREMOTEIO.
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", 121), errno.ETIMEDOUT,
                     errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN}
# Exception types of botocore/aiohttp/fsspec are matched by name, so that this module does
# not import those libraries for local-only use.
_TRANSIENT_NAMES = {"ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "IncompleteReadError", "ResponseStreamingError", "ClientPayloadError",
                    "ServerDisconnectedError", "ClientOSError", "FSTimeoutError",
                    "IncompleteRead"}
# Nothing listens at the endpoint (or its name does not resolve).
_REFUSED_NAMES = {"EndpointConnectionError", "ClientConnectorError"}
# Credentials missing, wrong or expired; access denied. s3fs turns the S3 error codes into
# PermissionError; raw botocore errors carry them in `response`.
_DENIED_NAMES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                 "NoAuthTokenError", "TokenRetrievalError", "UnauthorizedSSOTokenError"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "ExpiredToken", "ExpiredTokenException",
                 "SignatureDoesNotMatch", "InvalidToken", "AllAccessDisabled",
                 "RequestTimeTooSkewed", "403", "401"}
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                  ConnectionRefusedError)

# Endpoints that have answered a request in this process (see `classify`).
ANSWERED_ENDPOINTS: set[str] = set()


class StorageAccessError(OSError):
    """Storage refused us or cannot be reached: credentials, permissions or the endpoint.

    Never retried and never taken for damaged data; the message names the URL and what to
    check.
    """


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed try number `attempt` (0-based)."""
    return min(RETRY_BASE_DELAY * 2 ** attempt, RETRY_MAX_DELAY)


def is_local(url: str) -> bool:
    """True for a plain path or a file:// URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a plain path or file:// URL."""
    return urlparse(url).path if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    """Join a directory (path or URL) and a relative name; an absolute `name` wins.

    Args:
        base: a local directory or a URL prefix such as "s3://bucket/prefix".
        name: a relative name ("train-000000.tar") or an absolute path/URL.

    Returns:
        The joined path or URL.
    """
    if "://" in name or os.path.isabs(name):
        return name
    if is_local(base):
        return os.path.join(base, name)
    return base.rstrip("/") + "/" + name


def _endpoint(url: str) -> str:
    """The S3 endpoint from the environment, if any."""
    if urlparse(url).scheme in ("s3", "s3a"):
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return ""


def endpoint_of(url: str) -> str:
    """What answers requests for `url`: the S3 endpoint, else scheme://host ("" if local)."""
    if is_local(url):
        return ""
    parsed = urlparse(url)
    return _endpoint(url) or f"{parsed.scheme}://{parsed.netloc}"


def note_answered(url: str) -> None:
    """Record that `url`'s endpoint answered, so that a refused connection to it from now
    on is taken for a restart (transient), not for a wrong endpoint."""
    ANSWERED_ENDPOINTS.add(endpoint_of(url))


def _storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`'s protocol: the S3 endpoint; no botocore retries."""
    if urlparse(url).scheme not in ("s3", "s3a"):
        return {}
    # One attempt per botocore call: s3fs retries dropped reads and throttling briefly, and
    # `retry` / the reader everything transient; botocore's retries would add ~10 s to every
    # wrong-endpoint error. (A fresh dict: botocore rewrites it.)
    options: dict[str, Any] = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    if _endpoint(url):
        options["endpoint_url"] = _endpoint(url)
    return options


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a URL.

    Args:
        url: any fsspec URL (or local path).

    Returns:
        `(fs, path)`.
    """
    return fsspec.core.url_to_fs(url, **_storage_options(url))


def _has_name(exc: BaseException, names: set[str]) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _response(exc: BaseException) -> dict:
    """The botocore response of a ClientError, also behind s3fs's translated errors."""
    for each in (exc, exc.__cause__):
        response = getattr(each, "response", None)
        if isinstance(response, dict):
            return response
    return {}


def _is_denied(exc: BaseException) -> bool:
    if isinstance(exc, PermissionError) or _has_name(exc, _DENIED_NAMES):
        return True
    return str(_response(exc).get("Error", {}).get("Code", "")) in _DENIED_CODES


def _is_refused(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionRefusedError) or _has_name(exc, _REFUSED_NAMES)


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (throttling, dropped connection, timeout).

    A refused connection is not, here; `classify` tells a restarting server from a wrong
    endpoint.
    """
    if isinstance(exc, _NOT_TRANSIENT) or _is_refused(exc):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    status = _response(exc).get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status == 429 or isinstance(status, int) and 500 <= status < 600:  # throttled, 5xx
        return True
    return _has_name(exc, _TRANSIENT_NAMES)


def classify(exc: BaseException, url: str) -> str:
    """What an error reading or writing `url` means.

    Returns:
        "access": permission/credential error, or a refused connection to an endpoint that
        has never answered in this process (fatal; see `access_error`); "transient": retry;
        "other": anything else (missing object, bad data, bugs).
    """
    if isinstance(exc, StorageAccessError) or _is_denied(exc):
        return "access"
    if _is_refused(exc):
        return "transient" if endpoint_of(url) in ANSWERED_ENDPOINTS else "access"
    return "transient" if is_transient(exc) else "other"


def access_error(exc: BaseException, url: str) -> StorageAccessError:
    """The `StorageAccessError` for an error that `classify` calls "access"."""
    if isinstance(exc, StorageAccessError):
        return exc
    what = f"{type(exc).__name__}: {exc}"
    if is_local(url):
        return StorageAccessError(f"{url}: permission denied ({what}); check the "
                                  "file's permissions and owner")
    if _is_refused(exc):
        return StorageAccessError(
            f"{url}: cannot reach the storage endpoint {endpoint_of(url)} ({what}); check "
            "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (host, port, http/https) and that the "
            "object store is running")
    return StorageAccessError(
        f"{url}: access denied ({what}); check the credentials (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE; expired?), that "
        f"AWS_ENDPOINT_URL points at the right store (now {endpoint_of(url) or 'AWS'}), and "
        "the bucket policy")


def retry(fn: Callable[[], T], url: str, what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """Call `fn` until it succeeds, retrying transient errors with capped back-off.

    Args:
        fn: the operation on `url`; it must be safe to repeat (a read, a whole-object PUT).
        url: what it touches (classifies errors, names it in messages).
        what: a description for the final error message.
        attempts: total tries.

    Returns:
        `fn()`'s result. Access errors raise `StorageAccessError` at once, other
        non-transient errors are raised as they are, the last transient one after `attempts`.
    """
    for attempt in range(attempts):
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - classified just below
            kind = classify(exc, url)
            if kind == "access":
                raise access_error(exc, url) from exc
            if isinstance(exc, FileNotFoundError):
                note_answered(url)
            if kind != "transient":
                raise
            if attempt == attempts - 1:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"gave up trying to {what} after {attempts} attempts")
                raise
            time.sleep(retry_delay(attempt))
        else:
            note_answered(url)
            return result
    raise AssertionError("unreachable")  # pragma: no cover


class RetryingReader(io.RawIOBase):
    """A read-only file over an fsspec object that reopens it after a transient error.

    A long streaming read of a 256 MiB shard can lose its connection half-way; instead of
    failing, the object is reopened and the read resumes at the same offset.

    Args:
        opener: returns a fresh file object positioned at 0.
        url: what it reads (error classification and messages).
    """

    def __init__(self, opener: Callable[[], Any], url: str):
        super().__init__()
        self._opener = opener
        self._url = url
        self._pos = 0
        self._file = retry(opener, url, f"open {url}")

    def _with_retry(self, op: Callable[[], T]) -> T:
        tries = 0

        def attempt() -> T:
            nonlocal tries
            tries += 1
            if tries > 1:  # reopen at the offset where the broken read started
                try:
                    self._file.close()
                except Exception:  # noqa: BLE001 - the old handle is broken anyway
                    pass
                self._file = self._opener()
                if self._pos:
                    self._file.seek(self._pos)
            return op()

        return retry(attempt, self._url, f"read {self._url}")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._with_retry(lambda: self._file.read(size))
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._with_retry(lambda: self._file.seek(offset, whence))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            try:
                handle = getattr(self, "_file", None)  # absent if the first open failed
                if handle is not None:
                    handle.close()
            finally:
                super().close()


def open_url(url: str, mode: str = "rb", *, retry_reads: bool = True, **kwargs: Any):
    """Open a local path or fsspec URL.

    Reads of remote objects are wrapped in `RetryingReader` unless `retry_reads=False` (for
    callers that retry themselves and classify errors with `classify`). Writes through this
    function are NOT atomic; publish with `atomic_write_bytes` / `upload_file` instead.

    Args:
        url: path or URL.
        mode: "rb", "wb", "r", "w" ...
        retry_reads: wrap remote reads in `RetryingReader`.
        **kwargs: passed to `fsspec.AbstractFileSystem.open` (e.g. block_size).

    Returns:
        A file object (a context manager).
    """
    if is_local(url):
        path = local_path(url)
        if "w" in mode or "a" in mode:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    fs, path = filesystem(url)
    if "r" in mode and "+" not in mode:
        if not retry_reads:
            f = fs.open(path, mode, **kwargs)
            note_answered(url)
            return f
        raw = RetryingReader(lambda: fs.open(path, "rb", **kwargs), url)
        if "b" in mode:
            return raw
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8")
    return fs.open(path, mode, **kwargs)


def read_bytes(url: str) -> bytes:
    """The whole content of a file or object (retried on transient errors)."""
    if is_local(url):
        def read() -> bytes:
            with open(local_path(url), "rb") as f:
                return f.read()

        return retry(read, url, f"read {url}")  # a PermissionError -> StorageAccessError
    fs, path = filesystem(url)
    return retry(lambda: fs.cat_file(path), url, f"read {url}")


def _fsync_dir(directory: str) -> None:
    """Persist a rename: fsync the directory entry (best effort, not on every OS)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def local_temp_path(final_path: str) -> str:
    """A fresh temporary file beside `final_path`, named `.<name>.tmp-XXXX` (hidden).

    Writers that are killed leave such files behind; `sharding`'s writer removes them on
    its next successful run.
    """
    directory = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final_path)}.tmp-", dir=directory)
    os.close(fd)
    return tmp


def publish_local(tmp_path: str, final_path: str) -> None:
    """Atomically move a finished temp file to its final local name (same directory)."""
    os.replace(tmp_path, final_path)
    _fsync_dir(os.path.dirname(os.path.abspath(final_path)))


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` so that readers see either the old content or all of the new.

    Args:
        url: destination path or URL.
        data: the full content.
    """
    if is_local(url):
        path = local_path(url)
        tmp = local_temp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish_local(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return
    fs, path = filesystem(url)
    # One PUT (multipart above s3fs's chunk size): S3 shows the object only once complete.
    retry(lambda: fs.pipe_file(path, data), url, f"write {url}")


def upload_file(local_file: str, url: str) -> None:
    """Copy a finished local file to `url` atomically (see `atomic_write_bytes`).

    Args:
        local_file: source path; left in place.
        url: destination path or URL.
    """
    if is_local(url):
        path = local_path(url)
        tmp = local_temp_path(path)
        try:
            shutil.copyfile(local_file, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            publish_local(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return
    fs, path = filesystem(url)
    retry(lambda: fs.put_file(local_file, path), url, f"upload {local_file} to {url}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""


def exists(url: str) -> bool:
    """Whether a file or object exists (listing caches are bypassed)."""
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url)
    # Another process may have written it since this process cached the parent's listing.
    fs.invalidate_cache(_parent(path))
    return retry(lambda: fs.exists(path), url, f"stat {url}")


def size(url: str) -> int:
    """Size in bytes of a file or object. Raises FileNotFoundError if absent."""
    if is_local(url):
        return os.path.getsize(local_path(url))
    fs, path = filesystem(url)
    fs.invalidate_cache(_parent(path))
    return int(retry(lambda: fs.size(path), url, f"stat {url}"))


def remove(url: str) -> None:
    """Delete a file or object; a missing one is not an error."""
    if is_local(url):
        _remove_quietly(local_path(url))
        return
    fs, path = filesystem(url)
    try:
        retry(lambda: fs.rm_file(path), url, f"remove {url}")
    except FileNotFoundError:
        pass
    fs.invalidate_cache(_parent(path))


def list_names(url: str) -> list[str]:
    """Names (not paths) of the files directly under a directory or prefix; [] if none."""
    if is_local(url):
        path = local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        entries = retry(lambda: fs.ls(path, detail=False), url, f"list {url}")
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def list_sizes(url: str) -> dict[str, int]:
    """{name: size in bytes} of the files directly under a directory or prefix, in one
    listing; {} if there is none. Access errors raise `StorageAccessError`."""
    if is_local(url):
        path = local_path(url)
        if not os.path.isdir(path):
            return {}

        def scan() -> dict[str, int]:
            with os.scandir(path) as entries:
                return {e.name: e.stat().st_size for e in entries if e.is_file()}

        return retry(scan, url, f"list {url}")
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        entries = retry(lambda: fs.ls(path, detail=True), url, f"list {url}")
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


# Schemes routed to fsspec. webdataset keeps its own handlers for pipe:, http(s) and hf.
_WDS_FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "file")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    """A `webdataset.gopen` handler that opens the URL through `open_url` (no subprocess)."""
    del bufsize, kw  # fsspec buffers on its own
    return open_url(url, mode)


def register_webdataset_schemes() -> None:
    """Make `webdataset.gopen` open s3:// (and other fsspec URLs) in-process via fsspec.

    webdataset 1.0.2 has no s3 handler and its `pipe:` alternative leaks processes; this
    registers `_gopen_fsspec` for the common object-store schemes and as the fallback for
    any other scheme fsspec knows. Idempotent.
    """
    import importlib

    # `webdataset.gopen` is re-exported as a function; the dispatch table lives in the module.
    wds_gopen = importlib.import_module("webdataset.gopen")

    for scheme in _WDS_FSSPEC_SCHEMES:
        wds_gopen.gopen_schemes[scheme] = _gopen_fsspec
    wds_gopen.gopen_schemes["__default__"] = _gopen_fsspec
