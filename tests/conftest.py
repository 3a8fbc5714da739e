"""Shared fixtures: a real S3-compatible server (moto) on 127.0.0.1, small synthetic AVQA
shards, and a local Ray."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pytest
import torch

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    """Handle on the session's moto server.

    Args:
        endpoint: "http://127.0.0.1:PORT"; also in AWS_ENDPOINT_URL for this process and
            any subprocess started from the tests.
    """

    endpoint: str

    def make_bucket(self, name: str) -> str:
        """Create a bucket (if absent) and return its URL, "s3://name"."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3():
    """Start moto's ThreadedMotoServer on 127.0.0.1 (free port) and point AWS_* at it.

    Yields:
        `S3Server` with `endpoint` and `make_bucket(name) -> "s3://name"`. The environment
        is restored and the server stopped at the end of the session.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="session")
def avqa_shards(tmp_path_factory) -> dict[str, str]:
    """A small synthetic MUSIC-AVQA split set, sharded into several shards per split."""
    from sharding import musicavqa, synth

    root = tmp_path_factory.mktemp("avqa")
    release = root / "release"
    synth.main(["--out", str(release), "--videos-train", "128", "--videos-val", "32",
                "--videos-test", "32", "--seconds", "4", "--frame-size", "32", "--seed", "3"])
    out = {}
    for split in ("train", "val", "test"):
        out[split] = str(root / "shards" / split)
        assert musicavqa.main(["--annotations", str(release), "--frames", str(release / "frames"),
                               "--audio", str(release / "audio"), "--out", out[split], "--split", split,
                               "--num-frames", "4", "--image-size", "32", "--max-shard-bytes", "3MiB",
                               "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def ray_local(s3):
    """One local Ray for the whole session (starting one takes seconds on a busy machine; the
    jobs find it initialised and join it, as under `ray job submit`). Started after the S3
    server, so its workers inherit the endpoint and credentials, as they would from a cluster
    node's environment. A test that holds resources releases them (tests/test_sweep.py checks
    every CPU is free again after its runs)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def valor_shards(tmp_path_factory) -> dict[str, str]:
    """A small synthetic VALOR-32K split set (captions describing what is seen and heard),
    sharded into several shards per split, each with its vocab.txt."""
    from sharding import synth_valor, valor

    root = tmp_path_factory.mktemp("valor")
    release = root / "release"
    synth_valor.main(["--out", str(release), "--train", "96", "--val", "24", "--test", "24",
                      "--seconds", "4", "--frame-size", "32", "--seed", "5"])
    out = {}
    for split in ("train", "val", "test"):
        out[split] = str(root / "shards" / split)
        assert valor.main(["--ids", str(release / f"ids_{split}.json"),
                           "--captions", str(release / "captions.json"),
                           "--frames", str(release / "frames"), "--audio", str(release / "audio"),
                           "--out", out[split], "--split", split, "--num-frames", "4",
                           "--image-size", "32", "--max-shard-bytes", "1MiB", "--no-progress"]) == 0
    return out


@pytest.fixture
def one_torch_thread():
    """fbank on tiny tensors: extra intra-op threads only spin-wait on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
