"""Shared fixtures: a real S3-compatible server (moto) on 127.0.0.1, small synthetic AVQA
shards, and a local Ray."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: a second intra-op thread each only spin-waits.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """End-to-end runs first: spread over parallel test processes (`-n`), they start early and
    the quick tests fill the gaps, instead of a long run starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@dataclass
class RayCluster:
    """Handle on the session's Ray cluster.

    Args:
        address: the GCS address ("127.0.0.1:PORT"); also RAY_ADDRESS for this process, for
            any subprocess started from the tests, and for every Ray worker.
        dashboard: "http://127.0.0.1:PORT", where `ray job submit --address` goes.
        tmpdir: TMPDIR of every process of the cluster (what the jobs leave behind shows).
    """

    address: str
    dashboard: str
    tmpdir: Path


@pytest.fixture(scope="session")
def ray_local(s3, tmp_path_factory):
    """One Ray cluster for the whole session, started as users start one (`ray start --head`),
    after the S3 server so that its workers inherit the endpoint and credentials, as they would
    from a cluster node's environment. The jobs find Ray initialised (or RAY_ADDRESS set) and
    join it, as under `ray job submit`.

    With its dashboard and RAY_ADDRESS in every worker's environment, Ray's state API works
    inside the cluster: Ray Train's placement-group cleaner asks it whether the controller
    lives, and without it each run's shutdown waits out a 12 s timeout. Every port is a free
    one and the session files live under the test's temporary directory, so another Ray on
    the machine is neither joined nor disturbed. A test that holds resources releases them
    (tests/test_sweep.py checks every CPU is free again after its runs)."""
    import contextlib
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    import ray

    from tests.toy import free_port

    tmpdir = tmp_path_factory.mktemp("ray-tmpdir")
    # Short: Ray's unix sockets live under it, and a socket path holds at most 107 bytes (a
    # pytest folder of a parallel test process, .../pytest-N/popen-gw0/..., is too long).
    ray_dir = tempfile.mkdtemp(prefix="avpea-ray-", dir="/tmp")
    # No node here is a spot instance: Ray Train's preemption watcher (one more actor
    # process per run, polling for notices that never come) stays off.
    # Ray Train's controller polls its workers every 2 s by default: every start, restart and
    # finish of a run waits up to that long, which tiny test runs feel and users do not.
    port, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    env = {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ports = [f"--{flag}={free_port()}" for flag in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    head_log = open(tmpdir / "ray-head.log", "w")
    # --block keeps the head in its own process group: the fixture stops exactly this cluster
    # (`ray stop` would end every Ray process on the machine).
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", *ports, "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={ray_dir}"],
        stdin=subprocess.DEVNULL, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
        # as from an activated virtual environment: `python` in a submitted job is this one
        env=os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TMPDIR": str(tmpdir)})
    try:
        deadline = time.monotonic() + 120
        while True:
            # Its output says why it stopped (e.g. a port found free, then taken by another
            # test process's cluster before the head bound it).
            assert head.poll() is None, (f"ray start --head exited; its output:\n"
                                         f"{(tmpdir / 'ray-head.log').read_text()[-3000:]}")
            try:  # ray.init would wait minutes on a GCS that is not listening yet (or never)
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                assert time.monotonic() < deadline, "Ray head not up in 120 s"
                time.sleep(0.5)
                continue
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                assert time.monotonic() < deadline, "Ray head not up in 120 s"
                time.sleep(1)
        yield RayCluster(address, f"http://127.0.0.1:{dashboard}", tmpdir)
    finally:
        ray.shutdown()
        # Nothing in it is kept: its processes (all in the head's process group) are killed
        # outright; a SIGTERM'd head spends half a minute stopping them one by one. (A head
        # that exited on its own may have left none: its error above is the one to see.)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        head_log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class DamagedRun:
    """The session's 2-worker AVQA run whose test split lost a shard (`ddp_avqa_run`).

    Args:
        summary: the job's summary (--summary-json).
        out: what the job printed.
        damaged_test: the test split it evaluated, one shard deleted.
        lost_url, lost_samples, lost_questions: that shard's file name, clips and questions
            (another test process's shards name their files differently).
    """

    summary: dict
    out: str
    damaged_test: str
    lost_url: str
    lost_samples: int
    lost_questions: int


@pytest.fixture(scope="session")
def ddp_avqa_run(avqa_shards, tmp_path_factory, ray_local) -> DamagedRun:
    """One 2-worker DDP run on the session's AVQA shards (trained by whichever test process
    asks first), its test split with a shard missing (allowed: `data.allow_damaged`), for the
    tests that need trained adapters (tests/test_train.py checks the run, tests/test_infer.py
    serves its adapters)."""
    def build(storage: Path) -> dict:
        import contextlib
        import io
        import json
        import shutil

        from avpea_ray.cli import run_job
        from avpea_ray.data.reader import shard_samples
        from avpea_ray.data.shards import read_index
        from tests.toy import train_overrides

        damaged = storage / "test-damaged"
        shutil.copytree(avqa_shards["test"], damaged)
        lost = read_index(str(damaged)).shards[1]
        lost_questions = sum(len(json.loads(s["json"])["questions"]) for s in shard_samples(str(damaged / lost.url)))
        (damaged / lost.url).unlink()
        args = [*train_overrides(avqa_shards | {"test": str(damaged)}, storage,
                                 **{"run.num_workers": 2, "run.name": "ddp", "optim.epochs": 5,
                                    "data.allow_damaged": True}),
                "--summary-json", str(storage / "summary.json")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert run_job("avqa", "", args) == 0
        return {"summary": json.loads((storage / "summary.json").read_text()), "out": out.getvalue(),
                "damaged_test": str(damaged), "lost_url": lost.url, "lost_samples": lost.samples,
                "lost_questions": lost_questions}

    from tests.toy import once_per_session

    return DamagedRun(**once_per_session(tmp_path_factory, "ddp-avqa-run", build))


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
