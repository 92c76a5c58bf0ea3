"""Compile the chunked kernels for an H100 (sm_90) without a GPU and report registers and stack use.

    python benchmarks/ptxas_check.py [--warps 4,8] [--gates 0,1,2]

Uses the local Triton to compile and its bundled cuobjdump to read the cubin's resource usage, so
register pressure (STACK > 0 means spills) and shared memory (the H100 allows 232448 bytes a block)
can be checked before spending device time. Shapes: K = V = 128, bf16 inputs (the issue's training
shape); pointers are specialised as 16-byte aligned and T as a multiple of 16, as a real launch is
(without that, Triton neither vectorises nor pipelines the loads, and the figures are far off).

The device runs Triton 3.6; to compile with that version here (its compiler needs no GPU):

    pip install -q --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/ptxas_check.py --gates 2

This reproduced, offline, the 237568 bytes of shared memory that failed the one-pass per-key
forward's first launch on the H100 (BENCHMARKS.md, session 6).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mixc.backends.chunked import kernels_bwd, kernels_fwd
from mixc.backends.chunked import launch as C

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(fn, sig, consts, warps, stages=None, aligned=("T", "NTOT"), maxnreg=None):
    # as a launch specialises: every pointer 16-byte aligned and the integers named in ``aligned`` (the token
    # counts by default) multiples of 16 (these let Triton vectorise loads and pipeline them through shared
    # memory, which changes its footprint)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if ty.startswith("*") or name in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs = re.findall(r"REG:(\d+)", out)
    stack = re.findall(r"STACK:(\d+)", out)
    # registers, stack bytes (spills), shared-memory bytes (the H100 allows 232448 per block)
    return int(regs[-1]) if regs else -1, int(stack[-1]) if stack else -1, k.metadata.shared


def sig_of(fn, ptrs, ints, floats, consts):
    """Triton signature: listed pointers as given, other pointers fp32, ints, floats, constexprs."""
    import inspect

    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ints:
            sig[name] = "i32"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = ptrs.get(name, "*fp32")
    return sig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warps", default="", help="comma-separated; default: the warps each kernel runs with")
    ap.add_argument("--gates", default="0,1,2")
    ap.add_argument("--ks", action="store_true", help="with a key scale (gates 0 and 1)")
    ap.add_argument("--only", default="", help="comma-separated kernel names (default: all)")
    ap.add_argument("--stages", default="", help="comma-separated num_stages (default: Triton's)")
    ap.add_argument("--bv", default="", help="comma-separated value blocks (default: LAUNCH's)")
    ap.add_argument("--k", type=int, default=128, help="keys (based's features: 153, or 160 padded)")
    ap.add_argument("--v", type=int, default=128, help="values")
    ap.add_argument("--norm", action="store_true", help="with the normaliser (gates 0 and 1)")
    args = ap.parse_args()
    K, V = args.k, args.v
    bf, i32 = "*bf16", "*i32"
    for gate in map(int, args.gates.split(",")):
        BT, BS, BK = C._blocks(K, V, gate)
        base = dict(H=16, K=K, V=V, BT=BT, BK=BK, GATE=gate, GT=16, IS_VARLEN=False, DOT=0,
                    NORM=args.norm and gate < 2, SKIP=False, KS=args.ks and gate < 2, BOUND=50.0)
        ints = dict(cu=i32, cinfo=i32, hoff=i32)

        def at(name, **extra):  # the value block and warps the kernel runs with (LAUNCH)
            bv, warps = C._launch(name, V)
            return dict(BV=bv, **extra), warps

        kernels = {  # name: (pointer types other than fp32, constexprs, warps it runs with)
            "_state_walk_kernel/fwd": (dict(x=bf, y=bf, hs=bf, **ints), *at("walk", REVERSE=False, USE_S0=False,
                                                                             STORE_SN=True)),
            "_out_kernel": (dict(q=bf, k=bf, v=bf, hs=bf, o=bf, A=bf, **ints),
                            *(at("out_key", BK=min(BK, C.OUT_KEY_BK), SBK=BK, STORE_A=True) if gate == 2
                              else at("out"))),
            "_state_walk_kernel/rev": (dict(x=bf, y=bf, hs=bf, **ints), *at("walk_rev", REVERSE=True, USE_S0=True,
                                                                             STORE_SN=False)),
            "_dv_kernel": (dict(q=bf, k=bf, v=bf, do=bf, dhs=bf, dv=bf, **ints), *at("dv")),
        }
        if gate == 2:  # the inference forward with a bf16 decay read as it is (RAW_G, SELF_SPAN)
            kernels["_state_walk_kernel/fwd-raw"] = (dict(x=bf, g=bf, y=bf, hs=bf, **ints),
                                                     *at("walk_raw", REVERSE=False, USE_S0=False, STORE_SN=True,
                                                         RAW_G=True, GH=0))
            kernels["_out_kernel/infer"] = (dict(q=bf, k=bf, v=bf, g=bf, hs=bf, o=bf, A=bf, **ints),
                                            *at("out_infer", BK=min(BK, C.OUT_KEY_BK), SBK=BK, RAW_G=True, GH=0,
                                                SELF_SPAN=True))
            kernels["_intra_key_kernel"] = (dict(q=bf, k=bf, **ints), dict(BS=BS), C.SCORES_LAUNCH["num_warps"])
            kernels["_intra_diag_kernel"] = (dict(q=bf, k=bf, **ints), dict(BS=BS), C.WARPS_KEY)
            kernels["_dqk_key_off_kernel"] = (dict(q=bf, k=bf, v=bf, do=bf, hs=bf, dhs=bf, dq=bf, dk=bf, **ints),
                                              *at("dqk_key_off", BS=BS))
            kernels["_dqk_key_diag_kernel"] = (dict(q=bf, k=bf, v=bf, do=bf, dq=bf, dk=bf, **ints),
                                               *at("dqk_key_diag", BS=BS))
            kernels["_dg_key_kernel"] = (dict(hs=bf, dhs=bf, **ints), *at("dg_key"))
        else:
            kernels["_dqk_kernel"] = (dict(q=bf, k=bf, v=bf, do=bf, hs=bf, dhs=bf, dq=bf, dk=bf, **ints), *at("dqk"))
        for name, (ptrs, extra, warps) in kernels.items():
            if args.only and name.split("/")[0] not in args.only.split(","):
                continue
            kname = name.split('/')[0]
            fn = getattr(kernels_fwd, kname, None) or getattr(kernels_bwd, kname)
            fn = getattr(fn, "fn", fn)  # the jit function under a _Launch
            consts = {k: v for k, v in {**base, **extra}.items() if k in fn.arg_names}
            for prm in inspect.signature(fn.fn).parameters.values():  # constexprs left at their defaults
                if prm.default is not prm.empty and prm.name not in consts:
                    consts[prm.name] = prm.default
            sig = sig_of(fn, ptrs, {"T", "NTOT", "NCT"}, {"scale"}, consts)
            for w in (list(map(int, args.warps.split(","))) if args.warps else [warps]):
                for st in (list(map(int, args.stages.split(","))) if args.stages else [None]):
                    for bv in (list(map(int, args.bv.split(","))) if args.bv else [consts.get("BV")]):
                        c = {**consts, "BV": bv} if "BV" in consts else consts
                        regs, spill, shared = compile_one(fn, sig, c, w, st)
                        print(f"gate {gate} {name:<22} warps {w} stages {st} BV {bv}: {regs} registers, stack {spill}"
                              f" bytes, shared {shared} bytes", flush=True)


if __name__ == "__main__":
    main()
