#!/usr/bin/env bash
# One device-tool call: install the carried wheels, compile every mixer in parallel (one process
# each), then time and check in one process. Usage (from the repository root, on the device):
#   bash benchmarks/run_device.sh SHAPES [--no-checks] [--profile NAMES]
# Writes bench_rows.json, bench_chunked.json, bench_table.md (and profile.txt) under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=$PWD/.tcache
shapes=$1; shift
checks=""; profile=""
while [ $# -gt 0 ]; do
  case $1 in
    --no-checks) checks="--no-checks" ;;
    --profile) profile=$2; shift ;;
  esac
  shift
done
names=gla,retnet,mamba2,linear_attention,based
for n in ${names//,/ }; do
  timeout 300 python3 benchmarks/bench_chunked.py --warm --only "$n" --shapes "$shapes" > "$OUT/warm_$n.txt" 2>&1 &
done
wait
echo "compiled $(date +%T)"
timeout 300 python3 benchmarks/bench_chunked.py --out "$OUT" --only $names --shapes "$shapes" $checks 2>&1 \
  | grep -E "^(row|check)" | cut -c1-400
cat "$OUT/bench_table.md" 2>/dev/null  # the section to paste into BENCHMARKS.md
if [ -n "$profile" ]; then
  timeout 200 python3 benchmarks/profile_chunked.py ${profile//,/ } > "$OUT/profile.txt" 2>&1
  grep -E "^(chunk_recurrence|--)" "$OUT/profile.txt"
fi
