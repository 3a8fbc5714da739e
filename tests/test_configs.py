"""The shipped configs and cluster.yaml: they resolve, and they say what the paper says.

Fast: configs are only parsed, and models are built on the meta device (shapes, no weights, no
download).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from avpea_ray.config import load_config, to_dict
from avpea_ray.data.audio import AudioConfig
from avpea_ray.model.params import count_parameters
from avpea_ray.tasks import TASKS, build_model
from avpea_ray.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
CLUSTER = ROOT / "cluster.yaml"
DOCS = ROOT / "docs" / "cluster.md"

# Training configs; sweep files add a `sweep` section and are checked in tests/test_sweep.py.
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*")
                      if p.suffix in (".yaml", ".yml", ".json") and "sweep" not in p.name)

VIT_B = "vit_base_patch16_224.augreg_in21k"
VIT_L = "vit_large_patch16_224.augreg_in21k"
# The audio front ends the sharders write (and record in shards.json): sharding.musicavqa uses
# AudioConfig()'s defaults, sharding.ave its 1 s / 102-frame variant.
AVQA_AUDIO = {"window_seconds": 1.95, "target_frames": 192, "num_mel_bins": 128,
              "mean": -4.1426, "std": 3.2001}
AVE_AUDIO = {"window_seconds": 1.0, "target_frames": 102, "num_mel_bins": 128,
             "mean": -4.1426, "std": 3.2001}

# file -> (task, backbone, audio front end, the paper's headline number quoted in its header)
PAPER = {
    "avqa_vit_b16.yaml": ("avqa", VIT_B, AVQA_AUDIO, "74.90"),
    "avqa_vit_l16.yaml": ("avqa", VIT_L, AVQA_AUDIO, "75.27"),
    "avel_vit_b16.yaml": ("avel", VIT_B, AVE_AUDIO, "75.65"),
    "avel_vit_l16.yaml": ("avel", VIT_L, AVE_AUDIO, "79.90"),
    "avr_vit_b16.yaml": ("avr", VIT_B, AVE_AUDIO, "64.10"),
    "avc_vit_b16.yaml": ("avc", VIT_B, AVE_AUDIO, "11.37"),
}
# Adapter parameters with both streams adapted at r = 8 (paper: 3.7M / 12.9M; exact counts in
# reference.md section 1).
ADAPTER_PARAMS = {VIT_B: 3_654_192, VIT_L: 12_890_208}
BACKBONE_WIDTH = {VIT_B: 768, VIT_L: 1024}


def _ids(paths):
    return [p.name for p in paths]


def _head_kwargs(cfg: TrainConfig) -> dict:
    """The head arguments of a config with the real dataset's data-derived ones. Retrieval
    configs name BERT from the hub, which tests cannot download: a random text model stands in
    (these tests check the trunk)."""
    head = TASKS[cfg.task].reference_head_args | to_dict(cfg)["head"]
    return head | {"text_model": "random"} if cfg.task == "avr" else head


def test_the_paper_configs_are_there():
    assert set(PAPER) <= {p.name for p in CONFIG_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_config_resolves(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.task in TASKS
    to_dict(cfg)  # what every run saves


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings(name):
    task, backbone, audio, paper_number = PAPER[name]
    path = CONFIG_DIR / name
    cfg = load_config(TrainConfig, path)
    assert cfg.task == task
    assert cfg.model.backbone == backbone
    assert cfg.model.weights == "timm"
    assert cfg.model.reduction_factor == 8
    assert cfg.model.adapters == "both"
    assert cfg.model.cross_attention is True
    assert cfg.model.gating == "learned"
    assert cfg.optim.lr == pytest.approx(3e-4)
    # The header says what it reproduces and the paper's number.
    assert paper_number in path.read_text()


@pytest.mark.parametrize("size", ["b16", "l16"])
def test_avqa_paper_configs_chain_avsts_two_stages(size):
    """The QA stage starts from the grounding stage's published best adapters, and the two
    build the same model (what `model.init_from` requires before any worker starts)."""
    from avpea_ray.data import storage
    from avpea_ray.model.adapter_io import TRAINING_ONLY_HEAD_ARGS

    grounding = load_config(TrainConfig, CONFIG_DIR / f"avqa_grounding_vit_{size}.yaml")
    qa = load_config(TrainConfig, CONFIG_DIR / f"avqa_vit_{size}.yaml")
    assert (grounding.head.stage, qa.head.stage) == ("grounding", "qa")
    assert grounding.model.init_from == ""
    assert qa.model.init_from == storage.join(grounding.run.storage_path,
                                              f"{grounding.run.name}/best_adapters")
    assert grounding.model.architecture() == qa.model.architecture()
    same = lambda cfg: {k: v for k, v in to_dict(cfg)["head"].items() if k not in TRAINING_ONLY_HEAD_ARGS}
    assert same(grounding) == same(qa)
    assert grounding.data == qa.data and grounding.data.batch_size >= 2
    assert grounding.run.name != qa.run.name


@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_sharder_writes_the_papers_audio(name):
    """The fbank windows a config's shards hold (recorded in their index, the one record of
    them) are the paper's: the sharder of the config's dataset writes them by default."""
    task, _, audio, _ = PAPER[name]
    if task == "avqa":
        written = AudioConfig()  # sharding.musicavqa
    elif task == "avel":
        from sharding.ave import AUDIO as written
    else:
        from sharding.valor import AUDIO as written
    assert {k: getattr(written, k) for k in audio} == pytest.approx(audio)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_cluster_run_settings(name):
    cfg = load_config(TrainConfig, CONFIG_DIR / name)
    assert cfg.run.use_gpu is True
    assert cfg.run.num_workers == 8
    assert cfg.run.keep_checkpoints == 3
    assert cfg.run.checkpoint_every_steps > 0
    assert cfg.run.storage_path.startswith("s3://")
    for split in ("train", "val", "test"):
        assert getattr(cfg.data, split).startswith("s3://"), split


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_reduction_factor_divides_backbone_width(path):
    cfg = load_config(TrainConfig, path)
    model = build_model(cfg.model, cfg.task, _head_kwargs(cfg), meta=True)
    assert model.trunk.dim % cfg.model.reduction_factor == 0
    if cfg.model.backbone in BACKBONE_WIDTH:
        assert model.trunk.dim == BACKBONE_WIDTH[cfg.model.backbone]
    if cfg.model.backbone in ADAPTER_PARAMS and cfg.model.adapters == "both" \
            and cfg.model.reduction_factor == 8:
        assert count_parameters(model).adapter == ADAPTER_PARAMS[cfg.model.backbone]


# -- cluster.yaml ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_is_a_ray_launcher_config(cluster):
    """Ray's own defaults-filling and schema check, as `ray up` runs them (no AWS calls)."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert cluster["provider"]["type"] == "aws"
    validate_config(prepare_config(cluster))


def test_cluster_node_types(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in types
    head_cfg = types[head]["node_config"]
    assert "InstanceMarketOptions" not in head_cfg, "the head must be on-demand"
    assert not types[head]["resources"].get("GPU")
    assert head_cfg["InstanceType"][0] not in "gp", "the head needs no GPU"

    workers = {name: t for name, t in types.items() if name != head}
    # AWS GPU families are g* and p* (g5, g6e, p4d, p5...); or GPUs declared explicitly.
    gpu = {n: t for n, t in workers.items()
           if t["node_config"]["InstanceType"][0] in "gp" or t["resources"].get("GPU")}
    assert gpu, "no GPU worker type"
    assert any(t.get("max_workers", 0) >= 1 for t in gpu.values())

    on_demand = {n: t for n, t in workers.items() if t["resources"].get("on_demand")}
    assert on_demand, "no worker type carries the on_demand custom resource"
    for name, t in on_demand.items():
        assert "InstanceMarketOptions" not in t["node_config"], f"{name} must not be spot"


def test_cluster_installs_the_project_with_the_lock(cluster):
    mounts = cluster["file_mounts"]
    assert mounts.get("~/avpea-ray") == "."
    commands = " && ".join(cluster["setup_commands"])
    assert "-c requirements.lock" in commands or "--constraint requirements.lock" in commands
    assert "-e ." in commands and "~/avpea-ray" in commands


def test_cluster_token_auth(cluster):
    """Every node starts with token auth and gets the token through file_mounts."""
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cluster[key])
        assert "RAY_AUTH_MODE=token" in start, key
        assert "RAY_AUTH_MODE=disabled" not in start, key


def _mlflow_server_command(cluster) -> tuple[str, list[str]]:
    """The head command that starts `mlflow server`, and that server's arguments."""
    found = [c for c in cluster["head_setup_commands"] + cluster["head_start_ray_commands"]
             if "mlflow server" in c]
    assert len(found) == 1, "exactly one head command starts the MLflow server"
    command = found[0]
    # The arguments up to the first redirection, closing bracket or command separator.
    args = re.search(r"mlflow server(.*?)(?:[<>);&|]|$)", command).group(1)
    return command, shlex.split(args)


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def test_cluster_mlflow_server_is_private_and_authenticated(cluster):
    """The MLflow server proxies S3 with the head's IAM role: it must listen on the head's
    private address only (not 0.0.0.0) and require a login (MLflow's basic-auth app)."""
    command, args = _mlflow_server_command(cluster)
    host = _option(args, "--host")
    assert host is not None, "--host must be given: MLflow's default may change"
    assert host not in ("0.0.0.0", "::", "[::]", "*"), f"binds every interface: --host {host}"
    assert "0.0.0.0" not in command
    assert not host.startswith("127.") and host != "localhost", "workers could not reach it"
    assert _option(args, "--app-name") == "basic-auth"
    # The auth config and the secrets come from files on the head, never from the repo.
    assert "MLFLOW_AUTH_CONFIG_PATH=" in command
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=" in command
    assert re.search(r"MLFLOW_AUTH_ADMIN_PASSWORD=\"?\$\(cat ", command), \
        "the admin password is read from a file the user provides"
    # Flask-WTF, which the basic-auth app imports, is not in requirements.lock.
    assert "mlflow[auth]" in " ".join(cluster["head_setup_commands"])


def test_cluster_mlflow_credentials_stay_out_of_the_repo(cluster):
    """No password in cluster.yaml or in a tracking URI; every node's Ray (hence every job
    driver and Train worker) gets MLFLOW_TRACKING_USERNAME/PASSWORD from a file the user
    provides."""
    text = CLUSTER.read_text()
    assert not re.search(r"(?im)^[^#]*\b(admin_password|MLFLOW_[A-Z_]*PASSWORD)\s*=\s*[\"']?\w",
                         text), "a literal password in cluster.yaml"
    assert "password1234" not in text  # older MLflow's shipped default
    start = " ".join(cluster["head_start_ray_commands"])
    uri = re.search(r'MLFLOW_TRACKING_URI=("[^"]*"|\S+)', start).group(1)
    assert "@" not in uri, "credentials must not be put in the tracking URI"
    # The URI points at the address the server binds.
    _, args = _mlflow_server_command(cluster)
    assert _option(args, "--port") in uri
    env_file = "~/.avpea-ray/mlflow_tracking.env"
    assert cluster["file_mounts"].get("~/.avpea-ray") == "~/.avpea-ray"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        ray_start = next(c for c in cluster[key] if "ray start" in c)
        assert f". {env_file}" in ray_start and "set -a" in ray_start, key
        assert ray_start.index(env_file) < ray_start.index("ray start"), key


# -- docs/cluster.md --------------------------------------------------------------------------

def test_docs_cover_every_paper_config():
    text = DOCS.read_text()
    assert "not measured" in text  # the paper's numbers are labelled as such
    for name, (_, _, _, number) in PAPER.items():
        assert name in text and number in text, name
    for split in ("musicavqa/train", "musicavqa/val", "musicavqa/test",
                  "ave/train", "ave/val", "ave/test"):
        assert f"s3://YOUR-BUCKET/avpea/{split}" in text, split
    assert "python -m sharding.validate" in text and "--ranks 8 --loader-workers 4" in text


def test_docs_mlflow_is_private_and_authenticated():
    text = DOCS.read_text()
    assert "### MLflow on the cluster: private and authenticated" in text
    assert "--app-name basic-auth" in text
    assert "MLFLOW_TRACKING_USERNAME" in text and "MLFLOW_TRACKING_PASSWORD" in text
    # The UI is reached through a tunnel to the private address, not the head's localhost.
    assert "--remote-port 5000" not in text
    assert "-L 5000:$HEAD_PRIVATE_IP:5000" in text
