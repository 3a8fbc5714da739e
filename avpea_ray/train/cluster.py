"""Ray start-up: join the cluster `ray job submit` names, else start a local Ray."""
from __future__ import annotations

import os


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
