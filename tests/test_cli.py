"""`avpea-ray`: one command line for training, sweeps, sharding, validation and parameter
counts, each with --help that shows a real example; `train --task` runs that task's demo. (The
demo's dry run end to end, as submitted to a cluster: tests/test_job_submit.py.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from avpea_cli.main import COMMANDS, SHARDERS, main

ROOT = Path(__file__).resolve().parents[1]


def test_the_console_script_is_installed_and_lists_every_command():
    script = Path(sys.executable).parent / "avpea-ray"
    assert script.exists(), "pip install -e . installs the avpea-ray console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "sweep", "shard", "validate", "params", "predict", "infer"):
        assert f"  {command}" in out, out


@pytest.mark.parametrize("command,example", [
    ("train", "avpea-ray train --config configs/avqa_grounding_vit_b16.yaml"),
    ("sweep", "avpea-ray sweep --config configs/sweep_avqa_vit_b16.yaml"),
    ("shard", "avpea-ray shard musicavqa --annotations"),
    ("validate", "avpea-ray validate s3://"),
    ("params", "avpea-ray params --task avel"),
    ("predict", "avpea-ray predict runs/avqa-demo/best_adapters --video concert.mp4"),
    ("infer", "avpea-ray infer runs/avqa-demo/best_adapters --shards demo_data/shards/test"),
    ("reproduce", "avpea-ray reproduce --demo --only table2 optim.epochs=1"),
])
def test_each_command_has_help_with_a_real_example(command, example, capsys):
    assert set(COMMANDS) == {"train", "sweep", "shard", "validate", "params", "predict", "infer", "reproduce"}
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert example in out, out
    assert f"usage: avpea-ray {command}" in out  # the usage line names the command as typed
    # Every config file an example names exists.
    for word in out.split():
        if word.startswith("configs/"):
            assert (ROOT / word).is_file(), word


@pytest.mark.parametrize("dataset", sorted(SHARDERS))
def test_each_sharder_answers_help_under_its_command_name(dataset, capsys):
    assert main(["shard", dataset, "--help"]) == 0
    assert f"avpea-ray shard {dataset}" in capsys.readouterr().out


def test_unknown_command_or_dataset_is_a_usage_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main(["shard", "kinetics"]) == 2


def test_params_prints_the_peft_line(capsys):
    assert main(["params", "--task", "avqa", "--backbone", "vit_base_patch16_224"]) == 0
    assert "trainable params: " in capsys.readouterr().out


def test_epoch_progress_bar_prints_whole_lines_with_eta_loss_and_rate(monkeypatch):
    """The rank-0 bar reaches the driver through a line-by-line log: every redraw is a line of
    its own with the steps, the ETA, the loss and clips/s."""
    import io

    import torch

    from avpea_ray.train import loop

    monkeypatch.setattr(loop._EpochBar, "INTERVAL_S", 0.0)
    out = io.StringIO()
    bar = loop._EpochBar(epoch=3, total=4, done=1, stream=out)
    for _ in range(3):
        bar.step(torch.tensor(1.25), samples=8)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) >= 3
    assert lines[-1].startswith("epoch 3: 100%") and "4/4" in lines[-1]
    assert "loss=1.250" in lines[-1] and "clips_per_s=" in lines[-1]
    assert "<" in lines[1]  # elapsed<remaining: the ETA


def test_known_noise_lines_are_left_out_whole():
    import io

    from avpea_ray.train.cluster import KNOWN_NOISE, _DropLines

    out = io.StringIO()
    stream = _DropLines(out, KNOWN_NOISE)
    for line in ("epoch 0 step 10/30", f"(TrainController) [E] {KNOWN_NOISE[0]} and ID 'x' has ...", "done"):
        print(line, file=stream)
    assert out.getvalue() == "epoch 0 step 10/30\ndone\n"


def test_train_runs_the_demo_of_the_task_asked_for(capsys):
    """`avpea-ray train --task avel` (no config) resolves the AVE demo config: an AVQA-only head
    key is refused for it, by name, before any data is built or Ray starts."""
    assert main(["train", "--task", "avel", "head.stage=grounding"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key head.stage" in err, err
