"""The chunked backend's launcher (_Launch, also the delta rule's): Triton's dispatch the first time per
specialisation, the compiled handle after. Runs on the CPU with a stand-in for a jitted kernel (the real handle
exists only on a GPU, where the kernel tests run through it)."""

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mixc.backends.chunked import kernels_bwd, kernels_fwd, power, sequential
from mixc.backends.chunked import launcher as C
from mixc.backends.delta import bwd as delta_bwd
from mixc.backends.delta import fwd as delta_fwd


class FakeJit:
    """Records what Triton's dispatch would be asked; returns a handle recording direct launches."""

    def __init__(self, params, returns_handle=True):
        self.params = [SimpleNamespace(name=n, is_constexpr=c, default=d) for n, c, d in params]
        self.compiles, self.direct = [], []
        self.returns_handle = returns_handle
        self.__name__ = "fake_kernel"

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiles.append((grid, args, kwargs))
            if not self.returns_handle:
                return None
            fake = self

            class Handle:  # as Triton's compiled kernel: it reads all three grid sizes
                def __getitem__(self, g):
                    return lambda *a: fake.direct.append(((g[0], g[1], g[2]), a))
            return Handle()
        return run


PARAMS = [("x", False, None), ("n", False, None), ("BLOCK", True, None), ("FLAG", True, False)]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(C, "FAST_LAUNCH", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_second_launch_goes_straight_to_the_handle_with_every_parameter_in_order(fast):
    fn = FakeJit(PARAMS)
    k = C._Launch(fn)
    x = torch.zeros(8)
    k[(3, 1)](x, 32, BLOCK=16, num_warps=4)
    assert len(fn.compiles) == 1 and not fn.direct
    y = torch.ones(8)  # another tensor, same specialisation
    k[(5, 2)](y, 48, BLOCK=16, num_warps=4)
    assert len(fn.compiles) == 1
    assert fn.direct == [((5, 2, 1), (y, 48, 16, False))]  # FLAG's default filled in, num_warps is no parameter
    k[(7,)](y, 48, BLOCK=16, num_warps=4)  # a one-dimensional grid
    assert fn.direct[-1] == ((7, 1, 1), (y, 48, 16, False))


@pytest.mark.parametrize("change", ["dtype", "alignment", "int_one", "int_not_16", "int_64bit", "constexpr",
                                    "warps", "device"])
def test_each_specialisation_compiles_through_triton(fast, change, monkeypatch):
    fn = FakeJit(PARAMS)
    k = C._Launch(fn)
    x = torch.zeros(64)
    k[(1,)](x, 32, BLOCK=16, num_warps=4)
    args, kw = [x, 32], {"BLOCK": 16, "num_warps": 4}
    if change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "alignment":
        args[0] = x[1:]  # 4 bytes past an aligned address
    elif change == "int_one":
        args[1] = 1
    elif change == "int_not_16":
        args[1] = 33
    elif change == "int_64bit":
        args[1] = 2 ** 32
    elif change == "constexpr":
        kw["BLOCK"] = 32
    elif change == "warps":
        kw["num_warps"] = 8
    else:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    k[(1,)](*args, **kw)
    assert len(fn.compiles) == 2 and not fn.direct
    k[(1,)](*args, **kw)  # and that specialisation is cached in turn
    assert len(fn.compiles) == 2 and len(fn.direct) == 1


def test_a_runtime_argument_passed_by_keyword_is_never_cached(fast):
    fn = FakeJit(PARAMS)
    k = C._Launch(fn)
    x = torch.zeros(8)
    for _ in range(2):
        k[(1,)](x, n=32, BLOCK=16)
    assert len(fn.compiles) == 2 and not fn.direct


def test_no_handle_means_every_launch_goes_through_triton(fast):
    fn = FakeJit(PARAMS, returns_handle=False)
    k = C._Launch(fn)
    for _ in range(3):
        k[(1,)](torch.zeros(8), 32, BLOCK=16)
    assert len(fn.compiles) == 3


def test_without_the_fast_path_every_launch_goes_through_triton(monkeypatch):
    monkeypatch.setattr(C, "FAST_LAUNCH", False)
    fn = FakeJit(PARAMS)
    k = C._Launch(fn)
    for _ in range(3):
        k[(1,)](torch.zeros(8), 32, BLOCK=16)
    assert len(fn.compiles) == 3 and not fn.direct


def test_every_kernel_of_the_backend_is_launched_through_it():
    for mod in (kernels_fwd, kernels_bwd, sequential, power):
        names = [n for n in vars(mod) if n.endswith("_kernel")]
        assert names and all(isinstance(getattr(mod, n), C._Launch) for n in names), mod.__name__


def test_a_constexpr_passed_by_position_is_never_cached(fast):
    """Its value is not in the key (an int's key is only its class: 1, a multiple of 16, 32-bit), so a second
    value of the same class would reuse the first one's compiled kernel: such launches always go through Triton."""
    fn = FakeJit(PARAMS)
    k = C._Launch(fn)
    x = torch.zeros(8)
    k[(1,)](x, 32, 16)
    k[(1,)](x, 32, 32)
    assert len(fn.compiles) == 2 and not fn.direct


def test_every_delta_kernel_is_launched_through_it():
    for mod in (delta_fwd, delta_bwd):
        names = [n for n in vars(mod) if n.endswith("_kernel")]
        assert len(names) >= 3 and all(isinstance(getattr(mod, n), C._Launch) for n in names), mod.__name__


def _check_conventions(m, monkeypatch):
    """Route every launch of mixer ``m``'s module through the fast launcher (on a CPU with a stand-in device
    index), asserting that its positional arguments are exactly the kernel's runtime parameters and every
    constexpr is named; returns (device, the set of kernel names launched so far)."""
    mod = m._module
    seen = set()
    orig = mod._Launch._run

    def run(self, grid, args, kwargs):
        f = self.fn
        while hasattr(f, "fn"):  # (the interpreter's function has no .params: read the annotations)
            f = f.fn
        params = [(n, "constexpr" in str(p.annotation)) for n, p in inspect.signature(f).parameters.items()]
        assert [c for _, c in params[:len(args)]] == [False] * len(args), self.__name__
        assert all(c for _, c in params[len(args):]), self.__name__
        assert set(kwargs) <= {n for n, _ in params} | {"num_warps", "num_stages"}, self.__name__
        seen.add(self.__name__)
        return orig(self, grid, args, kwargs)

    monkeypatch.setattr(mod._Launch, "_run", run)
    monkeypatch.setattr(mod, "FAST_LAUNCH", True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":  # (the interpreter: no device to ask)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return dev, seen


def test_the_delta_launches_pass_runtime_arguments_by_position_and_constexprs_by_keyword(monkeypatch):
    """Every launch of a forward and backward (gated, with states and per-token scales) can take the compiled
    handle: its positional arguments are exactly the kernel's runtime parameters and every constexpr is named."""
    import mixc

    m = mixc.load(Path(__file__).resolve().parents[1] / "examples" / "gated_deltanet.mix")
    dev, seen = _check_conventions(m, monkeypatch)
    x = {k: v.to(dev).requires_grad_() for k, v in m.random_inputs(1, 70, 2, seed=0, K=8, V=8).items()}
    s0 = {"S": torch.randn(1, 2, 8, 8, device=dev, requires_grad=True)}
    o, fin = m(**x, initial_state=s0, output_final_state=True, form="chunked")
    (o.square().sum() + fin["S"].square().sum()).backward()
    assert seen == {n for md in (delta_fwd, delta_bwd) for n in vars(md) if n.endswith("_kernel")}


@pytest.mark.parametrize("name,sizes", [("mamba", {"P": 4, "N": 3}), ("hgrn", {"D": 8}), ("gla", {"K": 8, "V": 8}),
                                        ("s4d", {"N": 16})])
def test_the_recurrent_launches_pass_runtime_arguments_by_position_and_constexprs_by_keyword(name, sizes,
                                                                                            monkeypatch):
    """The recurrent form's launcher is the chunked one's (_Launch) plus step recording: every launch of a
    forward, a backward and a decoder step can take the compiled handle (the replay of a recorded step needs
    it), so runtime arguments go by position and constexprs by keyword."""
    import mixc

    m = mixc.load(Path(__file__).resolve().parents[1] / "examples" / f"{name}.mix")
    assert issubclass(m._module._RecLaunch, m._module._Launch)
    dev, seen = _check_conventions(m, monkeypatch)
    x = {k: v.to(dev).requires_grad_() for k, v in m.random_inputs(1, 40, 2, seed=0, **sizes).items()}
    m(**x, form="recurrent").square().sum().backward()
    dec = m.decoder(1, 2, device=dev, **sizes)
    with torch.no_grad():
        dec.step(**{k: v[:, 0] for k, v in x.items()})
    assert seen, "no launch went through the launcher"
