"""One forward and backward (chunk_fwd, chunk_bwd) on the GPU against a float64 loop and its autograd
gradients, under a launch given on the command line: does this launch compute correctly with this GPU
and Triton? Run one case per process (an illegal memory access ends the process's CUDA context):

    python benchmarks/check_launch.py K DTYPE [--decay key|scalar|none] [--v V] [NAME=VALUE ...]
    for K in 16 32 64 128; do python benchmarks/check_launch.py $K float16 "LAUNCH.out=128,4"; done

NAME=VALUE sets a LAUNCH entry (``LAUNCH.out=128,4``) or a module constant of mixc.backends.chunked (a
Python literal: ``SCORES_LAUNCH={'num_warps': 8}``) first. Shape: B1 T80 H2, K keys, V values (default
16), a per-key decay unless ``--decay`` says otherwise. Session 7 found with it that an output kernel
forming the per-key scores with two masked products computed wrong outputs at 4 warps under Triton 3.6
on the H100, and session 8 that the dq/dk kernel of the other decays did at K 32, V 48 (BENCHMARKS.md).
"""

import argparse

import torch
import torch.nn.functional as F
from tune_launch import apply_settings, passes  # (this script's folder is on the path)


def naive(q, k, v, g):
    B, T, H, K = q.shape
    g = g if g.dim() == 4 else g[..., None].expand(B, T, H, K)  # a scalar decay acts on every key
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64, device=q.device)
    o = torch.empty(B, T, H, v.shape[-1], dtype=torch.float64, device=q.device)
    for t in range(T):
        S = S * g[:, t].double().exp()[..., None] + k[:, t].double()[..., None] * v[:, t].double()[..., None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t].double(), S)
    return o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("K", type=int)
    ap.add_argument("dtype")
    ap.add_argument("--decay", default="key", choices=["key", "scalar", "none"])
    ap.add_argument("--v", type=int, default=16)
    ap.add_argument("settings", nargs="*")
    a = ap.parse_intermixed_args()
    K, V, dt = a.K, a.v, getattr(torch, a.dtype)
    apply_settings(a.settings)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU under TRITON_INTERPRET=1: a dry run)
    gen = torch.Generator(device=dev).manual_seed(5)
    B, T, H = 1, 80, 2
    q, k, v = (torch.randn(B, T, H, d, device=dev, generator=gen) for d in (K, K, V))
    g = F.logsigmoid(torch.randn(B, T, H, *([K] if a.decay == "key" else []), device=dev, generator=gen))
    g = None if a.decay == "none" else g
    do = torch.randn(B, T, H, V, device=dev, generator=gen)
    ref = [x.double().requires_grad_() for x in (q, k, v, g if g is not None else torch.zeros(B, T, H, device=dev))]
    ro = naive(*ref)
    (ro * do.double()).sum().backward()
    fwd, bwd = passes(*(x.to(dt) for x in (q, k, v)), g, do=do.to(dt))
    saved = fwd()
    o = saved[0]
    dq, dk, dv, dg = bwd(saved)[:4]
    if dev == "cuda":
        torch.cuda.synchronize()
    errs = [((x.double() - r).norm() / r.norm()).item() for x, r in
            zip((o, dq, dk, dv, dg), (ro, *(x.grad for x in ref))) if x is not None]
    names = ["o", "dq", "dk", "dv", "dg"][:len(errs)]
    print(f"K {K} V {V} {a.decay} {a.dtype} {' '.join(a.settings)}: relative error "
          + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)))


if __name__ == "__main__":
    main()
