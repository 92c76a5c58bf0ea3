"""The attention form against the reference (and torch SDPA where it applies): outputs and every gradient
(inputs and learnable score parameters), at odd T, T = 1, widths not a power of two, varlen, and decoding
from a key/value cache after a prefill (the split-KV path included).

Under TRITON_INTERPRET=1 (CPU, conftest.py) in fp32 (and one fp16 forward); tiny shapes.
"""

import pytest
import torch
import torch.nn.functional as F
from test_chunk_kernel import _compiled_matches_eager

import mixc
from mixc.backends.attention.emit import classifier_source
from mixc.backends.attention.intervals import interval_bool
from mixc.backends.attention.launch import _attn_tables
from mixc.backends.attention.plan import T_SYM, U_SYM, plan

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CAUSAL = {"softmax_attention": {}, "sliding_window_attention": {"W": 7}, "segment_attention": {"L": 5}}

# ALiBi: a per-head slope (a buffer, not learned) times the distance t - u
ALIBI = """
size K, V
input q[K], k[K], v[V]
buffer slope[] = 2 ** (-(head + 1))
let s = K ** -0.5 * sum(i: q[t, i] * k[u, i]) - slope * (t - u)
mask u <= t
out o[j] = sum(u: softmax(u: s) * v[u, j])
"""
# a learnable per-head slope on a log-distance bias, no mask line (causal by default)
LOGBIAS = """
size K, V
input q[K], k[K], v[V]
param slope[] = 0.5 + head
let s = K ** -0.5 * sum(i: q[t, i] * k[u, i]) - slope * log(1 + abs(t - u))
out o[j] = sum(u: softmax(u: s) * v[u, j])
"""
# a soft cap with a learnable per-head cap and window (gets a gradient through tanh)
SOFTCAP = """
size K, V
const W = 6
input q[K], k[K], v[V]
param cap[] = 2 + head
let s = cap * tanh(K ** -0.5 * sum(i: q[t, i] * k[u, i]) / cap)
mask t - W < u and u <= t
out o[j] = sum(u: softmax(u: s) * v[u, j])
"""
SYNTHETIC = {"alibi": ALIBI, "logbias": LOGBIAS, "softcap": SOFTCAP}


def _mixer(name):
    if name in SYNTHETIC:
        return mixc.loads(SYNTHETIC[name], f"<{name}>")
    return mixc.load(f"examples/{name}.mix", **CAUSAL[name])


def _inputs(B, T, H, K, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda d: torch.randn(B, T, H, d, generator=g, dtype=torch.float64).to(DEV, dtype)  # noqa: E731
    return {"q": mk(K), "k": mk(K), "v": mk(V)}


def _rel(a, b):
    """Relative RMS error (against at least 1: a gradient that is exactly zero, T = 1's dq, compares absolutely)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1.0))


@pytest.mark.parametrize("name", [*CAUSAL, *SYNTHETIC])
@pytest.mark.parametrize("shape", [(2, 37, 1, 16, 16), (1, 1, 1, 12, 20), (1, 21, 2, 12, 7)],
                         ids=lambda s: "B{}-T{}-H{}-K{}-V{}".format(*s))
def test_matches_reference_with_gradients(name, shape):
    m = _mixer(name)
    assert m.meta["default_form"] == "attention"
    B, T, H, K, V = shape
    x = {k: t.requires_grad_() for k, t in _inputs(B, T, H, K, V).items()}
    params = {n: t.clone().requires_grad_() for n, t in m.parameters_init(H, device=DEV).items()}
    learn = {n: t for n, t in params.items() if n in m.meta["params"]}
    o = m(**x, **params, form="attention")
    r = m.reference(**x, **params)
    assert o.shape == (B, T, H, V)
    assert _rel(o, r) < 1e-5
    g = torch.randn_like(r)
    wrt = [*x.values(), *learn.values()]
    ga = torch.autograd.grad(o, wrt, g)
    gr = torch.autograd.grad(r, wrt, g)
    for what, a, b in zip([*x, *learn], ga, gr):
        assert _rel(a, b) < 1e-5, what


def _sdpa(q, k, v, mask=None, causal=False):
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    return t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, is_causal=causal))


@pytest.mark.parametrize("name", ["softmax_attention", "sliding_window_attention", "alibi"])
def test_matches_sdpa(name):
    m = _mixer(name)
    B, T, H, D = 2, 33, 2, 16
    x = {k: t.requires_grad_() for k, t in _inputs(B, T, H, D, D).items()}
    tt, uu = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    if name == "softmax_attention":
        ref = _sdpa(**x, causal=True)
    elif name == "sliding_window_attention":
        ref = _sdpa(**x, mask=((uu <= tt) & (uu > tt - 7)).to(DEV))
    else:
        slope = 2.0 ** -(torch.arange(H) + 1.0)
        bias = (-slope.view(H, 1, 1) * (tt - uu)).masked_fill(uu > tt, float("-inf"))
        ref = _sdpa(**x, mask=bias.to(DEV))
    o = m(**x, form="attention")
    assert _rel(o, ref) < 1e-5
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(o, list(x.values()), g), torch.autograd.grad(ref, list(x.values()), g)):
        assert _rel(a, b) < 1e-5


def test_fp16_forward():
    m = _mixer("softmax_attention")
    x = _inputs(1, 40, 2, 16, 16, dtype=torch.float16)
    o = m(**x, form="attention")
    assert o.dtype == torch.float16
    assert _rel(o, m.reference(**{k: t.double() for k, t in x.items()})) < 2e-3


@pytest.mark.parametrize("name", ["softmax_attention", "sliding_window_attention", "segment_attention", "softcap"])
def test_decode_after_prefill_equals_full_run(name):
    """Prefill T0 tokens, then decode one token at a time from the returned cache: each output equals the full
    run's; the sliding window's cache keeps its last W keys. A 70-token cache takes the split-KV path."""
    m = _mixer(name)
    B, T, H, K, V = 1, 74, 2, 16, 8
    if DEV == "cpu":  # the 70-key cache (5 key tiles of 16) is split over 2 programs in the interpreter
        from mixc.backends.attention.launch import _attn_splits

        assert _attn_splits(1, 5, 2, torch.device("cpu"), 16) == 2
    x = _inputs(B, T, H, K, V, seed=3)
    full = m.reference(**x)
    T0 = 70
    o, cache = m(**{k: t[:, :T0] for k, t in x.items()}, output_final_state=True, form="attention")
    assert _rel(o, full[:, :T0]) < 1e-5
    window = plan(m.program).window
    assert cache["k"].shape == (B, H, min(T0, window or T0), K) and cache["v"].shape[-1] == V
    for t in range(T0, T):
        step = {k: v[:, t:t + 1] for k, v in x.items()}
        o, new = m(**step, initial_state=cache, output_final_state=True, form="attention")
        r, rc = m.reference(**step, initial_state=cache, output_final_state=True)
        assert _rel(o, full[:, t:t + 1]) < 1e-5 and _rel(r, full[:, t:t + 1]) < 1e-6
        assert torch.equal(new["k"], rc["k"]) and torch.equal(new["v"], rc["v"])
        cache = new
    # a chunk of several tokens from the cache too
    o, _ = m(**{k: v[:, 60:] for k, v in x.items()},
             initial_state=m(**{k: v[:, :60] for k, v in x.items()}, output_final_state=True)[1],
             output_final_state=True, form="attention")
    assert _rel(o, full[:, 60:]) < 1e-5


@pytest.mark.parametrize("name", ["segment_attention", "softcap"])
def test_varlen_matches_per_sequence(name):
    """Packed sequences in one launch (native varlen: one work row per sequence and tile), an empty one
    included: outputs and gradients equal each sequence run on its own; with a cache, one at a time."""
    m = _mixer(name)
    x = {k: t.requires_grad_() for k, t in _inputs(1, 29, 2, 16, 16, seed=5).items()}
    p = {n: t.clone().requires_grad_() for n, t in m.parameters_init(2, device=DEV).items()}
    cu = torch.tensor([0, 11, 11, 29], device=DEV)
    o = m(**x, **p, cu_seqlens=cu, form="attention")
    r = torch.cat([m.reference(**{k: v[:, a:b] for k, v in x.items()}, **p) for a, b in ((0, 11), (11, 29))], 1)
    assert _rel(o, r) < 1e-5
    g = torch.randn_like(r)
    wrt = [*x.values(), *p.values()]
    for a, b in zip(torch.autograd.grad(o, wrt, g), torch.autograd.grad(r, wrt, g)):
        assert _rel(a, b) < 1e-5
    # with a final cache: per sequence; equal lengths stack, ragged ones are refused by name
    cu2 = torch.tensor([0, 14, 28], device=DEV)
    x2 = {k: v[:, :28] for k, v in x.items()}
    with torch.no_grad():
        o2, fin = m(**x2, **p, cu_seqlens=cu2, output_final_state=True, form="attention")
        r2, rfin = m.reference(**x2, **p, cu_seqlens=cu2, output_final_state=True)
    assert _rel(o2, r2) < 1e-5 and torch.equal(fin["k"], rfin["k"]) and fin["k"].shape[0] == 2
    with pytest.raises(ValueError, match="final state 'k'"):
        m(**x, **p, cu_seqlens=cu, output_final_state=True, form="attention")


@pytest.mark.parametrize("cu", [None, [0, 11, 11, 29]], ids=["batch", "packed"])
@pytest.mark.parametrize("name", ["sliding_window_attention", "softcap"])
def test_torch_compile_fullgraph(name, cu):
    """torch.compile(fullgraph=True) over a whole attention call: the kernels are one torch operator a module,
    which builds the tile list of packed sequences when it runs (not while tracing), so nothing breaks the graph;
    outputs and gradients (a learnable score parameter's too) equal eager execution."""
    m = _mixer(name)
    x = _inputs(1 if cu else 2, 29, 2, 16, 16, seed=6)
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    p = m.parameters_init(2, device=DEV)
    names, pnames = list(x), list(p)

    def f(*t):
        kw = dict(zip(names + pnames, t))
        return m(**kw, cu_seqlens=cu_t, form="attention").square().sum()

    _compiled_matches_eager(f, tuple(v.clone().requires_grad_() for v in (*x.values(), *p.values())))


def test_tile_classes_skip_empty_and_unmask_full():
    """Interval reasoning on the mask: a sliding window visits O(W) key tiles per query tile, the diagonal tile
    is partial, the tiles inside the window full; the segment mask's floor is handled exactly."""
    m = mixc.load("examples/sliding_window_attention.mix", W=32)
    mask = plan(m.program).mask_expr
    assert interval_bool(mask, {T_SYM: (64, 79), U_SYM: (48, 63)}) == "full"
    assert interval_bool(mask, {T_SYM: (64, 79), U_SYM: (64, 79)}) == "partial"
    assert interval_bool(mask, {T_SYM: (64, 79), U_SYM: (16, 31)}) == "empty"
    assert interval_bool(mask, {T_SYM: (64, 79), U_SYM: (32, 47)}) == "partial"
    seg = plan(mixc.load("examples/segment_attention.mix", L=16).program).mask_expr
    assert interval_bool(seg, {T_SYM: (32, 47), U_SYM: (16, 31)}) == "full"
    assert interval_bool(seg, {T_SYM: (32, 47), U_SYM: (0, 15)}) == "empty"
    ns = {}
    exec("import torch\nfrom mixc.backends.attention.launch import *\n"
         + "\n".join(classifier_source(plan(m.program))), ns)
    qtab, ktab = _attn_tables(ns["_attention_tile_class"], 256, 256, 0, 16, 16)
    lo, flo, fhi, hi = qtab.long().unbind(1)
    assert int((hi - lo).max()) == 3 and int((fhi - flo).max()) == 1  # 2 partial + 1 full tile, not 16
    assert lo[10] == 8 and hi[10] == 11
    lo, flo, fhi, hi = ktab.long().unbind(1)
    assert int((hi - lo).max()) == 3


def test_explain_and_emitted_source():
    m = _mixer("softcap")
    src = m.source if isinstance(getattr(m, "source", None), str) else None
    text = mixc.emit.module_source(m.program) if src is None else src
    assert "def _attn_score(qk, f_t, f_u, f_h, p_cap, dim_K):" in text
    assert "tl.sigmoid" in text and "_attn_dpar_0" in text
    assert text == mixc.emit.module_source(m.program)  # deterministic bytes


def test_backward_preprocess_delta():
    """delta = rowsum(do * o) in fp32 [B, H, T] by the preprocess kernel: odd T, a width that is not a power of
    two, a gradient with strides of its own (a transposed view)."""
    from mixc.backends.attention.launch import _attn_bwd_preprocess_kernel

    B, T, H, V = 2, 37, 3, 20
    g = torch.Generator().manual_seed(7)
    o = torch.randn(B, T, H, V, generator=g).to(DEV)
    do = torch.randn(B, H, T, V, generator=g).to(DEV).transpose(1, 2)  # [B, T, H, V], not contiguous
    delta = torch.full((B, H, T), float("nan"), device=DEV)
    _attn_bwd_preprocess_kernel[(3, B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], T, H, DV=V, BM=16, BV=32)
    want = (do.double() * o.double()).sum(-1).permute(0, 2, 1)
    assert _rel(delta, want) < 1e-6


def test_gradients_with_strided_output_gradient():
    """The backward takes the output gradient's strides as they come (here a transposed view): equal to the
    reference's gradients."""
    m = _mixer("alibi")
    x = {k: t.requires_grad_() for k, t in _inputs(1, 19, 2, 16, 16, seed=4).items()}
    g = torch.randn(1, 2, 19, 16, device=DEV).transpose(1, 2)
    ga = torch.autograd.grad(m(**x, form="attention"), list(x.values()), g)
    gr = torch.autograd.grad(m.reference(**x), list(x.values()), g)
    for a, b in zip(ga, gr):
        assert _rel(a, b) < 1e-5


def test_score_slope_folded_into_one_multiply():
    """A score linear in qk with a per-head slope (softmax, ALiBi) compiles to qk * qk_scale (slope * log2(e),
    computed once per program) and scales dq, dk once; a non-linear one (soft cap) keeps the score per element."""
    lin = mixc.emit.module_source(_mixer("alibi").program)
    assert "return qk * qk_scale + " in lin and "    return ds\n" in lin
    assert "def _attn_dscale(f_h, p_slope, dim_K):\n" in lin
    cap = mixc.emit.module_source(_mixer("softcap").program)
    assert "return _attn_score(qk, f_t, f_u, f_h, p_cap, dim_K) * 1.4426950408889634" in cap
    assert "return ds * (" in cap


def test_work_rows_longest_first():
    """Work rows are ordered by the tiles each program visits, most first (causal: the last query tile)."""
    m = _mixer("softmax_attention")
    mod = m._module
    work = mod._attn_work(mod._ATTN_SPEC["classify"], ((0, 64, 0, 64),), 0, 16, 16, "q", torch.device("cpu"))
    visits = (work[:, 9] - work[:, 6]).tolist()
    assert visits == sorted(visits, reverse=True) and work[0, 5] == 3 and visits[0] == 4


@pytest.mark.parametrize("name", ["sliding_window_attention", "segment_attention", "softcap", "alibi"])
def test_decoder_equals_full_run(name):
    """m.decoder(B, H, max_len=...): a prefill then one token at a time from the preallocated cache equals the
    full run (a window's cache is a ring buffer of W slots, wrapped several times here); the cache reads back as
    the functional form's final state, and loads from it."""
    m = _mixer(name)
    B, T, H, K, V = 2, 30, 2, 12, 7
    x = _inputs(B, T, H, K, V, seed=1)
    params = m.parameters_init(H, device=DEV)
    full = m.reference(**x, **params)
    dec = m.decoder(B, H, max_len=34, device=DEV, params=params, K=K, V=V)
    window = plan(m.program).window
    assert dec.ring == (window is not None) and dec.capacity == (window or 34)
    if window is None and DEV == "cpu":  # the interpreter splits the 34-slot cache over 2 programs (a GPU: 1)
        assert dec._op.shape[0] == 2
    T0 = 21
    o = dec.prefill(**{k: t[:, :T0] for k, t in x.items()})
    assert o.shape == (B, T0, H, V) and _rel(o, full[:, :T0]) < 1e-5
    for t in range(T0, T):
        o_t = dec.step(**{k: v[:, t] for k, v in x.items()})
        assert o_t.shape == (B, H, V) and _rel(o_t, full[:, t]) < 1e-5, t
    assert dec.length == T
    _, fin = m(**x, **params, output_final_state=True, form="attention")
    for n in ("k", "v"):
        assert torch.equal(dec.state[n], fin[n])
    # a second decoder from the functional cache (a ring buffer: the last W keys, renumbered) continues equally
    y = _inputs(B, 3, H, K, V, seed=2)
    ref = m.reference(**{k: torch.cat([x[k], y[k]], 1) for k in x}, **params)[:, T:]
    dec2 = m.decoder(B, H, max_len=34, device=DEV, params=params, K=K, V=V)
    dec2.load_state(fin)
    for t in range(3):
        assert _rel(dec2.step(**{k: v[:, t] for k, v in y.items()}), ref[:, t]) < 1e-5


def test_decoder_truncate_reset_and_errors():
    m = _mixer("softmax_attention")
    B, H, D = 1, 2, 16
    x = _inputs(B, 6, H, D, D, seed=6)
    full = m.reference(**x)
    dec = m.decoder(B, H, max_len=6, device=DEV, K=D, V=D)
    dec.prefill(**{k: t[:, :5] for k, t in x.items()})
    step = {k: v[:, 5] for k, v in x.items()}
    first = dec.step(**step).clone()
    dec.truncate(5)  # roll back one token and redo it: the same output
    assert torch.equal(dec.step(**step), first) and _rel(first, full[:, 5]) < 1e-5
    with pytest.raises(ValueError, match="max_len=6"):
        dec.step(**step)
    dec.reset()
    assert _rel(dec.step(**{k: v[:, 0] for k, v in x.items()}), full[:, 0]) < 1e-5
    with pytest.raises(ValueError, match="missing input 'v'"):
        dec.step(q=step["q"], k=step["k"])
    with pytest.raises(ValueError, match="input 'q' has shape"):
        dec.step(q=x["q"], k=step["k"], v=step["v"])
    with pytest.raises(ValueError, match=r"input 'v' has shape \(1, 2, 15\).*width = 16"):
        dec.step(q=step["q"], k=step["k"], v=step["v"][..., :15])
    if DEV != "cpu":
        with pytest.raises(ValueError, match="input 'k' is on cpu"):
            dec.step(q=step["q"], k=step["k"].cpu(), v=step["v"])
    with pytest.raises(ValueError, match="pass max_len"):
        m.decoder(B, H, K=D, V=D)
    with pytest.raises(ValueError, match="exceeds max_len=6"):
        m.decoder(B, H, max_len=6, K=D, V=D).prefill(**{k: torch.cat([t, t], 1) for k, t in x.items()})
    ring = _mixer("sliding_window_attention").decoder(B, H, max_len=64, K=D, V=D)
    with pytest.raises(ValueError, match="ring buffer"):
        ring.truncate(0)
