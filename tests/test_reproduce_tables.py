"""The paper's numbers as shipped, and the table writer on fixed trial records: every number
present with its table and column, the paper's conventions applied to the measured numbers,
Table 4's ordering check passing and failing, the files written."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from avpea_ray.config import ConfigError
from avpea_ray.reproduce.paper import load_paper
from avpea_ray.reproduce.tables import build_tables, column_values, render_markdown, write_tables

ROOT = Path(__file__).resolve().parents[1]
ROWS, ORDERING = load_paper()
BY_ID = {row.id: row for row in ROWS}

# (row, column) -> the paper's number, read off the paper's Tables 1-4 by hand.
PAPER = {
    ("table1_avel_b16", "Acc"): 75.65, ("table1_avel_l16", "Acc"): 79.90,
    ("table2_avqa_b16", "Audio"): 76.16, ("table2_avqa_b16", "Visual"): 78.82,
    ("table2_avqa_b16", "Audio-visual"): 69.72, ("table2_avqa_b16", "Avg"): 74.90,
    ("table2_avqa_l16", "Audio"): 74.49, ("table2_avqa_l16", "Visual"): 80.06,
    ("table2_avqa_l16", "Audio-visual"): 71.26, ("table2_avqa_l16", "Avg"): 75.27,
    ("table3_avr", "R@1"): 64.10, ("table3_avr", "R@5"): 86.60, ("table3_avr", "R@10"): 92.40,
    ("table3_avr", "Avg"): 81.00,
    ("table3_avc", "BLEU4"): 11.37, ("table3_avc", "METEOR"): 19.09, ("table3_avc", "ROUGE-L"): 37.06,
    ("table3_avc", "Avg"): 22.51,
    ("table3_avqa_gen", "Acc"): 78.63,
    ("table4_none", "Acc"): 72.01, ("table4_audio", "Acc"): 72.71, ("table4_visual", "Acc"): 74.68,
    ("table4_both", "Acc"): 75.65,
}
PARAMS = {"table1_avel_b16": (3.7, 17.8), "table1_avel_l16": (12.9, 27.2),
          "table2_avqa_b16": (3.7, 12.4), "table2_avqa_l16": (12.9, 21.9)}


def test_every_paper_number_is_in_the_package_data_with_its_table():
    assert {(row.id, col) for row in ROWS for col in row.columns} == set(PAPER)
    for (row_id, column), number in PAPER.items():
        assert BY_ID[row_id].paper(column) == number
        assert BY_ID[row_id].table == f"Table {row_id[5]}"
    for row_id, (adapter, trainable) in PARAMS.items():
        assert BY_ID[row_id].params_m == {"adapter": adapter, "trainable": trainable,
                                          "total": BY_ID[row_id].params_m["total"]}
    assert {r.id: r.overrides.get("model.adapters") for r in ROWS if r.table == "Table 4"} == {
        "table4_none": "none", "table4_audio": "audio", "table4_visual": "visual", "table4_both": "both"}


def test_the_paper_avg_columns_are_the_mean_of_their_parts():
    """The paper's own Avg columns obey the convention the measured ones use, to the paper's
    rounding: AVR's Avg is printed to one decimal (81.00 for (64.10 + 86.60 + 92.40) / 3 = 81.03,
    as VALOR+LAVISH's 81.10 for 81.13), the others to two."""
    for row in ROWS:
        for name, column in row.columns.items():
            if "mean_of" in column:
                parts = [row.paper(p) for p in column["mean_of"]]
                assert row.paper(name) == pytest.approx(sum(parts) / len(parts), abs=0.05 if row.id == "table3_avr" else 0.006), (row.id, name)


def test_rows_inside_valor_are_marked_not_comparable_naming_why():
    flagged = {row.id for row in ROWS if row.not_comparable}
    assert flagged == {"table3_avr", "table3_avc", "table3_avqa_gen"}
    assert all("VALOR" in BY_ID[i].not_comparable and "timm" in BY_ID[i].not_comparable for i in flagged)


def test_paper_yaml_ships_as_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "paper.yaml" in data["avpea_ray.reproduce"]


def test_each_row_config_is_a_real_config_of_its_task():
    from avpea_ray.config import load_config
    from avpea_ray.train.config import TrainConfig

    for row in ROWS:
        cfg = load_config(TrainConfig, ROOT / "configs" / row.config, [])
        assert cfg.task == row.task, row.id


def test_a_broken_paper_file_is_refused_naming_the_row():
    text = (ROOT / "avpea_ray/reproduce/paper.yaml").read_text().replace("headline: Avg", "headline: Mean", 1)
    with pytest.raises(ConfigError, match="row table2_avqa_b16: headline 'Mean' is not a column"):
        load_paper(text)


def _trial(row, metrics, seed=0, status="finished", seconds=3600.0, gpus=2, trainable=12_400_000):
    return {"row": row, "seed": seed, "status": status, "metrics": metrics, "seconds": seconds, "gpus": gpus,
            "parameters": {"adapter": 3_654_192, "head": trainable - 3_654_192, "trainable": trainable}}


def _ablation(none, audio, visual, both):
    return [_trial(f"table4_{k}", {"accuracy": v}) for k, v in
            (("none", none), ("audio", audio), ("visual", visual), ("both", both))]


def test_conventions_applied_to_measured_numbers():
    """AVQA's Avg is the group mean (not `overall`), AVR's Avg the mean of R@1/5/10, AVC's the
    mean of BLEU-4/METEOR/ROUGE-L, generative AVQA's Acc all questions; seeds averaged."""
    trials = [
        _trial("table2_avqa_b16", {"Audio": 80.0, "Visual": 70.0, "Audio-Visual": 60.0, "overall": 64.0, "avg": 70.0}),
        _trial("table2_avqa_b16", {"Audio": 82.0, "Visual": 72.0, "Audio-Visual": 62.0, "overall": 66.0}, seed=1),
        _trial("table3_avr", {"t2v_R@1": 10.0, "t2v_R@5": 20.0, "t2v_R@10": 60.0, "v2t_R@1": 99.0}),
        _trial("table3_avc", {"BLEU-4": 3.0, "METEOR": 6.0, "ROUGE-L": 30.0, "CIDEr": 50.0}),
        _trial("table3_avqa_gen", {"avg": 40.0, "overall": 45.0}),
        _trial("table1_avel_b16", {"accuracy": 70.0}, gpus=0),
    ]
    tables = build_tables(trials, ROWS, ORDERING)
    rows = {r["id"]: r for r in tables["rows"]}
    avqa = rows["table2_avqa_b16"]["columns"]
    assert avqa["Avg"]["measured"] == pytest.approx(71.0)           # (70 + 72) / 2 seeds, not 65
    assert avqa["Avg"]["std"] == pytest.approx(2 ** 0.5)
    assert avqa["Avg"]["difference"] == pytest.approx(71.0 - 74.90)
    assert avqa["Audio-visual"]["measured"] == pytest.approx(61.0) and avqa["Avg"]["seeds"] == 2
    assert rows["table3_avr"]["columns"]["Avg"]["measured"] == pytest.approx(30.0)
    assert rows["table3_avr"]["columns"]["Avg"]["std"] is None  # one seed: no spread, not 0
    assert rows["table3_avc"]["columns"]["Avg"]["measured"] == pytest.approx(13.0)
    assert rows["table3_avqa_gen"]["columns"]["Acc"]["measured"] == pytest.approx(45.0)
    assert rows["table2_avqa_b16"]["params_m"] == {"paper_adapter": 3.7, "paper_trainable": 12.4,
                                                   "adapter": pytest.approx(3.654192), "trainable": pytest.approx(12.4)}
    assert rows["table2_avqa_b16"]["gpu_hours"] == pytest.approx(4.0)  # 2 seeds x 1 h x 2 GPUs
    assert rows["table1_avel_b16"]["gpu_hours"] == 0.0                 # a CPU run
    assert rows["table1_avel_l16"]["status"] == "not run" and rows["table1_avel_l16"]["columns"]["Acc"]["measured"] is None
    assert not rows["table3_avc"]["comparable"] and "VALOR" in rows["table3_avc"]["not_comparable_because"]
    assert tables["ordering"]["holds"] is None  # Table 4 not run


def test_column_values_missing_metric_is_none_not_zero():
    assert column_values(BY_ID["table3_avr"], {"t2v_R@1": 1.0, "t2v_R@5": 2.0}) == {
        "R@1": 1.0, "R@5": 2.0, "R@10": None, "Avg": None}


@pytest.mark.parametrize("none,audio,visual,both,holds,broken", [
    (72.01, 72.71, 74.68, 75.65, True, []),
    (72.0, 72.0, 74.0, 75.0, False, ["table4_audio (72.00) <= table4_none (72.00)"]),   # a tie is no win
    (72.0, 73.0, 76.0, 75.0, False, ["table4_both (75.00) <= table4_visual (76.00)"]),
    (75.0, 74.0, 73.0, 72.0, False, 3),
])
def test_table4_ordering_check_passes_and_fails(none, audio, visual, both, holds, broken):
    check = build_tables(_ablation(none, audio, visual, both), ROWS, ORDERING)["ordering"]
    assert check["holds"] is holds
    assert (len(check["failures"]) == broken) if isinstance(broken, int) else check["failures"] == broken
    assert check["order"] == ["table4_both", "table4_visual", "table4_audio", "table4_none"]


def test_unfinished_trials_make_a_partial_row_and_unknown_rows_are_refused():
    trials = [_trial("table1_avel_b16", {"accuracy": 70.0}),
              _trial("table1_avel_b16", None, seed=1, status="unfinished")]
    row = build_tables(trials, ROWS, ORDERING)["rows"][0]
    assert row["status"] == "partial" and row["seeds"] == [0] and row["columns"]["Acc"]["seeds"] == 1
    with pytest.raises(ValueError, match="table9_x"):
        build_tables([_trial("table9_x", {})], ROWS, ORDERING)


def test_files_written_with_every_row_and_the_verdict(tmp_path):
    trials = _ablation(72.01, 72.71, 74.68, 75.65) + [_trial("table3_avc", {"BLEU-4": 3.0, "METEOR": 6.0, "ROUGE-L": 30.0})]
    tables = build_tables(trials, ROWS, ORDERING, demo=True, name="demo")
    written = write_tables(tables, str(tmp_path / "out"))
    assert sorted(written) == ["paper_tables.json", "paper_tables.md", "paper_tables.png"]
    assert json.loads((tmp_path / "out/paper_tables.json").read_text()) == json.loads(json.dumps(tables))
    assert (tmp_path / "out/paper_tables.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out/paper_tables.md").read_text()
    assert md == render_markdown(tables)
    for row in ROWS:
        assert row.label in md
    for number in ("75.65", "74.90", "22.51", "78.63", "13.00", "-9.51", "| 3.65 / - | 12.4 / - |"):
        assert number in md
    assert "ordering: table4_both > table4_visual > table4_audio > table4_none: holds" in md
    assert "say nothing about the paper's" in md
    assert "no: the paper puts AV-PEA inside the pre-trained VALOR model" in md
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left
