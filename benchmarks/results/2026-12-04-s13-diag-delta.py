# ruff: noqa  (a kept record of a one-off device diagnosis, not a maintained tool)
"""(Session 13, kept with its output 2026-12-04-s13-h200-diag-delta.txt; run from the repository root with
PYTHONPATH=. on a GPU.) Diagnose the delta form's 16-bit path on the GPU: forward error vs a float64 token loop under variants."""
import time, sys
import torch
import torch.nn.functional as F
import mixc.backends.delta.kernels as K

dev = "cuda" if torch.cuda.is_available() else "cpu"
def loop(q, a, b, v, g, scale):
    B, T, H, Kd = q.shape; V = v.shape[-1]
    q, a, b, v, g = (x.double().cpu() for x in (q, a, b, v, g))
    S = torch.zeros(B, H, Kd, V, dtype=torch.float64); o = torch.zeros(B, T, H, V, dtype=torch.float64)
    for t in range(T):
        at, bt, vt = a[:, t], b[:, t], v[:, t]
        S = torch.exp(g[:, t])[..., None, None] * (S - at[..., :, None] * (bt[..., :, None] * S).sum(-2, keepdim=True)) + at[..., :, None] * vt[..., None, :]
        o[:, t] = scale * (q[:, t][..., :, None] * S).sum(-2)
    return o, S

def mk(B, T, H, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3)
    return q, k, k * beta[..., None], v, g

orig_prep, orig_wd = K._dl_prep_kernel, K._dl_work_dtype
class Ieee:
    def __getitem__(self, grid):
        def launch(*args, **kw):
            return orig_prep[grid](*["ieee" if x == "tf32x3" else x for x in args], **kw)
        return launch

def variant(tf32x3, work16):
    K._dl_prep_kernel = orig_prep if tf32x3 else Ieee()
    K._dl_work_dtype = (lambda q: q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32) if work16 else (lambda q: torch.float32)

def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu(); return float((a - b).norm() / b.norm())

for D, T in ((16, 40), (64, 200)):
    q, a, b, v, g = mk(2, T, 2, D, torch.float32)
    for gated in (False, True):
        ro, rS = loop(q, a, b, v, g if gated else torch.zeros_like(g), D ** -0.5)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for tf, w16 in ((True, True), (False, True), (True, False), (False, False)):
                if dtype == torch.float32 and not (tf and w16):
                    continue
                variant(tf, w16)
                try:
                    x = [t.to(dev, dtype) for t in (q, a, b, v)]
                    o, ht, _ = K.dl_chunk_fwd(*x, g.to(dev) if gated else None, None, D ** -0.5, True)
                    print(f"D{D} T{T} gated={gated} {dtype} tf32x3={tf} work16={w16}: o {rel(o, ro):.2e} S {rel(ht, rS):.2e}", flush=True)
                except Exception as e:
                    print(f"D{D} T{T} gated={gated} {dtype} tf32x3={tf} work16={w16}: ERROR {e!r}"[:200], flush=True)
K._dl_work_dtype = orig_wd
