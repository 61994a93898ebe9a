#!/usr/bin/env bash
# The README's test command. Sets up (or refreshes) two virtual environments and runs the whole suite in each:
#   .venv        transformers 5.x (primary target) + ruff
#   .venv-tf457  transformers 4.57 + Optimum's ONNX stack (optimum-onnx needs transformers < 4.58)
# torch is installed first and pinned to the CPU build that lies on disk, so no resolver pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

setup_lane() {  # venv, extras, transformers spec
  local venv=$1 extras=$2 transformers_spec=$3
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" "$transformers_spec" "$TORCH_SPEC"
}

status=0
run_lane() {  # venv, label
  local venv=$1 label=$2
  echo "=== pytest: $label ($("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)'))"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:3}" || status=1
}

setup_lane .venv "onnx,dev,examples,bench" "transformers>=5,<6"
setup_lane .venv-tf457 "onnx,dev,examples,optimum" "transformers>=4.57,<4.58"

echo "=== ruff"
.venv/bin/python -m ruff check . || status=1

run_lane .venv-tf457 "transformers 4.57 lane" "$@"
run_lane .venv "transformers 5 lane" "$@"
exit $status
