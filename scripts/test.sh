#!/usr/bin/env bash
# The test suite: bootstraps (venv, package, llama-server), then runs pytest with any arguments given.
#
#   scripts/test.sh                                  # everything; the first run builds llama-server (~6 min on 2 cores)
#   scripts/test.sh -x -q tests/test_scheduler_core.py
#
# Exits with pytest's code; "no tests collected" (pytest's 5) is reported as a failure too.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/bootstrap.sh
source scripts/bootstrap.sh   # exports LLAMA_SERVER, the built binary the tests run
export LLAMA_SERVER
echo "test: LLAMA_SERVER=$LLAMA_SERVER" >&2

code=0
.venv/bin/python -m pytest -q "$@" || code=$?
if [ "$code" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit "$code"
