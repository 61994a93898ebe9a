#!/usr/bin/env bash
# Rebuilds the lane locks in constraints/ from the ranges pyproject.toml declares: each lane is resolved afresh in
# a throw-away environment and frozen. Run it on purpose, read the diff, run scripts/test.sh, and commit the locks
# as their own change ("Update locks: transformers X -> Y"). Arguments: lanes to rebuild (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

declare -A EXTRAS=([tf5]="onnx,dev,examples,bench" [tf523]="onnx,dev,examples,bench" [tf457]="onnx,dev,examples,optimum")
declare -A TRANSFORMERS=([tf5]="transformers>=5,<6" [tf523]="transformers==5.23.0" [tf457]="transformers>=4.57,<4.58")
declare -A TITLE=([tf5]="transformers 5 (newest)" [tf523]="transformers 5.23 (last release before the cache rename; benchmarks)"
                  [tf457]="transformers 4.57 (floor)")

lanes=("$@")
[ ${#lanes[@]} -gt 0 ] || lanes=(tf457 tf523 tf5)
for lane in "${lanes[@]}"; do
  [ -n "${EXTRAS[$lane]:-}" ] || { echo "unknown lane $lane (known: ${!EXTRAS[*]})" >&2; exit 2; }
  work=$(mktemp -d)
  "$PYTHON" -m venv "$work/venv"
  "$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  "$work/venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[${EXTRAS[$lane]}]" \
    "${TRANSFORMERS[$lane]}" "$TORCH_SPEC"
  {
    echo "# Lock for the ${TITLE[$lane]} lane: exact versions of every package it installs (torch itself comes from"
    echo "# TORCH_SPEC, default torch==2.13.0, the CPU build in CI). scripts/test.sh installs this file with --no-deps,"
    echo "# then checks it with pip check. Updating it is a deliberate commit: scripts/update-locks.sh rebuilds it."
    "$work/venv/bin/python" -m pip freeze --all --disable-pip-version-check --exclude-editable \
      | grep -v -E '^(torch|pip)==' | sort -f
  } > "constraints/$lane.txt"
  rm -rf "$work"
  echo "constraints/$lane.txt: $(grep -E '^(transformers|peft|onnxruntime)==' "constraints/$lane.txt" | tr '\n' ' ')"
done
