"""Golden outputs: the reference meaning of every example must not drift.

Regenerate with ``python tests/golden/regen.py`` (only for an intended change of meaning).
"""

from pathlib import Path

import pytest
import torch

import mixc

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(p.stem for p in (ROOT / "examples").glob("*.mix"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().norm() / b.abs().norm().clamp_min(1e-300))


def test_every_example_has_a_golden_file():
    stored = sorted(p.stem for p in (ROOT / "tests" / "golden").glob("*.pt"))
    assert stored == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_golden(name):
    g = torch.load(ROOT / "tests" / "golden" / f"{name}.pt")
    m = mixc.load(ROOT / "examples" / f"{name}.mix", **g["consts"])
    o, final = m.reference(**g["inputs"], **g["params"], initial_state=g["initial_state"], output_final_state=True)
    assert o.dtype == torch.float64 and o.shape == g["output"].shape
    assert rel(o, g["output"]) < 1e-12
    cache = {k for k, sm in m.meta["states"].items() if "T@cache" in sm["axes"]}  # attention: the key/value cache
    assert sorted(set(final) - cache) == sorted(set(g["final_state"]) - cache)
    for k in final:
        if k in cache and k not in g["final_state"]:  # (stored before the cache was a state) the inputs' last keys
            x = g["inputs"][k].transpose(1, 2)
            assert torch.equal(final[k], x[:, :, x.shape[2] - final[k].shape[2]:])
        else:
            assert rel(final[k], g["final_state"][k]) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_golden_default_parameters(name):
    """The seeded initialisers are part of the meaning: parameters_init must not drift either."""
    g = torch.load(ROOT / "tests" / "golden" / f"{name}.pt")
    m = mixc.load(ROOT / "examples" / f"{name}.mix", **g["consts"])
    H = next(iter(g["inputs"].values())).shape[2]
    bound = {}
    for pname, pm in {**m.meta["params"], **m.meta["buffers"]}.items():
        for i, a in enumerate(pm["axes"]):
            bound[a] = g["params"][pname].shape[1 + i]
    sizes = {k: v for k, v in bound.items() if k in m.meta["sizes"]}
    fresh = m.parameters_init(H, dtype=torch.float64, **sizes)
    assert sorted(fresh) == sorted(g["params"])
    for k in fresh:
        torch.testing.assert_close(fresh[k], g["params"][k], rtol=0, atol=0)


def test_golden_detects_drift():
    """The comparison is sharp enough to catch a small change of meaning."""
    g = torch.load(ROOT / "tests" / "golden" / "gla.pt")
    m = mixc.load(ROOT / "examples" / "gla.mix")
    inputs = dict(g["inputs"])
    inputs["g"] = inputs["g"] * (1 + 1e-6)
    o = m.reference(**inputs, initial_state=g["initial_state"])
    assert rel(o, g["output"]) > 1e-12
