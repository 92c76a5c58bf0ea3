"""The recurrent form: decode steps, the state bandwidth at a large batch, mamba's training scan and
hgrn's, each timed against its anchor in the same run and checked against the reference.

(a) one gla decode step, B=1 H=16 K=V=128, through ``m.decoder`` (eager, and a CUDA-graph replay) vs fla's
    fused_recurrent_gla at T=1 (target <= 20 us);
(b) gla decode at B=256: the fp32 state read and written per step over the time, vs a torch copy of a
    tensor of the state's size (ratio = fraction of the copy bandwidth; target >= 0.8);
(c) mamba recurrent forward+backward at B4 T4096 H16 (P=64, N=16) vs the plain PyTorch token loop (the
    reference form, which is that loop) in the same run;
(d) hgrn (H=1, D=2048) at B4 T4096 vs fla's fused_recurrent_hgrn (x' = (1 - f) x and g = log f, [B, T, D]:
    the same function); forward, and forward+backward (target ratio >= 1.0); our gradients checked too;
(e) mamba forward+backward over 16 packed sequences (cu_seqlens, 64 to 2112 tokens, T16384 H16): ours in one
    launch each way vs ours called once a sequence (the runtime's split, the path before session 16).
bf16 inputs, fp32 state. ``--smoke``: tiny shapes on the CPU (interpreter), fla rows skipped when absent.
"""

from __future__ import annotations

from pathlib import Path

import torch

import mixc
from suites.common import DEV, fwd_bwd, on_gpu, rel, row, time_ms, wanted

EX = Path(__file__).resolve().parents[2] / "examples"
SUITE = "recurrent"


def _fla(name):
    try:
        if name == "gla":
            from fla.ops.gla import fused_recurrent_gla as f
        else:
            from fla.ops.hgrn import fused_recurrent_hgrn as f
        return f
    except Exception as e:  # fla missing or broken: the row says so
        return repr(e)


def _graph(fn):
    """A CUDA graph of ``fn()`` (warmed up on a side stream) and its output, or (None, None) off CUDA."""
    if not on_gpu():
        return None, None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def _gla_decoder(B, H, K, V, dtype, seed=0):
    """gla's decoder loaded with a random state, one token's inputs, and the check of two steps against the
    reference: the first (recorded) and the second (replayed: the host fast path the timing runs) through the
    same static input buffers. Returns (x [B, 1, H, ...], state, decoder, step inputs [B, H, ...] holding the
    first token again, the first step's output, the worse rel error, how the steps ran)."""
    m = mixc.load(EX / "gla.mix")
    x = m.random_inputs(B, 2, H, K=K, V=V, seed=seed, dtype=dtype, device=DEV)
    st = {"S": 0.1 * torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(seed + 1)).to(DEV)}
    dec = m.decoder(B, H, device=DEV, dtype=dtype, K=K, V=V)
    step_in = {k: v[:, 0].clone(memory_format=torch.contiguous_format) for k, v in x.items()}  # (own buffers)
    dec.load_state(st)
    o = dec.step(**step_in).clone()
    for k, v in step_in.items():
        v.copy_(x[k][:, 1])
    o2 = dec.step(**step_in).clone()
    want = m.reference(**{k: v.float() for k, v in x.items()}, initial_state=st)
    check = max(rel(o, want[:, 0]), rel(o2, want[:, 1]))
    for k, v in step_in.items():
        v.copy_(x[k][:, 0])
    path = "steps replayed" if any(dec._replays.values()) else "generic step path"
    return {k: v[:, :1] for k, v in x.items()}, st, dec, step_in, o, check, path


def decode_step(smoke: bool) -> list[dict]:
    B, H, K, V = (1, 2, 16, 16) if smoke else (1, 16, 128, 128)
    dt = torch.float32 if smoke else torch.bfloat16
    x, st, dec, step_in, o, check, path = _gla_decoder(B, H, K, V, dt)
    case = f"gla decode step B{B} H{H} K{K} V{V} ({str(dt)[6:]})"
    ours = time_ms(lambda: dec.step(**step_in))
    fla = _fla("gla")
    if callable(fla):
        h0 = st["S"].clone()
        q, k, v, g = (x[n] for n in ("q", "k", "v", "g"))
        fo, _ = fla(q, k, v, gk=g, initial_state=h0, output_final_state=True)
        note = f"fla's output vs ours: {rel(fo[:, 0], o):.1e}"
        anchor_ms = time_ms(lambda: fla(q, k, v, gk=g, initial_state=h0, output_final_state=True))
        anchor = "fla fused_recurrent_gla T=1"
    else:
        anchor, anchor_ms, note = None, None, f"fla missing: {fla}"
    rows = [row(SUITE, case + " eager", ours, anchor, anchor_ms, check, f"{note}; {path}; target <= 0.020 ms")]
    g, _ = _graph(lambda: dec.step(**step_in))
    if g is not None:
        rows.append(row(SUITE, case + " CUDA graph replay", time_ms(g.replay), anchor, anchor_ms, check,
                        "the decoder's step captured once, replayed"))
    return rows


def decode_bandwidth(smoke: bool) -> list[dict]:
    B, H, K, V = (4, 2, 16, 16) if smoke else (256, 16, 128, 128)
    dt = torch.float32 if smoke else torch.bfloat16
    _, _, dec, step_in, _, check, path = _gla_decoder(B, H, K, V, dt)
    g, _ = _graph(lambda: dec.step(**step_in))
    ours = time_ms(g.replay if g is not None else (lambda: dec.step(**step_in)))
    src = torch.randn(B * H * K * V, device=DEV)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    moved = 2 * src.numel() * 4  # the fp32 state read and written
    note = (f"state traffic {moved / ours / 1e6:.0f} GB/s vs copy {moved / copy_ms / 1e6:.0f} GB/s; ratio = share "
            f"of the copy bandwidth, target >= 0.8; {path}" + ("; CUDA graph replay" if g is not None else ""))
    return [row(SUITE, f"gla decode B{B} H{H} K{K} V{V} state bandwidth", ours, "torch copy of the state's size",
                copy_ms, check, note)]


def _once_ms(fn) -> float:
    """One call's wall time (ms), synchronised: for an anchor too slow to repeat (a token loop)."""
    import time

    if on_gpu():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if on_gpu():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def mamba_train(smoke: bool) -> list[dict]:
    m = mixc.load(EX / "mamba.mix")
    B, T, H, P, N = (1, 40, 2, 8, 4) if smoke else (4, 4096, 16, 64, 16)
    dt = torch.float32 if smoke else torch.bfloat16
    x = {k: v.requires_grad_() for k, v in m.random_inputs(B, T, H, P=P, N=N, dtype=dt, device=DEV).items()}
    pr = {k: v.requires_grad_() for k, v in m.parameters_init(H, P=P, N=N, device=DEV).items()}
    o = m(**x, **pr, form="recurrent")
    xf = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    want = m.reference(**xf, **pr)
    check = rel(o, want)
    go = torch.randn_like(want)
    ga = torch.autograd.grad(o, [x["dt"], pr["A"]], go.to(o.dtype))
    gb = torch.autograd.grad(want, [xf["dt"], pr["A"]], go)
    note = f"dt grad {rel(ga[0], gb[0]):.1e}, A grad {rel(ga[1], gb[1]):.1e} (vs the fp32 reference)"
    ours = time_ms(fwd_bwd(lambda **kw: m(**kw, form="recurrent"), {**x, **pr}))
    anchor = _once_ms(fwd_bwd(lambda **kw: m.reference(**kw), {**xf, **pr}))  # seconds a call: timed once
    return [row(SUITE, f"mamba fwd+bwd B{B} T{T} H{H} P{P} N{N} ({str(dt)[6:]})", ours,
                "PyTorch token loop (fp32, the reference form)", anchor, check, note)]


def hgrn(smoke: bool) -> list[dict]:
    m = mixc.load(EX / "hgrn.mix")
    B, T, D = (2, 40, 64) if smoke else (4, 4096, 2048)
    dt = torch.float32 if smoke else torch.bfloat16
    x = {k: v.requires_grad_() for k, v in m.random_inputs(B, T, 1, D=D, dtype=dt, device=DEV).items()}
    o = m(**x, form="recurrent")
    xf = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    want = m.reference(**xf)
    check = rel(o, want)
    go = torch.randn_like(want)  # the element-wise backward kernel, checked in the same run
    ga = torch.autograd.grad(o, [x["x"], x["f"]], go.to(o.dtype))
    gb = torch.autograd.grad(want, [xf["x"], xf["f"]], go)
    grads = f"x grad {rel(ga[0], gb[0]):.1e}, f grad {rel(ga[1], gb[1]):.1e} (vs the fp32 reference)"
    want = want.detach()
    fla = _fla("hgrn")
    with torch.no_grad():
        ours_f = time_ms(lambda: m(**x, form="recurrent"))
    ours_fb = time_ms(fwd_bwd(lambda **kw: m(**kw, form="recurrent"), x))
    if not callable(fla):
        note = f"fla missing: {fla}"
        return [row(SUITE, f"hgrn fwd B{B} T{T} D{D}", ours_f, None, None, check, note),
                row(SUITE, f"hgrn fwd+bwd B{B} T{T} D{D}", ours_fb, None, None, check, f"{note}; {grads}")]
    # fla's hgrn is h = exp(g) h + x: the same function as the file's with x' = (1 - f) x and g = log f
    f0 = x["f"].detach()[:, :, 0].float()
    xf = ((1 - f0) * x["x"].detach()[:, :, 0].float()).to(dt).contiguous().requires_grad_()
    gf = torch.log(f0).to(dt).contiguous().requires_grad_()
    fo, _ = fla(xf, gf)
    note = f"fla's output vs the reference {rel(fo, want[:, :, 0]):.1e}; target ratio >= 1.0"
    with torch.no_grad():
        anchor_f = time_ms(lambda: fla(xf, gf))
    anchor_fb = time_ms(fwd_bwd(lambda **kw: fla(kw["x"], kw["g"]), {"x": xf, "g": gf}))
    return [row(SUITE, f"hgrn fwd B{B} T{T} D{D} ({str(dt)[6:]})", ours_f, "fla fused_recurrent_hgrn", anchor_f,
                check, note),
            row(SUITE, f"hgrn fwd+bwd B{B} T{T} D{D} ({str(dt)[6:]})", ours_fb, "fla fused_recurrent_hgrn", anchor_fb,
                check, f"{note}; {grads}")]


def mamba_packed(smoke: bool) -> list[dict]:
    m = mixc.load(EX / "mamba.mix")
    lens = [64 * (1 + (7 * i) % 31) for i in range(15)] if not smoke else [20, 0, 33]
    T, H, P, N = (16384, 16, 64, 16) if not smoke else (70, 2, 8, 4)
    lens.append(T - sum(lens))
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV)
    dt = torch.float32 if smoke else torch.bfloat16
    x = {k: v.requires_grad_() for k, v in m.random_inputs(1, T, H, P=P, N=N, dtype=dt, device=DEV).items()}
    bounds = [int(c) for c in cu.tolist()]

    def packed(**kw):
        return m(**kw, cu_seqlens=cu, form="recurrent")

    def split(**kw):  # one call a sequence, as the runtime ran packed calls of this form before
        return torch.cat([m(**{k: v[:, a:b] for k, v in kw.items()}, form="recurrent")
                          for a, b in zip(bounds[:-1], bounds[1:]) if b > a], 1)

    with torch.no_grad():
        check = rel(packed(**x), split(**x).float())
    ours, anchor = time_ms(fwd_bwd(packed, x)), time_ms(fwd_bwd(split, x))
    return [row(SUITE, f"mamba packed fwd+bwd {len(lens)} sequences in T{T} H{H} P{P} N{N} ({str(dt)[6:]})", ours,
                "ours, one call a sequence", anchor, check, "check: packed against one call a sequence")]


def run(smoke: bool) -> list[dict]:
    """Every case above, in order (with bench.py --only, the groups whose name it matches: "gla decode step",
    "gla decode bandwidth", "mamba fwd+bwd", "hgrn fwd", "mamba packed")."""
    groups = (("gla decode step", decode_step), ("gla decode bandwidth", decode_bandwidth),
              ("mamba fwd+bwd", mamba_train), ("hgrn fwd", hgrn), ("mamba packed", mamba_packed))
    return [r for name, case in groups if wanted(name) for r in case(smoke)]
