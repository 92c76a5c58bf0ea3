#!/usr/bin/env bash
# One device-tool call: where a small call's time goes on the GPU host (benchmarks/host_device.py).
# Usage (repository root, on the device): bash benchmarks/run_host.sh [NAME ...]
# Each mixer with Triton's own launch dispatch and with mixc's compiled-handle launches; a trace of retnet.
set -u -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=$PWD/.tcache
names=${*:-gla retnet mamba2 linear_attention based}
for n in $names; do  # compile in parallel, one process each
  timeout 300 python3 benchmarks/bench_chunked.py --warm --only "$n" --shapes small > /dev/null 2>&1 &
done
wait
echo "compiled $(date +%T)"
timeout 300 python3 benchmarks/host_device.py $names 2>&1 | grep -v -i warn | tee "$OUT/host_device.txt"
timeout 100 python3 benchmarks/host_device.py --trace retnet > "$OUT/host_trace.txt" 2>&1
