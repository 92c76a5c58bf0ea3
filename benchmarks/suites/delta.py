"""The chunked delta rule (backends/delta) against fla 0.6.0's ``chunk_delta_rule`` and ``chunk_gated_delta_rule``.

Rows (bf16 on the GPU; fp32 in a CPU smoke run, where the interpreter's bf16 is wrong): deltanet and
gated_deltanet, forward and forward + backward, at B4 T4096 H16 D128 and B8 T1024 H16 D64 (the issue's shapes;
its targets: fwd+bwd vs chunk_delta_rule >= 1.0 and forward vs chunk_gated_delta_rule >= 1.0 at the first,
>= 2.0 at the second). Inputs as fla's users pass them: k L2-normalised (q too), beta = sigmoid, g = logsigmoid,
[B, T, H, D], scale D^-1/2 (``use_qk_l2norm_in_kernel=False``). Each row's check is our output's relative RMS
error against the reference in fp32 in the same run (the note gives fla's); a fwd+bwd row's check is the
larger of that and the gradients' (every input's, ours in the row's dtype against the reference's in fp32, on
the first sequence's first 256 tokens: the reference is a loop over tokens); rows without fla say so. The
16-bit work tensors (``DL_WORK16``, on) are compared with fp32 ones by ``benchmarks/tune.py delta``.
A row "deltanet packed" runs 16 packed sequences (cu_seqlens) in one row of 16384 tokens; an untimed row
("aligned keys", before it) compares the accuracy of fla, ours with 16-bit work and ours with fp32 work in the
corner where each step nearly erases the last (keys along one direction, beta in (0.9, 1)).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import DEV, fwd_bwd, rel, row, time_ms, wanted

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(4, 4096, 16, 128), (8, 1024, 16, 64)]
SMOKE_SHAPES = [(1, 70, 2, 16)]


def _fla():
    """fla's two ops, or None when fla is not installed."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:
        return None
    return chunk_delta_rule, chunk_gated_delta_rule


def _fla_refuses_gated_backward() -> bool:
    """fla 0.6.0's gated backward raises on Hopper with Triton >= 3.4 and < 3.7.1 (its #640 check)."""
    import triton

    ver = tuple(int(p) for p in triton.__version__.split(".")[:3] if p.isdigit())
    return DEV == "cuda" and torch.cuda.get_device_capability()[0] == 9 and (3, 4) <= ver < (3, 7, 1)


def _inputs(B, T, H, D, dtype, gated, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    x = {"q": q, "k": k, "v": v, "beta": beta}
    if gated:
        x["g"] = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 3)
    return {n: t.to(DEV, dtype) for n, t in x.items()}


def _grad_check(m, ours, x, n_tokens=256):
    """The largest relative RMS error of our gradients (every input, the row's dtype) against the reference's
    (fp32), on x's first sequence and first ``n_tokens`` tokens, with a fixed random output cotangent."""
    xs = {n: t[:1, :n_tokens].detach().clone().requires_grad_() for n, t in x.items()}
    xr = {n: t[:1, :n_tokens].detach().float().requires_grad_() for n, t in x.items()}
    ref = m.reference(**xr)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref.device)
    ref.backward(do)
    ours(**xs).backward(do.to(xs["q"].dtype))
    return max(rel(xs[n].grad.float(), xr[n].grad) for n in x)


def run(smoke: bool) -> list[dict]:
    import mixc

    fla = _fla()
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    rows = []
    for name, gated in (("deltanet", False), ("gated_deltanet", True)):
        m = mixc.load(ROOT / "examples" / f"{name}.mix")
        for B, T, H, D in SMOKE_SHAPES if smoke else SHAPES:
            if not wanted(f"{name} B{B} T{T}"):
                continue
            x = _inputs(B, T, H, D, dtype, gated)
            scale = D ** -0.5

            def ours(**kw):
                return m(**kw, form="chunked")

            def theirs(**kw):
                op = fla[1] if gated else fla[0]
                extra = {"g": kw["g"]} if gated else {}
                o, _ = op(q=kw["q"], k=kw["k"], v=kw["v"], beta=kw["beta"], scale=scale, **extra,
                          use_qk_l2norm_in_kernel=False)
                return o

            with torch.no_grad():
                ref = m.reference(**{n: t.float() for n, t in x.items()})
                fla_note = f"fla's check {rel(theirs(**x).float(), ref):.1e}" if fla else "fla not installed: no anchor"
                t_fla = time_ms(lambda: theirs(**x), label=f"fla {name} fwd") if fla else None
            shape = f"B{B} T{T} H{H} D{D} {str(dtype).replace('torch.', '')}"
            anchor = ("chunk_gated_delta_rule" if gated else "chunk_delta_rule") if fla else None
            xg = {n: t.clone().requires_grad_() for n, t in x.items()}
            do = torch.randn_like(ref).to(dtype)
            note_b = fla_note
            if gated and fla and _fla_refuses_gated_backward():  # (not called: it compiles kernels, then refuses)
                t_fla_b, note_b = None, "fla 0.6.0 refuses gated backwards on Hopper with Triton 3.4 to 3.7.0 (#640)"
            else:
                try:
                    t_fla_b = time_ms(fwd_bwd(theirs, xg, do), label=f"fla {name} fwd+bwd") if fla else None
                except RuntimeError as e:
                    t_fla_b, note_b = None, f"fla refused: {str(e)[:60]}"
            with torch.no_grad():
                check = rel(ours(**x).float(), ref)
                t_ours = time_ms(lambda: ours(**x), label=f"ours {name} fwd")
            rows.append(row("delta", f"{name} fwd {shape}", t_ours, anchor, t_fla, check, fla_note))
            print(rows[-1], flush=True)
            t_ours = time_ms(fwd_bwd(ours, xg, do), label=f"ours {name} fwd+bwd")
            g_check = _grad_check(m, ours, x)
            rows.append(row("delta", f"{name} fwd+bwd {shape}", t_ours, anchor, t_fla_b, max(check, g_check),
                            note_b + f"; check: max(forward {check:.1e}, gradients {g_check:.1e} "
                            f"on B1 T{min(T, 256)})", grad_check=g_check))
            print(rows[-1], flush=True)
    if wanted("aligned keys"):
        rows += aligned_keys(fla, dtype)
    if wanted("deltanet packed"):
        rows += packed(fla, dtype, smoke)
    return rows


def aligned_keys(fla, dtype) -> list[dict]:
    """Accuracy, not time: gated_deltanet at B1 T150 H2 D64 with every key near one direction, beta in (0.9, 1)
    and g near 0 (tests/test_delta.py's 16-bit corner), forward in the row's dtype against the reference in
    float64 on the CPU: ours with 16-bit work tensors (the shipped DL_WORK16), ours with fp32 ones, fla's
    chunk_gated_delta_rule, and the reference on the inputs rounded to the row's dtype (the floor)."""
    import mixc

    m = mixc.load(ROOT / "examples" / "gated_deltanet.mix")
    mod = m._module
    gen = torch.Generator().manual_seed(2)
    B, T, H, D = 1, 150, 2, 64
    k = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(k[:, :1] + 0.05 * k, dim=-1)
    x = {"q": torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), dim=-1),
         "k": k, "v": torch.randn(B, T, H, D, generator=gen, dtype=torch.float64),
         "beta": 0.9 + 0.1 * torch.rand(B, T, H, generator=gen, dtype=torch.float64),
         "g": -1e-3 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)}
    ref = m.reference(**x)
    xd = {n: t.to(DEV, dtype) for n, t in x.items()}
    floor = rel(m.reference(**{n: t.to(dtype).double() for n, t in x.items()}), ref)
    errs = {}
    shipped = mod.DL_WORK16
    try:
        for work16 in (True, False):
            mod.DL_WORK16 = work16
            with torch.no_grad():
                errs[work16] = rel(m(**xd, form="chunked").double().cpu(), ref)
    finally:
        mod.DL_WORK16 = shipped
    note = f"fp32 work {errs[False]:.2e}; inputs rounded alone {floor:.2e}"
    if fla:
        with torch.no_grad():
            o, _ = fla[1](q=xd["q"], k=xd["k"], v=xd["v"], beta=xd["beta"], g=xd["g"], scale=D ** -0.5,
                          use_qk_l2norm_in_kernel=False)
        note += f"; fla {rel(o.double().cpu(), ref):.2e}"
    r = row("delta", f"gated_deltanet aligned keys B{B} T{T} H{H} D{D} {str(dtype).replace('torch.', '')}", None,
            "chunk_gated_delta_rule" if fla else None, None, errs[True], note)
    print(r, flush=True)
    return [r]


def packed(fla, dtype, smoke: bool) -> list[dict]:
    """deltanet over packed sequences (cu_seqlens: 16 sequences of 64 to 2112 tokens in one row of 16384, H16
    D128; smoke: 4, one empty, in 150) forward + backward, against fla's chunk_delta_rule given the same
    cu_seqlens; checked against the reference on the first three sequences."""
    import mixc

    m = mixc.load(ROOT / "examples" / "deltanet.mix")
    lens = [64 * (1 + (7 * i) % 31) for i in range(15)] if not smoke else [40, 0, 70]
    T = 16384 if not smoke else 150
    lens.append(T - sum(lens))
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV)
    H, D = (16, 128) if not smoke else (2, 16)
    x = _inputs(1, T, H, D, dtype, False)
    xg = {n: t.clone().requires_grad_() for n, t in x.items()}
    do = torch.randn(1, T, H, D, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)

    def ours(**kw):
        return m(**kw, cu_seqlens=cu, form="chunked")

    def theirs(**kw):
        o, _ = fla[0](q=kw["q"], k=kw["k"], v=kw["v"], beta=kw["beta"], scale=D ** -0.5, cu_seqlens=cu,
                      use_qk_l2norm_in_kernel=False)
        return o

    if fla:
        with torch.no_grad():
            agree = rel(theirs(**x).float(), ours(**x).float())

    with torch.no_grad():  # checked on the first three sequences (the reference is a loop over tokens)
        n3 = int(cu[3])
        x3, cu3 = {n: t[:, :n3] for n, t in x.items()}, cu[:4]
        ref = m.reference(**{n: t.float() for n, t in x3.items()}, cu_seqlens=cu3)
        check = rel(m(**x3, cu_seqlens=cu3, form="chunked").float(), ref)
        note = f"check on the first 3 sequences ({n3} tokens)" + (f"; fla's output vs ours {agree:.1e}" if fla else
                                                                     "; fla not installed: no anchor")
    t_ours = time_ms(fwd_bwd(ours, xg, do), label="ours deltanet packed fwd+bwd")
    t_fla = time_ms(fwd_bwd(theirs, xg, do), label="fla deltanet packed fwd+bwd") if fla else None
    case = f"deltanet packed fwd+bwd {len(lens)} sequences in T{T} H{H} D{D} {str(dtype).replace('torch.', '')}"
    r = row("delta", case, t_ours, "chunk_delta_rule (cu_seqlens)" if fla else None, t_fla, check, note)
    print(r, flush=True)
    return [r]
