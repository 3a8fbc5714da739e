"""Bad values are refused before any worker starts, naming the field; flags are taken as typed
values; a resume refuses a changed model or data and records what may change."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avpea_ray.config import ConfigError
from avpea_ray.cli import parse_job_args, resolve_config
from avpea_ray.train.preflight import preflight
from avpea_ray.train.resume import RUN_STATE, check_resume, claim_run_folder
from avpea_ray.train.tracking import redact_uri
from tests.toy import train_overrides

REPO = Path(__file__).resolve().parents[1]

# (command-line arguments after the shard overrides, the field the one-line error must name)
BAD_VALUES = [
    (["run.num_workers=0"], "run.num_workers must be >= 1"),
    (["run.num_workers=[3, 2]"], "run.num_workers must be N or [min, max] with 1 <= min <= max"),
    (["run.num_workers=[1, 2, 3]"], "run.num_workers must be N or [min, max]"),
    (["--num-workers", "1-2", "data.batch_size=64", "data.loader_workers=2"], "run.num_workers=2 x"),
    (["run.log_every_steps=0"], "run.log_every_steps must be >= 1"),
    (["run.checkpoint_every_steps=-1"], "run.checkpoint_every_steps must be >= 0"),
    (["optim.lr=Infinity"], "optim.lr must be a finite number"),
    (["optim.weight_decay=NaN"], "optim.weight_decay must be a finite number"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio must be in [0, 1]"),
    (["run.keep_checkpoints=1"], "run.keep_checkpoints must be >= 2"),
    (["data.batch_size=200"], "data.batch_size=200"),  # more than the 128 training clips
    (["--num-workers", "2", "data.batch_size=64", "data.loader_workers=2"], "data.batch_size=64"),
    (["--run-name", "it's"], "run.name must be letters, digits"),
    (["--run-name", "../escape"], "run.name must be letters, digits"),
    (["run.tracking_uri=http://me:s3cr3t@mlflow:5000"], "run.tracking_uri must not hold credentials"),
]


def _args(shards, storage, extra):
    return [*train_overrides(shards, storage), *extra]


@pytest.mark.parametrize("extra,message", BAD_VALUES, ids=[m.split()[0] for _, m in BAD_VALUES])
def test_bad_value_is_refused_before_any_worker(avqa_shards, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        preflight(resolve_config(parse_job_args("", _args(avqa_shards, tmp_path, extra)), None)[0])


@pytest.mark.slow
def test_job_exits_2_with_one_line_and_starts_no_ray(avqa_shards, tmp_path, capsys):
    """The job as users run it (a process of its own: its exit code and its whole stderr) for a
    check that needs the model built; the same one-line exit 2 in process for a config key and
    a shard check (every message is checked in process above)."""
    from avpea_ray.cli import run_job

    cases = [BAD_VALUES[0], BAD_VALUES[-1], (["model.reduction_factor=5"], "error: model.reduction_factor")]
    *in_process, (extra, message) = cases
    job = subprocess.run([sys.executable, "jobs/avqa.py", *_args(avqa_shards, tmp_path / "job", extra)],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    results = [(tmp_path / "job", job.stdout, job.stderr, job.returncode, message)]
    for number, (extra, message) in enumerate(in_process):
        storage = tmp_path / str(number)
        code = run_job("avqa", "", _args(avqa_shards, storage, extra))
        out, err = capsys.readouterr()
        results.append((storage, out, err, code, message))
    for storage, stdout, stderr, code, message in results:
        assert code == 2, (message, stderr[-2000:])
        assert stderr.strip().count("\n") == 0 and message in stderr, (message, stderr)
        assert "Traceback" not in stderr, message
        assert "Ray:" not in stdout and not (storage / "mlflow.db").exists(), message


def test_flags_are_values_not_override_text(avqa_shards, tmp_path):
    odd = str(tmp_path / 'a "quoted", {odd} path=1')
    cfg = resolve_config(parse_job_args("", [*train_overrides(avqa_shards, tmp_path),
                                             "--storage-path", odd, "--run-name", "fine.name-1"]), None)[0]
    assert cfg.run.storage_path == odd and cfg.run.name == "fine.name-1"


@pytest.mark.parametrize("uri,shown", [
    ("http://user:s3cr3t@mlflow.internal:5000", "http://***@mlflow.internal:5000"),
    ("https://token@host/path", "https://***@host/path"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://host:5000", "http://host:5000"),
])
def test_secrets_in_tracking_uris_are_redacted(uri, shown):
    assert redact_uri(uri) == shown


# -- resume: what may change -------------------------------------------------------------------

def _saved(cfg_dict, data_ids):
    return {"config": cfg_dict, "data_ids": data_ids}


@pytest.fixture
def resolved(avqa_shards, tmp_path):
    from avpea_ray.config import to_dict

    def make(*extra):
        return to_dict(resolve_config(parse_job_args("", [*train_overrides(avqa_shards, tmp_path),
                                                          "--run-name", "r", *extra]), None)[0])
    return make


IDS = {"train": "a" * 64, "val": "b" * 64}


@pytest.mark.parametrize("change,refused", [
    (["optim.lr=0.1"], "optim.lr: 0.004 -> 0.1"),
    (["model.reduction_factor=16"], "model.reduction_factor: 8 -> 16"),
    (["head.hidden=32"], "head.hidden: 64 -> 32"),
    (["data.batch_size=2"], "data.batch_size: 4 -> 2"),
])
def test_resume_refuses_changes_to_model_or_data(resolved, change, refused):
    with pytest.raises(ConfigError, match=refused.replace(".", r"\.")):
        check_resume(_saved(resolved(), IDS), resolved(*change), IDS)


def test_resume_allows_another_number_of_workers(resolved):
    # The reader re-plans the rest of the epoch over the new ranks (tests/test_reader.py,
    # tests/test_elastic.py).
    assert check_resume(_saved(resolved(), IDS), resolved("--num-workers", "2"), IDS) == {
        "run.num_workers": (1, 2)}
    assert check_resume(_saved(resolved(), IDS), resolved("--num-workers", "1-3"), IDS) == {
        "run.num_workers": (1, [1, 3])}


@pytest.mark.parametrize("flag,value,scaling", [("3", 3, 3), ("2-8", [2, 8], (2, 8)), ("4-4", [4, 4], 4)])
def test_num_workers_flag_is_n_or_an_elastic_range(avqa_shards, tmp_path, flag, value, scaling):
    cfg = resolve_config(parse_job_args("", [*train_overrides(avqa_shards, tmp_path), "--num-workers", flag]), None)[0]
    assert cfg.run.num_workers == value and cfg.run.scaling_workers == scaling


@pytest.mark.parametrize("flag", ["0", "two", "8-2", "2-", "0-3"])
def test_num_workers_flag_refuses_what_is_not_n_or_min_max(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args("", ["--num-workers", flag])
    assert exit_info.value.code == 2
    assert "--num-workers: expected N" in capsys.readouterr().err


def test_resume_allows_more_epochs_and_refuses_resharded_data(resolved):
    assert check_resume(_saved(resolved(), IDS), resolved("optim.epochs=20"), IDS) == {"optim.epochs": (10, 20)}
    with pytest.raises(ConfigError, match="data.train: the shards changed"):
        check_resume(_saved(resolved(), IDS), resolved(), IDS | {"train": "c" * 64})


def test_resume_of_a_run_saved_by_an_earlier_version(resolved):
    """Fields that no longer exist (the clips' settings, now in the shard index) and fields added
    since at their defaults (the typed head config's) are not changes; a new field set to
    another value is."""
    earlier = resolved()
    earlier["model"] |= {"image_size": 32, "num_frames": 4, "audio": {"window_seconds": 1.95}}
    earlier["head"] = {"hidden": 64}
    assert check_resume(_saved(earlier, IDS), resolved(), IDS) == {}
    with pytest.raises(ConfigError, match="head.num_heads: None -> 8"):
        check_resume(_saved(earlier, IDS), resolved("head.num_heads=8"), IDS)


def test_run_folder_keeps_the_first_config_and_records_allowed_changes(resolved, tmp_path):
    run_url = str(tmp_path / "runs" / "r")
    assert not claim_run_folder(run_url, resolved(), IDS).resumed
    folder = claim_run_folder(run_url, resolved("optim.epochs=12"), IDS)
    assert folder.resumed and folder.changes == {"optim.epochs": (10, 12)}
    with pytest.raises(ConfigError, match="optim.lr"):
        claim_run_folder(run_url, resolved("optim.lr=0.5"), IDS)
    state = json.loads((Path(run_url) / RUN_STATE).read_text())
    assert state["config"]["optim"]["epochs"] == 12 and state["config"]["optim"]["lr"] == 0.004
    assert state["changes"][0]["changes"] == {"optim.epochs": [10, 12]}


@pytest.mark.parametrize("path,defaulted,nodes,refused", [
    ("/home/u/avpea-runs/runs", True, 3, True),    # the default, on a multi-node cluster
    ("/home/u/avpea-runs/runs", True, 1, False),   # the default, one node
    ("/mnt/shared/runs", False, 3, False),         # given explicitly: may be a shared filesystem
    ("s3://bucket/runs", True, 3, False),
])
def test_default_local_storage_is_refused_on_a_multi_node_cluster(path, defaulted, nodes, refused):
    from avpea_ray.train.preflight import check_storage_shared

    if refused:
        with pytest.raises(ConfigError, match="run.storage_path: the cluster has 3 nodes"):
            check_storage_shared(path, defaulted, nodes)
    else:
        check_storage_shared(path, defaulted, nodes)
