"""Are the chunk kernels right at a key width K on the GPU at a long sequence? For each K, decay kind and
launch setting this prints the bf16 (CPU: fp16) output's, final state's and gradients' relative RMS error
against the same kernels on fp32 copies of the inputs, and whether two bf16 runs agree bit for bit (all
five; a race shows as a difference).

    python benchmarks/diag_width.py [--ks 128 153 160 192] [--decays none norm scalar key] [--shape 1,4096,4,128]
                                    [--set "LAUNCH.walk=64,4,1" ...]

Session 11 found with it that based's features padded to 160 were wrong at T 4096 (not at T 80).
``--set`` takes tune_launch.py's NAME=VALUE settings, one setting group per argument (';' between several),
each group run after the unchanged launch.
"""

import argparse

import torch
import torch.nn.functional as F
from bench_chunked import rel  # (this script's folder is on the path)
from tune_launch import apply_settings

from mixc.backends import chunked as C

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # (on a CPU: TRITON_INTERPRET=1, fp16 for bf16)
HALF = torch.bfloat16 if DEV == "cuda" else torch.float16


def call(decay, q, k, v, g, **kw):
    """The public entry for decay kind ``decay`` (norm...: chunk_normalised with g as a scalar decay)."""
    if decay.startswith("norm"):
        return C.chunk_normalised(q, k, v, gs=g, **kw)
    return C.chunk_recurrence(q, k, v, gk=g if decay == "key" else None, gs=g if decay == "scalar" else None, **kw)


def run(decay, q, k, v, g, do):
    """(o, final state, dq, dk, dv) of one forward and backward (cotangent do on o)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, ht = call(decay, q, k, v, g, output_final_state=True)[:2]
    o.backward(do.to(o.dtype))
    return o.detach(), ht, q.grad, k.grad, v.grad


def timed(on, decay, q, k, v, g):
    """', forward X ms' (the bf16 forward without gradients, do_bench median) when ``on``."""
    if not on:
        return ""
    from triton.testing import do_bench

    def fwd():
        with torch.no_grad():
            return call(decay, q, k, v, g)
    return f", forward {do_bench(fwd, return_mode='median'):.3f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", nargs="+", type=int, default=[128, 153, 160, 192])
    ap.add_argument("--decays", nargs="+", default=["none", "norm", "norm-scalar", "scalar", "key"])
    ap.add_argument("--shape", default="1,4096,4,128")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--time", action="store_true", help="also the bf16 forward's median time (no gradient; GPU only)")
    a = ap.parse_args()
    B, T, H, V = map(int, a.shape.split(","))
    launch = dict(C.LAUNCH)
    for group in [""] + a.set:
        C.LAUNCH.update(launch)  # each group on top of the unchanged table (other constants stay set)
        if group:
            apply_settings(group.split(";"))
        for K in a.ks:
            for decay in a.decays:
                gen = torch.Generator(device=DEV).manual_seed(K)
                r = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
                q, k, v = r(B, T, H, K) / K ** 0.5, r(B, T, H, K), r(B, T, H, V)
                if decay.startswith("norm"):  # positive features: denominators away from 0
                    q, k = F.elu(q) + 1, F.elu(k) + 1
                g = {"none": None, "norm": None, "scalar": F.logsigmoid(r(B, T, H) + 3),
                     "norm-scalar": F.logsigmoid(r(B, T, H) + 3), "key": F.logsigmoid(r(B, T, H, K) + 3)}[decay]
                do = r(B, T, H, V)
                want = run(decay, q, k, v, g, do)
                qb, kb, vb = q.to(HALF), k.to(HALF), v.to(HALF)
                got = run(decay, qb, kb, vb, g, do)
                again = run(decay, qb, kb, vb, g, do)
                torch.cuda.synchronize() if DEV == "cuda" else None
                d = (got[0].float() - want[0].float()).square().mean(-1)  # [B, T, H]
                per_chunk = d[:, : T // 64 * 64].reshape(B, -1, 64, H).mean((0, 2, 3))
                bad = (per_chunk / want[0].float().square().mean() > 1e-4).nonzero()
                errs = ", ".join(f"{n} {rel(x, y):.1e}" for n, x, y in zip(("o", "state", "dq", "dk", "dv"), got, want))
                same = all(bool((x == y).all()) for x, y in zip(got, again))
                print(f"{group or 'as is'} K {K} {decay}: {errs}, runs equal {same}, chunks over 1e-2 "
                      f"{bad.numel()}/{T // 64} {bad.flatten().tolist()[:6]}{timed(a.time, decay, qb, kb, vb, g)}",
                      flush=True)


if __name__ == "__main__":
    main()
