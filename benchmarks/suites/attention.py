"""The attention form against torch SDPA, our own dense causal kernel and FlexAttention, in one run.

Cases (GPU, bf16; ``--smoke`` runs tiny fp32 shapes on the CPU interpreter):
- causal softmax attention B4 T4096 H16 D128, forward and forward+backward vs torch SDPA (is_causal)
  (targets: >= 0.8x and >= 0.7x);
- sliding window W=512 at B1 T16384 H16 D128, forward and forward+backward vs our own dense causal kernel
  at the same shape (target >= 4x: the empty tiles are skipped);
- the same two masks vs FlexAttention (torch.compile'd flex_attention with the same mask) where it runs;
- decode: one query token against a 16384-token key/value cache (split-KV) vs SDPA: through the functional API
  (the cache torch.cat'ed each call) and through ``m.decoder`` (a preallocated cache written in place; on a GPU
  also captured in a CUDA graph).
Every row checks our output (or gradients) against the reference, or SDPA, in the same run.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import mixc
from suites.common import DEV, fwd_bwd, on_gpu, rel, row, time_ms, wanted

ROOT = Path(__file__).resolve().parents[2]
SUITE = "attention"
FLEX_BUDGET_S = 75  # seconds into the suite after which the FlexAttention anchors (torch.compile) are skipped


def _inputs(B, T, H, D, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return {n: torch.randn(B, T, H, D, device=DEV, dtype=dtype, generator=g) for n in "qkv"}


def _bhtd(x):
    return x.transpose(1, 2)


def _sdpa(q, k, v, **kw):
    return _bhtd(F.scaled_dot_product_attention(_bhtd(q), _bhtd(k), _bhtd(v), **kw))


def _check_ref(m, x, o, heads=1, batch=1):
    """rel RMS of o against the fp32 reference on the first `batch` rows and `heads` heads (the reference is a
    masked T x T product: a slice keeps it small)."""
    sl = {n: t[:batch, :, :heads].float() for n, t in x.items()}
    return rel(o[:batch, :, :heads], m.reference(**sl))


class _Rows(list):
    """The suite's rows, each printed (flushed) as soon as it is measured, with the seconds since the start."""

    def __init__(self):
        super().__init__()
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, case, ours, anchor=None, anchor_ms=None, check=None, note=""):
        r = row(SUITE, case, ours, anchor, anchor_ms, check, note)
        self.append(r)
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(f"[attention {self.elapsed():.0f}s] {case}: ours {fmt(ours, '.4f')} ms, {anchor or '-'} "
              f"{fmt(anchor_ms, '.4f')} ms, ratio {fmt(r['ratio'], '.2f')}, check {fmt(check, '.1e')}; {note}",
              flush=True)

    def failed(self, case, e):
        if isinstance(e, _NotWanted):
            return
        traceback.print_exc()
        self.add(case, None, note=f"failed: {e!r}"[:200])


class _NotWanted(Exception):
    """A case bench.py --only does not select (raised before it runs; not a row)."""


def _want(case: str) -> None:
    if not wanted(case):
        raise _NotWanted(case)


def _flex(mask_mod):
    """A compiled FlexAttention call with ``mask_mod``, or the reason it cannot run here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)

        def call(q, k, v, block):
            return _bhtd(flex(_bhtd(q), _bhtd(k), _bhtd(v), block_mask=block))

        def block_for(B, H, T):
            return create_block_mask(mask_mod, B, H, T, T, device=DEV)

        return call, block_for, ""
    except Exception as e:  # noqa: BLE001 (an anchor that does not run is reported, not fatal)
        return None, None, f"flex_attention unavailable: {e!r}"[:120]


def run(smoke: bool) -> list[dict]:
    dtype = torch.float32 if smoke else torch.bfloat16
    B, T, H, D = (1, 48, 2, 16) if smoke else (4, 4096, 16, 128)
    Bw, Tw, W = (1, 96, 16) if smoke else (1, 16384, 512)
    Tc = 80 if smoke else 16384
    causal = mixc.load(ROOT / "examples" / "softmax_attention.mix")
    window = mixc.load(ROOT / "examples" / "sliding_window_attention.mix", W=W)
    rows = _Rows()
    label = "fp32 smoke" if smoke else "bf16"
    x = _inputs(B, T, H, D, dtype)
    xw = _inputs(Bw, Tw, H, D, dtype, seed=1)

    # causal forward / forward+backward vs SDPA
    case = f"causal fwd B{B} T{T} H{H} D{D} {label}"
    try:
        _want(case)
        with torch.no_grad():
            o = causal(**x, form="attention")
            ours = time_ms(lambda: causal(**x, form="attention"))
            sdpa = time_ms(lambda: _sdpa(**x, is_causal=True))
            check = _check_ref(causal, x, o)
        rows.add(case, ours, "torch SDPA", sdpa, check, "target >= 0.8x")
    except Exception as e:  # noqa: BLE001 (a failing case is reported; the others still run)
        rows.failed(case, e)
    case = f"causal fwd+bwd B{B} T{T} H{H} D{D} {label}"
    try:
        _want(case)
        xg = {n: t.clone().requires_grad_() for n, t in x.items()}
        g = torch.randn_like(x["v"])
        ours = time_ms(fwd_bwd(lambda **a: causal(**a, form="attention"), xg, g))
        sdpa = time_ms(fwd_bwd(lambda **a: _sdpa(**a, is_causal=True), xg, g))
        ga = torch.autograd.grad(causal(**xg, form="attention"), list(xg.values()), g)
        gs = torch.autograd.grad(_sdpa(**xg, is_causal=True), list(xg.values()), g)
        check = max(rel(a, b) for a, b in zip(ga, gs))
        rows.add(case, ours, "torch SDPA", sdpa, check, "target >= 0.7x; check: dq, dk, dv vs SDPA's")
    except Exception as e:  # noqa: BLE001
        rows.failed(case, e)

    # sliding window vs our own dense causal kernel
    case = f"sliding W{W} fwd B{Bw} T{Tw} H{H} D{D} {label}"
    try:
        _want(case)
        with torch.no_grad():
            ow = window(**xw, form="attention")
            ours = time_ms(lambda: window(**xw, form="attention"))
            dense = time_ms(lambda: causal(**xw, form="attention"))
            check = _check_ref(window, xw, ow)
        rows.add(case, ours, "ours dense causal", dense, check, "target >= 4x")
    except Exception as e:  # noqa: BLE001
        rows.failed(case, e)
    case = f"sliding W{W} fwd+bwd B{Bw} T{Tw} H{H} D{D} {label}"
    try:
        _want(case)
        xwg = {n: t.clone().requires_grad_() for n, t in xw.items()}
        gw = torch.randn_like(xw["v"])
        ours = time_ms(fwd_bwd(lambda **a: window(**a, form="attention"), xwg, gw))
        dense = time_ms(fwd_bwd(lambda **a: causal(**a, form="attention"), xwg, gw))
        tt = torch.arange(Tw, device=DEV)
        band = (tt[None, :] <= tt[:, None]) & (tt[None, :] > tt[:, None] - W)
        sl = {n: t[:, :, :1].detach().clone().requires_grad_() for n, t in xw.items()}
        ga = torch.autograd.grad(window(**sl, form="attention"), list(sl.values()), gw[:, :, :1])
        gs = torch.autograd.grad(_sdpa(**sl, attn_mask=band), list(sl.values()), gw[:, :, :1])
        check = max(rel(a, b) for a, b in zip(ga, gs))
        rows.add(case, ours, "ours dense causal", dense, check,
                 "target >= 4x; check: grads of head 0 vs SDPA with the band mask")
    except Exception as e:  # noqa: BLE001
        rows.failed(case, e)

    # decode: one token against a long cache (split-KV) vs SDPA over the whole cache
    case = f"decode 1 token, cache {Tc}, B{B} H{H} D{D} {label}"
    try:
        _want(case)
        xc = _inputs(B, Tc + 1, H, D, dtype, seed=2)
        cache = {"k": xc["k"][:, :Tc].transpose(1, 2).contiguous(),
                 "v": xc["v"][:, :Tc].transpose(1, 2).contiguous()}
        step = {n: t[:, Tc:] for n, t in xc.items()}
        with torch.no_grad():
            od = causal(**step, initial_state=cache, form="attention")
            ours = time_ms(lambda: causal(**step, initial_state=cache, form="attention"))
            sdpa = time_ms(lambda: _sdpa(step["q"], xc["k"], xc["v"]))
            check = rel(od, _sdpa(step["q"].float(), xc["k"].float(), xc["v"].float()))
        rows.add(case, ours, "torch SDPA", sdpa, check, "functional API: ours includes torch.cat of the cache")
    except Exception as e:  # noqa: BLE001
        rows.failed(case, e)

    # decode through the decoder: a preallocated cache written in place, the length on the device
    case = f"decoder step, cache {Tc}, B{B} H{H} D{D} {label}"
    try:
        _want(case)
        xc = _inputs(B, Tc + 1, H, D, dtype, seed=2)
        dec = causal.decoder(B, H, max_len=Tc + 1, device=DEV, dtype=dtype, K=D, V=D)
        dec.load_state({"k": xc["k"][:, :Tc].transpose(1, 2), "v": xc["v"][:, :Tc].transpose(1, 2)})
        tok = {n: t[:, Tc].contiguous() for n, t in xc.items()}  # [B, H, D]

        def step():
            dec.truncate(Tc)  # back to Tc cached tokens (a fill_ on the device), then the step proper
            return dec.step(**tok)

        with torch.no_grad():
            od = step().clone()
            ours = time_ms(step)
            sdpa = time_ms(lambda: _sdpa(xc["q"][:, Tc:], xc["k"], xc["v"]))
            check = rel(od, _sdpa(xc["q"][:, Tc:].float(), xc["k"].float(), xc["v"].float())[:, 0])
        rows.add(case, ours, "torch SDPA", sdpa, check, "m.decoder: the step writes k, v in place (split-KV)")
        if on_gpu():  # the same step captured in a CUDA graph (static inputs, the length read on the device)
            case = f"decoder step (CUDA graph), cache {Tc}, B{B} H{H} D{D} {label}"
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad():
                s_ = torch.cuda.Stream()
                s_.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s_):
                    step()
                torch.cuda.current_stream().wait_stream(s_)
                with torch.cuda.graph(graph):
                    step()
                graph.replay()
                torch.cuda.synchronize()
                check = rel(dec._out, _sdpa(xc["q"][:, Tc:].float(), xc["k"].float(), xc["v"].float())[:, 0])
                ours = time_ms(graph.replay)
            rows.add(case, ours, "torch SDPA", sdpa, check, "graph replay of truncate + step")
    except Exception as e:  # noqa: BLE001
        rows.failed(case, e)

    # FlexAttention with the same masks (GPU only: compiled; last, and skipped past the suite's time budget)
    for name, m, xb, mask_mod in (
        ("causal", causal, x, lambda b, h, q, k: k <= q),
        (f"sliding W{W}", window, xw, lambda b, h, q, k: (k <= q) & (k > q - W)),
    ):
        Bx, Tx = xb["q"].shape[0], xb["q"].shape[1]
        case = f"{name} fwd B{Bx} T{Tx} H{H} D{D} {label} vs flex_attention"
        if not wanted(case):
            continue
        if not on_gpu():
            rows.add(case, None, "flex_attention", None, None, "skipped: compiled FlexAttention needs a GPU")
            continue
        if rows.elapsed() > FLEX_BUDGET_S:
            rows.add(case, None, "flex_attention", None, None,
                     f"skipped: the suite had run {rows.elapsed():.0f} s (budget {FLEX_BUDGET_S} s before Flex)")
            continue
        call, block_for, why = _flex(mask_mod)
        try:
            block = block_for(Bx, H, Tx)
            with torch.no_grad():
                of = call(**xb, block=block)
                ours = time_ms(lambda m=m, xb=xb: m(**xb, form="attention"))
                flex = time_ms(lambda xb=xb, block=block: call(**xb, block=block))
                check = rel(m(**xb, form="attention"), of)
            rows.add(case, ours, "flex_attention", flex, check, "check: vs FlexAttention")
        except Exception as e:  # noqa: BLE001
            rows.add(case, None, "flex_attention", None, None, (why or f"flex_attention failed: {e!r}")[:160])
    return list(rows)
