#!/usr/bin/env bash
# One device-tool call: benchmarks/check_launch.py over a grid of head widths (K keys, V values) and decay
# kinds, one process per case, 16 at a time, then the cases whose relative error exceeds 2e-2. Usage (from
# the repository root, on the device; SETTING as check_launch.py's NAME=VALUE):
#   bash benchmarks/check_grid.sh "KS" "VS" "DECAYS" [DTYPE] [--use h0,kscale,...] [SETTING ...] > $OUT/grid.txt
#   bash benchmarks/check_grid.sh "16 24 32 48 64 80 128" "16 24 32 48 64 80 96 128" "key scalar"
# Session 8 found with it that the no-decay and scalar dq/dk kernel computed wrong gradients at 4 warps
# with K 16 and 32 and V 48 and 64, a region the kernel tests had not reached (BENCHMARKS.md).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=$PWD/.tcache
ks=$1; vs=$2; decays=$3; dt=${4:-bfloat16}; shift $(( $# < 4 ? $# : 4 ))
for d in $decays; do for K in $ks; do for V in $vs; do echo "$K $dt --decay $d --v $V $*"; done; done; done \
  | xargs -P 16 -I{} sh -c 'timeout 240 python3 benchmarks/check_launch.py {} 2>&1 | grep -E "^K |Error" | tail -1 | cut -c1-220' \
  | sort -k2,2n -k4,4n > /tmp/grid.txt
cat /tmp/grid.txt
echo "== cases over 2e-2 (or failed):"
awk '/^K / { bad = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+e[-+][0-9]+,?$/ && $i + 0 > 2e-2) bad = 1; if (bad) print; next } { print }' /tmp/grid.txt
echo "cases: $(grep -c "^K " /tmp/grid.txt)"
