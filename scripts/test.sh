#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the whole test suite in parallel test
# processes (TEST_PROCESSES, default 3): the end-to-end runs wait on process start-up and Ray's
# polling, which the other processes fill. (An expensive module fixture, a training
# run or a server, serves one test: tests of a module may land in different processes.)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`; for a single test
# run pytest directly: `.venv/bin/python -m pytest tests/test_model.py -k adapter`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${TEST_PROCESSES:-3}" --dist loadgroup "$@"
