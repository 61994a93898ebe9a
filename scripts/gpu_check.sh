#!/usr/bin/env bash
# One-shot check on a GPU machine without network (torch, transformers, peft, onnx preinstalled; its onnxruntime
# may lack CUDA): makes onnxruntime-gpu importable, then runs benchmarks/gpu_check.py (CUDA tests, parity with TF32
# off and on, float16 generation, PyTorch vs ONNX Runtime timings) and writes gpu_check.json and gpu_check.md.
#
# onnxruntime-gpu: an installed one whose CUDA provider is listed is used as is; otherwise the wheel is reassembled
# from the parts that ../shared/tools/ort-gpu/prepare.sh makes (.ortgpu/pK/part.N and NAME, carried to the machine)
# and installed with --target into $PTV2_ORT_SITE (default /tmp/ortsite), which goes first on PYTHONPATH.
#
# Environment: PYTHON (default python3), PTV2_GPU_REPORT_DIR (default benchmarks/results/gpu), PTV2_ORT_SITE,
# PTV2_GPU_CHECK_TIMEOUT (seconds for the Python part, default 420: the whole script stays under 8 minutes).
# Exit status: 0 everything ran; 1 the report lists what could not run or failed; 2 setup failed (Python or torch
# missing, incomplete wheel parts, pip failed); 3 no CUDA device visible to PyTorch: stops at once, writes nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PYTHON=${PYTHON:-python3}
site=${PTV2_ORT_SITE:-/tmp/ortsite}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

say() { echo "gpu_check: $*" >&2; }

# 1. A CUDA device, seen by PyTorch: without one there is nothing to check.
timeout 120 "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'
rc=$?
if [ "$rc" -eq 3 ]; then
  say "no CUDA device visible to PyTorch ($PYTHON): nothing to check on this machine; run this on a GPU machine."
  exit 3
elif [ "$rc" -ne 0 ]; then
  say "cannot run PyTorch with $PYTHON (exit $rc): install torch (a CUDA build) first."
  exit 2
fi
timeout 120 "$PYTHON" -c \
  'import torch; print("gpu_check: torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

# 2. onnxruntime with a CUDA provider: installed, or from the carried wheel parts.
has_cuda_ort() {
  timeout 60 "$PYTHON" -c \
    'import sys, onnxruntime as o; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' \
    2>/dev/null
}
if has_cuda_ort; then
  active=$(timeout 60 "$PYTHON" -c 'import onnxruntime as o; print(o.__version__, o.__file__)')
  say "using the installed onnxruntime: $active"
elif compgen -G ".ortgpu/p*/part.*" >/dev/null; then
  name=$(cat .ortgpu/NAME .ortgpu/p*/NAME 2>/dev/null | head -n 1)  # each carried pK holds a copy of NAME
  if [ -z "$name" ]; then
    say ".ortgpu holds wheel parts but no NAME file: rerun ../shared/tools/ort-gpu/prepare.sh and carry all of .ortgpu."
    exit 2
  fi
  wheel_dir=$(mktemp -d /tmp/ortwheel.XXXXXX)
  # parts are part.0, part.1, ... in p1, p2, ...: concatenate in the order of their number
  for part in .ortgpu/p*/part.*; do echo "${part##*.} $part"; done | sort -n | cut -d' ' -f2- \
    | xargs cat > "$wheel_dir/$name"
  if ! "$PYTHON" -c 'import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip() is not None)' \
      "$wheel_dir/$name" 2>/dev/null; then
    say "the parts in .ortgpu ($(ls -d .ortgpu/p* | tr '\n' ' ')) do not make a whole $name: carry every .ortgpu/pK."
    exit 2
  fi
  if ! timeout 300 "$PYTHON" -m pip install -q --no-deps --no-index --target "$site" "$wheel_dir/$name"; then
    say "pip could not install $name into $site."
    exit 2
  fi
  export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
  say "installed $name into $site (first on PYTHONPATH)"
  if ! has_cuda_ort; then
    say "the installed $name lists no CUDAExecutionProvider; the report will say what could not run."
  fi
else
  say "no onnxruntime with CUDA and no .ortgpu wheel parts: run ../shared/tools/ort-gpu/prepare.sh where pip works"
  say "and carry .ortgpu/pK; going on, the report will say what could not run."
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# 3. The checks (onnxruntime.preload_dlls() and the CUDA probe happen inside, before any CUDA session).
timeout "${PTV2_GPU_CHECK_TIMEOUT:-420}" "$PYTHON" -m benchmarks.gpu_check \
  --out "${PTV2_GPU_REPORT_DIR:-benchmarks/results/gpu}"
rc=$?
if [ "$rc" -eq 124 ]; then
  say "the checks ran past ${PTV2_GPU_CHECK_TIMEOUT:-420} s and were stopped; no report was written."
  exit 1
fi
exit "$rc"
