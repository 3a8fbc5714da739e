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
    # "local": a fresh in-process Ray even if some other Ray runs on this machine (set
    # RAY_ADDRESS=auto to join that one instead).
    ray.init(address=address or "local", log_to_driver=True)
    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = ray.cluster_resources().get("GPU", 0)
    where = f"cluster at {address}" if address else "a local Ray started in this process"
    return f"Ray: {where} ({cpus:g} CPUs, {gpus:g} GPUs)"


def alive_nodes() -> int:
    import ray
    return sum(1 for node in ray.nodes() if node.get("Alive"))
