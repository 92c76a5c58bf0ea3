"""The form table (backends/registry.py): what each backend pastes into a generated module must not
collide with another's, and the default that runs is always an emitted form, with its reason."""

import ast
import inspect

import pytest
import torch

import mixc
from mixc.backends.registry import KERNEL_FORMS, SHORT_T, backends

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# names the generated module itself defines (mixc/emit.py)
RESERVED = ("reference", "forward", "pick_form", "MIXER", "FORMS", "KERNEL_FORMS", "TRITON_FORMS", "TRITON_INTERPRETED",
            "_os", "init_params")


def _top_level_names(mod) -> set[str]:
    names = set()
    for node in ast.parse(inspect.getsource(mod)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_support_modules_define_disjoint_names():
    """Two backends' pasted modules share one namespace in a generated module: no top-level name twice,
    and none named like a form function."""
    seen: dict[str, str] = {}
    mods = {m for b in backends() for m in b.support}
    for mod in sorted(mods, key=lambda m: m.__name__):
        for name in _top_level_names(mod):
            assert name not in KERNEL_FORMS and name not in RESERVED, \
                f"{mod.__name__} defines {name}, a name the generated module uses"
            assert name not in seen, f"{name} is defined in both {seen[name]} and {mod.__name__}"
            seen[name] = mod.__name__


def test_every_backend_names_a_kernel_form():
    for b in backends():
        assert b.form in KERNEL_FORMS


@pytest.mark.parametrize("name", ["gla", "hgrn", "softmax_attention"])
def test_default_is_emitted_and_explained(name):
    m = mixc.load(f"examples/{name}.mix")
    assert m.meta["default_form"] in m.forms
    if m.meta["default_form"] != m.analysis.default_form:
        assert m.analysis.default_form in m.meta["not_emitted"]
        assert "not emitted" in m.meta["default_reason"]


def test_short_sequences_run_the_recurrent_form_where_fft_is_the_default():
    """A time-invariant file with both forms: a call with no form scans short sequences (decoding) and
    convolves long ones; explain and the metadata say so."""
    m = mixc.load("examples/s4d.mix", N=4)
    assert m.meta["default_form"] == "fft" and m.meta["short_sequences"] == {"form": "recurrent", "max_T": SHORT_T}
    for T, form in ((1, "recurrent"), (SHORT_T, "recurrent"), (SHORT_T + 5, "fft")):
        x = m.random_inputs(1, T, 2, device=DEV)
        assert torch.equal(m(**x), m(**x, form=form)), (T, form)
    assert mixc.load("examples/gla.mix").meta["short_sequences"] is None
