#!/usr/bin/env bash
# The GPU check: everything the CPU machines cannot verify, in one run on one GPU (an H200 or H100),
# in under 8 minutes, with the GPU host's own Python, torch and triton and nothing installed.
#
#   OUT=/some/dir scripts/gpu_check.sh
#
# Writes into $OUT (the output folder; created if missing), one file per step:
#   env.txt          GPU, driver, Python / torch / triton versions
#   kernel_tests.txt the Triton kernels compiled and run on CUDA against the torch references
#                    (tests/test_kernels_cuda.py) and the golden logits through the Triton MoE path
#                    (tests/test_golden_triton.py::TestOnCuda, float32 to 1e-3, bfloat16 loosely)
#   golden.txt       scripts/golden_numerics.py on CUDA: float32 and bfloat16, int8 (W8A16) and
#                    dequantized experts, against the reference's float32 logits
#   autotune.txt     kernels.autotune --quick on Grok-1 at EP 8, and the tuned file it writes,
#   e1_d6144_f32768_<device>.json   to be committed under kernels/configs/
#   bench.txt        kernels.bench --device cuda on Grok-1 at EP 8 (Triton, naive and torch paths,
#                    achieved GB/s of the weights against the measured copy bandwidth)
#   summary.txt      each step's exit status and seconds
#
# The golden steps need the tiny reference checkpoint: GROK1_REFERENCE (default
# ../shared/grok1-reference beside the repository, else shared/grok1-reference inside it). Without
# it they skip and say so. Steps run under their own time limits so that one slow step cannot
# take the others' time; AUTOTUNE_BUCKETS / AUTOTUNE_WEIGHTS narrow the tuning.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Not the interpreter: the point of this check is the real backend.
unset TRITON_INTERPRET
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS OUTFILE COMMAND...
    local name=$1 limit=$2 file=$3 started=$SECONDS rc
    shift 3
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$file" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$file"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
    "$PYTHON" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# conftest.py reads the reference beside the repository: point that path at wherever it came.
REFERENCE=${GROK1_REFERENCE:-}
if [ -z "$REFERENCE" ]; then
    for candidate in "$REPO/../shared/grok1-reference" "$REPO/shared/grok1-reference"; do
        [ -d "$candidate/tiny" ] && REFERENCE=$candidate && break
    done
fi
if [ -n "$REFERENCE" ] && [ -d "$REFERENCE/tiny" ] && [ ! -e "$REPO/../shared/grok1-reference" ]; then
    mkdir -p "$REPO/../shared" && ln -s "$(cd "$REFERENCE" && pwd)" "$REPO/../shared/grok1-reference"
fi
[ -n "$REFERENCE" ] && [ -d "$REFERENCE/tiny" ] || echo "no Grok-1 reference data: the golden steps skip" | tee -a "$OUT/summary.txt"

step "kernel tests on CUDA" 150 kernel_tests.txt \
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_cuda.py "tests/test_golden_triton.py::TestOnCuda"

step "golden logits on CUDA" 50 golden.txt \
    "$PYTHON" scripts/golden_numerics.py --device cuda --moe-backend triton \
    ${REFERENCE:+--reference "$REFERENCE/tiny"}

step "autotune Grok-1 EP 8" 180 autotune.txt \
    "$PYTHON" -m kernels.autotune --quick --shapes grok1-ep8 --weights "${AUTOTUNE_WEIGHTS:-int8,bf16}" \
    --buckets "${AUTOTUNE_BUCKETS:-1,16,256}" --out-dir "$OUT"

step "bench Grok-1 EP 8" 80 bench.txt \
    "$PYTHON" -m kernels.bench --device cuda --shapes grok1-ep8 --dtypes int8,bf16 --batches 1,16,256 \
    --storage in-out --budget 1 --min-reps 5

echo "== done in $SECONDS s" | tee -a "$OUT/summary.txt"
