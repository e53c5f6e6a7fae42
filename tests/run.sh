#!/usr/bin/env bash
# The README's test command: installs what is missing (scripts/setup.sh), then the whole suite.
#
#   bash tests/run.sh                  # about 3 minutes on 2 cores once installed
#   bash tests/run.sh -x -k tokenizer  # arguments go to pytest
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup.sh"
cd "$REPO"
exec python -m pytest -q tests "$@"
