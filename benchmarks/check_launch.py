"""One forward and backward (chunk_fwd, chunk_bwd) on the GPU against a float64 loop and its autograd
gradients, under a launch given on the command line: does this launch compute correctly with this GPU
and Triton? Run one case per process (an illegal memory access ends the process's CUDA context):

    python benchmarks/check_launch.py K DTYPE [--decay key|scalar|none] [--v V] [NAME=VALUE ...]
    for K in 16 32 64 128; do python benchmarks/check_launch.py $K float16 "LAUNCH.out=128,4"; done

NAME=VALUE sets a LAUNCH entry (``LAUNCH.out=128,4``) or a module constant of mixc.backends.chunked (a
Python literal: ``SCORES_LAUNCH={'num_warps': 8}``) first. Shape: B1 T80 H2, K keys, V values (default
16), a per-key decay unless ``--decay`` says otherwise. Session 7 found with it that an output kernel
forming the per-key scores with two masked products computed wrong outputs at 4 warps under Triton 3.6
on the H100, and session 8 that the dq/dk kernel of the other decays did at K 32, V 48 (BENCHMARKS.md).
"""

import argparse

import torch
import torch.nn.functional as F
from tune_launch import apply_settings, passes  # (this script's folder is on the path)


def naive(q, k, v, g, h0=None, ks=None, skip=None, norm=False):
    """(o, final state) of the recurrence in float64, one token at a time: S <- e^g S + (ks k) v^T,
    o = q S (+ skip v); with ``norm`` o = q S / q z, z <- e^g z + ks k (from 0)."""
    B, T, H, K = q.shape
    g = g if g.dim() == 4 else g[..., None].expand(B, T, H, K)  # a scalar decay acts on every key
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64, device=q.device) if h0 is None else h0.double()
    z = torch.zeros(B, H, K, dtype=torch.float64, device=q.device)
    o = []
    for t in range(T):
        kt = k[:, t].double() * (ks[:, t].double()[..., None] if ks is not None else 1.0)
        S = S * g[:, t].double().exp()[..., None] + kt[..., None] * v[:, t].double()[..., None, :]
        ot = torch.einsum("bhk,bhkv->bhv", q[:, t].double(), S)
        if norm:
            z = z * g[:, t].double().exp() + kt
            ot = ot / torch.einsum("bhk,bhk->bh", q[:, t].double(), z)[..., None]
        if skip is not None:
            ot = ot + skip.double()[:, None] * v[:, t].double()
        o.append(ot)
    return torch.stack(o, 1), S


def features(K, V, dt, decay, use, gen, dev):
    """The public differentiable entry (chunk_recurrence, or chunk_normalised with "norm") with the
    features in ``use`` (h0, kscale, skip, norm; ghalf: the decay in DTYPE too, which the forward's kernels
    sum themselves), against naive(): [(name, ours, reference)]; "o_infer" is the same call's output with
    no gradient wanted (the inference forward)."""
    from mixc.backends.chunked import chunk_normalised, chunk_recurrence

    B, T, H = 1, 80, 2
    r = lambda *shape: torch.randn(*shape, device=dev, generator=gen)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    if "norm" in use:  # positive features, as linear attention's: the denominators stay away from 0
        q, k = F.elu(q) + 1, F.elu(k) + 1
    g = None if decay == "none" else F.logsigmoid(r(B, T, H, *([K] if decay == "key" else [])))
    h0 = r(B, H, K, V) if "h0" in use else None
    ks = F.softplus(r(B, T, H)) if "kscale" in use else None
    skip = r(H) if "skip" in use else None
    do, dS = r(B, T, H, V), r(B, H, K, V)
    leaves = {"q": q, "k": k, "v": v, "g": g, "h0": h0, "ks": ks, "skip": skip}
    # the reference takes the inputs as rounded to DTYPE: the error is the kernels', not the inputs' rounding
    # (which alone moves a scalar decay's gradient by ~3e-2 in bf16: sums over K * V terms that cancel)
    rounded = "qkv" + ("g" if "ghalf" in use else "")
    ref = {n: (x.to(dt) if n in rounded else x).double().requires_grad_() for n, x in leaves.items() if x is not None}
    ours = {n: (x.to(dt) if n in rounded else x.float()).requires_grad_() for n, x in leaves.items()
            if x is not None}
    gz = torch.zeros(B, T, H, device=dev, dtype=torch.float64)
    ro, rS = naive(ref["q"], ref["k"], ref["v"], ref.get("g", gz), ref.get("h0"), ref.get("ks"), ref.get("skip"),
                   "norm" in use)
    gk = ours.get("g") if decay == "key" else None
    gs = ours.get("g") if decay == "scalar" else None
    def call():
        if "norm" in use:
            return chunk_normalised(ours["q"], ours["k"], ours["v"], gk=gk, gs=gs, h0=ours.get("h0"),
                                    kscale=ours.get("ks"), output_final_state=True)[:2]
        return chunk_recurrence(ours["q"], ours["k"], ours["v"], gk=gk, gs=gs, h0=ours.get("h0"),
                                kscale=ours.get("ks"), skip=ours.get("skip"), output_final_state=True)
    with torch.no_grad():
        o_infer = call()[0]
    o, S = call()
    ((o.float() * do).sum() + (S * dS).sum()).backward()
    ((ro * do.double()).sum() + (rS * dS.double()).sum()).backward()
    return [("o", o, ro), ("o_infer", o_infer, ro), ("S", S, rS)] + [("d" + n, ours[n].grad, ref[n].grad)
                                                                   for n in ref]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("K", type=int)
    ap.add_argument("dtype")
    ap.add_argument("--decay", default="key", choices=["key", "scalar", "none"])
    ap.add_argument("--v", type=int, default=16)
    ap.add_argument("--use", default="", help="comma-separated: h0, kscale, skip, norm, ghalf (through the public "
                    "chunk_recurrence / chunk_normalised, final state, every gradient and the inference output "
                    "checked)")
    ap.add_argument("settings", nargs="*")
    a = ap.parse_intermixed_args()
    K, V, dt = a.K, a.v, getattr(torch, a.dtype)
    apply_settings(a.settings)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU under TRITON_INTERPRET=1: a dry run)
    gen = torch.Generator(device=dev).manual_seed(5)
    if a.use:
        rows = features(K, V, dt, a.decay, a.use.split(","), gen, dev)
        print(f"K {K} V {V} {a.decay} {a.dtype} {a.use} {' '.join(a.settings)}: relative error "
              + ", ".join(f"{n} {((x.double() - r).norm() / r.norm()).item():.1e}" for n, x, r in rows))
        return
    B, T, H = 1, 80, 2
    q, k, v = (torch.randn(B, T, H, d, device=dev, generator=gen) for d in (K, K, V))
    g = F.logsigmoid(torch.randn(B, T, H, *([K] if a.decay == "key" else []), device=dev, generator=gen))
    g = None if a.decay == "none" else g
    do = torch.randn(B, T, H, V, device=dev, generator=gen)
    ref = [x.double().requires_grad_() for x in (q, k, v, g if g is not None else torch.zeros(B, T, H, device=dev))]
    ro = naive(*ref)[0]
    (ro * do.double()).sum().backward()
    fwd, bwd = passes(*(x.to(dt) for x in (q, k, v)), g, do=do.to(dt))
    saved = fwd()
    o = saved[0]
    dq, dk, dv, dg = bwd(saved)[:4]
    if dev == "cuda":
        torch.cuda.synchronize()
    errs = [((x.double() - r).norm() / r.norm()).item() for x, r in
            zip((o, dq, dk, dv, dg), (ro, *(x.grad for x in ref))) if x is not None]
    names = ["o", "dq", "dk", "dv", "dg"][:len(errs)]
    print(f"K {K} V {V} {a.decay} {a.dtype} {' '.join(a.settings)}: relative error "
          + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)))


if __name__ == "__main__":
    main()
