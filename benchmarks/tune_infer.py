"""The inference forward's output kernel (SELF_SPAN: a bf16 per-key decay of 64+ keys) under alternative
launches, timed side by side on the GPU at B4 T4096 H16 D128, each checked against the default's output.

    python benchmarks/tune_infer.py BV:WARPS:STAGES:KEYBLOCK ...
"""

import sys

import torch
from triton.testing import do_bench
from tune_launch import inputs  # (this script's folder is on the path)

from mixc.backends import chunked as C


def main():
    q, k, v, g, _ = inputs(2, g_dtype=torch.bfloat16)
    with torch.no_grad():
        ref = C.chunk_fwd(q, k, v, g, backward=False)[0]
        base = (C.LAUNCH["out_key"], C.OUT_KEY_BK)
        for spec in ["default"] + sys.argv[1:]:
            if spec != "default":
                bv, w, st, bk = map(int, spec.split(":"))
                C.LAUNCH["out_key"], C.OUT_KEY_BK = (bv, w, st), bk
            try:
                o = C.chunk_fwd(q, k, v, g, backward=False)[0]
                d = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = do_bench(lambda: C.chunk_fwd(q, k, v, g, backward=False), return_mode="median")
                print(f"{spec} {C.LAUNCH['out_key']} key block {C.OUT_KEY_BK}: inference forward {ms:.3f} ms, "
                      f"output vs default {d:.1e}{' WRONG' if d > 1e-2 else ''}", flush=True)
            except Exception as e:
                print(f"{spec}: failed {repr(e)[:150]}", flush=True)
            C.LAUNCH["out_key"], C.OUT_KEY_BK = base


if __name__ == "__main__":
    main()
