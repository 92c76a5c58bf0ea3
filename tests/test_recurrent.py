"""The recurrent form (backends/recurrent) against the reference: outputs, final states and every
gradient (inputs, parameters, initial states) at odd shapes, T = 1, variable-length batches; the
one-token path and the decoder (prefill with the chunked form, then decode).

Under TRITON_INTERPRET=1 (CPU, conftest.py); on a GPU the same tests run the compiled kernels.
"""

from pathlib import Path

import pytest
import torch
from test_chunk_kernel import _compiled_matches_eager

import mixc
from mixc.cli import explain_text

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {"K": 5, "V": 6, "N": 3, "P": 5, "D": 7}
NAMES = ["mamba", "hgrn", "gla", "retnet", "mamba2", "linear_attention", "deltanet", "gated_deltanet", "s4d", "h3"]

# An element-wise decay that is the exponential of a token vector over the value axis times a parameter
# over the key axis (formed in the kernel), a negated input, an output gate and a skip
SYN_ELEMENTWISE = """
size Dk, Dv
input a[Dk], b[Dk], c[Dv]
input f[Dv] ~ softplus
param r[Dk] = -0.5
param w[Dv] = 2
state M[Dk, Dv]
M[x, y] = exp(f[y] * r[x]) * M[x, y] - sigmoid(b[x]) * c[y]
out o[y] = sigmoid(c[y]) * sum(x: a[x] * M[x, y]) + w[y] * c[y]
"""
# A one-axis state whose decay is a product (no exponential) of a parameter and a token gate, read
# through a number and a gate
SYN_ONE_AXIS = """
size D
input x[D]
input f[D] ~ sigmoid
param c[D] = 0.9
state h[D]
h[d] = c[d] * f[d] * h[d] + x[d]
out y[d] = 0.5 * tanh(x[d]) * h[d]
"""
# A declared [value, key] state with a per-key decay
SYN_TRANSPOSED = """
size Dk, Dv
input a[Dk], b[Dk], c[Dv]
input g[Dk] ~ logsigmoid
state M[Dv, Dk]
M[y, x] = exp(g[x]) * M[y, x] + b[x] * c[y]
out o[y] = sum(x: a[x] * M[y, x])
"""
# One-axis states (the element-wise kernels): the exponential of a per-token number times a per-channel
# parameter, read through a per-token gate; a product of a per-head number and a token gate, a negated
# input, read as is (the kernel stores the output's dtype)
SYN_EW_EXP = """
size D
input x[D], s[]
input g[] ~ logsigmoid
param A[D] = -0.5
state h[D]
h[d] = exp(g * A[d]) * h[d] + x[d]
out o[d] = s * h[d]
"""
SYN_EW_PRODUCT = """
size D
input x[D]
input f[D] ~ sigmoid
param c[] = 0.9
state h[D]
h[d] = c * f[d] * h[d] - x[d]
out o[d] = h[d]
"""
# A token decay over both state axes (the kernel's [BK, BV] factor load) times a per-head number
SYN_FULL_DECAY = """
size Dk, Dv
input a[Dk], b[Dk], c[Dv]
input f[Dk, Dv] ~ logsigmoid
param r[] = 0.5
state M[Dk, Dv]
M[x, y] = exp(r * f[x, y]) * M[x, y] + b[x] * c[y]
out o[y] = sum(x: a[x] * M[x, y])
"""
SYNTHETICS = {"syn_full_decay": SYN_FULL_DECAY,
              "syn_elementwise": SYN_ELEMENTWISE, "syn_one_axis": SYN_ONE_AXIS, "syn_transposed": SYN_TRANSPOSED,
              "syn_ew_exp": SYN_EW_EXP, "syn_ew_product": SYN_EW_PRODUCT}
SYN_SIZES = {"Dk": 5, "Dv": 6, "D": 7}


def _load(name):
    if name in SYNTHETICS:
        return mixc.loads(SYNTHETICS[name], f"<{name}>")
    return mixc.load(ROOT / "examples" / f"{name}.mix")


def _sizes(m):
    return {a: (SIZES | SYN_SIZES)[a] for a in m.meta["sizes"] if a in SIZES | SYN_SIZES}


def _rel(a, b):
    a, b = (torch.view_as_real(x) if x.is_complex() else x for x in (a, b))
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _states(m, n, H, sizes, gen):
    out = {}
    sizes = {**m.meta["consts_as_sizes"], **sizes}  # (a token history's length is a constant)
    for k, sm in m.meta["states"].items():
        dt = torch.complex64 if sm["complex"] else torch.float32
        x = torch.randn(n, H, *[sizes[a] for a in sm["axes"]], generator=gen, dtype=dt)
        # a normaliser (a one-axis state beside another) stays positive
        out[k] = (x.abs() + 1) if len(sm["axes"]) == 1 and len(m.meta["states"]) > 1 and not sm["complex"] else x
    return {k: v.to(DEV).requires_grad_() for k, v in out.items()}


def _real(x):
    return torch.view_as_real(x) if x.is_complex() else x


def _check(m, B, T, H, cu_seqlens=None, with_state=True, seed=0):
    sizes = _sizes(m)
    gen = torch.Generator().manual_seed(seed)
    x = {k: v.to(DEV).requires_grad_() for k, v in m.random_inputs(B, T, H, seed=seed, **sizes).items()}
    pr = {k: v.to(DEV).requires_grad_() for k, v in m.parameters_init(H, **sizes).items()}
    n = B if cu_seqlens is None else len(cu_seqlens) - 1
    st = _states(m, n, H, sizes, gen) if with_state else {}
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=DEV)
    o1, f1 = m(**x, **pr, initial_state=st or None, output_final_state=True, cu_seqlens=cu, form="recurrent")
    o2, f2 = m.reference(**x, **pr, initial_state=st or None, output_final_state=True, cu_seqlens=cu)
    f1, f2 = ({k: _real(v) for k, v in f.items()} for f in (f1, f2))
    assert _rel(o1, o2) < 1e-3
    for k in f2:
        assert _rel(f1[k], f2[k]) < 1e-3, k
    leaves = {**x, **pr, **st}
    w = torch.randn(o2.shape, generator=gen).to(DEV)
    ws = {k: torch.randn(v.shape, generator=gen).to(DEV) for k, v in f2.items()}
    g1 = torch.autograd.grad((o1 * w).sum() + sum((f1[k] * ws[k]).sum() for k in f2), list(leaves.values()),
                             allow_unused=True)
    g2 = torch.autograd.grad((o2 * w).sum() + sum((f2[k] * ws[k]).sum() for k in f2), list(leaves.values()),
                             allow_unused=True)
    for name, a, b in zip(leaves, g1, g2):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert a is not None, f"no gradient for {name}"
        assert _rel(_real(a), _real(b)) < 1e-3, name


@pytest.mark.parametrize("name", NAMES + list(SYNTHETICS))
def test_recurrent_matches_reference(name):
    m = _load(name)
    assert "recurrent" in m.forms
    _check(m, 2, 7, 2)


@pytest.mark.parametrize("name", ["mamba", "hgrn", "gated_deltanet", "s4d"])
def test_one_token_without_state(name):
    _check(_load(name), 2, 1, 3, with_state=False)


@pytest.mark.parametrize("name", ["mamba", "hgrn"])
def test_variable_length(name):
    _check(_load(name), 1, 9, 2, cu_seqlens=[0, 4, 5, 9])


@pytest.mark.parametrize("name", ["mamba", "gla", "retnet", "linear_attention", "gated_deltanet", "syn_full_decay",
                                  "hgrn", "syn_ew_exp", "syn_ew_product"])
def test_packed_sequences_run_in_one_scan(name, monkeypatch):
    """Packed sequences (cu_seqlens) run in one launch of the scan kernels each way (the matrix-state scan, or
    the element-wise one for a one-axis state), one program row a sequence, each from its own initial state:
    lengths 40, 0, 35, 35 (an empty one; sequences that start inside a checkpoint chunk of the packed row and
    cross one of their own), outputs, final states and every gradient against the reference, which runs the
    sequences one by one."""
    m = _load(name)
    mod = m._module
    assert getattr(mod.recurrent, "native_varlen", False)
    launched = []
    orig = mod._RecLaunch.__getitem__

    def spy(self, grid):
        launched.append((self.fn.__name__, grid))
        return orig(self, grid)
    monkeypatch.setattr(mod._RecLaunch, "__getitem__", spy)
    _check(m, 1, 110, 2, cu_seqlens=[0, 40, 40, 75, 110], seed=3)
    names = sorted(n for n, _ in launched)
    assert names in (["_rec_bwd", "_rec_fwd"], ["_rec_ew_bwd", "_rec_ew_fwd"]), names  # one launch each way
    assert all(grid[1] == 4 * 2 for _, grid in launched)  # a program row per (sequence, head)


@pytest.mark.parametrize("cu", [None, [0, 7, 7, 20]], ids=["batch", "packed"])
@pytest.mark.parametrize("name", ["mamba", "hgrn", "gated_deltanet"])
def test_torch_compile_fullgraph(name, cu):
    """torch.compile(fullgraph=True) over a whole recurrent call (argument checks, prologue, the scan, the
    epilogue): the scans are torch operators, so nothing breaks the graph, packed sequences included; outputs,
    final states and gradients equal eager execution."""
    m = _load(name)
    sizes = _sizes(m)
    B = 2 if cu is None else 1
    x = m.random_inputs(B, 20, 2, seed=4, **sizes)
    st = _states(m, B if cu is None else len(cu) - 1, 2, sizes, torch.Generator().manual_seed(4))
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    names, snames = list(x), list(st)

    def f(*t):
        kw, s0 = dict(zip(names, t)), dict(zip(snames, t[len(names):]))
        o, fin = m(**kw, initial_state=s0, output_final_state=True, cu_seqlens=cu_t, form="recurrent")
        return o.square().sum() + sum(v.sum() for v in fin.values())

    _compiled_matches_eager(f, tuple(v.to(DEV).requires_grad_() for v in x.values())
                            + tuple(v.detach().clone().requires_grad_() for v in st.values()))


def test_long_sequence_crosses_checkpoints():
    """T = 70 > 2 chunks of 32 tokens: the backward restarts from each checkpoint."""
    _check(_load("hgrn"), 1, 70, 1)


@pytest.mark.parametrize("name", ["hgrn", "syn_one_axis", "syn_ew_exp", "syn_ew_product"])
def test_one_axis_state_takes_the_elementwise_kernels(name, monkeypatch):
    """A one-axis state (chosen from the state's shape, not a name) runs the element-wise kernels, never
    the matrix-state scan: two chunks of tokens (T = 70 > 64) with states and gradients, and T = 5."""
    m = _load(name)

    def refuse(*a, **k):
        raise AssertionError("a one-axis state went through the matrix-state scan")

    monkeypatch.setattr(m._module, "rec_scan", refuse)
    monkeypatch.setattr(m._module, "rec_step", refuse)
    assert "rec_ew_scan" in m._module.recurrent.__code__.co_names
    _check(m, 1, 70, 2, seed=1)
    _check(m, 2, 5, 1, with_state=False, seed=2)


def test_mamba_default_is_recurrent_and_decay_formed_in_kernel():
    m = _load("mamba")
    assert m.meta["default_form"] == "recurrent" and m.forms == ["recurrent", "reference"]
    text = explain_text(m)
    assert "decay A_t = exp(at * ap), at = dt[p] per token, ap = A[n, p] per head" in text
    assert "exp(at * ap)" in explain_text(_load("syn_elementwise"))


def test_complex_state_and_token_history_continue():
    """h3 (complex state, reads of past tokens): two calls chained through the final states (h and k@past)
    equal one call."""
    m = _load("h3")
    x = m.random_inputs(2, 9, 2, P=4, N=3, device=DEV)
    pr = m.parameters_init(2, P=4, N=3, device=DEV)
    o, st = m(**x, **pr, output_final_state=True, form="recurrent")
    o1, st1 = m(**{k: v[:, :4] for k, v in x.items()}, **pr, output_final_state=True, form="recurrent")
    o2, st2 = m(**{k: v[:, 4:] for k, v in x.items()}, **pr, initial_state=st1, output_final_state=True,
                form="recurrent")
    assert _rel(torch.cat([o1, o2], 1), o) < 1e-5 and _rel(_real(st2["h"]), _real(st["h"])) < 1e-5
    assert _rel(o, m.reference(**x, **pr)) < 1e-4
    dec = m.decoder(2, 2, device=DEV, params=pr, P=4, N=3)  # continue the first call token by token (k@past included)
    dec.load_state(st1)
    o_dec = torch.stack([dec.step(**{k: v[:, t] for k, v in x.items()}).clone() for t in range(4, 9)], 1)
    assert _rel(o_dec, o[:, 4:]) < 1e-5 and _rel(dec.state["k@past"], st["k@past"]) == 0


def test_explain_and_forms_agree():
    """Every legal recurrent form is emitted or listed with a reason, and explain says which."""
    for name in NAMES + ["softmax_attention", "based"]:
        m = _load(name)
        text = explain_text(m)
        if "recurrent" in m.forms:
            assert "recurrent kernels:" in text and "recurrent" not in m.meta["not_emitted"]
        elif "recurrent" not in m.analysis.forms:  # not legal: the analysis says why, nothing to emit
            assert "recurrent" not in m.meta["not_emitted"] and m.analysis.reasons["recurrent"] in text
        else:
            why = m.meta["not_emitted"]["recurrent"]
            assert f"not emitted: recurrent -- {why}" in text and why


def test_one_token_call_takes_the_step_path(monkeypatch):
    """T = 1 without gradients: one forward launch, no autograd function, no checkpoints."""
    m = _load("gla")
    x = m.random_inputs(2, 1, 3, K=5, V=6, device=DEV)
    st = {"S": torch.randn(2, 3, 5, 6, device=DEV)}

    def refuse(*a, **k):
        raise AssertionError("the one-token call went through the training scan")

    monkeypatch.setattr(m._module._RecScan, "apply", refuse)
    with torch.no_grad():
        o, f = m(**x, initial_state=st, output_final_state=True, form="recurrent")
    o2, f2 = m.reference(**x, initial_state=st, output_final_state=True)
    assert _rel(o, o2) < 1e-5 and _rel(f["S"], f2["S"]) < 1e-5


def test_prefill_chunked_then_decode_gla():
    m = _load("gla")
    x = {k: v.to(DEV) for k, v in m.random_inputs(2, 9, 3, K=5, V=6, seed=3).items()}
    o_full, st_full = m.reference(**x, output_final_state=True)
    o_pre, st = m(**{k: v[:, :5] for k, v in x.items()}, output_final_state=True, form="chunked")
    dec = m.decoder(2, 3, device=DEV, K=5, V=6)
    dec.load_state(st)
    outs = [dec.step(**{k: v[:, t] for k, v in x.items()}).clone() for t in range(5, 9)]
    assert _rel(torch.cat([o_pre, torch.stack(outs, 1)], 1), o_full) < 1e-4
    assert _rel(dec.state["S"], st_full["S"]) < 1e-4
    dec.reset()
    assert dec.state["S"].abs().max() == 0


@pytest.mark.parametrize("name", ["linear_attention", "hgrn", "mamba", "gated_deltanet", "syn_transposed", "s4d",
                                  "h3"])
def test_decoder_steps_equal_the_sequence(name):
    m = _load(name)
    sizes = _sizes(m)
    x = {k: v.to(DEV) for k, v in m.random_inputs(2, 4, 3, **sizes).items()}
    dec = m.decoder(2, 3, device=DEV, **sizes)
    o_full, st_full = m.reference(**x, **dec.params, output_final_state=True)
    o = torch.stack([dec.step(**{k: v[:, t] for k, v in x.items()}).clone() for t in range(4)], 1)
    assert _rel(o, o_full) < 1e-4
    for k in st_full:
        assert _rel(dec.state[k], st_full[k]) < 1e-4


def test_decoder_errors_name_the_argument():
    m = _load("gla")
    with pytest.raises(ValueError, match="size K"):
        m.decoder(1, 2, V=4)
    dec = m.decoder(1, 2, K=4, V=4)
    with pytest.raises(ValueError, match="missing input 'g'"):
        dec.step(q=torch.zeros(1, 2, 4), k=torch.zeros(1, 2, 4), v=torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="no recurrent step kernel"):
        mixc.load(ROOT / "examples" / "softmax_attention.mix").decoder(1, 1, K=4, V=4)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decoder_cuda_graph_capture():
    m = _load("gla")
    dec = m.decoder(2, 4, device="cuda", K=64, V=64)
    x = {k: v[:, 0].cuda().contiguous() for k, v in m.random_inputs(2, 3, 4, K=64, V=64).items()}
    static = {k: v.clone() for k, v in x.items()}
    dec.step(**static)  # compile outside the capture
    dec.reset()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dec.step(**static)
    torch.cuda.current_stream().wait_stream(s)
    dec.reset()
    with torch.cuda.graph(g):
        out = dec.step(**static)
    dec.reset()
    ref = m.decoder(2, 4, device="cuda", K=64, V=64)
    for _ in range(3):
        g.replay()
        want = ref.step(**static)
        torch.testing.assert_close(out, want)


def test_decoder_half_inputs_fp32_state():
    """fp16 inputs and output, the state in fp32: the kernel converts the output as it stores it."""
    m = _load("gla")
    x = {k: v.to(DEV) for k, v in m.random_inputs(2, 3, 2, K=5, V=6, dtype=torch.float16).items()}
    dec = m.decoder(2, 2, device=DEV, dtype=torch.float16, K=5, V=6)
    o = torch.stack([dec.step(**{k: v[:, t] for k, v in x.items()}).clone() for t in range(3)], 1)
    assert o.dtype == torch.float16 and dec.state["S"].dtype == torch.float32
    assert _rel(o, m.reference(**{k: v.float() for k, v in x.items()})) < 2e-3


def test_decoder_replays_a_recorded_step():
    """A step that is one launch on views of its inputs is recorded once per input layout and replayed with
    the new inputs' pointers (the host fast path); a step with a temporary (hgrn's (1 - f) x), an epilogue
    (a gate, a skip) or aliased inputs is never replayed; every step equals the reference."""
    m = _load("gla")
    x = {k: v.to(DEV) for k, v in m.random_inputs(2, 5, 3, K=5, V=6, seed=4).items()}
    want = m.reference(**x)
    static = {k: v[:, 0].clone() for k, v in x.items()}
    dec = m.decoder(2, 3, device=DEV, K=5, V=6)
    outs = []
    for t in range(5):
        for k in static:
            static[k].copy_(x[k][:, t])
        outs.append(dec.step(**static).clone())
    assert len(dec._replays) == 1 and None not in dec._replays.values()
    assert _rel(torch.stack(outs, 1), want) < 1e-5
    dec.reset()  # new tensors of the same layout every step
    outs = [dec.step(**{k: v[:, t].clone() for k, v in x.items()}).clone() for t in range(5)]
    assert len(dec._replays) == 1 and _rel(torch.stack(outs, 1), want) < 1e-5
    dec = m.decoder(2, 3, device=DEV, K=5, V=6)  # q and k one tensor at the first step: not replayable
    xa = {**x, "k": x["q"]}
    outs = []
    for t in range(5):
        qt = xa["q"][:, t].clone()
        outs.append(dec.step(q=qt, k=qt, v=xa["v"][:, t].clone(), g=xa["g"][:, t].clone()).clone())
    assert _rel(torch.stack(outs, 1), m.reference(**xa)) < 1e-5
    assert list(dec._replays.values()) == [None]
    for name, sizes in (("hgrn", {"D": 7}), ("syn_elementwise", {"Dk": 5, "Dv": 6})):
        mm = _load(name)
        xx = {k: v.to(DEV) for k, v in mm.random_inputs(2, 3, 2, **sizes).items()}
        d = mm.decoder(2, 2, device=DEV, **sizes)
        o = torch.stack([d.step(**{k: v[:, t].clone() for k, v in xx.items()}).clone() for t in range(3)], 1)
        assert not any(d._replays.values()) and _rel(o, mm.reference(**xx, **d.params)) < 1e-4
