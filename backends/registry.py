"""Which backend emits which form: the table the module assembler (``mixc/emit.py``) walks.

A form is a schedule of the one meaning a ``.mix`` file has (the reference). Each backend package
under ``backends/`` contributes one :class:`FormBackend`: the form it emits, a function from the
analysis to the form function's source lines (or the reason it cannot emit it), and the modules
whose source is pasted verbatim into the generated module (its kernels and their launch code).

The emitted form function is named after the form (``def chunked(...)``, ``def recurrent(...)``) and
has the signature every form shares::

    def <form>(inputs, params, states, sizes, output_final_state=False, cu_seqlens=None) -> (o, final)

``inputs`` are ``[B, T, H, ...]`` tensors, ``params`` ``[H, ...]``, ``states`` a dict of ``[B, H, ...]``
(absent: zero), ``sizes`` the bound sizes; ``final`` is a dict of states or None. Without
``native_varlen`` the runtime calls it once per packed sequence.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

KERNEL_FORMS = ("chunked", "recurrent", "fft", "attention")  # what the analysis can call legal
# Up to this many tokens a call with no form runs the recurrent form instead of the fft form: the fft form
# builds K from the parameters and runs its transforms on every call, a scan is one launch (decoding: T = 1).
# The crossover has not been measured on a GPU yet; 32 is the fft form's own switch to a Toeplitz product.
SHORT_T = 32

# Backend modules in the order they are tried; the first that emits a form provides it.
BACKEND_MODULES = (
    "mixc.backends.delta.emit",
    "mixc.backends.chunked.emit",
    "mixc.backends.fft.emit",
    "mixc.backends.recurrent.emit",
    "mixc.backends.attention",
)


@dataclass(frozen=True)
class FormBackend:
    form: str  # one of KERNEL_FORMS
    emit: Callable  # (Analysis) -> (list[str] | None, str): the form function's lines, or None and why not
    support: tuple[ModuleType, ...]  # modules pasted verbatim into the generated module, in this order
    native_varlen: bool = False  # the form function takes cu_seqlens itself
    describe: Callable | None = None  # (Analysis) -> list[str]: the plan lines `mixc explain` prints
    triton: bool = True  # its support runs Triton kernels (else plain PyTorch: any device, no interpreter)


@dataclass
class FormPlan:
    """What the assembler emits for one analysed program."""

    emitted: dict[str, tuple[FormBackend, list[str]]] = field(default_factory=dict)  # form -> backend, lines
    not_emitted: dict[str, str] = field(default_factory=dict)  # legal form -> why no backend emitted it
    default: str = "reference"
    default_reason: str = ""
    short_form: str | None = None  # the form a call with no form runs at T <= SHORT_T, when not the default
    short_reason: str = ""

    @property
    def forms(self) -> list[str]:
        """The forms the generated module runs, in the analysis's order, then ``reference``."""
        return [f for f in KERNEL_FORMS if f in self.emitted] + ["reference"]

    def support(self) -> list[ModuleType]:
        """The support modules of the emitted forms, each once, in table order."""
        out: list[ModuleType] = []
        for backend, _ in self.emitted.values():
            out += [m for m in backend.support if m not in out]
        return out


def backends() -> list[FormBackend]:
    return [importlib.import_module(name).BACKEND for name in BACKEND_MODULES]


def plan_forms(a) -> FormPlan:
    """Ask every backend for every form the analysis calls legal; pick the default among those emitted.

    The default follows the analysis's preference (``a.default_form`` first, then the analysis's
    order of legal forms); a preferred form that no backend emits is named with the reason."""
    plan = FormPlan()
    for backend in backends():
        if backend.form not in a.forms or backend.form in plan.emitted:
            continue
        lines, why = backend.emit(a)
        if lines is not None:
            plan.emitted[backend.form] = (backend, lines)
            plan.not_emitted.pop(backend.form, None)
        else:
            prev = plan.not_emitted.get(backend.form)
            plan.not_emitted[backend.form] = why if prev is None else f"{prev}; {why}"
    for f in a.forms:
        if f not in plan.emitted and f not in plan.not_emitted:
            plan.not_emitted[f] = "no backend emits this form yet"
    order = [a.default_form] + [f for f in a.forms if f != a.default_form]
    chosen = next((f for f in order if f in plan.emitted), "reference")
    if chosen == a.default_form:
        plan.default, plan.default_reason = chosen, a.reasons.get("default", "")
    else:
        skipped = [f for f in order[: order.index(chosen)] if f not in plan.emitted] if chosen in order else order
        plan.default = chosen
        plan.default_reason = "; ".join(f"{f} is legal but not emitted ({plan.not_emitted[f]})" for f in skipped)
        plan.default_reason += f"; so {chosen}" + ("" if chosen != "reference" else " (the plain-PyTorch meaning)")
    if plan.default == "fft" and "recurrent" in plan.emitted:
        plan.short_form = "recurrent"
        plan.short_reason = (f"recurrent at T <= {SHORT_T} (one scan launch; the fft form builds K and runs its "
                             "transforms on every call), fft above (crossover not yet measured on a GPU)")
    return plan
