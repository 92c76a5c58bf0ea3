#!/usr/bin/env bash
# The one device script: on the GPU machine (device tool), from the repository root,
#   bash benchmarks/device.sh [--tests "PYTEST ARGS"] [--suites chunked,recurrent,fft,attention,delta] [--limit S]
#                             [--bench "MORE bench.py ARGS"] [--suite-limit S] [--save-cache]  (e.g. --bench "--only T4096"; the
#                             arguments are split at spaces: write a space in an --only pattern as .)
# 1. installs the wheels carried in .whl/ (fla 0.6.0, pytest-xdist, ...: README "Performance") into /tmp/site;
# 2. --tests: runs pytest with those arguments on the GPU (8 processes when pytest-xdist is there), at most
#    --limit seconds (default 300; SIGINT at the limit, so pytest still reports what passed), log in $OUT/gpu_tests.txt;
# 3. --suites: runs benchmarks/bench.py on each of those suites in turn, at most --suite-limit seconds each (default
#    240; SIGINT at the limit: a slow suite cannot eat the others' time; rows printed so far stay in the log), rows
#    and tables in $OUT/bench_<suite>.{json,md}, the log in $OUT/bench_log.txt;
# 4. --save-cache: packs Triton's cache (compiled kernels and fla's autotuning results, FLA_CACHE_RESULTS) into
#    $OUT/tcache.tgz. Copied to .tcache.tgz in the repository root (git-ignored: .git/info/exclude) and carried
#    (`carry: [".whl", ".tcache.tgz"]`), it is unpacked before the next call's runs: a fresh machine then skips
#    the compiles and autotuning whose sources did not change (fla's, and ours between calls of a session).
#    Over 16 MB (the most a file back from the device may be; session 16's tests and delta suite left 68 MB), only
#    our kernels' entries are packed (fla's are left to compile again).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=$PWD/.tcache PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
if [ -f .tcache.tgz ]; then tar xzf .tcache.tgz && echo "Triton cache: $(du -sh .tcache | cut -f1) unpacked"; fi
tests=""; suites=""; limit=300; bench=""; suite_limit=240; save_cache=""
while [ $# -gt 0 ]; do
  case $1 in
    --tests) tests=$2; shift ;;
    --suites) suites=$2; shift ;;
    --limit) limit=$2; shift ;;
    --bench) bench=$2; shift ;;
    --suite-limit) suite_limit=$2; shift ;;
    --save-cache) save_cache=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -n "$tests" ]; then
  xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
  # shellcheck disable=SC2086
  timeout -s INT -k 30 "$limit" python3 -m pytest -q -rfE -p no:cacheprovider $xdist $tests > "$OUT/gpu_tests.txt" 2>&1
  tail -15 "$OUT/gpu_tests.txt"
fi
if [ -n "$suites" ]; then
  for suite in ${suites//,/ }; do
    # shellcheck disable=SC2086
    timeout -s INT -k 20 "$suite_limit" python3 benchmarks/bench.py "$suite" --out "$OUT" $bench 2>&1 \
      | tee -a "$OUT/bench_log.txt" | grep -v "^{"
  done
fi
if [ -n "$save_cache" ] && [ -d .tcache ]; then
  tar czf "$OUT/tcache.tgz" .tcache
  size=$(stat -c %s "$OUT/tcache.tgz")
  echo "Triton cache packed: $size bytes"
  if [ "$size" -gt 16000000 ]; then  # (files back from the device are at most 16 MiB each)
    # then only our kernels' entries (names with one leading _: _dl_*, _rec_*, _attn_*; not Triton's __grp__ files)
    find .tcache -mindepth 2 -maxdepth 2 -name '_[!_]*' -printf '%h\n' | sort -u > "$OUT/ours.txt"
    tar czf "$OUT/tcache.tgz" -T "$OUT/ours.txt"; rm "$OUT/ours.txt"
    size=$(stat -c %s "$OUT/tcache.tgz")
    echo "Triton cache over 16 MB: our kernels' entries alone packed, $size bytes"
    if [ "$size" -gt 16000000 ]; then
      rm "$OUT/tcache.tgz"; echo "still too large to bring back: left out"
    fi
  fi
fi
