#!/usr/bin/env bash
# One device-tool call that times several source trees side by side (an experiment branch against
# main), each on the mixers named for it. Usage (from the repository root, on the device):
#   bash benchmarks/compare_trees.sh SHAPES DIR:NAMES [DIR:NAMES ...] [-- PYTEST_DIR:EXPR ...]
# DIR is a tree with this repository's layout (`.` for the working tree; others made here with
# `git archive BRANCH | tar -x -C .trees/NAME` and carried). Every (tree, mixer) compiles in its own
# process in parallel first; then each is timed in turn (fla in the same process, so each row carries
# its own ratio). After `--`, each PYTEST_DIR:EXPR runs that tree's kernel tests selected by -k EXPR.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
shapes=$1; shift
runs=(); tests=()
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then shift; tests=("$@"); break; fi
  runs+=("$1"); shift
done
in_tree() {  # DIR CMD...: run CMD in DIR with that tree's mixc on the path and its own Triton cache
  local d=$1; shift
  (cd "$d" && PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=$PWD/.tcache "$@")
}
for r in "${runs[@]}"; do
  d=${r%%:*}; names=${r#*:}
  for n in ${names//,/ }; do
    in_tree "$d" timeout 300 python3 benchmarks/bench_chunked.py --warm --only "$n" --shapes "$shapes" \
      > /dev/null 2>&1 &
  done
done
wait
echo "compiled $(date +%T)"
for r in "${runs[@]}"; do
  d=${r%%:*}; names=${r#*:}
  echo "== tree $d: $names"
  in_tree "$d" timeout 300 python3 benchmarks/bench_chunked.py --out /tmp/bench_$$ --only "$names" \
    --shapes "$shapes" 2>&1 | awk '/^(row|check)/ { print substr($0, 1, 400); fflush() }'
done
for t in "${tests[@]}"; do
  d=${t%%:*}; expr=${t#*:}
  echo "== tests $d: $expr"
  # SIGINT at the limit: pytest stops and still prints its summary of what passed and failed
  in_tree "$d" timeout -s INT -k 30 200 python3 -m pytest -q -rfE tests/test_chunk_kernel.py -p no:cacheprovider \
    -k "$expr" 2>&1 | tail -6
done
