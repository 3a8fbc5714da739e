"""The function Ray Train runs on each worker, in a module that imports nothing heavy.

Ray Train's controller unpickles the train function and its config, though it never runs
them: pickled by reference, they would make it import torch's compiler stack, timm and the
model (~1 CPU-second of every run's start). Here the task class travels as bytes and the
loop is imported by the workers, when they start it.
"""
from __future__ import annotations

import pickle


def train_loop_config(config: dict, task: type, **fields) -> dict:
    """What `train_loop_per_worker` takes: the resolved config (a dict), the task class (as
    bytes, unpickled in the worker) and the other `fields` (mlflow, dry_run, progress)."""
    import ray.cloudpickle

    return {"config": config, "task": ray.cloudpickle.dumps(task), **fields}


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: `avpea_ray.train.loop.train_loop_per_worker` with the task class
    unpickled (bytes this run's driver pickled, never read from storage)."""
    from .loop import train_loop_per_worker as run

    run(loop_config | {"task": pickle.loads(loop_config["task"])})
