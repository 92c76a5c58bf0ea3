"""The inference forward (a bf16 per-key decay of 64+ keys, read raw: the walk and the SELF_SPAN output
kernel) under alternative launches, timed side by side on the GPU at B4 T4096 H16 D128, each checked against
the default's output.

    python benchmarks/tune_infer.py [SPEC[+SPEC ...]] ...

SPEC: ``BV:WARPS:STAGES:KEYBLOCK`` sets the output kernel's launch (LAUNCH["out_infer"] and OUT_KEY_BK);
``walk=BV:WARPS[:STAGES[:KEYBLOCK]]`` the raw-decay state walk's (LAUNCH["walk_raw"]; STAGES 0: Triton's
default); specs joined by + apply together. The default launch is timed first, in the same process.
"""

import sys

import torch
from triton.testing import do_bench
from tune_launch import inputs  # (this script's folder is on the path)

from mixc.backends import chunked as C


def _apply(specs):
    for spec in specs.split("+"):
        if spec.startswith("walk="):
            C.LAUNCH["walk_raw"] = tuple(map(int, spec[5:].split(":")))
        else:
            bv, w, st, bk = map(int, spec.split(":"))
            C.LAUNCH["out_infer"], C.OUT_KEY_BK = (bv, w, st), bk


def main():
    q, k, v, g, _ = inputs(2, g_dtype=torch.bfloat16)
    with torch.no_grad():
        ref = C.chunk_fwd(q, k, v, g, backward=False)[0]
        base = (C.LAUNCH["out_infer"], C.OUT_KEY_BK, C.LAUNCH["walk_raw"])
        for spec in ["default"] + sys.argv[1:]:
            if spec != "default":
                _apply(spec)
            try:
                o = C.chunk_fwd(q, k, v, g, backward=False)[0]
                d = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = do_bench(lambda: C.chunk_fwd(q, k, v, g, backward=False), return_mode="median")
                print(f"{spec} out {C.LAUNCH['out_infer']} key block {C.OUT_KEY_BK} walk {C.LAUNCH['walk_raw']}: "
                      f"inference forward {ms:.3f} ms, output vs default {d:.1e}{' WRONG' if d > 1e-2 else ''}",
                      flush=True)
            except Exception as e:
                print(f"{spec}: failed {repr(e)[:150]}", flush=True)
            C.LAUNCH["out_infer"], C.OUT_KEY_BK, C.LAUNCH["walk_raw"] = base


if __name__ == "__main__":
    main()
