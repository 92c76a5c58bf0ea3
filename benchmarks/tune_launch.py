"""Time the chunked kernels under alternative launches (value block, warps), one LAUNCH entry at a
time, on the GPU (B4 T4096 H16 D128 bf16, the issue's training shape).

    python benchmarks/tune_launch.py [ENTRY ...]

For each entry of ``chunked.LAUNCH`` and each alternative, the forward (entries of forward kernels)
or the backward alone (chunk_bwd from one saved forward) is timed with do_bench (median ms), for
the decays that use the kernel; the default launch is timed in the same process, first. Pick a new
default only from a difference measured here, and record it in BENCHMARKS.md.
"""

import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from mixc.backends import chunked as C

ALTERNATIVES = {  # entry: (decays it serves, alternatives to the default)
    "walk": ((1, 2), [(64, 8), (128, 4), (128, 8), (32, 4)]),
    "out": ((1, 2), [(64, 4), (128, 4)]),
    "walk_rev": ((1, 2), [(64, 8), (128, 4), (32, 4)]),
    "dv": ((1, 2), [(64, 8), (128, 4), (64, 4)]),
    "dqk": ((0, 1, "1+kscale"), [(64, 8), (32, 4), (128, 4), (64, 2)]),
    "dqk_key_off": ((2,), [(128, 8), (128, 4), (32, 4)]),
}
FORWARD = ("walk", "out")


def inputs(gate, B=4, T=4096, H=16, D=128):
    """q, k, v, log decay and key scale for decay kind ``gate`` (0, 1, 2, or "1+kscale": 1 with a key
    scale, as mamba2 runs)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    ks = None
    if gate == "1+kscale":
        gate, ks = 1, F.softplus(torch.randn(B, T, H, device="cuda", generator=gen))
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    g = None
    if gate == 1:
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen))
    elif gate == 2:
        g = F.logsigmoid(torch.randn(B, T, H, D, device="cuda", generator=gen))
    return q, k, v, g, ks


def time_entry(entry, gate):
    q, k, v, g, ks = inputs(gate)
    if entry in FORWARD:
        return do_bench(lambda: C.chunk_fwd(q, k, v, g, kscale=ks), return_mode="median")
    o, ht, hs, gf, A, zt, zs, den, span = C.chunk_fwd(q, k, v, g, kscale=ks)
    do = torch.randn_like(o)
    gk = C._gate_of(g)
    gflat = gf if gk == 2 else (C._flat(g) if gk == 1 else None)
    return do_bench(lambda: C.chunk_bwd(do, None, q, k, v, gk, gflat, None, None, hs, A, 1.0, span=span, kscale=ks),
                    return_mode="median")


def main(entries):
    for entry in entries:
        gates, alts = ALTERNATIVES[entry]
        default = C.LAUNCH[entry]
        for gate in gates:
            row = []
            for cfg in [default] + alts:
                C.LAUNCH[entry] = cfg
                try:
                    row.append(f"{'/'.join(map(str, cfg))}: {time_entry(entry, gate):.3f}")
                except Exception as e:  # a launch that does not compile (registers, shared memory)
                    row.append(f"{'/'.join(map(str, cfg))}: {type(e).__name__}")
            C.LAUNCH[entry] = default
            part = "fwd" if entry in FORWARD else "bwd"
            print(f"{entry:<12} decay {gate} {part} ms (value block/warps[/stages], default first): " + ", ".join(row),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(ALTERNATIVES))
