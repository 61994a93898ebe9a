#!/usr/bin/env bash
# The README's test command (CI runs exactly this): sets up (or refreshes) one virtual environment per lane from its
# committed lock (scripts/lanes.sh lists them) and runs ruff and the suite in each (the last lane all of it, the others
# all but the lane_independent tests). Arguments go to pytest;
# PTV2_LANES picks lanes (default: "tf457 tf523 tf5").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lanes.sh
LANES=${PTV2_LANES:-tf457 tf523 tf5}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

status=0
run_lane() {  # lane, pytest arguments...
  local venv
  venv=$(venv_of "$1")
  echo "=== pytest: lane $1 ($("$venv/bin/python" -c 'import torch, transformers, peft
print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")'))"
  # Both exporters' parametrized matrices run on the floor and newest lanes (tests/exporter_matrix.py); tf523, the
  # lane of the last `past_key_values` release, runs the default (dynamo) one, to keep CI within its time budget.
  # PTV2_TEST_EXPORTERS overrides. pytest-xdist spreads the tests over PTV2_TEST_WORKERS processes (default 2, CI's
  # core count; 1 runs them in this process): export tests are single-threaded Python for most of their time. Whole
  # files go to one worker (--dist loadfile), so a module's cached exports are made once, not once per worker
  # (tf5 lane: 306 s against 333 s test by test; 3 workers on 2 cores: 362 s).
  local exporters=${PTV2_TEST_EXPORTERS:-$([ "$1" = tf523 ] && echo dynamo || echo dynamo,torchscript)}
  local workers=${PTV2_TEST_WORKERS:-2}
  local parallel=() selection=()
  [ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile)
  # Tests marked lane_independent (the import graph, kill-mid-write, CLI and serving plumbing, the main job, which
  # scripts/main.sh runs on tf5) depend on nothing that differs between the lanes (same torch, PEFT, ONNX, ONNX
  # Runtime): the last lane runs them, the others skip them (about 60 s each).
  [ "$1" != "${LANES##* }" ] && selection=(-m "not lane_independent")
  echo "=== exporters in the parametrized export tests: $exporters; workers: $workers${selection:+; ${selection[1]}}"
  PTV2_TEST_EXPORTERS=$exporters "$venv/bin/python" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    "${selection[@]}" "${@:2}" || status=1
}

echo "=== setting up lanes: $LANES"
SECONDS=0
# shellcheck disable=SC2086
setup_lanes $LANES
echo "=== lanes ready in ${SECONDS} s"

echo "=== ruff"
"$(venv_of "${LANES##* }")/bin/python" -m ruff check . || status=1

for lane in $LANES; do run_lane "$lane" "$@"; done
exit $status
