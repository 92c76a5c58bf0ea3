"""The chunked backend's launcher (_Launch): Triton's dispatch the first time per specialisation, the
compiled handle after. Runs on the CPU with a stand-in for a jitted kernel (the real handle exists only
on a GPU, where the kernel tests run through it)."""

from types import SimpleNamespace

import pytest
import torch

from mixc.backends.chunked import kernels_bwd, kernels_fwd, power, sequential
from mixc.backends.chunked import launcher as C


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
