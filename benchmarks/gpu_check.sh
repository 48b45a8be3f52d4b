#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): real NVML in heartbeats, a CUDA llama-server
# built by `kitt bench prepare-demo`, a serving test through server + agent on the GPU.
#
# On the lent GPU machine, from the repository root, with $OUT set and .whl carried
# (made beforehand by benchmarks/gpu_check_bundle.sh):
#     bash benchmarks/gpu_check.sh
# Here, without a GPU (cached CPU llama-server, stand-in NVML, small model):
#     OUT=$(mktemp -d) PYTHON=python3.12 bash benchmarks/gpu_check.sh --local
# Writes under $OUT: check.log (every step timed, a one-line summary last), build.log,
# build-info.json, heartbeats.json, result.json, test.log, bench.json, agent.log.
set -u
export PYTHONUNBUFFERED=1
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s.%N)}
OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python3}
LOG=$OUT/check.log
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
LOCAL=0
if [ "${1:-}" = "--local" ]; then LOCAL=1; shift; fi

log() {
  local t
  t=$(awk -v a="$(date +%s.%N)" -v b="$GPU_CHECK_T0" 'BEGIN { printf "%6.1f", a - b }')
  printf '[%ss] %s\n' "$t" "$*" | tee -a "$LOG"
}

SITE=${GPU_CHECK_SITE:-/tmp/site}
WHEELS=(.whl/*.whl)
log "== install the ${#WHEELS[@]} wheels KITT needs into $SITE"
rm -rf "$SITE"
if "$PY" -m pip --version >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "${WHEELS[@]}" >>"$LOG" 2>&1 || log "-- pip install FAILED"
else  # a wheel is a zip: unpacked into the target it is installed, for import purposes
  "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
    "$SITE" "${WHEELS[@]}" >>"$LOG" 2>&1 || log "-- unzip of the wheels FAILED"
fi
export PYTHONPATH="$SITE:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$LOCAL" = 1 ]; then
  # The stand-in NVML the test suite uses (tests/fake_nvml), with one H100.
  export PYTHONPATH="$REPO/tests/fake_nvml:$PYTHONPATH"
  KITT_FAKE_NVML=$(mktemp --suffix=.json)
  export KITT_FAKE_NVML
  echo '{"gpus": [{"name": "NVIDIA H100 80GB HBM3", "util": 35, "mem_total": 85899345920,
    "mem_used": 10737418240, "temp": 41, "power_mw": 120500}]}' >"$KITT_FAKE_NVML"
fi
"$PY" -c 'import kitt, flask, sqlalchemy, pydantic, cryptography, gguf, pynvml
print("python", __import__("sys").version.split()[0], "kitt", kitt.__version__, "pynvml from", pynvml.__file__)' 2>&1 | tee -a "$LOG"

log "== machine"
{ nvidia-smi || echo "nvidia-smi: not available"; nproc; free -g | head -2
  for t in cmake ninja make g++ nvcc; do printf '%s: %s\n' "$t" "$(command -v "$t" || echo missing)"; done
  ls -la /usr/local/cuda/bin/nvcc 2>&1; } >>"$LOG" 2>&1
log "== checks (python)"
if [ "$LOCAL" = 1 ]; then set -- --local "$@"; fi
"$PY" benchmarks/gpu_check.py "$@"
rc=$?
log "exit $rc"
exit $rc
