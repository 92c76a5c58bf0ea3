"""Numerics of the chunked form (issue 17): it is offered only for decays the analysis proves to lie in
[0, 1], and where it is offered it never returns NaN or Inf where the float64 reference is finite: exact 0
decays (a log decay of -inf), very sharp gates (-1e4), NaN only from its token on, large inputs in fp16,
float64 calls, and a normalised readout through a function of its denominator (mLSTM-like).

Under TRITON_INTERPRET=1 (CPU, conftest.py); tiny shapes, T past one 64-token chunk.
"""

import math
from pathlib import Path

import pytest
import torch

import mixc

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")

REC = """
size K, V
input q[K], k[K], v[V]
input g[{gax}] ~ {sampler}
{extra}
state S[K, V]
S[i, j] = {decay} * S[i, j] + {inp}
out o[j] = sum(i: q[i] * S[i, j])
"""


def rec(decay, gax="", sampler="normal", extra="", inp="k[i] * v[j]", state="state S[K, V]"):
    return REC.format(decay=decay, gax=gax, sampler=sampler, extra=extra, inp=inp).replace("state S[K, V]", state)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def per_token(a, b):
    """The largest relative error of one token ([B, T, H, V] outputs)."""
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b).pow(2).sum((0, 2, 3)).sqrt() / b.pow(2).sum((0, 2, 3)).sqrt().clamp_min(1e-30)).max())


def both(m, x, grads=False, **kw):
    """(reference in float64, chunked in float32) outputs, final states and (with ``grads``) input gradients."""
    out = []
    for form, dt in (("reference", torch.float64), ("chunked", torch.float32)):
        xx = {k: v.detach().to(dt).requires_grad_(grads) for k, v in x.items()}
        o, st = m(**xx, form=form, output_final_state=True, **kw)
        g = {}
        if grads:
            o.pow(2).sum().backward()
            g = {k: v.grad for k, v in xx.items()}
        out.append((o, st, g))
    return out


# ---- which decays the analysis accepts ------------------------------------------------------------


@pytest.mark.parametrize("decay, extra, why", [
    ("gamma", "buffer gamma[] = -0.5", "bounded by [-0.5, -0.5]"),
    ("g", "", "an input"),
    ("t", "", "bounded by [0, inf]"),
    ("lam", "param lam[] = 0.9", "a learnable parameter"),
    ("dt * A", "param A[] = -1\ninput dt[] ~ softplus", "an input"),
    ("1.5", "", "bounded by [1.5, 1.5]"),
])
def test_decays_not_in_the_unit_interval_have_no_chunked_form(decay, extra, why):
    m = mixc.loads(rec(decay, extra=extra))
    a = m.analysis
    assert "chunked" not in m.forms and m.meta["default_form"] != "chunked"
    assert "chunked" not in a.forms and why in a.reasons["chunked"], a.reasons["chunked"]
    if "recurrent" in m.forms:  # a scan needs no bound on the decay: it runs these, and matches the reference
        x = m.random_inputs(1, 9, 2, K=3, V=4, device=DEV)
        assert rel(m(**x, form="recurrent"), m(**x, form="reference")) < 1e-4
    assert "not provably in [0, 1]" in a.explain()


@pytest.mark.parametrize("decay, extra", [
    ("exp(g)", ""), ("exp(g[i])", ""), ("sigmoid(g)", ""), ("0.5", ""),
    ("gamma", "buffer gamma[] = 1 - 2 ** (-5 - head)"),
    ("exp(g) * gamma", "buffer gamma[] = 1 - 2 ** (-5 - head)"), ("K ** -0.5", ""),
])
def test_decays_proved_in_the_unit_interval_are_chunked(decay, extra):
    gax = "K" if "g[i]" in decay else ""
    m = mixc.loads(rec(decay, gax=gax, extra=extra))
    assert m.forms[0] == "chunked" and m.meta["default_form"] == "chunked"


def test_complex_decay_has_no_chunked_form():
    src = rec("0.5j", state="state S[K, V] complex").replace("out o[j] = sum(i: q[i] * S[i, j])",
                                                              "out o[j] = real(sum(i: q[i] * S[i, j]))")
    m = mixc.loads(src)
    assert "chunked" not in m.forms and "is complex" in m.analysis.reasons["chunked"]
    src = src.replace("0.5j", "0.5")  # a real decay of a complex state with real inputs: chunked, and right
    m = mixc.loads(src)
    x = m.random_inputs(1, 9, 2, K=3, V=4, device=DEV)
    assert m.forms[0] == "chunked" and rel(m(**x, form="chunked"), m(**x, form="reference").double()) < 1e-5


def test_interval_bounds_of_initialisers():
    from mixc.analysis import bounds

    p = mixc.load(ROOT / "examples" / "retnet.mix").program
    (gamma,) = p.buffers
    lo, hi = bounds(gamma.init, p)
    assert 0.96 < lo and hi <= 1.0
    # and the values it takes do lie there
    for h in range(40):
        assert lo <= 1 - 2 ** (-5 - h) <= hi


# ---- what used to crash ------------------------------------------------------------------------------


@pytest.mark.parametrize("decay, inp", [("0.5", "k[i] * v[j]"), ("1", "k[i]"), ("exp(g)", "v[j]")])
def test_number_decays_and_unit_factors(decay, inp):
    """S = 0.5 S + k v^T (a number decay), S = S + k[i] (v' = 1), S = e^g S + v[j] (k' = 1): chunked, with
    gradients and final states equal to the reference."""
    m = mixc.loads(rec(decay, inp=inp, sampler="logsigmoid"))
    assert m.forms[0] == "chunked"
    x = m.random_inputs(1, 70, 2, K=5, V=6, dtype=torch.float64, device=DEV)
    (ro, rs, rg), (co, cs, cg) = both(m, x, grads=True)
    assert rel(co, ro) < 1e-5 and rel(cs["S"], rs["S"]) < 1e-5
    for k in ("q", "k", "v"):
        if k in inp or k == "q":
            assert rel(cg[k], rg[k]) < 1e-5, k


# ---- exact 0 decays, sharp gates, NaN ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gla():
    return mixc.loads(rec("exp(g[i])", gax="K", sampler="logsigmoid"))


def test_exact_zero_decays_per_key(gla):
    """g = -inf (a decay exactly 0) at some keys and tokens: the reference's result, gradients included."""
    x = gla.random_inputs(1, 67, 1, K=4, V=3, dtype=torch.float64, seed=2, device=DEV)
    x["g"][0, 7, :, 3] = -INF
    x["g"][0, 40, 0, :] = -INF
    x["g"][0, 64] = -INF  # the first token of the second chunk
    (ro, rs, rg), (co, cs, cg) = both(gla, x, grads=True)
    assert torch.isfinite(co).all() and torch.isfinite(cs["S"]).all()
    assert rel(co, ro) < 1e-5 and rel(cs["S"], rs["S"]) < 1e-5
    for k in ("q", "k", "v", "g"):
        assert torch.isfinite(cg[k]).all() and rel(cg[k], rg[k]) < 1e-4, k


def test_a_sigmoid_gate_exactly_zero():
    """sigmoid(x) = 0 in floating point (x = -1e4): log 0 = -inf taken as an exact 0 decay."""
    m = mixc.loads(rec("sigmoid(g)"))
    x = m.random_inputs(1, 70, 2, K=4, V=5, dtype=torch.float64, seed=1, device=DEV)
    x["g"][0, 3] = -1e4
    (ro, _, _), (co, _, _) = both(m, x)
    assert torch.isfinite(co).all() and rel(co, ro) < 1e-5


def test_sharp_gates_are_accurate(gla):
    """g = -1e4 on tokens 10 .. 39: was 4.2e-3 relative error (2.4e-2 at the worst token); the floored log
    decays keep the in-chunk sums small enough for fp32."""
    x = gla.random_inputs(1, 70, 1, K=16, V=8, dtype=torch.float64, seed=1, device=DEV)
    x["g"][0, 10:40] = -1e4
    (ro, _, _), (co, _, _) = both(gla, x)
    assert rel(co, ro) < 1e-4 and per_token(co, ro) < 5e-4


@pytest.mark.parametrize("decay, gax", [("exp(g[i])", "K"), ("exp(g)", "")])
def test_nan_propagates_only_forward(decay, gax):
    """A NaN in the gate at token 5 makes the outputs NaN from token 5 on, as in the reference (factored
    around the chunk's middle row it reached every row of the chunk)."""
    m = mixc.loads(rec(decay, gax=gax, sampler="logsigmoid"))
    x = m.random_inputs(1, 70, 2, K=16, V=16, dtype=torch.float64, seed=1, device=DEV)
    if gax:
        x["g"][0, 5, 0, 2] = float("nan")
    else:
        x["g"][0, 5, 0] = float("nan")
    (ro, _, _), (co, _, _) = both(m, x)
    assert torch.equal(torch.isnan(co), torch.isnan(ro))
    assert torch.isnan(ro[0, 5:, 0]).all() and not torch.isnan(ro[0, :5]).any()
    keep = ~torch.isnan(ro)
    assert rel(co[keep], ro[keep]) < 1e-5


# ---- large fp16 inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear_attention", "based"])
def test_large_fp16_inputs_stay_finite(name):
    """Inputs x1e3 in fp16: the states (k v^T summed over a chunk: 1e6 and more) and based's features (q (x) q)
    overflowed fp16; they are kept in fp32 (the kernels' products: tf32 on a GPU)."""
    m = mixc.load(ROOT / "examples" / f"{name}.mix")
    x = m.random_inputs(1, 150, 2, K=16, V=16, dtype=torch.float64, seed=1, device=DEV)
    x = {k: (v * 1e3).half() for k, v in x.items()}
    r16 = m(**x, form="reference")
    ref = m(**{k: v.double() for k, v in x.items()}, form="reference")
    o = m(**x, form="chunked")
    assert torch.isfinite(r16).all() and torch.isfinite(o).all()
    assert rel(o, ref) < 2e-3


# ---- float64 -----------------------------------------------------------------------------------------


def test_float64_calls_default_to_the_reference(gla):
    """The kernels compute in float32: a float64 call with no form runs the exact reference (gradcheck-able);
    form='chunked' still runs the kernels, float32-accurate, as the docs and `mixc run` say."""
    x = gla.random_inputs(1, 6, 1, K=2, V=2, dtype=torch.float64, device=DEV)
    assert torch.equal(gla(**x), gla(**x, form="reference"))
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    assert torch.autograd.gradcheck(lambda q, k, v, g: gla(q=q, k=k, v=v, g=g), (xs["q"], xs["k"], xs["v"], xs["g"]))
    o = gla(**x, form="chunked")
    assert o.dtype == torch.float64 and 0 < rel(o, gla(**x, form="reference")) < 1e-5


# ---- o = q'S / f(q'n) --------------------------------------------------------------------------------

MLSTM = """
size K, V
input q[K], k[K], v[V]
input f[{ax}] ~ logsigmoid
state S[K, V], n[K]
S[i, j] = {d} * S[i, j] + k[i] * v[j]
n[i] = {d} * n[i] + k[i]
out o[j] = sum(i: q[i] * S[i, j]) / max(abs(sum(i: q[i] * n[i])), 1)
"""


@pytest.mark.parametrize("d, ax", [("exp(f)", ""), ("exp(f[i])", "K")])
def test_a_function_of_the_denominator(d, ax):
    """An mLSTM-like readout o = q'S / max(|q'n|, 1): chunked (the normaliser as a value column, the function
    and the division a PyTorch epilogue), equal to the reference with initial and final states and every
    gradient, and with packed sequences."""
    m = mixc.loads(MLSTM.format(d=d, ax=ax))
    assert m.forms[0] == "chunked" and m.meta["default_form"] == "chunked"
    B, T, H, K, V = 1, 70, 2, 5, 7
    x = m.random_inputs(B, T, H, K=K, V=V, dtype=torch.float64, seed=3, device=DEV)
    gen = torch.Generator().manual_seed(0)
    s0 = {"S": torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(DEV),
          "n": torch.randn(B, H, K, generator=gen, dtype=torch.float64).to(DEV)}
    res = []
    for form, dt in (("reference", torch.float64), ("chunked", torch.float32)):
        xx = {k: v.detach().to(dt).requires_grad_() for k, v in x.items()}
        ss = {k: v.detach().to(dt).requires_grad_() for k, v in s0.items()}
        o, st = m(**xx, initial_state=ss, output_final_state=True, form=form)
        (o.pow(2).sum() + st["S"].sum() + st["n"].pow(2).sum()).backward()
        res.append([o, st["S"], st["n"]] + [xx[k].grad for k in sorted(xx)] + [ss[k].grad for k in sorted(ss)])
    for i, (r, c) in enumerate(zip(*res)):
        assert rel(c, r) < 1e-4, i
    cu = torch.tensor([0, 9, 10, T], device=DEV)
    ro = m(**x, cu_seqlens=cu, form="reference")
    co = m(**{k: v.float() for k, v in x.items()}, cu_seqlens=cu, form="chunked")
    assert rel(co, ro) < 1e-5
    assert "f(d) = max(abs(" in m.analysis.explain()


# ---- randomized: decay kinds x gates x input scales --------------------------------------------------

KINDS = {
    "scalar": ("exp(g)", "", "logsigmoid", ""),
    "key": ("exp(g[i])", "K", "logsigmoid", ""),
    "constant": ("gamma * exp(g)", "", "logsigmoid", "buffer gamma[] = 1 - 2 ** (-1 - head)"),
    "sigmoid": ("sigmoid(g)", "", "normal", ""),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_randomized_decays_never_give_nan_where_the_reference_is_finite(kind):
    """Random gates with exact-0 decays (-inf), very sharp ones (-1e4) and large inputs (x1e3), for each decay
    kind: wherever the float64 reference is finite, the chunked output is finite and close to it."""
    decay, gax, sampler, extra = KINDS[kind]
    m = mixc.loads(rec(decay, gax=gax, sampler=sampler, extra=extra))
    assert m.forms[0] == "chunked"
    gen = torch.Generator().manual_seed(17)
    for trial in range(3):
        x = m.random_inputs(1, 66 + 5 * trial, 1, K=4, V=3, dtype=torch.float64, seed=trial, device=DEV)
        g = x["g"]
        u = torch.rand(g.shape, generator=gen, dtype=torch.float64).to(DEV)
        low = -INF if kind != "sigmoid" else -1e4  # (sigmoid(-1e4) = 0: its exact 0 decay)
        g = torch.where(u < 0.05, torch.full_like(g, low), g)
        g = torch.where((u >= 0.05) & (u < 0.12), torch.full_like(g, -1e4), g)
        x["g"] = g
        scale = 10.0 ** (3 * trial / 2)
        for n in ("q", "k", "v"):
            x[n] = x[n] * scale
        (ro, rs, _), (co, cs, _) = both(m, x)
        fin = torch.isfinite(ro)
        assert fin.all()
        assert torch.isfinite(co).all() and torch.isfinite(cs["S"]).all(), (kind, trial)
        assert rel(co, ro) < 1e-4 and rel(cs["S"], rs["S"]) < 1e-4, (kind, trial, rel(co, ro))
    assert math.isfinite(rel(co, ro))


def test_half_precision_decay_summed_by_a_product():
    """A fp16 per-key decay of 64 keys is summed within chunks by a product with a triangular matrix of ones
    (and, with no backward, the output kernel measures the spans itself): a NaN there reached every row
    through 0 * NaN; it is counted by the same product and reaches only the rows from its token on. Exact
    0 decays and sharp gates alike."""
    m = mixc.loads(rec("exp(g[i])", gax="K", sampler="logsigmoid"))
    x = m.random_inputs(1, 70, 1, K=64, V=16, dtype=torch.float64, seed=1, device=DEV)
    x["g"][0, 3, 0, 5] = -INF
    x["g"][0, 20:30] = -1e4
    x["g"][0, 45, 0, 7] = float("nan")
    ref = m(**x, form="reference")
    with torch.no_grad():
        o = m(**{k: v.half() for k, v in x.items()}, form="chunked")
    assert torch.equal(torch.isnan(o), torch.isnan(ref)) and not torch.isinf(o).any()
    keep = ~torch.isnan(ref)
    assert rel(o[keep], ref[keep]) < 2e-3
