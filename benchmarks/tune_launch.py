"""Time the chunked kernels under alternative launches (value block, warps), one LAUNCH entry at a
time, on the GPU (B4 T4096 H16 D128 bf16, the issue's training shape).

    python benchmarks/tune_launch.py [ENTRY ...]

For each entry of ``chunked.LAUNCH`` and each alternative, the forward (entries of forward kernels)
or the backward alone (chunk_bwd from one saved forward) is timed with do_bench (median ms), for
the decays that use the kernel; the default launch is timed in the same process, first. Every
alternative's outputs (o and the gradients, at this shape and at B1 T80 H2 D16) are compared with the
default's, and a launch whose differ by more than 1e-2 is marked WRONG. Pick a new
default only from a difference measured here, and record it in BENCHMARKS.md. The entries of a bf16
per-key decay read as it is (``walk_raw``, ``out_infer``) are timed by tune_infer.py.
"""

import ast
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from mixc.backends import chunked as C

ALTERNATIVES = {  # entry: (decays it serves, alternatives to the default)
    "walk": ((1, 2), [(64, 8), (128, 4), (128, 8), (32, 4)]),
    "out": ((1,), [(64, 4), (128, 4)]),
    "out_key": ((2,), [(128, 8), (64, 4, 3), (128, 4, 1), (128, 4, 2)]),
    "walk_rev": ((1, 2), [(64, 8), (128, 4), (32, 4)]),
    "dv": ((1, 2), [(64, 8), (128, 4), (64, 4)]),
    "dqk": ((0, 1, "1+kscale"), [(64, 8), (32, 4), (128, 4), (64, 2)]),
    "dqk_key_off": ((2,), [(128, 8), (128, 4), (32, 4)]),
}
FORWARD = ("walk", "out", "out_key")


def inputs(gate, B=4, T=4096, H=16, D=128, g_dtype=torch.float32):
    """q, k, v, log decay (in ``g_dtype``) and key scale for decay kind ``gate`` (0, 1, 2, or "1+kscale": 1
    with a key scale, as mamba2 runs)."""
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
    return q, k, v, (g if g is None else g.to(g_dtype)), ks


def passes(q, k, v, g, ks=None, do=None):
    """(fwd, bwd): chunk_fwd on these inputs, and chunk_bwd from one of its results with the cotangent
    ``do`` (default: a seeded draw shaped as v), as the library's autograd function runs them."""
    if do is None:
        do = torch.randn(v.shape, device=v.device, generator=torch.Generator(device=v.device).manual_seed(1))
        do = do.to(v.dtype)

    def fwd():
        return C.chunk_fwd(q, k, v, g, kscale=ks)

    def bwd(saved):
        o, ht, hs, gf, A, zt, zs, den, span = saved
        return C.chunk_bwd(do, None, q, k, v, C._gate_of(g), gf, None, None, hs, A, 1.0, span=span, kscale=ks)
    return fwd, bwd


def run(q, k, v, g, ks, timed=False):
    """(forward ms, backward ms (chunk_bwd from one saved forward), [o, dq, dk, dv(, dg)]) of the chunked
    kernels on these inputs; the times are 0 unless ``timed``."""
    fwd, bwd = passes(q, k, v, g, ks)
    saved = fwd()
    dq, dk, dv, dg = bwd(saved)[:4]
    outs = [saved[0], dq, dk, dv] + ([dg] if dg is not None else [])
    if not timed:
        return 0.0, 0.0, outs
    return do_bench(fwd, return_mode="median"), do_bench(lambda: bwd(saved), return_mode="median"), outs


def checked_run(gate):
    """run() timed at the training shape, with the outputs there and at B1 T80 H2 D16 (key loops of one
    iteration), for wrong()."""
    f, b, outs = run(*inputs(gate), timed=True)
    return f, b, outs + run(*inputs(gate, B=1, T=80, H=2, D=16))[2]


def apply_settings(items):
    """Set LAUNCH entries (``LAUNCH.out=128,4``) or module constants of mixc.backends.chunked (a Python
    literal: ``SCORES_LAUNCH={'num_warps': 8}``) from NAME=VALUE strings."""
    for item in items:
        name, value = item.split("=", 1)
        if name.startswith("LAUNCH."):
            C.LAUNCH[name[7:]] = tuple(map(int, value.split(",")))
        else:
            setattr(C, name, ast.literal_eval(value))


def wrong(want, got, tol=1e-2):
    """'' if every output of a launch is within tol (relative) of the default launch's, else a warning naming
    the worst: a launch is a candidate only if it computes the same thing (Triton can miscompile one launch
    and not another: BENCHMARKS.md, session 7)."""
    errs = [float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)) for x, y in zip(got, want)]
    worst = max(errs)
    return "" if worst <= tol else f" WRONG (relative difference {worst:.1e})"


def main(entries):
    for entry in entries:
        gates, alts = ALTERNATIVES[entry]
        default = C.LAUNCH[entry]
        for gate in gates:
            row, want = [], None
            for cfg in [default] + alts:
                C.LAUNCH[entry] = cfg
                try:
                    f, b, got = checked_run(gate)
                    want = got if cfg is default else want
                    row.append(f"{'/'.join(map(str, cfg))}: {f if entry in FORWARD else b:.3f}{wrong(want, got)}")
                except Exception as e:  # a launch that does not compile (registers, shared memory)
                    row.append(f"{'/'.join(map(str, cfg))}: {type(e).__name__}")
            C.LAUNCH[entry] = default
            part = "fwd" if entry in FORWARD else "bwd"
            print(f"{entry:<12} decay {gate} {part} ms (value block/warps, default first): " + ", ".join(row),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(ALTERNATIVES))
