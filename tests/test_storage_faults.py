"""Object-store faults against real moto servers on 127.0.0.1: access errors are fatal at
once and never taken for damaged data; a server restart mid-read is ridden out.

- Access: a separate `moto_server` process with authentication on (after the first few
  requests): an IAM user may write the split and read its index but is denied the shards;
  unknown keys get InvalidAccessKeyId.
- Wrong endpoint: nothing listens on a free port.
- Dropped body: an in-process moto server closes the connection half-way through the
  first body it sends for each shard.
- Restart: an in-process moto server (whose backend, and so the buckets, outlives it) is
  crashed mid-read, listener closed and open connections reset, and a new one started on
  the same port 1.5 s later.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import boto3
import pytest

from avpea_ray.data import shards, storage
from avpea_ray.data.reader import ShardStream, check_shards_present
from test_reader import KEYS, keys_of, stream, write_split

QUICK_S = 5.0  # well under the retry budget: the first four back-offs alone take 7.5 s


@pytest.fixture
def no_retries(monkeypatch):
    """Fail the test if anything waits to retry (loader workers inherit it by fork)."""
    def retried(exc: BaseException) -> None:
        raise AssertionError(f"an access error was retried ({exc!r})")

    monkeypatch.setattr(storage, "on_retry", retried)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def use_endpoint(monkeypatch, endpoint: str, key: str | None = None,
                 secret: str | None = None) -> None:
    """Point this process's S3 clients at `endpoint` (and credentials), with fresh clients."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    if key:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients keep their credentials


# --- classification -----------------------------------------------------------------------

@pytest.mark.parametrize("code,status,kind", [
    ("AccessDenied", 403, "access"), ("InvalidAccessKeyId", 403, "access"),
    ("ExpiredToken", 400, "access"), ("SignatureDoesNotMatch", 403, "access"),
    ("SlowDown", 503, "transient"), ("InternalError", 500, "transient"),
    ("BadGateway", 502, "transient"), ("NoSuchKey", 404, "other"),
])
def test_classify_botocore_errors_raw_and_as_s3fs_raises_them(code, status, kind):
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError({"Error": {"Code": code, "Message": code},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    assert storage.classify(error, "s3://b/k") == kind
    assert storage.classify(translate_boto_error(error), "s3://b/k") == kind


def test_a_refused_connection_is_transient_only_once_the_endpoint_answered(monkeypatch):
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setattr(storage, "ANSWERED_ENDPOINTS", set())
    refused = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")
    assert storage.classify(refused, "s3://b/k") == "access"
    assert storage.classify(NoCredentialsError(), "s3://b/k") == "access"
    storage.note_answered("s3://b/other")
    assert storage.classify(refused, "s3://b/k") == "transient"
    assert storage.classify(PermissionError(13, "denied"), "/data/x.tar") == "access"


# --- access errors ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_s3(s3, tmp_path_factory):
    """A moto server with authentication: the first 3 requests (creating an IAM user, its
    key and its policy) are free, every later one needs that user's key. The user may do
    anything in bucket "guarded" except read its .tar objects. The split is written there.

    Yields:
        (endpoint, (key id, secret), split url).
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
         "-p", str(port)], env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="no-shards", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:GetObject",
                 "Resource": "arn:aws:s3:::guarded/*.tar"}]}))
        creds = (key["AccessKeyId"], key["SecretAccessKey"])
        with pytest.MonkeyPatch.context() as mp:
            use_endpoint(mp, endpoint, *creds)
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id=creds[0], aws_secret_access_key=creds[1],
                         ).create_bucket(Bucket="guarded")
            write_split("s3://guarded/split")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint, creds, "s3://guarded/split"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_access_denied_on_a_shard_is_fatal_and_quick(auth_s3, monkeypatch, no_retries,
                                                    workers):
    endpoint, creds, url = auth_s3
    use_endpoint(monkeypatch, endpoint, *creds)
    s = stream(url, training=False, world=1, workers=workers)  # the index may be read
    shard = s.index.shard_urls()[0]
    start = time.monotonic()
    with pytest.raises(storage.StorageAccessError) as err:
        keys_of(s)
    assert time.monotonic() - start < QUICK_S
    message = str(err.value)
    assert shard in message and "access denied" in message and "bucket policy" in message
    assert s.stats["retries"] == 0 and s.stats["samples_lost"] == 0  # not taken for damage


def test_unknown_credentials_are_fatal_and_quick(auth_s3, monkeypatch, no_retries):
    endpoint, _, url = auth_s3
    use_endpoint(monkeypatch, endpoint, "AKIAUNKNOWN000000000", "wrong")
    start = time.monotonic()
    with pytest.raises(storage.StorageAccessError, match="AWS_ACCESS_KEY_ID") as err:
        ShardStream(url, batch_size=2, training=False, num_workers=0)
    assert f"{url}/{shards.INDEX_NAME}" in str(err.value)
    assert time.monotonic() - start < QUICK_S


def test_check_shards_present_raises_access_errors(auth_s3, monkeypatch, no_retries):
    endpoint, creds, url = auth_s3
    use_endpoint(monkeypatch, endpoint, *creds)
    index = shards.read_index(url)
    assert check_shards_present(index) == []  # listing is allowed
    use_endpoint(monkeypatch, endpoint, "AKIAUNKNOWN000000000", "wrong")
    with pytest.raises(storage.StorageAccessError, match="guarded/split"):
        check_shards_present(index)


def test_a_wrong_endpoint_is_fatal_and_quick(s3, monkeypatch, no_retries):
    url = s3.make_bucket("endpoint-faults") + "/split"
    write_split(url)
    index = shards.read_index(url)
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    use_endpoint(monkeypatch, nowhere)
    start = time.monotonic()
    with pytest.raises(storage.StorageAccessError, match="AWS_ENDPOINT_URL") as err:
        ShardStream(url, batch_size=2, training=False, num_workers=0)  # reads the index
    assert nowhere in str(err.value)
    # Shards on an endpoint that never answered, read in a loader worker.
    s = stream(index, training=False, world=1, workers=1)
    with pytest.raises(storage.StorageAccessError) as err:
        keys_of(s)
    assert index.shard_urls()[0] in str(err.value) and nowhere in str(err.value)
    assert s.stats["retries"] == 0 and s.stats["samples_lost"] == 0
    assert time.monotonic() - start < 2 * QUICK_S


# --- a server restart ---------------------------------------------------------------------

class CrashableMotoServer:
    """moto's ThreadedMotoServer, plus `crash()`: stop serving, close the listening socket
    and reset every open connection, as a restarting server does."""

    def __init__(self, port: int):
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer
        from moto.moto_server.werkzeug_app import MotoRequestHandler

        self.connections: set[socket.socket] = set()
        connections = self.connections

        class Tracked(MotoRequestHandler):
            def setup(self):
                super().setup()
                connections.add(self.connection)

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        # ThreadedMotoServer takes no handler class; it is looked up per connection.
        self.server._server.RequestHandlerClass = Tracked
        self.port = self.server.get_host_and_port()[1]

    def crash(self) -> None:
        self.server.stop()
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server._server.server_close()


def test_a_server_restart_mid_read_is_retried_exactly_once(s3, monkeypatch):
    server = CrashableMotoServer(0)
    restarted: list[CrashableMotoServer] = []
    try:
        endpoint = f"http://127.0.0.1:{server.port}"
        use_endpoint(monkeypatch, endpoint)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="restart-test")
        url = "s3://restart-test/split"
        write_split(url)
        clean = keys_of(stream(url, training=False, world=1, workers=0))
        assert sorted(clean) == KEYS

        def restart() -> None:
            time.sleep(1.5)
            restarted.append(CrashableMotoServer(server.port))

        s = stream(url, training=False, world=1, workers=0)
        seen = []
        for batch in s:
            seen += batch["key"]
            if len(seen) == 2:  # mid-read: the first shard is open, four are still to come
                server.crash()
                threading.Thread(target=restart, daemon=True).start()
        assert restarted, "the read finished before the server came back"
        assert seen == clean  # every sample exactly once, in order
        assert s.stats["retries"] >= 1 and s.stats["samples_lost"] == 0
    finally:
        for each in [server, *restarted]:
            try:
                each.crash()
            except Exception:  # noqa: BLE001 - already down
                pass


def test_a_connection_dropped_mid_body_is_retried_without_loss_or_repeat(s3, monkeypatch):
    """The first GET of every shard loses its connection half-way through the body; s3fs
    re-fetches the range, so the tar stream goes on where it was: nothing lost, nothing
    twice, nothing taken for damage."""
    server = CrashableMotoServer(0)
    dropped: list[str] = []
    app = server.server._server.app

    def dropping_app(environ, start_response):
        body = app(environ, start_response)
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] != "GET" or not path.endswith(".tar") or path in dropped:
            return body
        dropped.append(path)
        data = b"".join(body)

        def half_then_drop():
            yield data[: len(data) // 2]
            environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)

        return half_then_drop()

    try:
        endpoint = f"http://127.0.0.1:{server.port}"
        use_endpoint(monkeypatch, endpoint)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="drop-test")
        url = "s3://drop-test/split"
        write_split(url)
        server.server._server.app = dropping_app
        seen = []
        for rank in range(2):
            s = stream(url, rank, training=False, world=2, workers=1)
            seen += keys_of(s)
            assert not s.stats["corrupt_shards"] and s.stats["samples_lost"] == 0
        assert sorted(seen) == KEYS and len(seen) == len(set(seen))
        assert len(dropped) == len(shards.read_index(url).shards)  # every shard hit once
    finally:
        server.crash()
