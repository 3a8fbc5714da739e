"""Ray start-up: join the cluster `ray job submit` names, else start a local Ray."""
from __future__ import annotations

import os
from pathlib import Path


# Lines Ray prints from its own processes that say nothing a user can act on; the console
# leaves them out unless run.verbose (--verbose).
KNOWN_NOISE = (
    # Ray Train's controller creates its spot-preemption watcher with restartable arguments
    # and Ray core logs an ERROR about it on every run (the watcher works).
    "Actor with class name: 'PreemptionWatcher'",
)


class _DropLines:
    """A console stream that leaves out whole lines holding any of `patterns` (the driver
    prints Ray's forwarded lines as `print(line)`: the text, then its newline)."""

    def __init__(self, stream, patterns: tuple[str, ...]):
        self.stream, self.patterns, self.dropped = stream, patterns, False

    def write(self, text: str) -> int:
        if any(p in text for p in self.patterns):
            self.dropped = True
            return len(text)
        if self.dropped and text == "\n":  # the newline of the line just dropped
            self.dropped = False
            return len(text)
        self.dropped = False
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def quiet_known_noise(verbose: bool) -> None:
    """Leave Ray's `KNOWN_NOISE` lines out of this process's console (once per process)."""
    import sys

    if verbose:
        return
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _DropLines):
            setattr(sys, name, _DropLines(stream, KNOWN_NOISE))


def init_ray() -> str:
    """Connect to the cluster named by RAY_ADDRESS (set inside `ray job submit`), else start a
    fresh local Ray in this process. Returns a line saying which."""
    import ray
    if ray.is_initialized():
        return "Ray: already initialised"
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a fresh in-process Ray even if some other Ray runs on this machine (set
        # RAY_ADDRESS=auto to join that one instead). Its actors are told where its state API
        # is: Ray Train's placement-group cleaner asks it whether the run's controller still
        # lives, and without an address it follows /tmp/ray/ray_current_cluster, which names
        # the last `ray start` cluster (possibly long dead: a 40 s timeout and a traceback at
        # the end of every run, or another cluster's answer).
        port = _free_port()
        ray.init(address="local", log_to_driver=True, dashboard_port=port,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = ray.cluster_resources().get("GPU", 0)
    where = f"cluster at {address}" if address else "a local Ray started in this process"
    return f"Ray: {where} ({cpus:g} CPUs, {gpus:g} GPUs)"


def alive_nodes() -> int:
    import ray
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def nodes_not_seeing(folder: str, timeout_s: float = 60.0) -> list[str]:
    """The alive nodes (other than this one) that do not see `folder` as this process does:
    a marker file written here is looked for by a zero-CPU task pinned to each other node.

    A node-local folder on a multi-node cluster is what users hit first: Ray Train's workers
    on the other nodes would write checkpoints where no one else finds them, and a resume
    there would start over. Found before any worker starts, it is an error naming the path.

    Returns:
        "node <id> (<ip>)" per node that does not see the marker (or whose task failed).
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return []
    token = uuid.uuid4().hex
    marker = Path(folder) / f".avpea-shared-probe-{token[:8]}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    try:
        pending = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                   .remote(str(marker)): n for n in others}
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        unseen = []
        for ref, node in pending.items():
            try:
                seen = ref in ready and ray.get(ref) == token
            except Exception:  # noqa: BLE001 - a node that cannot answer cannot be relied on
                seen = False
            if not seen:
                unseen.append(f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})")
        return unseen
    finally:
        marker.unlink(missing_ok=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
