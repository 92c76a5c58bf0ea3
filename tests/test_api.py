"""The Python surface: load/loads, calling, parameters, nn.Module, and call-time errors that name the argument."""

from pathlib import Path

import pytest
import torch

import mixc

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"


@pytest.fixture(scope="module")
def gla():
    return mixc.load(EX / "gla.mix")


@pytest.fixture(scope="module")
def mamba2():
    return mixc.load(EX / "mamba2.mix")


def test_call_runs_the_default_form(gla):
    """m(...) runs the analysis's default form where its kernels can run (here: the interpreter)."""
    x = gla.random_inputs(2, 7, 3, K=4, V=5, seed=1)
    torch.testing.assert_close(gla(**x, form="reference"), gla.reference(**x), rtol=0, atol=0)
    torch.testing.assert_close(gla(**x), gla.reference(**x), rtol=1e-4, atol=1e-5)
    assert gla.forms == ["chunked", "recurrent", "reference"] and gla.meta["default_form"] == "chunked"


def test_final_state_and_layouts(gla):
    x = gla.random_inputs(2, 7, 3, K=4, V=5)
    o, st = gla(**x, output_final_state=True)
    assert o.shape == (2, 7, 3, 5) and st["S"].shape == (2, 3, 4, 5)
    assert isinstance(gla(**x, output_final_state=False), torch.Tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_output_dtype_follows_the_inputs(gla, dtype):
    x = gla.random_inputs(1, 5, 2, K=4, V=3, dtype=dtype)
    o = gla(**x)
    assert o.dtype == dtype
    ref = gla(**{k: v.double() for k, v in x.items()})
    err = (o.double() - ref).norm() / ref.norm()
    assert err < (2e-3 if dtype == torch.float16 else 1e-6)


def test_parameters_default_and_override(mamba2):
    p = mamba2.parameters_init(4, seed=0)
    assert set(p) == {"A", "D"} and p["A"].shape == (4,)
    assert bool((p["A"] < -0.99).all() and (p["A"] > -16.01).all())
    torch.testing.assert_close(p["D"], torch.ones(4))
    torch.testing.assert_close(mamba2.parameters_init(4, seed=0)["A"], p["A"], rtol=0, atol=0)
    assert not torch.equal(mamba2.parameters_init(4, seed=1)["A"], p["A"])
    x = mamba2.random_inputs(1, 6, 4, N=3, P=2)
    base = mamba2(**x)
    torch.testing.assert_close(mamba2(**x, **p), base)
    assert not torch.allclose(mamba2(**x, A=p["A"] * 2, D=p["D"]), base)


def test_module_holds_learnable_parameters_and_buffers(mamba2):
    mod = mamba2.module(num_heads=3)
    assert isinstance(mod, torch.nn.Module)
    assert sorted(n for n, _ in mod.named_parameters()) == ["A", "D"]
    x = mamba2.random_inputs(2, 5, 3, N=4, P=2)
    o = mod(**x)
    o.square().sum().backward()
    assert mod.A.grad is not None and mod.D.grad is not None and bool(mod.A.grad.abs().sum() > 0)
    retnet = mixc.load(EX / "retnet.mix").module(num_heads=4)
    assert [n for n, _ in retnet.named_buffers()] == ["gamma"]
    assert list(retnet.parameters()) == []
    torch.testing.assert_close(retnet.gamma, 1 - 2.0 ** (-5 - torch.arange(4.0)))


def test_gradients_reach_inputs_and_initial_state(gla):
    x = {k: v.double().requires_grad_() for k, v in gla.random_inputs(1, 4, 2, K=3, V=2).items()}
    s0 = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    o, st = gla(**x, initial_state={"S": s0}, output_final_state=True)
    (o.sum() + st["S"].sum()).backward()
    assert all(v.grad is not None for v in x.values()) and s0.grad is not None


def test_load_overrides_constants():
    a = mixc.load(EX / "sliding_window_attention.mix", W=2)
    b = mixc.load(EX / "sliding_window_attention.mix")
    assert a.meta["consts"]["W"] == 2 and b.meta["consts"]["W"] == 256
    x = a.random_inputs(1, 6, 1, K=4, V=4)
    assert not torch.allclose(a(**x), b(**x))


def test_load_unknown_constant_is_a_located_error():
    with pytest.raises(mixc.MixError) as e:
        mixc.load(EX / "gla.mix", Q=3)
    assert "unknown constant 'Q'" in str(e.value) and "gla.mix" in str(e.value)


def test_loads_and_name():
    m = mixc.loads("size D\ninput x[D]\nstate h[D]\nh[d] = 0.5 * h[d] + x[d]\nout o[d] = h[d]\n", "toy.mix")
    assert m.name == "toy"
    x = torch.ones(1, 3, 1, 2)
    torch.testing.assert_close(m(x=x)[0, :, 0, 0], torch.tensor([1.0, 1.5, 1.75]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"q": None}, "missing input 'q'"),
        ({"extra": torch.zeros(1)}, "unexpected argument 'extra'"),
        ({"v": torch.zeros(2, 5, 3)}, "input 'v' must have shape \\[B, T, H, V\\]"),
        ({"k": torch.zeros(2, 5, 3, 7)}, "size K disagrees"),
        ({"g": torch.zeros(2, 5, 4, 4)}, "input 'g' has H=4"),
        ({"v": torch.zeros(2, 5, 3, 6, dtype=torch.float64)}, "input 'v' is torch.float64"),
        ({"v": torch.zeros(2, 5, 3, 6, dtype=torch.int64)}, "floating-point"),
    ],
)
def test_call_errors_name_the_argument(gla, kwargs, match):
    x = gla.random_inputs(2, 5, 3, K=4, V=6)
    x.update(kwargs)
    x = {k: v for k, v in x.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        gla(**x)


def test_state_and_varlen_errors(gla):
    x = gla.random_inputs(2, 5, 3, K=4, V=6)
    with pytest.raises(ValueError, match="initial_state has 'T'"):
        gla(**x, initial_state={"T": torch.zeros(1)})
    with pytest.raises(ValueError, match="initial_state 'S' must have shape \\[B, H, K, V\\]"):
        gla(**x, initial_state={"S": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match="size V disagrees: initial_state 'S' .* has V=5, but input 'v'"):
        gla(**x, initial_state={"S": torch.zeros(2, 3, 4, 5)})
    with pytest.raises(ValueError, match="B must be 1"):
        gla(**x, cu_seqlens=torch.tensor([0, 5]))
    y = gla.random_inputs(1, 5, 3, K=4, V=6)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        gla(**y, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="form 'fft' is not available"):
        gla(**y, form="fft")
    with pytest.raises(ValueError, match="unknown form"):
        gla(**y, form="fast")


def test_parameter_shape_errors(mamba2):
    x = mamba2.random_inputs(1, 4, 3, N=2, P=2)
    with pytest.raises(ValueError, match="parameter 'A' has H=2"):
        mamba2(**x, A=torch.zeros(2))
    with pytest.raises(ValueError, match="parameter 'D' must have shape \\[H\\]"):
        mamba2(**x, D=torch.zeros(3, 1))


def test_unbound_size_is_named():
    m = mixc.loads("size N\ninput x[]\nparam a[N] = 0.5\nstate h[N]\nh[n] = a[n] * h[n] + x\n"
                   "out y = sum(n: h[n])\n", "nosize.mix")
    with pytest.raises(ValueError, match="size N .* is not bound"):
        m(x=torch.zeros(1, 3, 1))
    assert m(x=torch.zeros(1, 3, 1), a=torch.full((1, 5), 0.5)).shape == (1, 3, 1)
    assert mixc.loads(m.program.source.text, "nosize.mix", N=7).parameters_init(2)["a"].shape == (2, 7)


def test_generated_source_is_deterministic_and_names_its_source():
    a = mixc.load(EX / "h3.mix").source_code
    b = mixc.load(EX / "h3.mix").source_code
    assert a == b
    assert "from " + str(EX / "h3.mix") in a.splitlines()[0]


def test_a_repeated_call_signature_binds_as_the_checked_path(mamba2):
    """bind_call remembers a checked signature (names, shapes, dtypes, devices) and gives the same
    binding without the checks; the tensors bound are always the call's own."""
    rt = mamba2._module
    x = mamba2.random_inputs(2, 5, 3, N=4, P=6)
    A = torch.full((3,), -0.5)
    rt._BOUND.clear()
    first = rt.bind_call(rt.MIXER, {**x, "A": A}, None, None, rt.init_params)
    assert len(rt._BOUND) == 1
    y = {k: v + 1 for k, v in x.items()}
    A2 = A * 2
    again = rt.bind_call(rt.MIXER, {**y, "A": A2}, None, None, rt.init_params)
    checked = rt._bind_checked(rt.MIXER, {**y, "A": A2}, None, None, rt.init_params)
    assert len(rt._BOUND) == 1
    assert list(again[1]) == list(checked[1]) == list(first[1])  # parameters, in the same order
    assert again[1]["A"] is A2 and again[1]["D"] is checked[1]["D"]  # the call's A, the default D
    assert again[0]["x"] is y["x"] and again[3:] == checked[3:]
    s0 = {"h": torch.zeros(2, 3, 4, 6)}
    with_state = rt.bind_call(rt.MIXER, y, s0, None, rt.init_params)
    assert with_state[2]["h"] is s0["h"] and len(rt._BOUND) == 2


def test_errors_are_raised_after_a_remembered_signature(mamba2):
    x = mamba2.random_inputs(1, 4, 3, N=2, P=2)
    mamba2(**x)
    with pytest.raises(ValueError, match="parameter 'A' has H=2"):
        mamba2(**x, A=torch.zeros(2))
    with pytest.raises(ValueError, match="initial_state 'h' must have shape"):
        mamba2(**x, initial_state={"h": torch.zeros(1, 3, 2)})
    bad = {**x, "B": x["B"][..., :1]}
    with pytest.raises(ValueError, match="size N disagrees"):
        mamba2(**bad)
    mamba2(**x)


# ---- issue 17: hardening -----------------------------------------------------------------------------


def test_initial_state_must_be_a_dict(gla):
    x = gla.random_inputs(1, 3, 2, K=4, V=5)
    with pytest.raises(ValueError, match=r"initial_state must be a dict .*\(S\).*got Tensor"):
        gla(**x, initial_state=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="initial_state must be a dict"):
        gla.reference(**x, initial_state=[torch.zeros(1, 2, 4, 5)])


def test_a_mixer_module_deep_copies_and_saves(tmp_path):
    import copy
    import pickle

    m = mixc.load(EX / "mamba2.mix", N=4)
    layer = m.module(2, P=3)
    with torch.no_grad():
        layer.A.add_(0.25)  # a trained value, not the default
    x = m.random_inputs(1, 5, 2, P=3)
    want = layer(**x)
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(**x), want, rtol=0, atol=0)
    assert twin.A is not layer.A
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    torch.testing.assert_close(loaded(**x), want, rtol=0, atol=0)
    assert loaded.mixer.program.sizes == m.program.sizes and loaded.mixer.name == "mamba2"
    again = pickle.loads(pickle.dumps(m))
    assert again.source_code == m.source_code


def test_torch_compile_fullgraph_with_default_parameters():
    """The file's default parameters are made when the call is traced (a random initialiser's torch.Generator
    cannot be), with the default inductor backend."""
    m = mixc.load(EX / "mamba2.mix", N=4)
    x = m.random_inputs(1, 5, 2, P=3, seed=3)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(**x, form="reference"), m.reference(**x))


def test_initialisers_see_the_number_of_heads():
    """ALiBi's slopes 2 ** (-8 (h + 1) / H)."""
    src = ("size V = 2\ninput k[], v[V]\nbuffer slope[] = 2 ** (-8 * (head + 1) / H)\n"
           "out o[j] = sum(u: exp(slope * (u - t)) * v[u, j])\n")
    m = mixc.loads(src, path="alibi.mix")
    for H in (1, 4):
        slope = m.parameters_init(H)["slope"]
        torch.testing.assert_close(slope, torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)]))
        x = m.random_inputs(1, 3, H)
        assert m(**x).shape == (1, 3, H, 2)


def test_triton_interpret_set_after_loading(monkeypatch):
    """Kernels built for a GPU (TRITON_INTERPRET unset when the module was imported) do not run on the CPU even
    when the variable is set later: form=None runs the reference, an explicit form says why not."""
    from mixc import emit

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(emit, "_loaded", {})
    m = mixc.load(EX / "gla.mix")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = m.random_inputs(1, 4, 1, K=4, V=4)
    torch.testing.assert_close(m(**x), m.reference(**x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set after this mixer's kernels were built"):
        m(**x, form="chunked")
