"""MLflow tracking: one MLflow run per training run, continued (never duplicated) on resume.

The driver finds or creates the run (tagged with the run's storage path and name), logs the
flattened resolved config as params, and hands the run id to the workers; rank 0 logs step and
epoch metrics into it by id (no `start_run` in workers, so nothing is left RUNNING by a crash
but the run itself, which the resumed job continues and ends).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

RUN_KEY_TAG = "avpea.run_key"
# Runs are found by a digest of their key: a name or path may hold any character, and a
# digest needs no quoting in MLflow's filter syntax.
RUN_KEY_DIGEST_TAG = "avpea.run_key_sha256"
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def redact_uri(uri: str) -> str:
    """The URI without a `user:secret@` part, for logs, params and summaries."""
    return _USERINFO.sub(r"\1***@", uri) if isinstance(uri, str) else uri


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message names the URI."""


def resolve_tracking_uri(configured: str, storage_path: str) -> str:
    """The tracking URI: the config's, else $MLFLOW_TRACKING_URI, else a local sqlite store
    in the storage path (or ./runs when storage is remote)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    local = storage_path if "://" not in storage_path else "runs"
    return f"sqlite:///{Path(local).resolve() / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail fast (seconds, not minutes of retries) if the tracking store cannot be used."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"MLflow store {uri!r}: cannot create {folder}: {err}") from err
        return
    if uri.startswith(("http://", "https://")):
        import requests
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(f"MLflow tracking server {uri!r} is not reachable "
                                f"(run.tracking_uri / MLFLOW_TRACKING_URI): {err}") from err


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'reduction_factor': 8}} -> {'model.reduction_factor': 8}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def start_or_resume_run(uri: str, experiment: str, run_key: str, run_name: str,
                        params: dict[str, Any], artifact_root: str | None = None,
                        parent_run_id: str | None = None) -> tuple[str, bool]:
    """Find the MLflow run of this training run, or create it and log its params.

    Args:
        uri: tracking URI.
        experiment: experiment name (created if missing).
        run_key: what identifies the training run (storage path + name).
        run_name: MLflow's display name.
        params: flattened config and parameter counts (logged once, at creation).
        artifact_root: where a new experiment keeps artifacts (local stores).
        parent_run_id: nest the run under this one (a sweep's trials under the sweep).

    Returns:
        (run id, whether it already existed).
    """
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=artifact_root)
    digest = hashlib.sha256(run_key.encode()).hexdigest()
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_DIGEST_TAG}` = '{digest}'",
                                  max_results=1)
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    tags = {RUN_KEY_TAG: run_key, RUN_KEY_DIGEST_TAG: digest} | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    from mlflow.entities import Param
    items = [Param(k, redact_uri(str(v))[:6000]) for k, v in params.items()]  # no secrets in params
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id, False


class MetricLogger:
    """Logs metrics into an existing run by id (rank 0 only; a no-op elsewhere).

    A resumed attempt re-trains the steps between its checkpoint and the crash; each metric
    is logged once per step, so steps the run already holds are not logged again (training
    is deterministic: the first attempt logged the same values).

    Logging does not block the training step: batches go out on MLflow's asynchronous queue
    and `flush` waits for them (at every checkpoint and at the end).
    """

    def __init__(self, uri: str, run_id: str | None, enabled: bool):
        self.enabled = enabled and bool(run_id)
        self.run_id = run_id
        self.client = _client(uri) if self.enabled else None
        self.logged_up_to = last_logged_steps(self.client, run_id) if self.enabled else {}
        self.pending: list = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(name, float(v), now, step) for name, v in
                 ((_metric_name(k), v) for k, v in metrics.items())
                 if step > self.logged_up_to.get(name, -1)]
        if batch:
            self.pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            _set_tags(self.client, self.run_id, tags)

    def flush(self) -> None:
        """Wait until everything logged so far is in the tracking store."""
        for operation in self.pending:
            operation.wait()
        self.pending.clear()


def start_system_metrics(uri: str, run_id: str, node: int, every_s: float):
    """Sample this node's CPU, memory, disk, network (and GPUs, where NVML finds any) into the
    run as `system/node<node>/...` every `every_s` seconds, continuing the step count of an
    earlier attempt. Returns the monitor (`finish()` stops it and flushes its last samples)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True,
                                   node_id=f"node{node}", tracking_uri=uri)
    monitor.start()
    return monitor


def last_logged_steps(client, run_id: str) -> dict[str, int]:
    """Metric name -> the highest step the run has logged for it."""
    names = client.get_run(run_id).data.metrics
    return {name: max(m.step for m in client.get_metric_history(run_id, name)) for name in names}


def _metric_name(name: str) -> str:
    # MLflow metric names allow letters, digits, _ - . space / : only.
    return "".join(c if c.isalnum() or c in "_-./ :" else "_" for c in name)


def finish_run(uri: str, run_id: str, artifacts: list[tuple[str, str | None]],
               metrics: dict[str, float] | None = None, status: str = "FINISHED") -> None:
    """Log final metrics and artifacts, then mark the run ended.

    Args:
        artifacts: (local path, artifact sub-directory or None) pairs; directories are
            logged whole.
    """
    client = _client(uri)
    logged = client.get_run(run_id).data.metrics
    metrics = {_metric_name(k): v for k, v in (metrics or {}).items()}
    fresh = {k: v for k, v in metrics.items() if k not in logged}  # a rerun of a finished run
    if fresh:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in fresh.items()])
    for path, sub in artifacts:
        if Path(path).is_dir():
            client.log_artifacts(run_id, path, sub)
        else:
            client.log_artifact(run_id, path, sub)
    client.set_terminated(run_id, status)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Tags on a run: a resume's allowed config changes, a sweep trial's identity (params
    cannot change once logged, tags can)."""
    _set_tags(_client(uri), run_id, tags)


def _set_tags(client, run_id: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:5000])


def changes_as_tags(changes: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    return {f"avpea.changed.{key}": f"{old!r} -> {new!r}" for key, (old, new) in changes.items()}
