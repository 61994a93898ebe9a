#!/usr/bin/env bash
# Early warning, not CI: runs the suite against the newest releases that pyproject.toml's ranges allow (no lock),
# in a throw-away environment (.venv-latest). When it fails and CI is green, an upstream release broke us: fix the
# code, then move the locks forward with scripts/update-locks.sh. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

rm -rf .venv-latest
"$PYTHON" -m venv .venv-latest
.venv-latest/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv-latest/bin/python -m pip install -q --disable-pip-version-check --upgrade -e ".[onnx,dev,examples,bench]" \
  "$TORCH_SPEC"
echo "=== newest releases: $(.venv-latest/bin/python -m pip freeze --disable-pip-version-check \
  | grep -i -E '^(transformers|peft|onnxruntime|onnx|safetensors|accelerate)==' | tr '\n' ' ')"
.venv-latest/bin/python -m pytest -q -p no:cacheprovider "$@"
