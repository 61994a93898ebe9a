# Sourced by scripts/test.sh and scripts/main.sh: one virtual environment per lane, installed from its committed lock.
#   tf5    .venv         constraints/tf5.txt    transformers 5.24.0 (newest; the `cache` argument name)
#   tf523  .venv-tf523   constraints/tf523.txt  transformers 5.23.0 (last 5.x with `past_key_values`; benchmark lock)
#   tf457  .venv-tf457   constraints/tf457.txt  transformers 4.57.6 (floor of the declared range) + Optimum's ONNX stack
# Locks are installed with --no-deps, so nothing outside them is resolved and an upstream release cannot change what
# runs; `pip check` then proves the lock is complete and consistent. torch comes from TORCH_SPEC (default
# torch==2.13.0, the CPU build on this project's machines) so that no resolver pulls a multi-GB CUDA build.
# --no-compile: pip would byte-compile every installed module (all of torch's), more than half of a lane's set-up
# time (222 s -> 103 s for the three lanes in a fresh clone); Python compiles what is imported, once, on first use.
PYTHON=${PYTHON:-python3}
# Bytecode: with the installs below not byte-compiled, Python caches the bytecode of what it imports on first use, and
# every later process (pytest workers, the tests' child processes) reads it. A machine-wide PYTHONDONTWRITEBYTECODE
# (the machine this was measured on sets it) would make every process compile torch from source again: in a fresh clone
# of b214219 the tf5 lane took 481 s, against 335 s for 3ee0271 (pip-compiled). These scripts let Python write it
# (into the venvs and gitignored __pycache__ folders).
unset PYTHONDONTWRITEBYTECODE
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

venv_of() {  # lane -> its virtual environment
  case $1 in tf5) echo .venv ;; *) echo ".venv-$1" ;; esac
}

setup_lane() {  # lane
  local venv lock
  venv=$(venv_of "$1") lock="constraints/$1.txt"
  [ -f "$lock" ] || { echo "no lock $lock" >&2; return 1; }
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv" || return 1
  local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-compile)
  "${pip[@]}" "$TORCH_SPEC" && "${pip[@]}" -r "$lock" && "${pip[@]}" -e . || return 1
  if ! "$venv/bin/python" -m pip check --disable-pip-version-check >/dev/null; then
    "$venv/bin/python" -m pip check --disable-pip-version-check
    echo "$lock is incomplete or inconsistent (pip check above); rebuild it with scripts/update-locks.sh" >&2
    return 1
  fi
}

setup_lanes() {  # lanes...: set them up side by side (each is mostly unpacking; 103 s -> 65 s for three on 2 cores)
  local lane pids=() logs=() status=0 i
  for lane in "$@"; do
    logs+=("$(mktemp)")
    setup_lane "$lane" >"${logs[-1]}" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      echo "=== setting up lane ${*:$((i + 1)):1} failed:" >&2
      cat "${logs[$i]}" >&2
      status=1
    fi
    rm -f "${logs[$i]}"
  done
  return $status
}
