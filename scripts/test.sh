#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the whole test suite in parallel test
# processes (TEST_PROCESSES, default 2): the end-to-end runs are CPU-bound (process start-up:
# torch, timm, Ray Train), so two processes fill the 2 cores the suite is sized for; a third
# (and its Ray cluster) only added contention (1317 vs. 1206 CPU-seconds for the suite).
# (An expensive module fixture, a training run or a server, serves one test: tests of a
# module may land in different processes.)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`; for a single test
# run pytest directly: `.venv/bin/python -m pytest tests/test_model.py -k adapter`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --dist loadgroup hands tests out one at a time as processes free up (xdist's scope scheduler;
# no test here carries a group): 12 min 40 s on a clean clone, 14 min 25 s with the default
# chunked handout, which leaves end-to-end runs for the end (both with 3 processes).
exec .venv/bin/python -m pytest -n "${TEST_PROCESSES:-2}" --dist loadgroup --durations=15 "$@"
