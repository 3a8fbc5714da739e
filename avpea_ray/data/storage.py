"""Storage helpers: one small API for local paths and fsspec URLs (s3://, gs://, memory://).

Everything the shard writer, the validator and the reader touch goes through here, so that
these properties hold in one place:

- atomic publication: `atomic_write_bytes` and `upload_file` never leave a half-written
  object under its final name (local: `avpea_ray.atomic`, temp file + `os.replace`; object
  stores: one whole PUT or one multipart upload, which S3 only makes visible once it
  completes);
- errors are classified once (`classify`): a permission or credential error, or an endpoint
  that cannot be reached and has never answered in this process (a wrong AWS_ENDPOINT_URL),
  raises `StorageAccessError` at once, naming the URL and what to check;
- retrying is s3fs's: every s3fs request (and every ranged read of an open file, which is
  re-fetched whole when its body breaks off) goes through s3fs's retry loop
  (`S3_RETRIES` tries, back-off 0.1 * 1.7**i s: about 17 s in all). s3fs retries dropped
  connections, timeouts and throttling on its own; `classify` is installed as its custom
  error handler (`s3fs.core.set_custom_error_handler`) so that it also retries 5xx and a
  refused connection to an endpoint that has answered before (a server restarting), and
  never an access error. botocore's own retries stay off: they would retry a refused
  connection to a wrong endpoint for seconds before we could report it;
- the S3 endpoint comes from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (MinIO, moto, Ceph).
  botocore already honours both variables; we also pass the endpoint explicitly so that it
  becomes part of fsspec's filesystem-instance cache key (an endpoint changed at runtime then
  gets a fresh client instead of a stale cached one).
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import fsspec

from avpea_ray import atomic

T = TypeVar("T")

# Tries s3fs makes per request (and per ranged read) before it raises; its back-off waits
# min(0.1 * 1.7**i, 15) s after try i: 0.1, 0.17, ... 11.8 s, about 17 s in all, enough to
# ride out an object store that restarts. (A ranged read nests two such loops in s3fs: its
# GET request inside the re-fetch of the range.)
S3_RETRIES = 9

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


# Transient errors s3fs was told to retry in this process (see `_s3fs_should_retry`).
_retries = 0


def retries_so_far() -> int:
    """How many times, in this process, `classify` had s3fs retry a transient error.

    s3fs also retries its own list of dropped-connection errors and timeouts
    (`s3fs.core.S3_RETRYABLE_ERRORS`) without asking, and those are not counted here.
    """
    return _retries


def on_retry(exc: BaseException) -> None:
    """Called each time s3fs is told to retry `exc` (counts it; tests replace it)."""
    global _retries
    _retries += 1


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
    # One attempt per botocore call: s3fs's loop is the one that retries (see the module
    # docstring). botocore's standard/legacy modes retry every connection error, also a
    # wrong endpoint's, which would delay that error by seconds. (A fresh dict: botocore
    # rewrites it.)
    options: dict[str, Any] = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    if _endpoint(url):
        options["endpoint_url"] = _endpoint(url)
    return options


def _s3fs_should_retry(exc: BaseException) -> bool:
    """s3fs's custom error handler: retry what `classify` calls transient.

    s3fs asks about every error that is not on its own retry list (S3 error responses
    other than SlowDown, refused connections, ...). It gives no URL; a refused
    connection's endpoint comes from the error itself.
    """
    if classify(exc, "") != "transient":
        return False
    on_retry(exc)
    return True


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a URL.

    For S3, the instance gets `S3_RETRIES` and `classify` as s3fs's error handler.

    Args:
        url: any fsspec URL (or local path).

    Returns:
        `(fs, path)`.
    """
    fs, path = fsspec.core.url_to_fs(url, **_storage_options(url))
    if urlparse(url).scheme in ("s3", "s3a"):
        import s3fs.core

        fs.retries = S3_RETRIES
        s3fs.core.set_custom_error_handler(_s3fs_should_retry)
    return fs, path


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


def _refused_by_answered_endpoint(exc: BaseException, url: str) -> bool:
    """Whether a refused connection went to an endpoint that has answered before."""
    if url and endpoint_of(url) in ANSWERED_ENDPOINTS:
        return True
    target = str(getattr(exc, "kwargs", {}).get("endpoint_url") or "")  # botocore's
    return bool(target) and any(e and target.startswith(e) for e in ANSWERED_ENDPOINTS)


def classify(exc: BaseException, url: str) -> str:
    """What an error reading or writing `url` means.

    Returns:
        "access": permission/credential error, or a refused connection to an endpoint that
        has never answered in this process (fatal; see `access_error`); "transient": worth
        retrying (s3fs does); "other": anything else (missing object, bad data, bugs).
        With url "" a refused connection's endpoint is taken from the error.
    """
    if isinstance(exc, StorageAccessError) or _is_denied(exc):
        return "access"
    if _is_refused(exc):
        return "transient" if _refused_by_answered_endpoint(exc, url) else "access"
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


def _call(fn: Callable[[], T], url: str) -> T:
    """Run one storage operation on `url`: access errors become `StorageAccessError`.

    Nothing is retried here (s3fs retries transient errors, see the module docstring);
    other errors are raised as they are. A success or a missing object records that the
    endpoint answered.
    """
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - classified just below
        if classify(exc, url) == "access":
            raise access_error(exc, url) from exc
        if isinstance(exc, FileNotFoundError):
            note_answered(url)
        raise
    note_answered(url)
    return result


def open_url(url: str, mode: str = "rb", **kwargs: Any):
    """Open a local path or fsspec URL.

    Remote reads are retried by the filesystem (s3fs re-fetches a range whose body broke
    off). Writes through this function are NOT atomic; publish with `atomic_write_bytes` /
    `upload_file` instead.

    Args:
        url: path or URL.
        mode: "rb", "wb", "r", "w" ...
        **kwargs: passed to `fsspec.AbstractFileSystem.open` (e.g. block_size).

    Returns:
        A file object (a context manager). Opening a remote file that we may not read
        raises `StorageAccessError`.
    """
    if is_local(url):
        path = local_path(url)
        if "w" in mode or "a" in mode:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    fs, path = filesystem(url)
    if "r" in mode and "+" not in mode:
        return _call(lambda: fs.open(path, mode, **kwargs), url)
    return fs.open(path, mode, **kwargs)


def read_bytes(url: str) -> bytes:
    """The whole content of a file or object."""
    if is_local(url):
        def read() -> bytes:
            with open(local_path(url), "rb") as f:
                return f.read()

        return _call(read, url)  # a PermissionError -> StorageAccessError
    fs, path = filesystem(url)
    return _call(lambda: fs.cat_file(path), url)


# The local halves of atomic publication live in `avpea_ray.atomic` (shared with the model's
# adapter files); these names are what the shard writer uses.
local_temp_path = atomic.temp_path
publish_local = atomic.publish
_remove_quietly = atomic.remove_quietly


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` so that readers see either the old content or all of the new.

    Args:
        url: destination path or URL.
        data: the full content.
    """
    if is_local(url):
        atomic.atomic_write_bytes(local_path(url), data)
        return
    fs, path = filesystem(url)
    # One PUT (multipart above s3fs's chunk size): S3 shows the object only once complete.
    _call(lambda: fs.pipe_file(path, data), url)


def upload_file(local_file: str, url: str) -> None:
    """Copy a finished local file to `url` atomically (see `atomic_write_bytes`).

    Args:
        local_file: source path; left in place.
        url: destination path or URL.
    """
    if is_local(url):
        atomic.atomic_write(local_path(url), lambda tmp: shutil.copyfile(local_file, tmp))
        return
    fs, path = filesystem(url)
    _call(lambda: fs.put_file(local_file, path), url)


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""


def exists(url: str) -> bool:
    """Whether a file or object exists (listing caches are bypassed)."""
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url)
    # Another process may have written it since this process cached the parent's listing.
    fs.invalidate_cache(_parent(path))
    return _call(lambda: fs.exists(path), url)


def size(url: str) -> int:
    """Size in bytes of a file or object. Raises FileNotFoundError if absent."""
    if is_local(url):
        return os.path.getsize(local_path(url))
    fs, path = filesystem(url)
    fs.invalidate_cache(_parent(path))
    return int(_call(lambda: fs.size(path), url))


def remove(url: str) -> None:
    """Delete a file or object; a missing one is not an error."""
    if is_local(url):
        _remove_quietly(local_path(url))
        return
    fs, path = filesystem(url)
    try:
        _call(lambda: fs.rm_file(path), url)
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
        entries = _call(lambda: fs.ls(path, detail=False), url)
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

        return _call(scan, url)
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        entries = _call(lambda: fs.ls(path, detail=True), url)
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
