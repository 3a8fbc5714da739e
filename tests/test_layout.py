"""The import graph points downward only, and no package imports another in a loop.

    jobs, bench, avpea_cli, deploy   entry points (`avpea-ray`), benchmarks, the image's check
    avpea_ray.cli, avpea_ray.__main__   the command line
    avpea_ray.reproduce              the paper's tables: every row a Tune trial, tables written back
    avpea_ray.tune                   sweeps
    avpea_ray.train                  one run: checks, Ray, loop, checkpoints, tracking
    avpea_ray.infer                  using trained adapters: predict, batch inference on Ray Data
    avpea_ray.tasks                  one module per task + the registry
    avpea_ray.{model,heads,data,metrics}   the parts (none imports another)
    avpea_ray.{config,hub,atomic}    the base
    sharding                         dataset tools: may use avpea_ray.data (and the base), nothing above

Read from the source (imports anywhere in a file, also inside functions), no import executed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {
    "jobs": 7, "bench": 7, "avpea_cli": 7, "deploy": 7,
    "avpea_ray.cli": 6, "avpea_ray.__main__": 6,
    "avpea_ray.reproduce": 5,
    "avpea_ray.tune": 4,
    "avpea_ray.train": 3, "avpea_ray.infer": 3,
    "avpea_ray.tasks": 2, "sharding": 2,
    "avpea_ray.model": 1, "avpea_ray.heads": 1, "avpea_ray.data": 1, "avpea_ray.metrics": 1,
    "avpea_ray.config": 0, "avpea_ray.hub": 0, "avpea_ray.atomic": 0, "avpea_ray": 0,
}
TOOLS = {"sharding": {"avpea_ray.data", "avpea_ray.config", "avpea_ray.atomic", "avpea_ray"}}


def _unit(path: Path) -> str:
    """avpea_ray.<package or module>, or the top folder (sharding, jobs, bench)."""
    parts = path.relative_to(ROOT).parts
    if parts[0] != "avpea_ray":
        return parts[0]
    return "avpea_ray" if parts[1] == "__init__.py" else f"avpea_ray.{Path(parts[1]).stem}"


def import_edges() -> dict[tuple[str, str], str]:
    """(importing unit, imported unit) -> where, for every project import."""
    edges = {}
    files = [p for d in ("avpea_ray", "avpea_cli", "sharding", "jobs", "bench", "deploy") for p in (ROOT / d).rglob("*.py")]
    for path in files:
        package = ".".join(path.relative_to(ROOT).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                name = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    name = ".".join(up + ([name] if name else []))
                names = [name] + [f"{name}.{a.name}" for a in node.names] if name == "avpea_ray" else [name]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] not in ("avpea_ray", "avpea_cli", "sharding", "jobs", "bench", "deploy"):
                    continue
                target = f"avpea_ray.{parts[1]}" if parts[0] == "avpea_ray" and len(parts) > 1 else parts[0]
                source = _unit(path)
                if target != source:
                    edges.setdefault((source, target), f"{path.relative_to(ROOT)}:{node.lineno}")
    return edges


EDGES = import_edges()


@pytest.mark.parametrize("edge", sorted(EDGES), ids=lambda e: f"{e[0]}->{e[1]}")
def test_imports_point_downward(edge):
    source, target = edge
    where = EDGES[edge]
    if source in TOOLS:
        assert target in TOOLS[source], f"{where}: the tool {source} imports {target}"
        return
    assert target not in TOOLS or source in ("jobs", "bench", "avpea_cli", "deploy"), \
        f"{where}: the library imports the tool {target}"
    assert source in LEVEL and target in LEVEL, f"{where}: {source} -> {target}: add the unit to LEVEL"
    assert LEVEL[source] > LEVEL[target], f"{where}: {source} (level {LEVEL[source]}) imports {target} (level {LEVEL[target]})"


def test_the_graph_was_read():
    assert ("avpea_ray.train", "avpea_ray.tasks") in EDGES and ("jobs", "avpea_ray.cli") in EDGES
