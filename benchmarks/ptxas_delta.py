"""Compile the delta-rule kernels (backends/delta) for an H100 (sm_90) without a GPU: registers, spills, shared memory.

    PYTHONPATH=/tmp/t36 python benchmarks/ptxas_delta.py [--k 128] [--v 128] [--warps 4,8]

(Triton 3.6, the device's version: ``pip install -q --no-deps --target /tmp/t36 triton==3.6.0``.) bf16 inputs,
the launch's value block and warps unless --warps is given. STACK > 0 means spills.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ptxas_check import compile_one, sig_of  # noqa: E402

from mixc.backends.delta import kernels as D  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--v", type=int, default=128)
    ap.add_argument("--warps", default="")
    ap.add_argument("--bv", type=int, default=0, help="largest value block (default: the table's for --dtype)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--stages", default="", help="comma-separated num_stages (default: the launch's)")
    ap.add_argument("--only", default="", help="comma-separated kernel names")
    ap.add_argument("--varlen", action="store_true", help="the packed-sequence variants (VARLEN, cu_seqlens)")
    ap.add_argument("--maxnreg", type=int, default=0, help="a register cap per thread (default: the launch's)")
    ap.add_argument("--same-ab", action="store_true", help="a and b one tensor (SAME_AB: one cotangent)")
    ap.add_argument("--work16", action="store_true", help="W, U and hs in the inputs' dtype (DL_WORK16; else fp32)")
    args = ap.parse_args()
    K, V = args.k, args.v
    BK = max(16, D._pow2(K))
    BV = min(max(16, D._pow2(V)), args.bv or (D.DL_BV if args.dtype != "fp32" and K <= 128 else D.DL_BV_SMALL))
    NV = -(-V // BV)
    x = f"*{args.dtype}"
    w = x if args.work16 or args.dtype == "fp32" else "*fp32"  # the work tensors' pointers
    prec = "ieee" if args.dtype == "fp32" else "tf32"
    base = dict(H=16, K=K, V=V, BT=D.DL_CHUNK, BK=BK, BV=BV, NV=NV, PREC=prec, BU=BV, VARLEN=args.varlen,
                NU=NV, PREC_T="ieee" if prec == "ieee" else D.DL_INV_PREC)
    bvo = D._dl_out_block(BV, NV)
    kernels = {
        "_dl_prep_kernel": (dict(a=x, b=x, v=x, W=w, U=w), dict(HAS_G=True, HAS_BS=True, HAS_VS=True, SAVE=True)),
        "_dl_walk_kernel": (dict(a=x, W=w, U=w, hs=w), dict(HAS_H0=True, STORE_HT=True)),
        "_dl_out_kernel": (dict(q=x, a=x, o=x, U=w, hs=w), {}),
        "_dl_bwd_local_kernel": (dict(q=x, a=x, do=x, dU=w), {}),
        "_dl_bwd_walk_kernel": (dict(q=x, a=x, do=x, W=w, dU=w, dhs=w), dict(HAS_DHT=True, STORE_DH0=True)),
        "_dl_bwd_vloop_kernel": (dict(q=x, a=x, v=x, do=x, dq=x, dv=x, U=w, hs=w, dU=w, dhs=w, dW=w, dA1=w),
                                 dict(HAS_G=True, HAS_VS=True)),
        "_dl_bwd_wy_kernel": (dict(a=x, b=x, da=x, db=x, dW=w, dA1=w), dict(HAS_G=True, HAS_BS=True,
                                                                             SAME_AB=args.same_ab)),
    }
    for name, (ptrs, extra) in kernels.items():
        if args.only and name not in args.only.split(","):
            continue
        fn = getattr(D, name)
        fn = fn if hasattr(fn, "arg_names") else fn.fn  # (the launcher, _Launch, holds the jitted kernel)
        consts = {k: v for k, v in {**base, **extra}.items() if k in fn.arg_names}
        if name in ("_dl_out_kernel", "_dl_bwd_local_kernel"):
            consts["BV"] = bvo
        sig = sig_of(fn, {**ptrs, "ctab": "*i32", "coff": "*i32"}, {"T", "NT"}, {"scale"}, consts)
        for w in (list(map(int, args.warps.split(","))) if args.warps else [D._DL_LAUNCH[name][0]]):
            for st in (list(map(int, args.stages.split(","))) if args.stages else [D._DL_LAUNCH[name][1]]):
                regs, spill, shared = compile_one(fn, sig, consts, w, st, maxnreg=args.maxnreg or None)
                bv = consts.get("BV", BV)
                print(f"{name:<22} K {K} V {V} BV {bv} warps {w} stages {st}: {regs} registers, stack {spill} bytes, "
                      f"shared {shared} bytes", flush=True)


if __name__ == "__main__":
    main()
