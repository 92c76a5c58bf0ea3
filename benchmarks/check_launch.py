"""One forward and backward (chunk_fwd, chunk_bwd; per-key decay) on the GPU against a float64 loop and
its autograd gradients, under a launch given on the command line: does this launch compute correctly
with this GPU and Triton? Run one case per process (an
illegal memory access ends the process's CUDA context):

    python benchmarks/check_launch.py K DTYPE [NAME=VALUE ...]
    for K in 16 32 64 128; do python benchmarks/check_launch.py $K float16 "LAUNCH.out=128,4"; done

NAME=VALUE sets a LAUNCH entry (``LAUNCH.out=128,4``) or a module constant of mixc.backends.chunked (a
Python literal: ``SCORES_LAUNCH={'num_warps': 8}``) first. Shape: B1 T80 H2, K keys, 16 values.
Session 7 found with it that an output kernel forming the per-key scores itself computed wrong outputs
at 4 warps under Triton 3.6 on the H100 (BENCHMARKS.md).
"""

import sys

import torch
import torch.nn.functional as F
from tune_launch import apply_settings, passes  # (this script's folder is on the path)


def naive(q, k, v, g):
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64, device=q.device)
    o = torch.empty(B, T, H, v.shape[-1], dtype=torch.float64, device=q.device)
    for t in range(T):
        S = S * g[:, t].double().exp()[..., None] + k[:, t].double()[..., None] * v[:, t].double()[..., None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t].double(), S)
    return o


def main():
    K, dt = int(sys.argv[1]), getattr(torch, sys.argv[2])
    apply_settings(sys.argv[3:])
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU under TRITON_INTERPRET=1: a dry run)
    gen = torch.Generator(device=dev).manual_seed(5)
    B, T, H, V = 1, 80, 2, 16
    q, k, v = (torch.randn(B, T, H, d, device=dev, generator=gen) for d in (K, K, V))
    g = F.logsigmoid(torch.randn(B, T, H, K, device=dev, generator=gen))
    do = torch.randn(B, T, H, V, device=dev, generator=gen)
    ref = [x.double().requires_grad_() for x in (q, k, v, g)]
    ro = naive(*ref)
    (ro * do.double()).sum().backward()
    fwd, bwd = passes(*(x.to(dt) for x in (q, k, v)), g, do=do.to(dt))
    saved = fwd()
    o = saved[0]
    dq, dk, dv, dg = bwd(saved)[:4]
    if dev == "cuda":
        torch.cuda.synchronize()
    errs = [((x.double() - r).norm() / r.norm()).item() for x, r in
            zip((o, dq, dk, dv, dg), (ro, *(x.grad for x in ref)))]
    print(f"K {K} {sys.argv[2]} {' '.join(sys.argv[3:])}: relative error o {errs[0]:.1e}, dq {errs[1]:.1e}, "
          f"dk {errs[2]:.1e}, dv {errs[3]:.1e}, dg {errs[4]:.1e}")


if __name__ == "__main__":
    main()
