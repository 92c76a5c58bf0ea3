"""The forward that no backward follows: the fused kernel (chunk_infer) against the four-kernel forward
(chunk_fwd(backward=False)) and fla's op, side by side in one process on the GPU, with the fused
output's error against an fp32 reference (chunk_fwd on the same inputs in fp32, exact products).

    python benchmarks/time_fused.py [--shape B,T,H,D] [--decays key,scalar,none] [--sweep BV:W:S,...]

``--sweep``: also each launch of the fused kernel given as value block:warps:stages (LAUNCH "fused_key"
for the per-key decay, "fused" for the others), timed and checked (a launch whose error is over 1e-2
is marked WRONG). Inputs: tune_launch.py's (bf16 q, k, v; fp32 decays; a fixed seed).
"""

import argparse

import torch
from triton.testing import do_bench
from tune_launch import inputs  # (this script's folder is on the path)

from mixc.backends import chunked as C

GATE = {"none": 0, "scalar": 1, "key": 2}


def fla_op(decay):
    """fla 0.6.0's forward for this decay kind on (q, k, v, g), or None without fla."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    if decay == "key":
        return lambda q, k, v, g: chunk_gla(q, k, v, g, scale=1.0)[0]
    if decay == "scalar":
        return lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]
    return lambda q, k, v, g: chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4,4096,16,128")
    ap.add_argument("--decays", default="key,scalar,none")
    ap.add_argument("--sweep", default="")
    a = ap.parse_args()
    B, T, H, D = map(int, a.shape.split(","))
    for decay in a.decays.split(","):
        q, k, v, g, _ = inputs(GATE[decay], B, T, H, D)
        with torch.no_grad():
            ref = C.chunk_fwd(q.float(), k.float(), v.float(), g, backward=False)[0]
            forms = {"four kernels": lambda: C.chunk_fwd(q, k, v, g, backward=False)[0],
                     "fused": lambda: C.chunk_infer(q, k, v, g)[0]}
            op = fla_op(decay)
            if op is not None:
                forms["fla"] = lambda: op(q, k, v, g)
            row = f"{decay} B{B} T{T} H{H} D{D}:"
            for label, fn in forms.items():
                try:
                    err = rel(fn(), ref)
                    row += f" {label} {do_bench(fn, return_mode='median'):.3f} ms (err {err:.1e}),"
                except Exception as e:  # fla refusing a case is a result too
                    row += f" {label} failed: {repr(e)[:120]},"
            print(row, flush=True)
            name = "fused_key" if decay == "key" else "fused"
            default = C.LAUNCH[name]
            for launch in filter(None, a.sweep.split(",")):
                C.LAUNCH[name] = tuple(int(x) for x in launch.split(":"))
                try:
                    out = C.chunk_infer(q, k, v, g)[0]
                    e = rel(out, ref)
                    ms = do_bench(lambda: C.chunk_infer(q, k, v, g), return_mode="median")
                    print(f"  {name} {C.LAUNCH[name]}: {ms:.3f} ms, err {e:.1e}{' WRONG' if e > 1e-2 else ''}",
                          flush=True)
                except Exception as ex:
                    print(f"  {name} {C.LAUNCH[name]}: failed {repr(ex)[:160]}", flush=True)
            C.LAUNCH[name] = default


if __name__ == "__main__":
    main()
