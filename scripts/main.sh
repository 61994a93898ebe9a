#!/usr/bin/env bash
# The README's main job in one command: set up .venv, then fine-tune a P-Tuning v2 adapter on all-MiniLM-L6-v2,
# export it to ONNX and evaluate it with ONNX Runtime. Arguments go to `python -m examples.main_job`, e.g.
#   scripts/main.sh --train-file ../shared/data/sst2/train.tsv --validation-file ../shared/data/sst2/dev.tsv
#   scripts/main.sh                       # no data given: a small generated sentiment set, fully offline
#   scripts/main.sh --dataset stanfordnlp/sst2   # online, with `pip install datasets`
# It installs the newest test lane's lock (constraints/tf5.txt, see scripts/lanes.sh) into .venv: the versions CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1  # the model comes from a package: no hub access needed
source scripts/lanes.sh
setup_lane tf5

exec .venv/bin/python -m examples.main_job "$@"
