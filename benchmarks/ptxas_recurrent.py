"""Compile the recurrent form's kernels (backends/recurrent) for an H100/H200 (sm_90) without a GPU: registers,
spills, shared memory, as the launch table (or --bv/--warps) picks them.

    PYTHONPATH=/tmp/t36 python benchmarks/ptxas_recurrent.py [--k 128] [--v 128] [--bv 32,64] [--warps 4,8]

(Triton 3.6, the device's version.) bf16 inputs, fp32 state. The matrix-state step/scan (_rec_fwd, as the
gla decode step at B256 H16 runs it) and the element-wise kernels (_rec_ew_fwd, _rec_ew_bwd, as hgrn at
B4 D2048 runs them). STACK > 0 means spills.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ptxas_check import compile_one, sig_of  # noqa: E402

from mixc.backends.recurrent import elementwise as E  # noqa: E402
from mixc.backends.recurrent import kernels as R  # noqa: E402
from mixc.backends.recurrent import launch as L  # noqa: E402


def _ints(fn):
    """Every runtime argument that is not a pointer, the scale or a constexpr: an i32."""
    names = list(inspect.signature(fn.fn).parameters)
    return {n for n in names if n[0].islower() and n != "scale"} | {"T", "H", "KD", "VD", "NV", "NCK"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--v", type=int, default=128)
    ap.add_argument("--bv", default="", help="comma-separated value blocks (default: the launch table's)")
    ap.add_argument("--warps", default="", help="comma-separated (default: the launch table's)")
    ap.add_argument("--only", default="", help="comma-separated kernel names")
    ap.add_argument("--bt", default="", help="comma-separated token chunks of the element-wise kernels")
    ap.add_argument("--step", action="store_true", help="T = 1 (a decode step: Triton specialises an int 1)")
    ap.add_argument("--varlen", action="store_true", help="the scans' packed-sequence variants (VARLEN)")
    args = ap.parse_args()
    x = "*bf16"
    BK, BV0, W0 = L._rec_tiles(256 * 16, args.k, args.v, args.step)
    BT, BVE, WE = E._rec_ew_tiles(4096)
    cases = {
        "_rec_fwd": (R._rec_fwd, dict(Q=x, K_=x, V_=x, AT=x, O=x, CU="*i32", COFF="*i32"),
                     dict(DELTA=False, HAS_Q=True, HAS_K=True, HAS_AT=True, HAS_AP=False, EXP_DECAY=True, HAS_H0=True,
                          AT_K=True, AT_V=False, AP_K=False, AP_V=False, VARLEN=args.varlen,
                          STORE_HT=True, STORE_CK=args.varlen, CHUNK=L.REC_CHUNK, BK=BK), BV0, W0),
        "_rec_bwd": (R._rec_bwd, dict(Q=x, K_=x, V_=x, AT=x, CU="*i32", COFF="*i32"),
                     dict(DELTA=False, HAS_Q=True, HAS_K=True, HAS_AT=True, HAS_AP=False, EXP_DECAY=True,
                          AT_K=True, AT_V=False, AP_K=False, AP_V=False, HAS_DHT=True, VARLEN=args.varlen,
                          CHUNK=L.REC_CHUNK, BK=BK), BV0, W0),
        "_rec_ew_fwd": (E._rec_ew_fwd, dict(V_=x, AT=x, O=x, CU="*i32", COFF="*i32"),
                        dict(HAS_AT=True, HAS_AP=False, EXP_DECAY=False, HAS_H0=False, STORE_HT=True, STORE_CK=True,
                             BT=BT, VARLEN=args.varlen), BVE, WE),
        "_rec_ew_bwd": (E._rec_ew_bwd, dict(V_=x, AT=x, DO=x, DV=x, DAT=x, CU="*i32", COFF="*i32"),
                        dict(HAS_AT=True, HAS_AP=False, AT_V=True, AP_V=False, EXP_DECAY=False, HAS_DHT=True, BT=BT,
                             VARLEN=args.varlen), BVE, WE),
    }
    for name, (fn, ptrs, consts, bv0, w0) in cases.items():
        if args.only and name not in args.only.split(","):
            continue
        for bv in (list(map(int, args.bv.split(","))) if args.bv else [bv0]):
            bts = list(map(int, args.bt.split(","))) if args.bt and "BT" in consts else [None]
            for bt in bts:
                c = {**consts, "BV": bv, **({"T": 1} if args.step else {})}
                if bt is not None:
                    c["BT"] = bt
                elif "BT" in c and args.bv:
                    c["BT"] = max(16, min(64, 2048 // bv))
                sig = sig_of(fn, ptrs, _ints(fn) - set(c), {"scale"}, c)
                for w in (list(map(int, args.warps.split(","))) if args.warps else [w0]):
                    regs, spill, shared = compile_one(fn, sig, c, w)
                    tile = f"BT {c['BT']}" if "BT" in c else f"BK {c['BK']}"
                    print(f"{name:<12} BV {bv} {tile} warps {w}: {regs} registers, stack {spill} bytes, shared "
                          f"{shared} bytes", flush=True)


if __name__ == "__main__":
    main()
