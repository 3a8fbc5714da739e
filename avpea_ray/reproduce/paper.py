"""The paper's numbers (`paper.yaml`, shipped in the package): one `PaperRow` per row that a
reproduction runs, with the table and column each number comes from."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from ..config import ConfigError

PAPER_FILE = "paper.yaml"


@dataclass(frozen=True)
class PaperRow:
    """One AV-PEA row of the paper's Tables 1-4 (see `paper.yaml` for the fields)."""

    id: str
    table: str
    label: str
    task: str
    config: str
    columns: dict[str, dict[str, Any]]
    headline: str
    overrides: dict[str, Any] = field(default_factory=dict)
    params_m: dict[str, float] | None = None
    not_comparable: str | None = None
    grounding: str | None = None

    @property
    def table_key(self) -> str:
        """"table1" for "Table 1": what `--only` names."""
        return self.table.lower().replace(" ", "")

    def paper(self, column: str) -> float:
        return float(self.columns[column]["paper"])


def load_paper(text: str | None = None) -> tuple[list[PaperRow], dict[str, Any]]:
    """The rows and Table 4's ordering claim, from the packaged `paper.yaml` (or `text`)."""
    if text is None:
        text = resources.files(__package__).joinpath(PAPER_FILE).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    rows = [PaperRow(**row) for row in data["rows"]]
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{PAPER_FILE}: duplicate row ids in {ids}")
    for row in rows:
        if row.headline not in row.columns:
            raise ConfigError(f"{PAPER_FILE}: row {row.id}: headline {row.headline!r} is not a column")
        for name, column in row.columns.items():
            if ("metric" in column) == ("mean_of" in column):
                raise ConfigError(f"{PAPER_FILE}: row {row.id} column {name}: give one of metric, mean_of")
    ordering = data["ordering"]
    unknown = set(ordering["rows"]) - set(ids)
    if unknown:
        raise ConfigError(f"{PAPER_FILE}: ordering names unknown rows {sorted(unknown)}")
    return rows, ordering


def tables_of(rows: list[PaperRow]) -> list[str]:
    """The `--only` names ("table1", ...) in the paper's order."""
    return list(dict.fromkeys(row.table_key for row in rows))
