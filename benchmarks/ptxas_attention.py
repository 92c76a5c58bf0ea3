"""Compile the attention form's kernels (backends/attention) for an H100/H200 (sm_90) without a GPU: registers,
spills, shared memory, per kernel kind at the launch table's tiles (or the ones given).

    PYTHONPATH=/tmp/t36 python benchmarks/ptxas_attention.py [--mix softmax_attention] [--d 128]
        [--cfg fwd:128,64,8,3] [--dtype bf16]

(Triton 3.6, the device's version: ``pip install -q --no-deps --target /tmp/t36 triton==3.6.0``.) STACK > 0
means spills; the H100 allows 232448 bytes of shared memory a block.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from ptxas_check import compile_one as _compile_one  # noqa: E402
from ptxas_check import sig_of  # noqa: E402

import mixc  # noqa: E402

INTS = {"sqb", "sqt", "sqh", "skb", "skt", "skh", "svb", "svt", "svh", "sos", "sob", "sot", "soh", "sls", "slb",
        "slh", "sdb", "sdt", "sdh", "H", "NP", "soB", "soT", "soH", "sdB", "sdT", "sdH", "T"}


def compile_one(fn, sig: dict, consts: dict, warps: int, stages: int | None = None) -> tuple[int, int, int]:
    """(registers, stack bytes, shared bytes) of ``fn`` compiled for sm_90, specialised as a real launch at
    D = 128 is: every pointer 16-byte aligned and every stride (and T) a multiple of 16."""
    return _compile_one(fn, sig, consts, warps, stages, aligned=INTS - {"H", "NP"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mix", default="softmax_attention", help="an examples/ file (no .mix), or a .mix path")
    ap.add_argument("--d", type=int, default=128, help="q/k and v width")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--cfg", action="append", default=[], help="kind:BM,BN,warps,stages (default: the table's)")
    args = ap.parse_args()
    m = mixc.load(args.mix if args.mix.endswith(".mix") else ROOT / "examples" / f"{args.mix}.mix")
    mod = m._module
    D, x = args.d, f"*{args.dtype}"
    esize = 4 if args.dtype == "fp32" else 2
    dev = torch.device("cuda", 0)
    BW = mod._attn_width(D)
    even = D == BW
    dot = "ieee" if esize == 4 else "tf32"
    given = {k: tuple(int(v) for v in c.split(",")) for k, c in (s.split(":") for s in args.cfg)}
    floats = {f"dim_{s}" for s in mod._ATTN_SPEC["sizes"]}
    ptrs = dict(Q=x, K=x, V=x, O=x, DO=x, DQ=x, DK_OUT=x, DV_OUT=x, TABLE="*i32", POS="*i32", KC=x, VC=x)
    kinds = {
        "fwd": (mod._attn_fwd_kernel, dict(NS=1, EVEN=even)),
        "dkdv": (mod._attn_bwd_dkdv_kernel, dict(NPL=mod._ATTN_SPEC["npl"], EVEN=even)),
        "dq": (mod._attn_bwd_dq_kernel, dict(EVEN=even)),
    }
    print(f"{'kernel':<34} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} {'REG':>5} {'STACK':>6} {'SHARED':>7}")
    for kind, (fn, extra) in kinds.items():
        BM, BN, warps, stages = given.get(kind) or mod._attn_config(kind, D, D, dev, 4096, esize)
        consts = dict(DK=D, DV=D, BM=BM, BN=BN, BK=BW, BV=BW, DOT=dot, **extra)
        sig = sig_of(fn, ptrs, INTS, floats, consts)
        regs, stack, shared = compile_one(fn, sig, consts, warps, stages)
        print(f"{fn.__name__:<34} {BM:>4} {BN:>4} {warps:>5} {stages:>6} {regs:>5} {stack:>6} {shared:>7}")
    BN, ns, warps = mod._attn_decode_plan(16384, 64, dev) if torch.cuda.is_available() else (64, 9, 4)
    window = mod._ATTN_SPEC["window"]
    consts = dict(DK=D, DV=D, BN=BN, BK=BW, BV=BW, NS=ns, CAP=window or 16384, RING=window is not None)
    fn = mod._ATTN_SPEC["decode"]
    regs, stack, shared = compile_one(fn, sig_of(fn, ptrs, INTS, floats, consts), consts, warps)
    print(f"{fn.__name__:<34} {1:>4} {BN:>4} {warps:>5} {'-':>6} {regs:>5} {stack:>6} {shared:>7}")
    for fn, consts in ((mod._attn_bwd_preprocess_kernel, dict(DV=D, BM=64, BV=BW)),
                       (mod._attn_decode_merge_kernel, dict(DV=D, BV=BW, NS=ns, BS=16))):
        regs, stack, shared = compile_one(fn, sig_of(fn, ptrs, INTS, floats, consts), consts, 4)
        print(f"{fn.__name__:<34} {'-':>4} {'-':>4} {4:>5} {'-':>6} {regs:>5} {stack:>6} {shared:>7}")


if __name__ == "__main__":
    main()
