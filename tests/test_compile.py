"""`mixc compile` output is a standalone module: it runs where mixc cannot be imported and gives
the same numbers as ``mixc.load(...).reference`` (its default form on CPU tensors to 1e-12 in
float64; its Triton kernel forms, where it has any, to the kernels' 1e-3); its bytes are
deterministic; its header names the ``.mix`` source it came from."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixc

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # example -> sizes for its random inputs
    "gla": {"K": 8, "V": 16},
    "gated_deltanet": {"K": 8, "V": 16},
    "s4d": {"N": 16},
    "softmax_attention": {"K": 8, "V": 8},
}
B, T, H = 2, 24, 3

# Runs in a fresh interpreter (python -I: no cwd, no user site, no PYTHON* variables) with mixc
# made unimportable, loads the compiled module by path and compares with the saved results.
CHILD = r"""
import sys
sys.modules["mixc"] = None  # any `import mixc` now fails, even through the editable install
try:
    import mixc  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("mixc is importable in the child")

import importlib.util
import torch

module_path, data_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
spec = importlib.util.spec_from_file_location("compiled_mixer", module_path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert not any(name == "mixc" or name.startswith("mixc.") for name in sys.modules if sys.modules[name] is not None)

def rel(a, b):
    d = (a.to(b.dtype) - b).abs().norm().item()
    n = b.abs().norm().item()
    return d / n if n > 0 else d

if mode == "default":  # forward() as a user calls it: CPU tensors, no Triton interpreter -> reference
    forms, tol, dev = [None], 1e-12, "cpu"
else:  # every Triton kernel form, on CUDA or in the interpreter, at the kernels' fp32 tolerance
    forms, tol = [f for f in mod.FORMS if f in mod.KERNEL_FORMS], 1e-3
    dev = "cuda" if torch.cuda.is_available() else "cpu"
worst = 0.0
for form in forms:
    for i, case in enumerate(torch.load(data_path, weights_only=True)):
        kwargs = {k: (v.to(dev) if isinstance(v, torch.Tensor) and k != "cu_seqlens" else v)
                  for k, v in case["kwargs"].items()}
        if "initial_state" in kwargs:
            kwargs["initial_state"] = {k: v.to(dev) for k, v in kwargs["initial_state"].items()}
        ofs = case["state"] is not None  # (None: a packed call of an attention mixer, caches of ragged lengths)
        res = mod.forward(**kwargs, output_final_state=ofs, form=form)
        o, state = res if ofs else (res, {})
        assert o.shape == case["o"].shape, (form, i, o.shape)
        if form is None:
            assert o.dtype == case["o"].dtype, (i, o.dtype)
        worst = max(worst, rel(o.cpu(), case["o"]))
        assert sorted(state) == sorted(case["state"] or {}), (form, i, sorted(state), sorted(case["state"] or {}))
        for k, v in state.items():
            want = case["state"][k]
            assert v.shape == want.shape, (form, i, k, v.shape, want.shape)
            if form is None:
                assert v.dtype == want.dtype, (i, k, v.dtype, want.dtype)
            worst = max(worst, rel(v.cpu(), want))
print(f"forms {forms}: max rel err {worst:.3e}")
if not worst < tol:
    raise SystemExit(f"compiled module disagrees with the reference: rel err {worst:.3e} (tolerance {tol})")
"""


def _env(tmp_path, hashseed):
    env = dict(os.environ)
    env["MIXC_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONHASHSEED"] = str(hashseed)
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Each example compiled twice: by `python -m mixc compile` and by cli.main in another process
    with another hash seed. Returns {name: (first path, second path)}."""
    tmp = tmp_path_factory.mktemp("compiled")
    first = {n: tmp / f"{n}_a.py" for n in CASES}
    second = {n: tmp / f"{n}_b.py" for n in CASES}
    procs = [subprocess.Popen([sys.executable, "-m", "mixc", "compile", f"examples/{n}.mix", "-o", str(first[n])],
                              cwd=ROOT, env=_env(tmp, 0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in CASES]
    again = "from mixc.cli import main\n" + "".join(
        f"assert main(['compile', 'examples/{n}.mix', '-o', {str(second[n])!r}]) == 0\n" for n in CASES)
    procs.append(subprocess.Popen([sys.executable, "-c", again], cwd=ROOT, env=_env(tmp, 12345),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return {n: (first[n], second[n]) for n in CASES}


@pytest.mark.parametrize("name", CASES)
def test_deterministic(compiled, name, monkeypatch):
    a, b = compiled[name]
    assert a.read_bytes() == b.read_bytes()
    # and the same text as the module mixc itself runs for that file
    monkeypatch.chdir(ROOT)
    assert a.read_text() == mixc.load(f"examples/{name}.mix").source_code


@pytest.mark.parametrize("name", CASES)
def test_header_names_source(compiled, name):
    lines = compiled[name][0].read_text().splitlines()
    assert lines[0].startswith(f"# Generated by mixc {mixc.__version__} from examples/{name}.mix (mixer '{name}')")
    digest = hashlib.sha256((ROOT / "examples" / f"{name}.mix").read_text().encode()).hexdigest()
    assert lines[1] == f"# Source sha256: {digest}"


def _cases(m: mixc.Mixer, sizes: dict) -> list[dict]:
    """Calls to replay in the child: default parameters; explicit parameters with an initial state;
    packed sequences (cu_seqlens). Each with the reference's output and final state."""
    f64 = torch.float64
    calls = [m.random_inputs(B, T, H, dtype=f64, seed=0, **sizes)]
    x = m.random_inputs(B, T, H, dtype=f64, seed=1, **sizes)
    x.update(m.parameters_init(H, seed=1, dtype=f64, **sizes))
    gen = torch.Generator().manual_seed(2)
    bound = {**m.meta["sizes"], **m.meta["consts_as_sizes"], **sizes}
    init = {}
    for s, meta in m.meta["states"].items():
        shape = (B, H, *[bound[a] for a in meta["axes"]])
        init[s] = torch.randn(shape, generator=gen, dtype=torch.complex128 if meta["complex"] else f64)
    calls.append({**x, "initial_state": init})
    packed = m.random_inputs(1, T, H, dtype=f64, seed=3, **sizes)
    calls.append({**packed, "cu_seqlens": torch.tensor([0, 5, 6, 17, T])})
    out = []
    for kwargs in calls:  # (a key/value cache has one length per packed sequence: no final state there)
        cache = "cu_seqlens" in kwargs and any(a == "T@cache" for sm in m.meta["states"].values() for a in sm["axes"])
        res = m.reference(**kwargs, output_final_state=not cache)
        o, state = (res, None) if cache else res
        out.append({"kwargs": kwargs, "o": o, "state": state})
    return out


def _run_child(tmp_path, name, module, mode, env):
    m = mixc.load(ROOT / "examples" / f"{name}.mix")
    data = tmp_path / f"{name}.pt"
    torch.save(_cases(m, CASES[name]), data)
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    # python -I ignores PYTHON* variables, but TRITON_INTERPRET is read by the module itself
    return subprocess.run([sys.executable, "-I", str(child), str(module), str(data), mode], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", CASES)
def test_standalone_matches_reference(compiled, tmp_path, name):
    """forward() with its default form on CPU tensors runs the reference: equal to 1e-12 in float64."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = _run_child(tmp_path, name, compiled[name][0], "default", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max rel err" in r.stdout


KERNEL_CASES = [n for n in CASES if mixc.load(ROOT / "examples" / f"{n}.mix").forms != ["reference"]]


def test_some_compiled_cases_have_kernel_forms():
    assert KERNEL_CASES, "the standalone kernel-form test below would run nothing"


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_standalone_kernel_forms(compiled, tmp_path, name):
    """The Triton forms in the standalone module run without mixc and match the reference."""
    kernel_forms = [f for f in mixc.load(ROOT / "examples" / f"{name}.mix").forms if f != "reference"]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = _run_child(tmp_path, name, compiled[name][0], "kernels", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"forms {kernel_forms}: max rel err" in r.stdout
