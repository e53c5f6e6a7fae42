#!/usr/bin/env bash
# The README's test command: installs what is missing (scripts/setup.sh), then the whole suite.
#
#   bash tests/run.sh                  # about 10 minutes on 2 cores once installed
#   bash tests/run.sh -x -k tokenizer  # arguments go to pytest
#   bash tests/run.sh tests/test_flags.py
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup.sh"
cd "$REPO"
# The whole suite unless the arguments name tests themselves (tests/test_x.py, tests/test_x.py::name).
for arg in "$@"; do [[ "$arg" == tests/* ]] && exec python -m pytest -q "$@"; done
exec python -m pytest -q tests "$@"
