"""Checks that this Python environment runs what requirements.lock pins.

The Dockerfile runs it as the image's last build step, so an image whose base brought other
versions than the lock's (or a Python other than the one it names) fails to build instead of
training on untested versions:

    python deploy/check_image.py --python 3.11 --meteor

- every distribution avpea-ray needs at run time (its dependencies, followed through their own
  requirements and extras) is installed at exactly the version the lock pins;
- `--python X.Y`: the interpreter is that Python;
- `--meteor`: Java and pycocoevalcap's METEOR jar work (one real METEOR score, about 10 s), as the
  captioning test evaluation needs them.

Exit 0 when all hold; otherwise one line per problem and exit 1. Standard library plus
`packaging` (a dependency of Ray's), so it runs before and without the tests' extras.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# The lock, as `pip freeze` writes one, leaves out the packaging tools; torch still requires
# setuptools (<82), which pip has checked against that requirement when it installed torch.
FREEZE_OMITS = {"pip", "setuptools", "wheel", "distribute"}


def canonical(name: str) -> str:
    """PEP 503 name: what pip compares."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: Path) -> dict[str, str]:
    """`name==version` lines of the lock, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(Requirement(name).name)] = version.split(";", 1)[0].strip()
    return pins


def runtime_closure(root: str = "avpea-ray") -> dict[str, str | None]:
    """Every distribution `root` needs at run time -> its installed version (None: missing).

    Follows installed metadata from `root` without extras (the test extra is not part of a
    run), taking each requirement whose marker holds here for the extras asked of it.
    """
    found: dict[str, str | None] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in done:
            continue
        done.add((canonical(name), extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            found[canonical(name)] = None
            continue
        found[canonical(name)] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            wanted = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in wanted):
                todo.append((req.name, frozenset(req.extras)))
    return found


def version_problems(lock: Path) -> list[str]:
    pins = lock_pins(lock)
    problems = []
    for name, version in sorted(runtime_closure().items()):
        if name == "avpea-ray" or (name in FREEZE_OMITS and name not in pins):
            continue  # the project itself is not in its lock, nor are the packaging tools
        if version is None:
            problems.append(f"{name}: required but not installed")
        elif name not in pins:
            problems.append(f"{name}=={version}: installed and required, but not pinned in {lock.name}")
        elif version != pins[name]:
            problems.append(f"{name}: {version} installed, {lock.name} pins {pins[name]}")
    return problems


def meteor_problems() -> list[str]:
    try:
        from avpea_ray.metrics.captions import meteor_score

        score = meteor_score(["a man plays a guitar on a stage"], [["a man plays a guitar on a stage"]])
    except Exception as err:  # noqa: BLE001 - any failure means METEOR cannot run in this image
        return [f"METEOR: {type(err).__name__}: {err}"]
    # An identical caption scores just under 1 (METEOR's fragmentation penalty).
    return [] if score > 0.9 else [f"METEOR: an identical caption scored {score}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    parser.add_argument("--python", help="expected interpreter version, X.Y")
    parser.add_argument("--meteor", action="store_true", help="also run one METEOR score (Java)")
    args = parser.parse_args(argv)
    problems = version_problems(args.lock)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if args.python and here != args.python:
        problems.append(f"python: {here} here, expected {args.python}")
    if args.meteor:
        problems += meteor_problems()
    for line in problems:
        print(f"check_image: {line}", file=sys.stderr)
    if not problems:
        print(f"check_image: ok (Python {here}, {len(runtime_closure()) - 1} locked distributions"
              f"{', METEOR' if args.meteor else ''})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
