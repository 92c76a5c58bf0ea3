"""Emit the chunked form of a delta-rule recurrence (transition classes ``delta`` and ``gated_delta``).

The analysis writes the update of the main state as ``S_t = c_t S_{t-1} - c_t a_t (b_t^T S_{t-1}) +
k'_t v'_t^T`` (a diagonal term with the scalar coefficient c_t, one rank-one correction, one outer-product
input). :func:`plan` reads those terms, never a mechanism's name:

* the correction's factors over the update's key index are ``a`` and those over the summed index are
  ``b``; the factors of c_t are divided out; the remaining per-token scalars (deltanet's beta) join ``b``;
* the input's factors over the key index must be the same vector ``a`` (so ``a u^T`` with the pseudo-value
  ``u = v - c b^T S`` is one rank-one update); its other factors form the kernels' value;
* ``log c_t`` is the gate g (none when c = 1).

The readout (q', an output gate, a skip) is read as :mod:`mixc.backends.chunked.plan` reads it. The
form calls :func:`mixc.backends.delta.kernels.delta_chunk` (an autograd.Function; under torch.compile a torch
operator).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.analysis import Analysis, StateForm, Term, _flatten_mul, product, show
from mixc.ir import T_VAR, Node, Var
from mixc.lower import make, rename

from .. import custom_op, hostint
from ..chunked import launcher
from ..chunked.emit_tensors import _as_btd, _feature_emitter, _is_number
from ..chunked.plan import NoChunkedForm, _const, _log_decay, _readout_of, _readout_parts, _rename_terms, _signed
from ..reference import prologue
from . import bwd, fwd, kernels


@dataclass
class DeltaPlan:
    state: str  # the main state
    transposed: bool  # declared [value, key] rather than [key, value]
    key: Var  # the update's index over the key axis
    value: Var  # ... over the value axis
    q: Node  # q'_t[key]
    a: Node  # a_t[key]: the correction's left factor and the input's key
    b: Node  # b_t[key]: the correction's right factor (with its per-token scalars)
    v: Node  # the kernels' value v_t[value] (the input's factors other than a)
    bs: Node | None  # b's per-token scalar factors (deltanet's beta), applied by the kernels as they load b
    vs: Node | None  # v's per-token scalar factors, likewise
    g: Node | None  # log c_t (a per-token scalar), None when c = 1
    gate: Node | None  # output gate over the value axis
    skip: Node | None  # state-free part of the output


def _remove(factors: list[Node], drop: list[Node]) -> list[Node] | None:
    """``factors`` less one occurrence of each of ``drop`` (None when one is missing)."""
    out = list(factors)
    for f in drop:
        if f not in out:
            return None
        out.remove(f)
    return out


def _same(xs: list[Node], ys: list[Node]) -> bool:
    return len(xs) == len(ys) and _remove(xs, ys) == []


def plan(a: Analysis) -> DeltaPlan:
    """The delta-rule chunked plan of an analysed recurrence (raises NoChunkedForm with the reason)."""
    from mixc.history import token_history

    p = a.program
    if "chunked" not in a.forms:
        raise NoChunkedForm(a.reasons.get("chunked", "not chunkable"))
    if a.kind != "recurrence" or a.transition not in ("delta", "gated_delta"):
        raise NoChunkedForm(f"the {a.transition} transition is not a delta rule (this backend's class)")
    if token_history(p):
        raise NoChunkedForm("reads of past tokens are not supported by the chunked delta-rule form")
    main: StateForm = max(a.states, key=lambda s: (len(s.axes), s.normaliser_of is None))
    others = [s for s in a.states if s is not main]
    if others:
        raise NoChunkedForm(f"a delta-rule state beside other states ({', '.join(s.name for s in others)})")
    key = main.key_axis
    value = next(v for v in main.axes if v != key)
    transposed = main.axes.index(key) == 1
    diag = [t for t in main.linear if not t.summed]
    corr = [t for t in main.linear if t.summed]
    if len(diag) != 1 or len(corr) != 1 or diag[0].sign < 0:
        raise NoChunkedForm("the update is not c S - c a (b^T S) with one rank-one correction")
    (d,), (r,) = diag, corr
    (l,) = r.summed
    read = tuple(r.state.arg[1])
    if read[main.axes.index(key)] != l or read[main.axes.index(value)] != value:
        raise NoChunkedForm("the rank-one correction does not act along the key axis")
    rest = _remove(r.factors, d.factors)
    if rest is None:
        raise NoChunkedForm("the correction is not scaled by the state's own decay c_t")
    a_side = [f for f in rest if key in f.idx]
    b_side = [f for f in rest if l in f.idx]
    scal = [f for f in rest if key not in f.idx and l not in f.idx]
    if any(l in f.idx for f in a_side) or any(value in f.idx for f in rest) or not a_side or not b_side:
        raise NoChunkedForm(f"the correction {r.show()} is not a (b^T S) with a, b over the key axis")
    # the input k' v'^T: its key factors must be a
    if len(main.inputs) != 1:
        raise NoChunkedForm("the input is not one outer product")
    inp: Term = main.inputs[0]
    kf = [f for f in inp.factors if key in f.idx]
    vf = [f for f in inp.factors if key not in f.idx]
    if any(value in f.idx for f in kf):
        raise NoChunkedForm("the input term is not an outer product")
    if not _same(kf, a_side):
        raise NoChunkedForm(f"the input's key ({' * '.join(show(f) for f in kf)}) is not the correction's left "
                            f"factor ({' * '.join(show(f) for f in a_side)}): no single rank-one update per token")
    a_node = product(a_side)
    # A = c (I - a b^T): the correction's sign is -; per-token scalars go to the kernels as scales
    bsc, brest = _token_scalars(b_side + scal)
    b_node = rename(_signed(brest, -r.sign), {l: key})
    vsc, vrest = _token_scalars(vf)
    if not any(value in f.idx for f in vrest):
        vsc, vrest = [], vf
    v_node = _signed(vrest, inp.sign)
    g = _log_decay(d.factors) if d.factors else None
    if g is not None and set(g.idx) - {T_VAR}:
        raise NoChunkedForm(f"the decay {show(g)} is not one scalar per token")
    # readout
    rd = _readout_of(a)
    out_vars = p.output.vars
    if len(out_vars) != 1 or out_vars[0].axis != value.axis:
        raise NoChunkedForm("the output is not indexed by the state's value axis")
    if rd.ratio is not None:
        raise NoChunkedForm("a normalised readout of a delta-rule state")
    outmap = {out_vars[0]: value}
    q_node, gate = _readout_parts(_rename_terms(rd.terms, outmap), main.name, key, value, tuple(main.axes))
    skip = None
    if rd.skip:
        parts = [rename(_signed(t.factors, t.sign), outmap) for t in rd.skip]
        skip = parts[0]
        for x in parts[1:]:
            skip = make("add", (skip, x), None)
    if any(n.dtype == "complex" for n in (q_node, a_node, b_node, v_node)):
        raise NoChunkedForm("complex-valued recurrences have no chunked kernel")
    return DeltaPlan(main.name, transposed, key, value, q_node, a_node, b_node, v_node, product(bsc) if bsc else None,
                     product(vsc) if vsc else None, g, gate, skip)


def _token_scalars(factors: list[Node]) -> tuple[list[Node], list[Node]]:
    """(the factors that vary with the token only, the others)."""
    scal = [f for f in factors if set(f.idx) == {T_VAR}]
    return scal, [f for f in factors if set(f.idx) != {T_VAR}]


def emit_delta(a: Analysis, dp: DeltaPlan) -> list[str]:
    """Lines of ``chunked(inputs, params, states, sizes, output_final_state, cu_seqlens)``."""
    p = a.program
    lines = ["def chunked(inputs, params, states, sizes, output_final_state=False, cu_seqlens=None):",
             f'    """The chunked form of {p.name}: q\', a, b, v and the log gate in PyTorch, then the chunked delta '
             f"rule\n    (UT transform per 64-token chunk) for the {a.transition} recurrence of state {dp.state}."
             '"""']
    extra = [n for n in (dp.q, dp.a, dp.b, dp.v, dp.bs, dp.vs, dp.g, dp.gate, dp.skip) if n is not None]
    em = prologue(p, lines, extra)  # the gate and the epilogue: in the compute dtype (fp32 at least)
    fe = _feature_emitter(p, em)  # q', a, b, v: in the kernels' input dtype
    K, V = em.sizes_var[dp.key.axis], em.sizes_var[dp.value.axis]
    upd = next((eq for eq in p.updates if eq.target == dp.state), None)
    src = p.source.path
    where_u = f"{src}:{upd.pos.line}" if upd is not None and upd.pos else src
    where_o = f"{src}:{p.output.pos.line}" if p.output.pos else src
    em.emit(f"# {dp.state}_t = c_t (I - a_t b_t^T) {dp.state}_(t-1) + a_t v_t^T  ({where_u}):")
    em.emit(f"#   a = {show(dp.a)},  b = {_scaled(dp.b, dp.bs)},  v = {_scaled(dp.v, dp.vs)},  "
            f"log c = {show(dp.g) if dp.g is not None else '0'}")
    em.emit(f"# q'_t = {show(dp.q)}  (the output {p.output.target}, {where_o})")
    numbers, tensors = [], []
    for f in _flatten_mul(dp.q):
        (numbers if _is_number(f) else tensors).append(f)
    scale = " * ".join(em._paren(em.val(f, "pre")[0]) for f in numbers) or "1.0"
    q = _as_btd(fe, product(tensors) if tensors else _const(1), (dp.key,), f"B, H, T, {K}")
    ka = _as_btd(fe, dp.a, (dp.key,), f"B, H, T, {K}")
    kb = _as_btd(fe, dp.b, (dp.key,), f"B, H, T, {K}")
    v = _as_btd(fe, dp.v, (dp.value,), f"B, H, T, {V}")
    if dp.g is None:
        g = "None"
    elif _is_number(dp.g):
        g = em.fresh()
        em.emit(f"{g} = torch.full((B, T, H), float({em.val(dp.g, 'pre')[0]}), dtype=torch.float32, device=dev)")
    else:
        g = _as_btd(em, dp.g, (), "B, H, T")
        g = f"as_dtype({g}, torch.float32)"
    args = [f"as_dtype({x}, dt_in)" for x in (q, ka, kb, v)]
    for name, node in (("bs", dp.bs), ("vs", dp.vs)):
        if node is not None:
            em.emit(f"# {name} = {show(node)}: the kernels scale {name[0]} by it per token as they load {name[0]}")
        args.append(f"as_dtype({_as_btd(em, node, (), 'B, H, T')}, torch.float32)" if node is not None else "None")
    # an argument written twice is computed once: one conversion, and one tensor (a is b: the backward writes its
    # one cotangent; bs is vs: one conversion back)
    seen: dict[str, str] = {}
    twice = {x for x in args if x != "None" and args.count(x) > 1}
    for i, expr in enumerate(args):
        if expr in twice:
            if expr not in seen:
                seen[expr] = em.fresh()
                em.emit(f"{seen[expr]} = {expr}")
            args[i] = seen[expr]
    tr = ".transpose(-1, -2)" if dp.transposed else ""
    em.emit(f"h0 = states.get({dp.state!r})")
    em.emit(f"h0 = None if h0 is None else as_dtype(h0, torch.float32){tr}")
    epilogue = dp.gate is not None or dp.skip is not None
    scales = "".join(f", {n}={x}" for n, x in zip(("bs", "vs"), args[4:]) if x != "None")
    em.emit(f"o, ht = delta_chunk({args[0]}, {args[1]}, {args[2]}, {args[3]}, {g}, h0, {scale}, output_final_state"
            + (", real" if epilogue else "") + scales + ", cu_seqlens=cu_seqlens)")
    if dp.gate is not None:
        em.emit(f"o = o * {_as_btd(em, dp.gate, (dp.value,), f'B, H, T, {V}')}")
    if dp.skip is not None:
        em.emit(f"o = o + {_as_btd(em, dp.skip, (dp.value,), f'B, H, T, {V}')}")
    em.emit(f"return o, ({{{dp.state!r}: as_dtype(ht{tr}, real)}} if output_final_state else None)")
    return lines


def _scaled(vec: Node, scale: Node | None) -> str:
    return show(vec) if scale is None else f"{show(scale)} * {show(vec)}"


def describe(a: Analysis) -> list[str]:
    """The delta-rule plan in words (``mixc explain``); empty when this backend has no form for ``a``."""
    try:
        dp = plan(a)
    except NoChunkedForm:
        return []
    return [f"delta rule: a = {show(dp.a)}, b = {_scaled(dp.b, dp.bs)}, v = {_scaled(dp.v, dp.vs)}, q' = {show(dp.q)} "
            "(PyTorch prologue; per-token scales applied by the kernels as they load b and v)",
            "log gate: " + (show(dp.g) if dp.g is not None else "none") + "; per 64-token chunk the UT transform "
            "(I + L)^-1 in fp32 by recursive doubling of its diagonal blocks (2 x 2 to 64 x 64), then a "
            "sequential walk over chunks (Triton)",
            "backward: an adjoint walk over chunks in reverse, then every chunk in parallel in two kernels (Triton)"]


def emit_any(a: Analysis) -> tuple[list[str] | None, str]:
    try:
        return emit_delta(a, plan(a)), "chunked delta-rule kernels emitted"
    except NoChunkedForm as ex:
        return None, str(ex)


def _backend():
    from ..registry import FormBackend

    return FormBackend(form="chunked", emit=emit_any, support=(custom_op, hostint, launcher, fwd, bwd, kernels),
                       native_varlen=True,
                       describe=describe)


BACKEND = _backend()
