#!/bin/bash
# Run the 2-process tests N times in a row (default 30) and count failures: issue 12's "30 consecutive
# runs without a failure". Each round is a fresh pytest process; a failing round's log is kept.
#   bash tests/reliability/repeat_two_process_tests.sh [N] [LOG_DIR]
set -uo pipefail
ROUNDS=${1:-30}
LOG_DIR=${2:-/tmp/repeat_two_process_tests}
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TESTS=(
    "tests/test_convert.py::test_conversion_from_a_two_process_zero1_checkpoint"
    "tests/test_failures.py::test_a_failing_run_exits[step-2]"
    "tests/test_failures.py::test_launcher_forwards_sigterm_and_waits_for_the_save"
    "tests/test_failures.py::test_the_deepspeed_launcher_also_stops_every_rank"
    "tests/test_training_launch.py::test_sigterm_to_the_launcher_completes_the_checkpoint_and_the_resumed_run_matches[deepspeed]"
)
mkdir -p "$LOG_DIR"
failed=0
for round in $(seq 1 "$ROUNDS"); do
    started=$(date +%s)
    if (cd "$REPO" && python -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "$LOG_DIR/round$round.log" 2>&1); then
        status=passed
        rm -f "$LOG_DIR/round$round.log"
    else
        status="FAILED (log: $LOG_DIR/round$round.log)"
        failed=$((failed + 1))
    fi
    echo "round $round/$ROUNDS: $status in $(( $(date +%s) - started ))s"
done
echo "$((ROUNDS - failed))/$ROUNDS rounds passed"
[[ $failed -eq 0 ]]
