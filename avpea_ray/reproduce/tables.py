"""The paper's tables written back: published beside measured, with the gap.

    tables = build_tables(trials, rows, ordering)      # pure: fixed inputs -> one dict
    write_tables(tables, "s3://bucket/runs/repro")    # paper_tables.{json,md,png}, atomically

A trial record (what `run.py` collects per Tune trial, or a test builds by hand):

    {"row": "table2_avqa_b16", "seed": 0, "status": "finished",
     "metrics": {"Audio": 76.0, ...},                 # the run's test metrics, as the task names them
     "parameters": {"adapter": 3654192, "trainable": 12400000, ...},
     "seconds": 5400.0, "gpus": 8}

Per row and column the measured number follows the paper's convention: a column either reads
one metric of the run or (`mean_of`) is the plain mean of other columns, as the paper computed
AVQA's Avg (mean of the three group accuracies), AVR's Avg (mean of R@1/5/10) and AVC's Avg
(mean of BLEU-4/METEOR/ROUGE-L). With several seeds a column is their mean, with the sample
standard deviation beside it.
"""
from __future__ import annotations

import io
import json
import statistics
from typing import Any

from ..data import storage
from .paper import PaperRow

TABLES_MD, TABLES_JSON, TABLES_PNG = "paper_tables.md", "paper_tables.json", "paper_tables.png"
DEMO_NOTE = ("DEMO: toy sizes on synthetic data (tiny random-weight ViT, a few steps). These numbers "
             "say nothing about the paper's; they only show the whole path runs.")


def column_values(row: PaperRow, metrics: dict[str, float]) -> dict[str, float | None]:
    """A run's number for each of the row's columns, in the paper's convention (None: the run
    did not report the metric)."""
    values: dict[str, float | None] = {}
    for name, column in row.columns.items():
        if "metric" in column:
            value = metrics.get(column["metric"])
            values[name] = None if value is None else float(value)
    for name, column in row.columns.items():
        if "mean_of" in column:
            parts = [values.get(part) for part in column["mean_of"]]
            values[name] = None if any(p is None for p in parts) else sum(parts) / len(parts)
    return {name: values[name] for name in row.columns}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None from one seed: no spread was measured)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def build_row(row: PaperRow, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the tables from its trials (any seeds, any status)."""
    finished = [t for t in trials if t.get("status") == "finished" and t.get("metrics")]
    per_seed = [column_values(row, t["metrics"]) for t in finished]
    columns = {}
    for name in row.columns:
        values = [v[name] for v in per_seed if v[name] is not None]
        mean, std = _mean_std(values)
        columns[name] = {"paper": row.paper(name), "measured": mean, "std": std, "seeds": len(values),
                         "difference": None if mean is None else mean - row.paper(name)}
    trainable = [t["parameters"]["trainable"] for t in finished if t.get("parameters")]
    adapter = [t["parameters"]["adapter"] for t in finished if t.get("parameters")]
    gpu_seconds = sum(float(t.get("seconds") or 0.0) * float(t.get("gpus") or 0) for t in trials)
    status = ("measured" if finished and len(finished) == len(trials) else
              "partial" if finished else "not run" if not trials else "unfinished")
    return {
        "id": row.id, "table": row.table, "label": row.label, "task": row.task,
        "status": status, "seeds": sorted(t.get("seed", 0) for t in finished),
        "headline": row.headline, "columns": columns,
        "params_m": {"paper_adapter": (row.params_m or {}).get("adapter"),
                     "paper_trainable": (row.params_m or {}).get("trainable"),
                     "adapter": adapter[0] / 1e6 if adapter else None,
                     "trainable": trainable[0] / 1e6 if trainable else None},
        "gpu_hours": gpu_seconds / 3600.0,
        "wall_hours": sum(float(t.get("seconds") or 0.0) for t in trials) / 3600.0,
        "comparable": row.not_comparable is None,
        "not_comparable_because": row.not_comparable,
    }


def check_ordering(rows: dict[str, dict[str, Any]], ordering: dict[str, Any]) -> dict[str, Any]:
    """Table 4's claim on the measured numbers: each listed row's headline strictly above the
    next's (both > visual only > audio only > none). `holds` is None while a row is missing."""
    names = ordering["rows"]
    values = []
    for name in names:
        row = rows.get(name)
        values.append(None if row is None else row["columns"][row["headline"]]["measured"])
    if any(v is None for v in values):
        holds, failures = None, []
    else:
        failures = [f"{a} ({va:.2f}) <= {b} ({vb:.2f})"
                    for a, b, va, vb in zip(names, names[1:], values, values[1:]) if not va > vb]
        holds = not failures
    return {"table": ordering["table"], "order": names, "measured": dict(zip(names, values)),
            "holds": holds, "failures": failures}


def build_tables(trials: list[dict[str, Any]], rows: list[PaperRow], ordering: dict[str, Any],
                 demo: bool = False, name: str = "") -> dict[str, Any]:
    """Every row of `rows` (run or not) with its trials, and the ordering check."""
    unknown = {t["row"] for t in trials} - {row.id for row in rows}
    if unknown:
        raise ValueError(f"trials of rows the paper table does not have: {sorted(unknown)}")
    built = {row.id: build_row(row, [t for t in trials if t["row"] == row.id]) for row in rows}
    return {"name": name, "demo": demo, "note": DEMO_NOTE if demo else None,
            "rows": list(built.values()), "ordering": check_ordering(built, ordering),
            "gpu_hours": sum(r["gpu_hours"] for r in built.values())}


# -- rendering ------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _params(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"  # 3.7 and 12.4 as printed; a demo's 0.0232


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def render_markdown(tables: dict[str, Any]) -> str:
    """paper_tables.md: one section per paper table, one line per column of each row."""
    lines = [f"# AV-PEA paper tables: published vs. measured{' (' + tables['name'] + ')' if tables['name'] else ''}", ""]
    if tables["note"]:
        lines += [f"**{tables['note']}**", ""]
    lines += ["measured: mean over finished seeds (± sample std); difference: measured - paper; "
              "params in millions (measured / paper); GPU-h: GPU-hours of the row's trials.", ""]
    for table in dict.fromkeys(r["table"] for r in tables["rows"]):
        lines += [f"## {table}", "",
                  "| row | column | paper | measured | ± | difference | seeds | adapter M | trainable M | GPU-h | comparable |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in (r for r in tables["rows"] if r["table"] == table):
            p = row["params_m"]
            params = (f"{_params(p['adapter'])} / {_params(p['paper_adapter'])}",
                      f"{_params(p['trainable'])} / {_params(p['paper_trainable'])}")
            comparable = "yes" if row["comparable"] else f"no: {row['not_comparable_because']}"
            for i, (name, col) in enumerate(row["columns"].items()):
                first = i == 0
                headline = "**" if name == row["headline"] else ""
                lines.append(
                    f"| {row['label'] + ' (' + row['status'] + ')' if first else ''} | {headline}{name}{headline} "
                    f"| {_num(col['paper'])} | {_num(col['measured'])} | {_num(col['std'])} "
                    f"| {_signed(col['difference'])} | {col['seeds']} "
                    f"| {params[0] if first else ''} | {params[1] if first else ''} "
                    f"| {_num(row['gpu_hours'], 3) if first else ''} | {comparable if first else ''} |")
        lines.append("")
    check = tables["ordering"]
    verdict = {True: "holds", False: "FAILS", None: "not checked (rows missing)"}[check["holds"]]
    lines += [f"## {check['table']} ordering: {' > '.join(check['order'])}: {verdict}", ""]
    lines += [f"- {name}: {_num(value)}" for name, value in check["measured"].items()]
    lines += [f"- broken: {failure}" for failure in check["failures"]]
    lines += ["", f"total GPU-hours: {tables['gpu_hours']:.3f}", ""]
    return "\n".join(lines)


def render_figure(tables: dict[str, Any]) -> bytes:
    """paper_tables.png: each row's headline number, published beside measured (PNG bytes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = tables["rows"]
    labels = [f"{r['table']}\n{r['id'].split('_', 1)[1]}" for r in rows]
    paper = [r["columns"][r["headline"]]["paper"] for r in rows]
    measured = [r["columns"][r["headline"]]["measured"] or 0.0 for r in rows]
    errors = [r["columns"][r["headline"]]["std"] or 0.0 for r in rows]  # none from one seed
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], paper, 0.4, label="paper", color="#4C72B0")
    bars = ax.bar([i + 0.2 for i in x], measured, 0.4, yerr=errors, label="measured", color="#DD8452")
    for bar, row in zip(bars, rows):
        if not row["comparable"]:
            bar.set_hatch("//")
        if row["columns"][row["headline"]]["measured"] is None:
            ax.text(bar.get_x() + bar.get_width() / 2, 1, "not run", rotation=90, ha="center", fontsize=7)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("headline metric (%; Avg columns as the paper)")
    title = "AV-PEA: paper vs. measured (hatched: not comparable)"
    ax.set_title(title + ("\nDEMO: toy numbers, nothing about the paper's" if tables["demo"] else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_tables(tables: dict[str, Any], folder: str) -> dict[str, str]:
    """paper_tables.{json,md,png} under `folder` (local or s3://), each written atomically.
    Returns file name -> URL."""
    contents = {TABLES_JSON: json.dumps(tables, indent=1).encode("utf-8"),
                TABLES_MD: render_markdown(tables).encode("utf-8"),
                TABLES_PNG: render_figure(tables)}
    written = {}
    for name, data in contents.items():
        url = storage.join(folder, name)
        storage.atomic_write_bytes(url, data)
        written[name] = url
    return written
