"""MLflow's basic-auth app as cluster.yaml runs it on the head, started here on 127.0.0.1.

The server takes its arguments and environment variable names from cluster.yaml's start command
(only the address, port and stores are swapped for local ones), its auth config from the
`printf` command that writes basic_auth.ini on the head, and the jobs' user is created by the
head's own user-sync command. Then: no credentials, 401; MLFLOW_TRACKING_USERNAME/PASSWORD in
the environment, a working MlflowClient (runs, metrics, proxied artifacts).

Needs Flask-WTF (MLflow's `auth` extra), which cluster.yaml installs on the head but
requirements.lock does not pin: skipped without it.
"""
from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from tests.toy import free_port, mlflow_server


pytestmark = pytest.mark.slow

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"
SEARCH = "/api/2.0/mlflow/experiments/search"
JOB_USER, JOB_PASSWORD = "avpea-ray", "job-" + secrets.token_urlsafe(16)
ADMIN_PASSWORD = "admin-" + secrets.token_urlsafe(16)
# Variables this test must not inherit (the server, the user-sync command and the client get
# exactly what the test gives them).
_CLEAN = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
          "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME",
          "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


def _head_command(cluster: dict, key: str, needle: str) -> str:
    found = [c for c in cluster[key] if needle in c]
    assert len(found) == 1, f"one command in {key} with {needle!r}"
    return found[0]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    return env | extra


def _server_args(command: str, port: int, home: Path) -> list[str]:
    """cluster.yaml's `mlflow server` arguments with local address, port and stores."""
    args = shlex.split(re.search(r"mlflow server(.*?)(?:[<>);&|]|$)", command).group(1))
    local = {"--host": "127.0.0.1", "--port": str(port),
             "--backend-store-uri": f"sqlite:///{home}/mlflow/mlflow.db",
             "--artifacts-destination": str(home / "artifacts")}
    for i, arg in enumerate(args[:-1]):
        if arg in local:
            args[i + 1] = local.pop(arg)
    assert not local, f"cluster.yaml's mlflow server lacks {sorted(local)}"
    return args


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The basic-auth server; yields (uri, cluster)."""
    cluster = yaml.safe_load(CLUSTER.read_text())
    home = tmp_path_factory.mktemp("head")
    (home / "mlflow").mkdir()
    # The head's own command writes the auth config (into $HOME/mlflow).
    ini_command = _head_command(cluster, "head_setup_commands", "basic_auth.ini")
    subprocess.run(["bash", "-c", ini_command], env=_env(HOME=str(home)), check=True)
    ini = home / "mlflow" / "basic_auth.ini"
    assert "password" not in ini.read_text().lower(), "no password in the auth config"

    start = _head_command(cluster, "head_start_ray_commands", "mlflow server")
    port = free_port()
    # The variables cluster.yaml sets for the server, with values for this test.
    names = set(re.findall(r"\b(MLFLOW_[A-Z_]+)=", start.split("mlflow server")[0]))
    values = {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
              "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
              "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    assert names == set(values), f"cluster.yaml sets {sorted(names)}"
    with mlflow_server(home, _server_args(start, port, home), port, _env(**values)) as uri:
        yield uri, cluster


def _sync_user(cluster: dict, uri: str, admin_password: str) -> subprocess.CompletedProcess:
    """The head's user-sync command's Python part, with this server's address."""
    command = _head_command(cluster, "head_start_ray_commands", "users/")
    code = re.search(r'python -c "(.*?)"', command).group(1)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env=_env(MLFLOW_URI=uri, ADMIN_PASSWORD=admin_password,
                 MLFLOW_TRACKING_USERNAME=JOB_USER, MLFLOW_TRACKING_PASSWORD=JOB_PASSWORD))


def _requests_without_credentials_are_refused(uri: str) -> None:
    assert requests.get(uri + SEARCH, params={"max_results": 1}, timeout=30).status_code == 401
    wrong = requests.get(uri + SEARCH, params={"max_results": 1}, auth=("admin", "not-it-12345"),
                         timeout=30)
    assert wrong.status_code == 401
    admin = requests.get(uri + SEARCH, params={"max_results": 1},
                         auth=("admin", ADMIN_PASSWORD), timeout=30)
    assert admin.status_code == 200, admin.text


def test_credentials_refused_then_job_user_sync_and_client(server, monkeypatch, tmp_path):
    """One test on the module's auth server (a server per parallel test process otherwise)."""
    uri, cluster = server
    _requests_without_credentials_are_refused(uri)
    # Created, then (second `ray up`) its password reset to the same value.
    for _ in range(2):
        done = _sync_user(cluster, uri, ADMIN_PASSWORD)
        assert done.returncode == 0, done.stdout + done.stderr
    refused = _sync_user(cluster, uri, "not-the-admin-password")
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr
    user = requests.get(uri + "/api/2.0/mlflow/users/get", params={"username": JOB_USER},
                        auth=("admin", ADMIN_PASSWORD), timeout=30).json()["user"]
    assert user["is_admin"] is False

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for name in _CLEAN:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException, match="401|nauthorized|credentials"):
        MlflowClient(uri).search_experiments(max_results=1)

    # The way the jobs get in: the URI carries no credentials, the environment does.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", JOB_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", JOB_PASSWORD)
    client = MlflowClient(uri)
    experiment = client.create_experiment("avpea-ray")
    run = client.create_run(experiment).info.run_id
    client.log_metric(run, "train.loss", 0.5, step=1)
    (tmp_path / "config.json").write_text("{}")
    client.log_artifact(run, str(tmp_path / "config.json"))  # proxied by the server
    assert [f.path for f in client.list_artifacts(run)] == ["config.json"]

    # docs/cluster.md: an admin adds a user and lets it log runs into the jobs' experiment.
    from mlflow.server import get_app_client

    def login(user: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    alice = "alice-" + secrets.token_urlsafe(12)
    login("admin", ADMIN_PASSWORD)
    auth = get_app_client("basic-auth", tracking_uri=uri)
    auth.create_user("alice", alice)
    login("alice", alice)
    with pytest.raises(MlflowException, match="403|PERMISSION_DENIED|ermission"):
        client.create_run(experiment)  # default_permission READ
    login("admin", ADMIN_PASSWORD)
    auth.grant_user_permission("alice", "experiment", experiment, "EDIT")
    login("alice", alice)
    client.create_run(experiment)
