"""The FFT form (s4d: one channel per head, H = C channels, N modes) against the straightforward torch.fft
convolution of the same kernel, forward and forward+backward, in the same run.

Two comparisons, each forward and forward+backward (gradients to u and every parameter):

* ``layer``: the generated ``fft`` form called as a user calls it (K from the parameters, the convolution,
  the skip) against what a user writes by hand: K by the Vandermonde sum over an explicit [H, N, L]
  tensor of powers (S4D's standalone code), the complex FFTs of the zero-padded signal and kernel, their
  product, the inverse and its real part, plus D u.
* ``conv``: the convolution alone, with K given: our ``_fft_causal_conv`` (real FFTs, K's transform shared
  by the batch, its own backward) against the same complex-FFT convolution.

The check is our output's relative RMS error against the reference (the token loop) in float64, run
once in the same process; the anchor's own error against it is in the note.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .common import DEV, fwd_bwd, rel, row, time_ms, wanted

ROOT = Path(__file__).resolve().parent.parent.parent
SUITE = "fft"


def naive_kernel(log_dt, A_re, A_im, C_re, C_im, L):
    """K_l = 2 Re(sum_n C_n dB_n dA_n^l) through an explicit [H, N, L] tensor of powers."""
    A = torch.complex(A_re, A_im)
    dtA = log_dt.exp().unsqueeze(-1) * A  # [H, N]
    dB = (dtA.exp() - 1) / A
    powers = torch.exp(dtA.unsqueeze(-1) * torch.arange(L, device=A.device))  # [H, N, L]
    return 2 * torch.einsum("hn,hnl->hl", torch.complex(C_re, C_im) * dB, powers).real


def naive_conv(x, K):
    """y = K * x causally: complex FFTs of the zero-padded signal [B, H, L] and kernel [H, L], product,
    inverse, real part (what one writes first)."""
    L = x.shape[-1]
    n = 2 * L
    return torch.fft.ifft(torch.fft.fft(x, n=n) * torch.fft.fft(K, n=n), n=n).real[..., :L]


def naive_layer(u, log_dt, A_re, A_im, C_re, C_im, D):
    """s4d by hand: u [B, L, H] -> [B, L, H]."""
    x = u.transpose(1, 2)
    K = naive_kernel(log_dt, A_re, A_im, C_re, C_im, x.shape[-1])
    return (naive_conv(x, K) + D.unsqueeze(-1) * x).transpose(1, 2)


def run(smoke: bool) -> list[dict]:
    import mixc

    m = mixc.load(ROOT / "examples" / "s4d.mix")
    B, C, L, N = (2, 8, 64, 4) if smoke else (8, 1024, 4096, 64)
    shape = f"B{B} C{C} L{L} N{N} fp32"
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(B, L, C, generator=gen).to(DEV)
    p = {k: v.to(DEV) for k, v in m.parameters_init(C, N=N, dtype=torch.float32).items()}
    rows = []

    # the check: our output against the reference (token loop) in float64, and the anchor's. The channels are
    # independent, so the reference runs on the first Hc of them only (its prologue is [B, T, H, N] complex128)
    Hc = min(C, 128)
    with torch.no_grad():
        ref = m(u=u[..., :Hc].double(), **{k: v[:Hc].double() for k, v in p.items()}, form="reference")
        ours = m(u=u, **p, form="fft")[..., :Hc]
        anchor = naive_layer(u, **p)[..., :Hc]
    err, err_anchor = rel(ours, ref), rel(anchor, ref)
    del ref

    def ours_layer(**kw):
        return m(**kw, form="fft")

    leaves = {"u": u.clone().requires_grad_(), **{k: v.clone().requires_grad_() for k, v in p.items()}}
    note = f"checked on channels 0-{Hc - 1}; anchor's error {err_anchor:.1e}; K from the parameters in both"
    for what, fn_ours, fn_anchor, inputs in (
        ("fwd", lambda: ours_layer(u=u, **p), lambda: naive_layer(u, **p), None),
        ("fwd+bwd", fwd_bwd(ours_layer, leaves), fwd_bwd(lambda **kw: naive_layer(**kw), leaves), leaves),
    ):
        if not wanted(f"s4d layer {what} {shape}"):
            continue
        if inputs is None:
            with torch.no_grad():
                t_ours, t_anchor = time_ms(fn_ours), time_ms(fn_anchor)
        else:
            t_ours, t_anchor = time_ms(fn_ours), time_ms(fn_anchor)
        rows.append(row(SUITE, f"s4d layer {what} {shape}", t_ours, "torch.fft complex conv + Vandermonde K",
                        t_anchor, err, note))

    if rows and (not math.isfinite(err) or err > 1e-4):
        rows[0]["note"] += "; CHECK FAILED (> 1e-4)"
    if not (wanted(f"conv fwd {shape}") or wanted(f"conv fwd+bwd {shape}")):
        return rows
    # the convolution alone, K given (the same K for both)
    conv = m._module._fft_causal_conv
    x = u.transpose(1, 2)
    with torch.no_grad():
        K = naive_kernel(p["log_dt"], p["A_re"], p["A_im"], p["C_re"], p["C_im"], L).contiguous()
        cerr = rel(conv(x, K), naive_conv(x.double(), K.double()))
        t_ours, t_anchor = time_ms(lambda: conv(x, K)), time_ms(lambda: naive_conv(x, K))
    rows.append(row(SUITE, f"conv fwd {shape}", t_ours, "torch.fft complex conv", t_anchor, cerr,
                    f"K given; check against the complex conv in float64; n = {m._module._fft_size(L)}"))
    xl, Kl = x.detach().clone().requires_grad_(), K.clone().requires_grad_()
    g = torch.randn_like(x)

    def ours_fb():
        torch.autograd.grad(conv(xl, Kl), (xl, Kl), g)

    def anchor_fb():
        torch.autograd.grad(naive_conv(xl, Kl), (xl, Kl), g)

    rows.append(row(SUITE, f"conv fwd+bwd {shape}", time_ms(ours_fb), "torch.fft complex conv", time_ms(anchor_fb),
                    cerr, "gradients to x and K"))
    return rows
