"""The analysis: classification of every example and synthetic cases that no example covers."""

from pathlib import Path

import pytest

import mixc
from mixc.analysis import analyse

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {
    # name: (transition, legal forms, default)
    "linear_attention": ("identity", {"chunked", "recurrent"}, "chunked"),
    "retnet": ("constant_scalar", {"chunked", "recurrent"}, "chunked"),
    "gla": ("diagonal_key", {"chunked", "recurrent"}, "chunked"),
    "mamba2": ("scalar", {"chunked", "recurrent"}, "chunked"),
    "deltanet": ("delta", {"chunked", "recurrent"}, "chunked"),
    "gated_deltanet": ("gated_delta", {"chunked", "recurrent"}, "chunked"),
    "hgrn": ("elementwise", {"recurrent"}, "recurrent"),
    "mamba": ("elementwise", {"recurrent"}, "recurrent"),
    "s4d": ("elementwise", {"fft", "recurrent"}, "fft"),
    "h3": ("elementwise", {"fft", "recurrent"}, "fft"),
}
ATTENTION = ["softmax_attention", "sliding_window_attention", "segment_attention"]


def an(name: str):
    return analyse(mixc.load(ROOT / "examples" / f"{name}.mix").program)


def ans(src: str, **consts):
    return analyse(mixc.loads(src, "synthetic.mix", **consts).program)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recurrence_examples(name):
    transition, forms, default = EXPECTED[name]
    a = an(name)
    assert a.kind == "recurrence"
    assert a.transition == transition
    assert set(a.forms) == forms
    assert a.default_form == default
    assert a.separable is None
    assert "attention" not in a.forms
    assert a.time_invariant == ("fft" in forms)
    for f in ("chunked", "recurrent", "fft", "attention"):
        assert a.reasons[f], f  # every decision has a reason in words


@pytest.mark.parametrize("name", ATTENTION)
def test_softmax_examples_are_attention_only(name):
    a = an(name)
    assert a.forms == ["attention"] and a.default_form == "attention"
    assert a.separable is False and a.feature_width is None
    assert "no finite feature map" in a.reasons["chunked"]


def test_based_is_separable_with_width():
    a = an("based")
    assert a.separable is True
    assert a.feature_width == "1 + K + K**2"
    assert a.to_json()["feature_width_symmetric"] == "1 + 3*K/2 + K**2/2"
    assert {"chunked", "recurrent"} <= set(a.forms) and a.default_form == "chunked"


def test_normal_forms_name_their_parts():
    m2 = an("mamba2")
    (h,) = m2.states
    assert (h.k, h.v) == ("dt * B[n]", "x[p]")
    gla = an("gla")
    assert (gla.states[0].k, gla.states[0].v) == ("k[i]", "v[j]")
    la = an("linear_attention")
    z = next(s for s in la.states if s.name == "z")
    assert z.normaliser_of == "S"
    assert "extra value column of S" in la.explain()


def test_a_normaliser_decays_like_its_state():
    """z is recognised as S's normaliser only with S's decay (else two independent states)."""
    src = """
size K, V
input q[K], k[K], v[V]
input f[] ~ logsigmoid
state S[K, V], z[K]
S[i, j] = exp(f) * S[i, j] + k[i] * v[j]
z[i] = exp(F) * z[i] + k[i]
out o[j] = sum(i: q[i] * S[i, j]) / sum(i: q[i] * z[i])
"""
    same = ans(src.replace("exp(F)", "exp(f)"))
    other = ans(src.replace("exp(F)", "exp(f / 2)"))
    assert next(s for s in same.states if s.name == "z").normaliser_of == "S"
    assert next(s for s in other.states if s.name == "z").normaliser_of is None
    assert "chunked" in same.forms and "chunked" not in other.forms


def test_json_has_the_promised_fields():
    for name in list(EXPECTED) + ATTENTION + ["based"]:
        j = an(name).to_json()
        for key in ("forms", "default_form", "separable", "feature_width", "transition", "time_invariant", "reasons"):
            assert key in j, (name, key)


# ---- synthetic cases -----------------------------------------------------------------------------

ATTN = """
size K, V
input q[K], k[K], v[V]
let s = sum(i: q[t, i] * k[u, i])
out o[j] = sum(u: {w} * v[u, j]) / sum(u: {w})
"""


def test_cubic_polynomial_kernel_width():
    a = ans(ATTN.format(w="(1 + s) ** 3"))
    assert a.separable and a.feature_width == "1 + K + K**2 + K**3"


def test_exp_of_dot_product_is_not_separable():
    a = ans(ATTN.format(w="exp(s)"))
    assert a.separable is False and a.forms == ["attention"]
    assert "exp of a dot product has no finite feature map" in a.separability.reason


def test_cos_of_dot_product_is_not_separable():
    a = ans(ATTN.format(w="cos(s)"))
    assert a.separable is False
    assert "cos of a dot product" in a.separability.reason


def test_explicit_feature_maps_have_width_k():
    src = """
size K, V
input q[K], k[K], v[V]
def phi(x) = elu(x) + 1
let w = sum(i: phi(q[t, i]) * phi(k[u, i]))
out o[j] = sum(u: w * v[u, j]) / sum(u: w)
"""
    a = ans(src)
    assert a.separable and a.feature_width == "K"


def test_products_and_scalings_of_separable_terms():
    src = """
size K, V
input q[K], k[K], q2[V], k2[V], v[V]
let a = sum(i: q[t, i] * k[u, i])
let b = sum(j: q2[t, j] * k2[u, j])
out o[j] = sum(u: 3 * a * b * v[u, j])
"""
    a = ans(src)
    assert a.separable and a.feature_width == "K*V"


def test_separable_weight_under_a_window_mask_has_no_state():
    src = ATTN.format(w="s").replace("out o", "const W = 8\nmask t - W < u <= t\nout o")
    a = ans(src)
    assert a.separable is True
    assert "chunked" not in a.forms and "recurrent" not in a.forms
    assert "not the plain causal mask" in a.reasons["chunked"]


REC = """
size K, V
input q[K], k[K], v[V], g[K]
param P[K, V] = -1
state S[K, V]
S[i, j] = {decay} * S[i, j] + k[i] * v[j]
out o[j] = sum(i: q[i] * S[i, j])
"""


def test_decay_indexed_by_both_axes_is_elementwise():
    a = ans(REC.format(decay="exp(g[i] * P[i, j])"))
    assert a.transition == "elementwise" and a.forms == ["recurrent"]
    assert "both state axes" in a.reasons["chunked"]


def test_decay_along_the_value_axis():
    src = REC.replace("input q[K], k[K], v[V], g[K]", "input q[K], k[K], v[V], g[V]").format(decay="exp(g[j])")
    a = ans(src)
    assert a.transition == "diagonal_value" and "chunked" in a.forms


def test_constant_scalar_from_a_parameter():
    src = REC.replace("param P[K, V] = -1", "param lam[] = 0.9").format(decay="lam")
    a = ans(src)
    assert a.transition == "constant_scalar"


def test_renamed_linear_attention_is_classified_the_same():
    """Nothing is keyed on names: a file with other names lands in the same class."""
    src = """
mixer my_new_mixer
size Dk, Dv
input query[Dk], key[Dk], value[Dv]
state M[Dk, Dv], n[Dk]
def feat(x) = relu(x) + 1
M[a, b] = M[a, b] + feat(key[a]) * value[b]
n[a] = n[a] + feat(key[a])
out y[b] = sum(a: feat(query[a]) * M[a, b]) / sum(a: feat(query[a]) * n[a])
"""
    a = ans(src)
    assert a.transition == "identity" and "chunked" in a.forms
    assert a.states[1].normaliser_of == "M"
    assert a.feature_width == "Dk"


def test_time_invariant_real_diagonal_system():
    src = """
size N = 8
input x[]
param a[N] = 0.5
param b[N] = 1
param c[N] = 1
state h[N]
h[n] = a[n] * h[n] + b[n] * x
out y = sum(n: c[n] * h[n])
"""
    a = ans(src)
    assert a.time_invariant and "fft" in a.forms and a.default_form == "fft"
    assert "Vandermonde" in a.kernel


def test_input_gated_diagonal_system_is_not_time_invariant():
    src = """
size N = 8
input x[], z[N]
param a[N] = 0.5
state h[N]
h[n] = a[n] * h[n] + z[n] * x
out y = sum(n: h[n])
"""
    a = ans(src)
    assert not a.time_invariant and "fft" not in a.forms


def test_state_squared_is_rejected_with_a_located_error():
    src = REC.format(decay="S[i, j]")
    with pytest.raises(mixc.MixError) as e:
        mixc.loads(src, "sq.mix")
    assert "not linear in the state" in e.value.message
    assert e.value.pos.line == 6


def test_mask_reading_the_future_is_rejected():
    src = ATTN.format(w="s").replace("out o", "mask u > t\nout o")
    with pytest.raises(mixc.MixError) as e:
        mixc.loads(src, "fut.mix")
    assert "future" in e.value.message and e.value.pos.line == 5


def test_rank_one_score():
    src = """
size V
input a[], b[], v[V]
let w = sigmoid(a[t]) * sigmoid(b[u])
out o[j] = sum(u: w * v[u, j])
"""
    a = ans(src)
    assert a.separable and a.feature_width == "1"


def test_explain_reads_well():
    text = an("gla").explain()
    assert "transition diagonal_key" in text
    assert "k' = k[i], v' = v[j]" in text
    assert "default: chunked" in text
