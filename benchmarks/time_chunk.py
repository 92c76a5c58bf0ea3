"""Kernels alone: time chunk_fwd and chunk_fwd + chunk_bwd of one decay kind on the GPU, and save the
outputs so that two source trees can be compared in one device call.

    python benchmarks/time_chunk.py --decay key [--warm] [--save out.pt] [--compare a.pt b.pt]

``--warm`` compiles (one call each) and exits, so several trees can compile in parallel before any
is timed. Inputs: tune_launch.py's (B4 T4096 H16 D128 unless ``--shape B,T,H,D``, bf16 q, k, v, fp32
decays, a fixed seed).

Two trees in one device call (a branch archived into .trees/exp, with this script and tune_launch.py
copied into it so both trees time the same inputs; `carry` [".whl", ".trees"]):

    cp benchmarks/time_chunk.py benchmarks/tune_launch.py .trees/exp/benchmarks/   # here, before the call
    pip install -q --no-index --no-deps --target /tmp/site .whl/lark*.whl
    t() { (cd $1 && PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=.tcache python3 benchmarks/time_chunk.py "${@:2}"); }
    t . --warm & t .trees/exp --warm & wait
    for r in 1 2; do t . --save /tmp/a.pt; t .trees/exp --save /tmp/b.pt; done
    t . --compare /tmp/b.pt /tmp/a.pt
"""

import argparse
import inspect

import torch
from triton.testing import do_bench
from tune_launch import inputs, passes  # (this script's folder is on the path)

from mixc.backends import chunked as C

GATE = {"none": 0, "scalar": 1, "key": 2}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decay", default="key", choices=["none", "scalar", "key"])
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--save", default="")
    ap.add_argument("--compare", nargs=2, default=None)
    ap.add_argument("--profile", action="store_true", help="also each kernel's time per call (torch profiler)")
    ap.add_argument("--shape", default="4,4096,16,128", help="B,T,H,D (default: the training shape)")
    ap.add_argument("--g-dtype", default="float32", help="the decay's dtype (gla's module passes bf16)")
    a = ap.parse_args()
    if a.compare:
        x, y = (torch.load(p) for p in a.compare)
        for name in x:
            if name not in y:
                continue
            d = (x[name].float() - y[name].float()).norm() / y[name].float().norm()
            print(f"{name}: relative difference {d.item():.2e}")
        return
    B, T, H, D = map(int, a.shape.split(","))
    q, k, v, g, _ = inputs(GATE[a.decay], B, T, H, D, g_dtype=getattr(torch, a.g_dtype))
    fwd, bwd = passes(q, k, v, g)

    def fwdbwd():
        saved = fwd()
        return saved[0], bwd(saved)

    o, (dq, dk, dv, dg, *_) = fwdbwd()
    torch.cuda.synchronize()
    if a.warm:
        return
    infer = ""  # the forward that no backward follows (chunk_fwd(backward=False)), where the tree has it
    saved = {"o": o, "dq": dq, "dk": dk, "dv": dv, "dg": dg}
    has_infer = "backward" in inspect.signature(C.chunk_fwd).parameters
    if has_infer:
        saved["o_infer"] = C.chunk_fwd(q, k, v, g, backward=False)[0]
        ms = do_bench(lambda: C.chunk_fwd(q, k, v, g, backward=False), return_mode="median")
        infer = f", fwd without backward {ms:.3f} ms"
    if a.save:
        torch.save(saved, a.save)
    print(f"decay {a.decay}: fwd {do_bench(fwd, return_mode='median'):.3f} ms, "
          f"fwd+bwd {do_bench(fwdbwd, return_mode='median'):.3f} ms{infer}", flush=True)
    if a.profile:
        if has_infer:
            print("  the forward without backward:")
            profile_kernels(lambda: C.chunk_fwd(q, k, v, g, backward=False))
            print("  forward and backward:")
        profile_kernels(fwdbwd)


def profiled(fn, n, cpu=False):
    """A torch profile of n calls of fn (the GPU's activity, and the host's with ``cpu``), after one warm call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return prof


def profile_kernels(fn, n=20):
    """Each GPU kernel's time per call of fn (ms, mean over n calls), from the torch profiler."""
    rows = [(e.key, e.device_time_total / n / 1e3, e.count // n) for e in profiled(fn, n).key_averages()
            if e.device_time_total > 0]
    for name, ms, count in sorted(rows, key=lambda r: -r[1]):
        print(f"  {ms:7.3f} ms  x{count}  {name[:90]}", flush=True)


if __name__ == "__main__":
    main()
