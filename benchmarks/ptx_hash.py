"""Hash the PTX of several chunked-kernel configurations (debug info left out), compiled for an H100 without
a GPU: a refactor of kernels already checked on the GPU that leaves every hash unchanged compiles to the
same code. Used in session 10 for the _tile_row refactor.

    PYTHONPATH=/tmp/t36 python benchmarks/ptx_hash.py > before.txt   # (Triton 3.6: see ptxas_check.py)
    ... change ...;  the same > after.txt; diff before.txt after.txt
"""

import hashlib
import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton  # noqa: E402
from ptxas_check import sig_of  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mixc.backends import chunked as C  # noqa: E402

bf, i32 = "*bf16", "*i32"
P = dict(q=bf, k=bf, v=bf, x=bf, y=bf, hs=bf, o=bf, A=bf, g=bf, cu=i32, cinfo=i32, hoff=i32)
WALK = dict(BK=64, NORM=False, KS=False, STORE_SN=True)
OUT = dict(BOUND=50.0, KS=False, SKIP=False, NORM=False)
KEY = dict(BV=128, BK=32, SBK=64, GATE=2)
CASES = [  # (name, kernel, constexprs beyond the common ones, warps, pointer types other than bf16)
    ("walk_fwd_raw", C._state_walk_kernel, dict(WALK, BV=128, GATE=2, REVERSE=False, USE_S0=True, RAW_G=True, GH=0),
     4, {}),
    ("walk_rev_G", C._state_walk_kernel, dict(WALK, BV=64, GATE=2, REVERSE=True, USE_S0=True), 4, {"g": "*fp32"}),
    ("walk_scalar", C._state_walk_kernel, dict(WALK, BV=64, GATE=1, REVERSE=False, USE_S0=False, NORM=True, KS=True),
     4, {"g": "*fp32"}),
    ("cumsum_half", C._local_cumsum_kernel, dict(BK=64, STORE_G=True, GH=0, DOT=0), 4, {"G": "*fp32"}),
    ("cumsum_f32", C._local_cumsum_kernel, dict(BK=64, STORE_G=True), 4, {"g": "*fp32", "G": "*fp32"}),
    ("out_infer", C._out_kernel, dict(OUT, **KEY, SKIP=True, RAW_G=True, GH=0, SELF_SPAN=True), 4, {}),
    ("out_train_raw", C._out_kernel, dict(OUT, **KEY, RAW_G=True, GH=0, STORE_A=True), 4, {}),
    ("out_train_G", C._out_kernel, dict(OUT, **KEY, STORE_A=True), 4, {"g": "*fp32"}),
    ("out_none", C._out_kernel, dict(OUT, BV=128, BK=64, GATE=0, NORM=True), 8, {}),
    ("fwd_loop", C._chunk_fwd_kernel, dict(BT=16, BK=64, BV=16, HAS_GK=True, HAS_GV=True, HAS_GS=False, USE_H0=True,
                                           STORE_HT=True, REVERSE=False, SHIFT_G=False), 4,
     {"gk": "*fp32", "gv": "*fp32"}),
]


def main():
    for name, kern, extra, w, ptrs in CASES:
        fn = kern.fn
        consts = dict(H=16, K=128, V=128, BT=64, GT=16, IS_VARLEN=False, DOT=0)
        consts.update(extra)
        for p in inspect.signature(fn.fn).parameters.values():
            if p.default is not p.empty and p.name not in consts:
                consts[p.name] = p.default
        consts = {k_: v_ for k_, v_ in consts.items() if k_ in fn.arg_names}
        sig = sig_of(fn, {**P, **ptrs}, {"T", "NTOT", "NCT", "N", "NT"}, {"scale"}, consts)
        attrs = {(i,): [["tt.divisibility", 16]] for i, (n, ty) in enumerate(sig.items())
                 if ty.startswith("*") or n == "T"}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": w})
        body = k.asm["ptx"].split(".section")[0]  # the debug sections follow the code
        ptx = "\n".join(line for line in body.splitlines() if not re.match(r"\s*(\.loc|\.file|//|\$L__tmp)", line))
        ptx = re.sub(r"\$L__\w+", "L", ptx)
        print(name, hashlib.sha256(ptx.encode()).hexdigest()[:12], flush=True)


if __name__ == "__main__":
    main()
