"""The container image and the KubeRay manifests (docs/kubernetes.md), without a cluster.

- every RayJob / RayCluster under deploy/kuberay validates against KubeRay v1.7's CRD schema
  (tests/fixtures/kuberay), made strict as the API server's field validation is, and passes the
  checks of the KubeRay operator's own validation that a manifest alone decides;
- images, versions and entrypoints agree with the package: one image name (pyproject's version),
  the lock's Ray in the base image and every rayVersion, the base image's Python and CUDA those
  of the lock, entrypoints that start with the console script and name configs that exist and
  fit the cluster they run on;
- token auth in every cluster, and every Secret name and key the manifests read in the template.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata as md
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kuberay"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kuberay"
SECRETS_TEMPLATE = DEPLOY / "secrets.example.yaml"
DOCS = ROOT / "docs" / "kubernetes.md"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
# KubeRay v1.7, ray-operator/controllers/ray/utils/constant.go
MAX_NAME = {"RayCluster": 53, "RayJob": 53 - 6}
# What each cluster's Ray containers need: S3 for shards and checkpoints, MLflow for tracking.
REQUIRED_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"}

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc is not None]


def manifest_docs() -> list[tuple[str, int, dict]]:
    return [(path.name, i, doc) for path in sorted(DEPLOY.glob("*.yaml")) if path != SECRETS_TEMPLATE
            for i, doc in enumerate(load_all(path))]


DOCS_BY_ID = {f"{name}:{i}:{doc.get('kind')}": doc for name, i, doc in manifest_docs()}
RAY_DOCS = {key: doc for key, doc in DOCS_BY_ID.items() if doc.get("kind") in CRD_FILES}
RAY_JOBS = {key: doc for key, doc in RAY_DOCS.items() if doc["kind"] == "RayJob"}


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's RayContainerIndex


def all_containers(spec: dict) -> list[dict]:
    return [c for _, g in groups(spec) for c in g["template"]["spec"]["containers"]]


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@functools.cache
def lock() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        from check_image import lock_pins
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    return lock_pins(ROOT / "requirements.lock")


@functools.cache
def dockerfile() -> dict:
    """The Dockerfile's base image (and the versions in its tag), WORKDIR and check_image call."""
    text = (ROOT / "Dockerfile").read_text()
    base = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(base) == 1, f"one FROM line expected, got {base}"
    tag = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<minor>\d+)-cu(?P<cuda>\d+)", base[0])
    assert tag, f"{base[0]}: not an official rayproject/ray:<ray>-py3XX-cuXXX tag"
    checked = re.search(r"check_image\.py\s+--python\s+(\S+)", text)
    return {"base": base[0], "ray": tag["ray"], "python": f"{tag['py']}.{tag['minor']}",
            "cuda": tag["cuda"], "workdir": re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1],
            "checked_python": checked and checked[1], "text": text}


def documented_image() -> str:
    images = set(re.findall(r"^\s*IMAGE=(\S+)", DOCS.read_text(), re.M))
    assert len(images) == 1, f"docs/kubernetes.md names one IMAGE=..., found {images}"
    return images.pop()


def config(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def entrypoint(doc: dict) -> tuple[list[str], dict[str, str]]:
    """The RayJob's entrypoint: its words, and its --flag values (flags without one: "")."""
    words = shlex.split(doc["spec"]["entrypoint"])
    flags, i = {}, 2
    while i < len(words):
        if words[i].startswith("--"):
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            flags[words[i]] = words[i + 1] if has_value else ""
            i += 2 if has_value else 1
        else:
            i += 1
    return words, flags


def quantity(text: str | int) -> float:
    """A Kubernetes CPU/count quantity ("44", "500m") as a number."""
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ------------------------------------------------------------------------------------------------
# The CRD schemas

def strict(schema: dict) -> dict:
    """The schema with unknown fields refused, as the API server's strict field validation
    (kubectl's default) does: every object that lists its properties and neither allows extra
    ones nor preserves unknown fields gets additionalProperties: false. Plain jsonschema would
    otherwise accept a misspelt field, which Kubernetes drops or refuses."""
    def walk(node):
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: ({name: walk(sub) for name, sub in value.items()} if key == "properties" else walk(value))
               for key, value in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    return walk(schema)


@functools.cache
def crd(kind: str) -> tuple[str, dict]:
    """(apiVersion, strict schema) of the CRD's stored version."""
    doc = load_all(FIXTURES / CRD_FILES[kind])[0]
    assert doc["kind"] == "CustomResourceDefinition" and doc["spec"]["names"]["kind"] == kind
    stored = [v for v in doc["spec"]["versions"] if v.get("storage")]
    assert len(stored) == 1, "a CRD has exactly one stored version"
    schema = strict(stored[0]["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI v3.0 schemas are draft-4-like
    return f"{doc['spec']['group']}/{stored[0]['name']}", schema


def schema_errors(doc: dict) -> list[str]:
    api_version, schema = crd(doc["kind"])
    errors = [f"apiVersion: {doc.get('apiVersion')!r}, the stored version is {api_version!r}"] \
        if doc.get("apiVersion") != api_version else []
    for err in sorted(jsonschema.Draft4Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path)):
        errors.append(f"{'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}")
    return errors


def test_fixtures_are_the_published_crds():
    """The CRD copies are byte for byte the ones their README names (origin, version, sha256)."""
    readme = (FIXTURES / "README.md").read_text()
    assert "v1.7" in readme and "Apache" in readme and (FIXTURES / "LICENSE").is_file()
    recorded = dict(re.findall(r"\|\s*`([\w.]+\.yaml)`\s*\|[^|]*\|\s*`([0-9a-f]{64})`", readme))
    assert set(recorded) == set(CRD_FILES.values())
    for name, digest in recorded.items():
        assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == digest, name


def test_deploy_folder_holds_only_validated_kinds():
    """Every document under deploy/kuberay is a RayJob or RayCluster (validated below), or a
    Secret in the template; nothing goes unchecked."""
    assert RAY_JOBS and any(doc["kind"] == "RayCluster" for doc in RAY_DOCS.values())
    assert set(DOCS_BY_ID) == set(RAY_DOCS), f"unexpected kinds: {set(DOCS_BY_ID) - set(RAY_DOCS)}"
    assert {doc["kind"] for doc in load_all(SECRETS_TEMPLATE)} == {"Secret"}


@pytest.mark.parametrize("key", sorted(RAY_DOCS))
def test_manifest_is_valid_against_the_crd_schema(key):
    assert schema_errors(RAY_DOCS[key]) == []


@pytest.mark.parametrize("mutation, expected", [
    pytest.param(lambda spec: spec["headGroupSpec"].__setitem__("rayStartParam", {}),
                 "'rayStartParam' was unexpected", id="misspelt-field"),
    pytest.param(lambda spec: spec.setdefault("authOptions", {}).__setitem__("mode", "on"),
                 "'on' is not one of", id="enum"),
    pytest.param(lambda spec: ray_container(spec["headGroupSpec"])["resources"]["limits"].__setitem__("cpu", "four"),
                 "does not match", id="quantity"),
    pytest.param(lambda spec: spec["workerGroupSpecs"][0].pop("groupName"),
                 "'groupName' is a required property", id="required"),
    pytest.param(lambda spec: spec["workerGroupSpecs"][0].__setitem__("replicas", "2"),
                 "is not of type 'integer'", id="type"),
])
def test_schema_check_catches_broken_manifests(mutation, expected):
    """The validation above would see a misspelt field, a wrong enum value, a malformed quantity,
    a missing required field and a wrong type (guards against a schema that accepts anything)."""
    for doc in RAY_DOCS.values():
        broken = copy.deepcopy(doc)
        mutation(cluster_spec(broken))
        assert any(expected in line for line in schema_errors(broken)), doc["metadata"]["name"]


def validation_errors(doc: dict) -> list[str]:
    """The KubeRay v1.7 operator's own checks (controllers/ray/utils/validation.go, run when it
    reconciles the resource) that a manifest alone decides; the rest need a cluster."""
    kind, name, spec = doc["kind"], doc["metadata"].get("name", ""), cluster_spec(doc)
    errors = []
    if len(name) > MAX_NAME[kind] or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"{kind} name {name!r}: a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    for group_name, group in groups(spec):
        start = group.get("rayStartParams", {})
        if group.get("resources") and any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{group_name}: resources in both rayStartParams and resources")
        if "labels" in start:
            errors.append(f"{group_name}: rayStartParams['labels'] is not supported")
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{group_name}: no container")
        if group_name != "head":
            low, high = group.get("minReplicas"), group.get("maxReplicas")
            if not autoscaling and (low is None or high is None):
                errors.append(f"{group_name}: minReplicas and maxReplicas must be set without autoscaling")
            if low is not None and high is not None and not low <= group.get("replicas", low) <= high:
                errors.append(f"{group_name}: replicas outside [minReplicas, maxReplicas]")
        if (autoscaling and spec.get("autoscalerOptions", {}).get("version") == "v2"
                and group["template"]["spec"].get("restartPolicy", "Never") != "Never"):
            errors.append(f"{group_name}: autoscaler v2 needs restartPolicy Never or unset")
    auth = spec.get("authOptions", {})
    if auth.get("mode") == "token" and Version(spec.get("rayVersion", "0")) < Version("2.52.0"):
        errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    if kind == "RayJob":
        if doc["spec"].get("ttlSecondsAfterFinished", 0) < 0 or doc["spec"].get("backoffLimit", 0) < 0:
            errors.append("ttlSecondsAfterFinished and backoffLimit must not be negative")
        if auth.get("enableK8sTokenAuth"):
            errors.append("K8s token auth is not supported for RayJob")
    return errors


@pytest.mark.parametrize("key", sorted(RAY_DOCS))
def test_manifest_passes_kuberay_validation(key):
    assert validation_errors(RAY_DOCS[key]) == []


# ------------------------------------------------------------------------------------------------
# Image, versions, Python

def test_one_image_name_everywhere():
    """`<registry>/<project>:<project version>`: docs/kubernetes.md's IMAGE, the Dockerfile's
    build comment and every container of every manifest."""
    image = documented_image()
    project = pyproject()["project"]
    assert image.rsplit("/", 1)[-1] == f"{project['name']}:{project['version']}", image
    assert f"IMAGE={image}" in dockerfile()["text"], "the Dockerfile's build comment names another image"
    for key, doc in RAY_DOCS.items():
        for container in all_containers(cluster_spec(doc)):
            assert container["image"] == image, f"{key} {container['name']}: {container['image']}"


def test_ray_version_is_the_locked_one():
    ray = lock()["ray"]
    assert dockerfile()["ray"] == ray, f"Dockerfile base {dockerfile()['base']}, lock ray=={ray}"
    for key, doc in RAY_DOCS.items():
        assert cluster_spec(doc)["rayVersion"] == ray, key


def test_image_cuda_is_the_locked_torch_build():
    """The base image's CUDA is the one of the CUDA runtime wheel the lock's torch brings."""
    runtime = [v for name, v in lock().items() if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", name)]
    assert len(runtime) == 1, "one CUDA runtime wheel in the lock"
    major, minor = runtime[0].split(".")[:2]
    assert dockerfile()["cuda"] == f"{major}{minor}", f"{dockerfile()['base']} vs CUDA runtime {runtime[0]}"


def test_image_python_fits_the_package_and_the_lock():
    """The base image's Python: the one the build checks, allowed by pyproject and by every
    locked distribution (their Requires-Python, from the installed metadata)."""
    python = dockerfile()["python"]
    assert dockerfile()["checked_python"] == python, "the Dockerfile's check_image.py --python differs"
    version = f"{python}.0"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(version)
    refused = []
    for name in lock():
        try:
            requires = md.metadata(name).get("Requires-Python")
        except md.PackageNotFoundError:
            continue
        if requires and not SpecifierSet(requires).contains(version):
            refused.append(f"{name} (Requires-Python {requires})")
    assert refused == [], f"Python {python} is refused by {refused}"


def test_check_image_passes_here_and_catches_a_wrong_pin(tmp_path):
    """The build's last step on the local environment (which scripts/setup.sh installs from the
    lock): no problem; and with a lock pinning another Ray, it names ray."""
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import check_image
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    assert check_image.version_problems(ROOT / "requirements.lock") == []
    wrong = tmp_path / "requirements.lock"
    wrong.write_text(re.sub(r"(?m)^ray==.*$", "ray==0.0.1", (ROOT / "requirements.lock").read_text()))
    assert any(line.startswith("ray:") and "0.0.1" in line for line in check_image.version_problems(wrong))


def test_containers_run_in_the_image_project_folder():
    """Relative config paths in an entrypoint resolve in the Dockerfile's WORKDIR."""
    for key, doc in RAY_DOCS.items():
        for _, group in groups(cluster_spec(doc)):
            assert ray_container(group).get("workingDir") == dockerfile()["workdir"], key


# ------------------------------------------------------------------------------------------------
# Entrypoints and the configs they run

def test_rayjob_lifecycle():
    """A RayJob's cluster goes when the job ends, after a grace period, with retries."""
    for key, doc in RAY_JOBS.items():
        spec = doc["spec"]
        assert spec.get("shutdownAfterJobFinishes") is True, key
        assert spec.get("ttlSecondsAfterFinished", 0) > 0, key
        assert spec.get("backoffLimit", 0) >= 1, key


@pytest.mark.parametrize("key", sorted(RAY_JOBS))
def test_rayjob_entrypoint_runs_an_existing_config_that_fits_the_cluster(key):
    doc = RAY_JOBS[key]
    words, flags = entrypoint(doc)
    scripts = pyproject()["project"]["scripts"]
    assert words[0] in scripts, f"{words[0]!r} is not a console script of pyproject ({sorted(scripts)})"
    assert words[1] == "train", "a training RayJob runs `train`"
    # The real command line takes the words and resolves the config they name.
    from avpea_ray.cli import parse_job_args, resolve_config
    resolved, _ = resolve_config(parse_job_args("", words[2:], task_flag=True), None)
    assert resolved.run.name == doc["metadata"]["name"] and resolved.run.use_gpu
    path = flags.get("--config", "")
    assert path.startswith("configs/") and (ROOT / path).is_file(), f"--config {path!r}: no such config"
    cfg = config(path)
    run = cfg.get("run", {})
    assert cfg.get("task") and "sweep" not in cfg, f"{path}: not a training config"
    # Results must outlive the cluster, which is deleted with its disks.
    storage = flags.get("--storage-path") or run.get("storage_path", "")
    assert storage.startswith("s3://"), f"storage {storage!r}: the run's results would be deleted with the cluster"
    assert flags.get("--run-name") == doc["metadata"]["name"], "one RayJob per run, named like it"
    # MLflow: the config leaves the URI to the environment, which the Secret fills.
    assert not run.get("tracking_uri"), f"{path}: run.tracking_uri overrides MLFLOW_TRACKING_URI"
    # The cluster holds the run: one GPU per Train worker, the config's CPUs per worker.
    workers = int(flags.get("--num-workers") or run.get("num_workers", 1))
    assert "--use-gpu" in flags or run.get("use_gpu"), "the GPU workers would sit idle"
    spec = cluster_spec(doc)
    assert not spec.get("enableInTreeAutoscaling"), "a training run needs its GPUs from start to end"
    capacity = sum(g.get("replicas", 0) * gpus(ray_container(g)) for _, g in groups(spec)[1:])
    assert capacity == workers, f"{workers} workers on {capacity} GPUs"
    for name, group in groups(spec)[1:]:
        container = ray_container(group)
        need = gpus(container) * float(run.get("cpus_per_worker", 1))
        assert quantity(container["resources"]["limits"]["cpu"]) >= need, f"{name}: {need} CPUs needed"


def documented_commands() -> list[tuple[str, str]]:
    """(subcommand, config) of every `avpea-ray train|sweep ... --config configs/X` in the docs
    and manifests (comments included)."""
    texts = [DOCS.read_text()] + [p.read_text() for p in sorted(DEPLOY.glob("*.yaml"))]
    pattern = r"avpea-ray\s+(train|sweep)\b[^\n]*?--config\s+(configs/[\w./-]+\.ya?ml)"
    return sorted({m for text in texts for m in re.findall(pattern, text)})


def test_documented_commands_name_existing_configs():
    commands = documented_commands()
    assert ("sweep", "configs/sweep_avqa_vit_b16.yaml") in commands
    for sub, path in commands:
        assert (ROOT / path).is_file(), path
        assert ("sweep" in config(path)) == (sub == "sweep"), f"avpea-ray {sub} --config {path}"


def test_raycluster_runs_the_documented_sweeps():
    """The sweep configs submitted to the RayCluster find their trial drivers' custom resources
    on a CPU group (cluster.yaml's on-demand head) and the GPUs for their concurrent trials."""
    clusters = [doc for doc in RAY_DOCS.values() if doc["kind"] == "RayCluster"]
    sweeps = [path for sub, path in documented_commands() if sub == "sweep"]
    assert clusters and sweeps
    for doc in clusters:
        spec = cluster_spec(doc)
        assert spec.get("enableInTreeAutoscaling"), "GPU pods should come and go with the trials"
        cpu_groups = [g for _, g in groups(spec) if gpus(ray_container(g)) == 0]
        for path in sweeps:
            cfg = config(path)
            sweep, run = cfg["sweep"], cfg["run"]
            for resource in sweep.get("driver_resources", {}):
                assert any(resource in g.get("resources", {}) for g in cpu_groups), \
                    f"{path}: no CPU group offers {resource!r} for the trial drivers"
            gpu_max = sum(g.get("maxReplicas", 0) * gpus(ray_container(g)) for _, g in groups(spec)[1:])
            concurrent = max(1, sweep.get("max_concurrent_trials", 1))
            assert run["num_workers"] * concurrent <= gpu_max, f"{path}: trials need more GPUs than {gpu_max}"
            for name, group in groups(spec)[1:]:
                container = ray_container(group)
                need = gpus(container) * float(run.get("cpus_per_worker", 1))
                assert quantity(container["resources"]["limits"]["cpu"]) >= need, f"{name}: {need} CPUs needed"


# ------------------------------------------------------------------------------------------------
# Token auth and Secrets

@pytest.mark.parametrize("key", sorted(RAY_DOCS))
def test_token_auth_is_on(key):
    """Ray >= 2.59 expects token auth; KubeRay's authOptions.mode token generates the token and
    hands it to every Ray container and the submitter. Nothing may switch it off."""
    spec = cluster_spec(RAY_DOCS[key])
    assert spec.get("authOptions", {}).get("mode") == "token"
    for container in all_containers(spec):
        for env in container.get("env", []):
            assert env["name"] != "RAY_AUTH_MODE" or env.get("value") == "token", container["name"]


def secret_refs() -> list[tuple[str, str, str, bool]]:
    """(where, secret, key or "*" for envFrom, optional) of every Secret a manifest reads."""
    refs = []
    for key, doc in RAY_DOCS.items():
        for container in all_containers(cluster_spec(doc)):
            where = f"{key} {container['name']}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((where, ref["name"], ref["key"], bool(ref.get("optional"))))
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    refs.append((where, source["secretRef"]["name"], "*", bool(source["secretRef"].get("optional"))))
    return refs


def test_ray_containers_read_s3_and_mlflow_from_secrets():
    """Head (drivers) and workers (shards, checkpoints, rank 0's metrics) alike."""
    for key, doc in RAY_DOCS.items():
        for group_name, group in groups(cluster_spec(doc)):
            names = {env["name"] for env in ray_container(group).get("env", [])
                     if "secretKeyRef" in env.get("valueFrom", {})}
            assert REQUIRED_ENV <= names, f"{key} {group_name}: missing {REQUIRED_ENV - names}"


def test_secrets_template_matches_the_manifests():
    template = {doc["metadata"]["name"]: {**doc.get("data", {}), **doc.get("stringData", {})}
                for doc in load_all(SECRETS_TEMPLATE)}
    text = SECRETS_TEMPLATE.read_text()
    used = set()
    for where, name, key, optional in secret_refs():
        assert name in template, f"{where}: Secret {name!r} is not in {SECRETS_TEMPLATE.name}"
        used.add((name, key))
        if key == "*" or key in template[name]:
            continue
        # An optional key may be left out of the template, but must be shown in a comment.
        assert optional and re.search(rf"(?m)^\s*#\s*{key}:", text), \
            f"{where}: key {key!r} of Secret {name!r} is not in {SECRETS_TEMPLATE.name}"
    for name, keys in template.items():
        for key in keys:
            assert (name, key) in used or (name, "*") in used, f"{name}.{key}: no manifest reads it"


def test_secrets_template_holds_no_secret():
    for doc in load_all(SECRETS_TEMPLATE):
        for key, value in {**doc.get("data", {}), **doc.get("stringData", {})}.items():
            if re.search(r"SECRET|PASSWORD|TOKEN|KEY_ID", key):
                assert value == "REPLACE-ME", f"{doc['metadata']['name']}.{key}: a placeholder only"
