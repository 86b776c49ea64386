#!/usr/bin/env bash
# Every GPU measurement of issue 13 in one run (under 8 minutes on one H100/H200), results under $OUT:
#
#   OUT=/tmp/out bash benchmarks/gpu_issue13.sh           # on the device machine, from the repository root
#   SMOKE=1 OUT=/tmp/out bash benchmarks/gpu_issue13.sh   # tiny shapes: checks the script on a CPU (~2 min)
#
#   1. kernels: Pallas vs XLA on the issue's decode and prefill shapes, the per-sequence path included
#      (adapter_mixture.py --quick --tune; ~2.5 min on an H100), with the device copy bandwidth;
#   2. routed forward at InternVL2-2B shapes, 10 experts r=16 on every LLM linear, every routing level against
#      the base forward (routed_forward.py; the issue-12 ratio on a GPU);
#   3. the 2B preset's stage-A step: tokens/s, approximate MFU and peak memory, plain jit and as drex.train runs
#      it on a (data, fsdp, tensor) mesh over every local GPU (internvl2_step.py).
# Each part has its own time limit, so one that fails or hangs leaves the others' figures; its log is in $OUT.
# Needs jax with CUDA (preinstalled there); parts 2-3 also need drex's dependencies (flax, optax, orbax...):
# a part whose imports fail says so in its log and the run goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the directory for the results}"
mkdir -p "$OUT"
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY="${PYTHON:-python3}"
GPUS=$("$PY" -c "import jax; print(jax.local_device_count())" 2>/dev/null || echo 1)

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local begin=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - begin))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import jax, sys; print('jax', jax.__version__, 'python', sys.version.split()[0], jax.devices())" 2>&1
} > "$OUT/device.txt"
cat "$OUT/device.txt"

if [[ -n "${SMOKE:-}" ]]; then
  part kernels 300 "$PY" benchmarks/adapter_mixture.py --grid smoke --reps 1 --threads 2 --out "$OUT"
  part routed_forward 300 "$PY" benchmarks/routed_forward.py --preset tiny --iters 1 --out "$OUT"
  part step 300 "$PY" benchmarks/internvl2_step.py --smoke --mesh "1,$GPUS,1" --out "$OUT"
else
  part kernels 240 "$PY" benchmarks/adapter_mixture.py --quick --tune --threads 16 --out "$OUT"
  part routed_forward_2b 120 "$PY" benchmarks/routed_forward.py --preset internvl2_2b --iters 10 --out "$OUT"
  part step_2b 150 "$PY" benchmarks/internvl2_step.py --preset internvl2_2b --batch 8 --seq 1024 \
    --mesh "1,$GPUS,1" --out "$OUT"
fi
echo "done in ${SECONDS}s" | tee -a "$OUT/summary.txt"
