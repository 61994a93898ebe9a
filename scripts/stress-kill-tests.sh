#!/usr/bin/env bash
# Proof that the kill tests are race-free: runs them N times in a row (default 30) while a CPU burner keeps every
# core busy, and stops at the first failure. Not run by CI. Usage: scripts/stress-kill-tests.sh [N] [venv]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30} venv=${2:-.venv}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
burners=()
for _ in $(seq "$(nproc)"); do
  timeout 3600 "$venv/bin/python" -c "while True: pass" & burners+=($!)
done
trap 'kill "${burners[@]}" 2>/dev/null || true' EXIT
tests=(
  "tests/test_atomic_save.py::test_killed_save_leaves_the_old_adapter_intact_and_the_next_save_cleans_up"
  "tests/test_atomic_save.py::test_without_atomic_writes_the_same_kill_corrupts_the_adapter"
  "tests/test_atomic_export.py::test_killed_export_leaves_the_previous_export"
)
for run in $(seq "$runs"); do
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" > /tmp/stress-kill-last.log 2>&1 || {
    cat /tmp/stress-kill-last.log; echo "run $run of $runs FAILED"; exit 1; }
  echo "run $run of $runs: $(tail -n 1 /tmp/stress-kill-last.log)"
done
echo "all $runs runs passed under a $(nproc)-core CPU burner"
