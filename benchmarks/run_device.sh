#!/usr/bin/env bash
# One device-tool call: install the carried wheels, compile every mixer in parallel (one process
# each), then time and check in one process. Usage (from the repository root, on the device):
#   bash benchmarks/run_device.sh SHAPES [--no-checks] [--profile NAMES] [--tests]
# Writes bench_rows.json, bench_chunked.json, bench_table.md (and profile.txt, gpu_tests.txt) under $OUT.
# --tests: afterwards, the kernel tests on the GPU (fp32 kernels against the float64 loop: normaliser,
# skip, key scale, per-key decays factored and exact, sharp gates, fp16), at most 230 s (540 s with SHAPES none); --tests-k EXPR: only
# the tests pytest -k EXPR selects (a failure does not stop the rest); with pytest-xdist and execnet wheels in
# .whl/ the tests run in 8 processes. SHAPES "none": no benchmark (tests
# only); SHAPES "train,small": both shapes, which with the gradient checks needs about 600 s: pass --no-checks.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=$PWD/.tcache
shapes=$1; shift
checks=""; profile=""; tests=""; tests_k="normalised or skip or sharp or half or gk or key_scale or side_by_side or inference or time_invariant or only_some or without_backward or at_the_bound"
while [ $# -gt 0 ]; do
  case $1 in
    --no-checks) checks="--no-checks" ;;
    --profile) profile=$2; shift ;;
    --tests) tests=1 ;;
    --tests-k) tests=1; tests_k=$2; shift ;;
  esac
  shift
done
names=gla,retnet,mamba2,linear_attention,based
[ "$shapes" = none ] && names=""
for n in ${names//,/ }; do
  timeout 300 python3 benchmarks/bench_chunked.py --warm --only "$n" --shapes "$shapes" > "$OUT/warm_$n.txt" 2>&1 &
done
wait
echo "compiled $(date +%T)"
[ -n "$names" ] && timeout 300 python3 benchmarks/bench_chunked.py --out "$OUT" --only $names --shapes "$shapes" $checks 2>&1 \
  | awk '/^(row|check)/ { print substr($0, 1, 400); fflush() }'
cat "$OUT/bench_table.md" 2>/dev/null  # the section to paste into BENCHMARKS.md
if [ -n "$profile" ]; then
  timeout 200 python3 benchmarks/profile_chunked.py ${profile//,/ } > "$OUT/profile.txt" 2>&1
  grep -E "^(chunk_recurrence|--)" "$OUT/profile.txt"
fi
if [ -n "$tests" ]; then
  tlimit=230; [ "$shapes" = none ] && tlimit=540
  # in 8 processes when pytest-xdist is carried (.whl/): the run is mostly Triton compiling, one test at a time
  xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
  # SIGINT at the limit: pytest stops and still prints which tests passed and failed (-v lists each)
  timeout -s INT -k 30 $tlimit python3 -m pytest -v -rfE tests/test_chunk_kernel.py -p no:cacheprovider $xdist \
    -k "$tests_k" > "$OUT/gpu_tests.txt" 2>&1
  tail -3 "$OUT/gpu_tests.txt"
fi
