"""The chunked plan of an analysed recurrence (:class:`ChunkPlan`: q', k', v', the log decay, output gate,
skip and normaliser over the state's key and value axes), read from the analysis's normal form and
readout only (never a mechanism's name); :func:`plan` raises :class:`NoChunkedForm` with the reason
a program in a chunkable class still has no chunked form. Also what the kernels take beside it: a
skip they add (:func:`_kernel_skip`), a normaliser they carry, a per-token key scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.analysis import Analysis, Readout, StateForm, Term, _flatten_mul, _k_factors, product, show
from mixc.ir import T_VAR, Node, Var
from mixc.lower import make, rename


@dataclass
class ChunkPlan:
    state: str  # the main state
    transposed: bool  # declared [value, key] rather than [key, value]
    key: Var  # the update's index over the key axis
    value: Var  # ... over the value axis
    q: Node  # q'_t[key]
    k: Node  # k'_t[key] (sign included)
    v: Node  # v'_t[value]
    decay: str  # none | scalar | key | value
    g: Node | None  # the log decay (idx (t), (), (t, key) or (t, value))
    gate: Node | None  # output gate over the value axis (multiplies q'^T S)
    skip: Node | None  # state-free part of the output (over the value axis)
    normaliser: str | None  # state z carried as an extra value column; o = num / den
    den_fn: tuple[Node, Node] | None = None  # o = num / f(den): (den's readout node, f(den)) (Readout.den_fn)


class NoChunkedForm(Exception):
    """Why a program in a chunkable class still has no chunked form in this backend."""


def _const(v) -> Node:
    return Node("const", arg=v)


def _log_decay(factors: list[Node]) -> Node:
    """log of a product of decay factors: exp(x) contributes x, anything else log(f)."""
    terms = [f.src[0] if f.op == "exp" else make("log", (f,), None) for f in factors]
    out = terms[0]
    for t in terms[1:]:
        out = make("add", (out, t), None)
    return out


def _signed(factors: list[Node], sign: int) -> Node:
    node = product(factors) if factors else _const(1)
    return node if sign > 0 else make("neg", (node,), None)


def _readout_parts(terms: list[Term], state: str, key: Var, value: Var, decl_vars) -> tuple[Node, Node | None]:
    """q' (over the key var) and the output gate (over the value var) of a readout of ``state``."""
    if len(terms) != 1 or terms[0].state is None or terms[0].state.arg[0] != state:
        raise NoChunkedForm(f"the output does not read {state} through a single q'^T {state} term")
    t = terms[0]
    read = t.state.arg[1]
    mapping = dict(zip(read, decl_vars))
    kx = [v for v in read if mapping[v] == key][0]
    if kx not in t.summed or len(t.summed) != 1:
        raise NoChunkedForm(f"the readout of {state} does not sum over its key axis")
    qf, gf = [], []
    for f in t.factors:
        f = rename(f, mapping)
        axes = set(f.idx) - {T_VAR}
        if value in axes and key in axes:
            raise NoChunkedForm(f"the readout factor {show(f)} depends on both state axes")
        (gf if value in axes else qf).append(f)
    q = _signed(qf, t.sign)
    gate = product(gf) if gf else None
    return q, gate


def plan(a: Analysis) -> ChunkPlan:
    """The chunked plan of an analysed recurrence (raises NoChunkedForm with the reason)."""
    from mixc.history import token_history

    p = a.program
    if "chunked" not in a.forms:
        raise NoChunkedForm(a.reasons.get("chunked", "not chunkable"))
    if a.kind != "recurrence":
        raise NoChunkedForm("attention-form files reach the chunked form through their feature maps (not yet)")
    if a.transition not in ("identity", "constant_scalar", "scalar", "diagonal_key", "diagonal_value"):
        raise NoChunkedForm(f"the {a.transition} transition has no chunked kernel in this backend yet")
    if token_history(p):
        raise NoChunkedForm("reads of past tokens are not supported by the chunked form")
    main: StateForm = max(a.states, key=lambda s: (len(s.axes), s.normaliser_of is None))
    key = main.key_axis
    value = next(v for v in main.axes if v != key)
    transposed = main.axes.index(key) == 1
    inp = main.inputs[0]
    k_node = _signed(_k_factors(inp, value), inp.sign)
    vf = [f for f in inp.factors if value in f.idx]
    v_node = product(vf) if vf else _const(1)
    if any(key in f.idx for f in vf):
        raise NoChunkedForm("the input term is not an outer product")
    # decay
    decay, g = "none", None
    if main.linear:
        factors = list(main.linear[0].factors)
        if a.transition == "identity" or not factors:
            decay = "none"
        else:
            g = _log_decay(factors)
            axes = set(g.idx) - {T_VAR}
            decay = "scalar" if not axes else "key" if axes == {key} else "value" if axes == {value} else "?"
            if decay == "?":
                raise NoChunkedForm(f"the decay {show(g)} varies along both state axes")
    # readout
    rd: Readout = _readout_of(a)
    out_vars = p.output.vars
    if len(out_vars) != 1 or out_vars[0].axis != value.axis:
        raise NoChunkedForm("the output is not indexed by the state's value axis")
    outmap = {out_vars[0]: value}
    normaliser = next((s.name for s in a.states if s.normaliser_of == main.name), None)
    others = [s for s in a.states if s is not main and s.name != normaliser]
    if others:
        raise NoChunkedForm(f"more than one independent state ({', '.join(s.name for s in others)})")
    skip = None
    if rd.ratio is not None:
        if normaliser is None:
            raise NoChunkedForm("the output divides two readouts but no normaliser state was recognised")
        num, den = rd.ratio
        if num.skip or den.skip:
            raise NoChunkedForm("a normalised readout with a skip term")
        q_node, gate = _readout_parts(_rename_terms(num.terms, outmap), main.name, key, value, tuple(main.axes))
        zdecl = a.states[[s.name for s in a.states].index(normaliser)]
        qz, gz = _readout_parts(_rename_terms(den.terms, outmap), normaliser, zdecl.axes[0], Var("_none", "_"),
                                (zdecl.axes[0],))
        qz = rename(qz, {zdecl.axes[0]: key})
        if qz != q_node or gz is not None:
            raise NoChunkedForm("the normaliser is read with another query than the state")
        if rd.den_fn is not None and decay == "value":
            raise NoChunkedForm("a function of the denominator under a per-value decay")
    else:
        if normaliser is not None:
            raise NoChunkedForm("a normaliser state that the output does not divide by")
        q_node, gate = _readout_parts(_rename_terms(rd.terms, outmap), main.name, key, value, tuple(main.axes))
        if rd.skip:
            parts = [rename(_signed(t.factors, t.sign), outmap) for t in rd.skip]
            skip = parts[0]
            for x in parts[1:]:
                skip = make("add", (skip, x), None)
    if any(n.dtype == "complex" for n in (q_node, k_node, v_node) if n is not None):
        raise NoChunkedForm("complex-valued recurrences have no chunked kernel")
    return ChunkPlan(main.name, transposed, key, value, q_node, k_node, v_node, decay, g, gate, skip, normaliser,
                     rd.den_fn if rd.ratio is not None else None)


def _rename_terms(terms: list[Term], m: dict) -> list[Term]:
    return [Term([rename(f, m) for f in t.factors], rename(t.state, m) if t.state is not None else None,
                 tuple(m.get(v, v) for v in t.summed), t.sign) for t in terms]


def _readout_of(a: Analysis) -> Readout:
    from mixc.analysis import readout

    rd = readout(a.program.output.value)
    if rd is None:
        raise NoChunkedForm("the output is not linear in the states")
    return rd


def _kernel_skip(cp: ChunkPlan) -> Node | None:
    """The per-head coefficient of a skip term the output kernel adds (none with an output gate, which
    multiplies before the skip is added), or None."""
    return _skip_coefficient(cp.skip, cp.v) if cp.skip is not None and cp.gate is None else None


def _normaliser_in_kernel(cp: ChunkPlan) -> bool:
    """Whether the kernels carry the normaliser (no decay or a scalar one, dividing by the denominator itself;
    chunk_normalised otherwise makes it a value column)."""
    return cp.normaliser is not None and cp.decay in ("none", "scalar") and cp.den_fn is None


def _skip_coefficient(skip: Node, v: Node) -> Node | None:
    """``c`` if the skip term is c * v' with c a per-head constant (numbers, parameters, buffers), so the
    output kernel can add it; else None (the skip stays a PyTorch epilogue)."""
    rest = _flatten_mul(skip)
    for f in _flatten_mul(v):
        if f not in rest:
            return None
        rest.remove(f)
    if any(f.idx or any(x.op in ("input", "state", "iota", "rand") for x in f.walk()) for f in rest):
        return None
    return product(rest) if rest else _const(1)


def _key_scale(cp: ChunkPlan) -> tuple[Node | None, Node]:
    """(the per-token scalar factors of k', what remains of k'): a factor that varies with the token only
    (such as mamba2's dt in dt * B[n]) is passed to the kernels as a key scale, which they apply as they
    load k, so the scaled keys are never written out. (None, k') when k' has no such factor, or nothing
    but such factors."""
    scal, rest = [], []
    for f in _flatten_mul(cp.k):
        (scal if set(f.idx) == {T_VAR} else rest).append(f)
    if not scal or not any(cp.key in f.idx for f in rest):
        return None, cp.k
    return product(scal), product(rest)
