"""The FFT form against the reference: outputs, final states and every gradient (inputs, parameters,
initial states) for s4d, h3 and synthetic time-invariant files written only here; odd T, T = 1, the
Toeplitz path (T <= 32) and the FFT path, variable-length batches, low-precision inputs, and a long
sequence (T = 16384) against a float64 scan of our own.

The FFT form is plain PyTorch (torch.fft), so these run at full speed on the CPU.
"""

import math
from pathlib import Path

import pytest
import torch

import mixc
from mixc.backends.fft import kernels

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# A real diagonal SSM per channel c with modes n: decays exp(-softplus(g)) < 1, an input map shared by the
# channels, an output gate and a skip (the gate keeps the skip out of K)
SYN_REAL = """
size C, N
input x[C], z[C]
param g[C, N] = normal(0, 1)
param bm[N] = normal(0, 1)
param cm[C, N] = normal(0, 1)
param d[C] = 1
state s[C, N]
s[c, n] = exp(-softplus(g[c, n])) * s[c, n] + bm[n] * x[c]
out y[c] = sigmoid(z[c]) * sum(n: cm[c, n] * s[c, n]) + d[c] * x[c]
"""
# A transition that is no exp (log a taken in complex), the state declared [modes, channels], a signal made
# of two inputs, and a skip -0.5 u folded into K_0 (no gate)
SYN_SIG = """
size N, C
input u[C], r[C]
param a[N] = normal(0, 1)
param bm[N, C] = normal(0, 1)
param cm[N] = normal(0, 1)
state s[N, C]
s[n, c] = sigmoid(a[n]) * s[n, c] + bm[n, c] * u[c] * tanh(r[c])
out y[c] = sum(n: cm[n] * s[n, c]) - 0.5 * u[c] * tanh(r[c])
"""
SYNTHETICS = {"syn_real": SYN_REAL, "syn_sig": SYN_SIG}
NAMES = ["s4d", "h3", *SYNTHETICS]
SIZES = {"N": 5, "P": 3, "C": 3}


def load(name):
    if name in SYNTHETICS:
        return mixc.loads(SYNTHETICS[name], f"{name}.mix")
    return mixc.load(ROOT / "examples" / f"{name}.mix")


def sizes_of(m):
    return {k: v for k, v in SIZES.items() if k in m.meta["sizes"]}


def rel(a, b):
    a, b = a.detach().to(torch.complex128), b.detach().to(torch.complex128)
    return float((a - b).abs().square().sum().sqrt() / max(float(b.abs().square().sum().sqrt()), 1e-30))


def states_for(m, n, H, sizes, seed=5):
    gen = torch.Generator().manual_seed(seed)
    bound = {**m.meta["consts_as_sizes"], **sizes}
    out = {}
    for s, sm in m.meta["states"].items():
        shape = (n, H, *[bound[a] for a in sm["axes"]])
        x = 0.5 * torch.randn(*shape, generator=gen, dtype=torch.float64)
        out[s] = torch.complex(x, 0.5 * torch.randn(*shape, generator=gen, dtype=torch.float64)) if sm["complex"] else x
    return out


def _leaf(v, dtype):
    if v.is_complex():
        dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    return v.detach().clone().to(DEV, dtype).requires_grad_()


def run_both(m, x, params, s0, cu=None):
    """(output, final states, gradients) of the reference in float64 and of the FFT form in float32."""
    out = []
    for dtype, form in ((torch.float64, "reference"), (torch.float32, "fft")):
        xs = {k: _leaf(v, dtype) for k, v in x.items()}
        ps = {k: _leaf(v, dtype) for k, v in params.items()}
        ss = {k: _leaf(v, dtype) for k, v in (s0 or {}).items()}
        o, fin = m(**xs, **ps, initial_state=ss or None, output_final_state=True, cu_seqlens=cu, form=form)
        loss = (o * torch.linspace(-1, 1, o.shape[-1], device=DEV, dtype=o.dtype)).square().sum()
        loss = loss + sum((torch.view_as_real(f) if f.is_complex() else f).sum() * 0.1 for f in fin.values())
        loss.backward()
        grads = {k: t.grad for k, t in {**xs, **ps, **ss}.items() if t.grad is not None}
        out.append((o, fin, grads))
    return out


def check(ref, ours, tol=1e-4):
    (ro, rf, rg), (o, f, g) = ref, ours
    assert o.dtype == torch.float32 and torch.isfinite(o).all()
    assert rel(o, ro) < tol
    assert sorted(f) == sorted(rf)
    for k in rf:
        assert f[k].dtype == (torch.complex64 if rf[k].is_complex() else torch.float32), k
        assert rel(f[k], rf[k]) < tol, k
    assert sorted(g) == sorted(rg)
    for k in rg:
        assert rel(g[k], rg[k]) < tol, k


def test_examples_and_synthetics_compile_to_the_fft_form():
    for name in NAMES:
        m = load(name)
        assert m.analysis.time_invariant and "fft" in m.forms, name
        assert m.meta["default_form"] == "fft", name
        src = m.source_code
        body = src[src.index("def fft("):src.index("FORMS =")]
        assert "_fft_causal_conv(" in body and "_fft_vandermonde(" in body, name
    # the transition's log is read off exp(...) where it is one (real or complex), else a complex log
    assert "torch.log(" not in load("s4d").source_code.split("def fft(")[1]
    assert "torch.log(" in load("syn_sig").source_code.split("def fft(")[1]


# T = 1 and 31 take the Toeplitz product, 37 and 150 the FFTs (odd, not powers of two)
CASES = [(n, B, T, H) for n in NAMES for (B, T, H) in ((2, 37, 2), (1, 1, 3), (2, 31, 1), (1, 150, 1))]


@pytest.mark.parametrize("name,B,T,H", CASES, ids=[f"{c[0]}-B{c[1]}-T{c[2]}-H{c[3]}" for c in CASES])
def test_fft_matches_reference(name, B, T, H):
    m = load(name)
    sz = sizes_of(m)
    x = m.random_inputs(B, T, H, dtype=torch.float64, seed=T, **sz)
    params = {k: v * 1.1 for k, v in m.parameters_init(H, dtype=torch.float64, **sz).items()}
    s0 = states_for(m, B, H, sz)
    ref, ours = run_both(m, x, params, s0)
    assert set(ours[2]) == {*x, *params, *s0}  # a gradient reaches every input, parameter and initial state
    check(ref, ours)
    check(*run_both(m, x, params, None))


# Corners of the normal form: no modes (a scalar state per channel, a constant decay), a negative decay
# (log a = log|a| + i pi), and an output axis the state does not have (a gate over it broadcasts K * x)
ODD = {
    "no_modes": "size C\ninput u[C]\nstate s[C]\ns[c] = 0.9 * s[c] + u[c]\nout y[c] = 2 * s[c]\n",
    "negative": "size N\ninput u[]\nparam r[N] = normal(0, 1)\nstate s[N]\ns[n] = -sigmoid(r[n]) * s[n] + u\n"
                "out y = sum(n: s[n])\n",
    "extra_axis": "size N, V\ninput u[], g[V]\nparam r[N] = normal(0, 1)\nstate s[N]\n"
                  "s[n] = exp(-exp(r[n])) * s[n] + u\nout y[v] = g[v] * sum(n: s[n]) + u\n",
}


@pytest.mark.parametrize("name", ODD)
def test_fft_corners_of_the_normal_form(name):
    m = mixc.loads(ODD[name], f"{name}.mix")
    assert m.meta["default_form"] == "fft"
    sz = {k: 3 for k in m.meta["sizes"]}
    for T in (5, 70):
        x = m.random_inputs(2, T, 2, dtype=torch.float64, seed=T, **sz)
        check(*run_both(m, x, m.parameters_init(2, dtype=torch.float64, **sz), states_for(m, 2, 2, sz)))


@pytest.mark.parametrize("name", NAMES)
def test_fft_varlen(name):
    cu = [0, 5, 5, 45, 80]
    m = load(name)
    sz = sizes_of(m)
    x = m.random_inputs(1, cu[-1], 2, dtype=torch.float64, seed=3, **sz)
    params = m.parameters_init(2, dtype=torch.float64, **sz)
    check(*run_both(m, x, params, states_for(m, len(cu) - 1, 2, sz), cu=torch.tensor(cu, device=DEV)))


def test_fft_float64_is_the_reference():
    """In float64 the FFT form (FFTs in complex128) agrees with the reference to rounding."""
    m = load("h3")
    x = m.random_inputs(2, 70, 2, dtype=torch.float64, seed=1, P=3, N=4)
    s0 = states_for(m, 2, 2, {"P": 3, "N": 4})
    ro, rf = m(**x, initial_state=s0, output_final_state=True, form="reference")
    o, f = m(**x, initial_state=s0, output_final_state=True, form="fft")
    assert o.dtype == torch.float64 and rel(o, ro) < 1e-11
    assert f["h"].dtype == torch.complex128 and all(rel(f[k], rf[k]) < 1e-11 for k in rf)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fft_low_precision_inputs(dtype):
    """bf16/fp16 inputs: the transforms run in fp32, the output comes back in the inputs' dtype."""
    m = load("h3")
    x = m.random_inputs(2, 100, 2, dtype=torch.float64, P=4, N=8)
    ref = m.reference(**x)
    o = m(**{k: v.to(DEV, dtype) for k, v in x.items()}, form="fft")
    assert o.dtype == dtype and rel(o.cpu(), ref) < 2e-2


def _scan64(u, log_dt, A_re, A_im, C_re, C_im, D):
    """s4d by its recurrence in float64, vectorised over heads and modes (u [B, T, H])."""
    A = torch.complex(A_re, A_im)
    dA = torch.exp(log_dt.exp()[:, None] * A)
    dB = (dA - 1) / A
    C = torch.complex(C_re, C_im)
    h = torch.zeros(u.shape[0], *A.shape, dtype=torch.complex128)
    ys = []
    for t in range(u.shape[1]):
        h = dA * h + dB * u[:, t, :, None]
        ys.append(2 * (C * h).sum(-1).real + D * u[:, t])
    return torch.stack(ys, 1), h


def test_long_sequence_stays_finite_and_accurate():
    """T = 16384 at one head and four modes: the fp32 FFT form against a float64 scan of the recurrence
    (the powers a^l come from exp(l log a), so nothing drifts or overflows along the sequence)."""
    m = load("s4d")
    T, N = 16384, 4
    x = m.random_inputs(1, T, 1, dtype=torch.float64, seed=2)
    p = m.parameters_init(1, dtype=torch.float64, N=N)
    p["log_dt"] = torch.tensor([math.log(0.002)], dtype=torch.float64)  # slow decay: the kernel spans ~1000s
    want, h = _scan64(x["u"], *(p[k] for k in ("log_dt", "A_re", "A_im", "C_re", "C_im", "D")))
    o, f = m(**{k: v.float() for k, v in x.items()}, **{k: v.float() for k, v in p.items()},
             output_final_state=True, form="fft")
    assert torch.isfinite(o).all() and torch.isfinite(torch.view_as_real(f["h"])).all()
    print(f"T={T}: output {rel(o, want):.1e}, final state {rel(f['h'], h):.1e}")
    assert rel(o, want) < 1e-4 and rel(f["h"], h) < 1e-4
    # the kernel's last taps against float64 powers taken one at a time (no accumulated rounding)
    A = torch.complex(p["A_re"], p["A_im"])
    la = p["log_dt"].exp()[:, None] * A
    w = 2 * torch.complex(p["C_re"], p["C_im"]) * (la.exp() - 1) / A
    ell = torch.arange(T - 64, T, dtype=torch.float64)
    tail = (w[..., None] * torch.exp(ell * la[..., None])).sum(-2).real
    got = kernels._fft_vandermonde(w.to(torch.complex64), la.to(torch.complex64), T)[..., T - 64:]
    print(f"last 64 taps of K: {rel(got, tail):.1e}")
    assert rel(got, tail) < 1e-4


def test_fft_size_and_blocks():
    for T in (1, 2, 31, 37, 150, 4096, 5000, 16384):
        n = kernels._fft_size(T)
        m = n // 2
        for f in (2, 3, 5, 7):
            while m % f == 0:
                m //= f
        assert n >= 2 * T and n % 2 == 0 and m == 1
        I, J = kernels._fft_blocks(T)
        assert I * J >= T and J * J >= T and (I - 1) * J < T


def test_fft_conv_paths_agree():
    """The Toeplitz product and the FFTs compute the same causal convolution (value and gradients)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    y = kernels._FFTCausalConv.apply(x, k, kernels._fft_size(40))
    d = torch.arange(40)
    lag = d.view(-1, 1) - d.view(1, -1)
    want = ((k[..., lag.clamp(min=0)] * (lag >= 0)) @ x.unsqueeze(-1)).squeeze(-1)
    assert rel(y, want) < 1e-12
    gy = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64)
    g1 = torch.autograd.grad(y, (x, k), gy)
    g2 = torch.autograd.grad(want, (x, k), gy)
    assert all(rel(a, b) < 1e-12 for a, b in zip(g1, g2))
    assert torch.autograd.gradcheck(lambda a, b: kernels._FFTCausalConv.apply(a, b, 16), (x[:1, :1, :7], k[:1, :7]))


def test_explain_states_the_fft_plan():
    from mixc.cli import explain_text

    text = explain_text(load("s4d"))
    assert "fft kernels:" in text and "T <= 32 tokens" in text and "real FFTs" in text
    assert "D added to K_0" in text
    text = explain_text(load("h3"))
    assert "output gate q[p]: PyTorch epilogue" in text and "k@past (3 tokens)" in text
    from mixc.cli import explain_json

    j = explain_json(load("syn_sig"))
    assert j["default_form"] == "fft" and any("log a = log(sigmoid(a[n])) (complex)" in x for x in j["fft_plan"])


def test_no_fft_form_for_time_varying_or_nonlinear_readouts():
    m = mixc.load(ROOT / "examples" / "mamba.mix")
    assert "fft" not in m.forms
    # a state read through a nonlinearity is not a convolution: the plan refuses it, with the reason
    m = mixc.loads("size N\ninput u[]\nparam c[N] = 1\nstate s[N]\ns[n] = 0.5 * s[n] + u\n"
                   "out y = sum(n: c[n] * s[n]) + exp(sum(n: s[n]))\n", "nl.mix")
    assert "fft" not in m.forms
