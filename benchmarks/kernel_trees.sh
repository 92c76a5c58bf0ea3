#!/usr/bin/env bash
# One device-tool call: the chunked kernels alone (no mixer module, no fla) in several source trees,
# each checked on the GPU before it is timed. Usage (from the repository root, on the device):
#   bash benchmarks/kernel_trees.sh DECAY [--checks-only | --no-checks] [--shape B,T,H,D] DIR [DIR ...]
# DECAY: key, scalar or none. Four trees with checks take about the 600 s of one call on a cold machine:
# split them with --checks-only and --no-checks (the second call on the same machine finds the cache).
# DIR is a tree with this repository's layout (`.` for the working tree; others made here with
# `git archive BRANCH | tar -x -C .trees/NAME` and carried with `carry [".whl", ".trees"]`).
# This tree's time_chunk.py, tune_launch.py and check_launch.py are copied into every other tree, so
# all time the same inputs. Steps:
#   1. (DECAY key) check_launch.py at K 16, 32, 64 and 128, fp16 and bf16, one process per case: a tree
#      whose errors differ from the first tree's computes something else (session 7's 4-warp miscompile
#      showed only at some K);
#   2. the first tree compiles, then the others in parallel (one process each);
#   3. two alternating rounds of time_chunk.py per tree, then each tree's outputs against the first's;
#   4. each tree's kernels one by one (time_chunk.py --profile).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
decay=$1; shift
checks=1; timing=1; shape=4,4096,16,128
while true; do
  case ${1:-} in
    --checks-only) timing=""; shift ;;
    --no-checks) checks=""; shift ;;
    --shape) shape=$2; shift 2 ;;  # B,T,H,D of the timing (time_chunk.py --shape)
    *) break ;;
  esac
done
trees=("$@")
for d in "${trees[@]}"; do
  [ "$d" = . ] || cp benchmarks/time_chunk.py benchmarks/tune_launch.py benchmarks/check_launch.py "$d/benchmarks/"
done
cache=$PWD/.tcache  # one Triton cache for every tree: it is keyed by each kernel's source and constants,
# so a kernel that two trees share compiles once (the first tree runs first, the others then find it)
in_tree() {  # DIR CMD...: run CMD in DIR with that tree's mixc on the path
  local d=$1; shift
  (cd "$d" && PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=$cache "$@")
}
check_tree() {  # DIR: every case at once, one process each (compiling is most of it)
  for K in 16 32 64 128; do
    for dt in float16 bfloat16; do
      (in_tree "$1" timeout 240 python3 benchmarks/check_launch.py $K $dt 2>&1 | grep -E "^K |Error" | tail -1 \
        | sed "s|^|$1: |" | cut -c1-200) &
    done
  done
}
if [ "$decay" = key ] && [ -n "$checks" ]; then  # the first tree, then the others at once
  check_tree "${trees[0]}"
  wait
  for d in "${trees[@]:1}"; do check_tree "$d"; done
  wait
  echo "checked $(date +%T)"
fi
[ -n "$timing" ] || exit 0
in_tree "${trees[0]}" timeout 300 python3 benchmarks/time_chunk.py --decay "$decay" --shape $shape --warm > /dev/null 2>&1
for d in "${trees[@]:1}"; do
  in_tree "$d" timeout 300 python3 benchmarks/time_chunk.py --decay "$decay" --shape $shape --warm > /dev/null 2>&1 &
done
wait
echo "compiled $(date +%T)"
for r in 1 2; do
  i=0
  for d in "${trees[@]}"; do
    echo -n "$d: "
    in_tree "$d" timeout 120 python3 benchmarks/time_chunk.py --decay "$decay" --shape $shape --save /tmp/kt_$i.pt 2>&1 | tail -1
    i=$((i + 1))
  done
done
for ((i = 1; i < ${#trees[@]}; i++)); do
  echo "== ${trees[$i]} against ${trees[0]}"
  in_tree . timeout 60 python3 benchmarks/time_chunk.py --compare /tmp/kt_$i.pt /tmp/kt_0.pt 2>&1 | tail -5
done
for d in "${trees[@]}"; do
  echo "== kernels of $d (ms per fwd+bwd call)"
  in_tree "$d" timeout 120 python3 benchmarks/time_chunk.py --decay "$decay" --shape $shape --profile 2>&1 | grep -E "^ +[0-9]"
done
