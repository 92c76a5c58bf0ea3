"""Emit the recurrent form of a complex diagonal state (S4D, H3): a PyTorch prologue forming the real
token factors and the complex per-head coefficients, then :mod:`mixc.backends.recurrent.complex`'s scan.

The state update must be ``S[k, v] = a[k, v] S[k, v] + b[k, v] * (token factors)`` with ``a``, ``b``
free of tokens (a time-invariant complex decay and input map: anything else is refused with the
reason), and the output ``Re(sum_k c[k, v] q'[k] S[k, v])`` times numbers and a real gate, plus a skip.
Reads of past tokens (``k[t - m, p]``) come from the prologue's token history (``"k@past"`` states).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.analysis import Analysis, StateForm, product, readout, show, token_dependent
from mixc.history import history_name, token_history
from mixc.ir import T_VAR, Node, Var
from mixc.lower import rename

from ..chunked.emit_tensors import _as_btd, _feature_emitter, _is_number
from ..reference import prologue


class NoComplexKernel(Exception):
    pass


@dataclass
class ComplexPlan:
    state: str
    axes: tuple[Var, ...]
    key: Var  # the axis the readout sums over
    value: Var | None  # the other axis (None: V = 1, a scalar output)
    a: Node  # the decay, per head
    b: Node | None  # the input map, per head (None: 1)
    c: Node | None  # the readout's per-head coefficient (None: 1)
    q: Node | None  # real token factor of the readout over the key axis
    k: Node | None  # real token factor of the input over the key axis
    v: Node  # real token factor of the input over the value axis (or a per-token scalar)
    scale: list[Node]
    gate: Node | None
    skip: Node | None
    history: dict[str, int]


def plan_complex(a: Analysis, main: StateForm) -> ComplexPlan:
    p = a.program
    key = main.key_axis
    if key is None:
        raise NoComplexKernel(f"the readout of the complex state {main.name} does not sum over one of its axes")
    value = next((v for v in main.axes if v != key), None)
    kv = {key} | ({value} if value is not None else set())
    if len(main.linear) != 1 or main.linear[0].summed or main.linear[0].sign < 0 or len(main.inputs) != 1:
        raise NoComplexKernel(f"the update of {main.name} is not a S + b x (a diagonal complex recurrence)")
    dec = main.linear[0].factors
    if any(token_dependent(f) for f in dec):
        raise NoComplexKernel("a token-dependent complex decay has no scan kernel yet")
    inp = main.inputs[0]
    bf = [f for f in inp.factors if not token_dependent(f)]
    tf = [f for f in inp.factors if token_dependent(f)]
    if any(f.dtype == "complex" for f in tf):
        raise NoComplexKernel("a complex token factor in the input")
    kf = [f for f in tf if key in f.idx]
    vf = [f for f in tf if key not in f.idx]
    if any(value is not None and value in f.idx for f in kf):
        raise NoComplexKernel("the input's token factors are not an outer product k' v'^T")
    if inp.sign < 0:
        bf.append(Node("const", arg=-1))
    rd = readout(p.output.value)
    if rd is None or rd.ratio is not None or len(rd.terms) != 1 or rd.terms[0].state.arg[0] != main.name:
        raise NoComplexKernel("the output is not one linear readout of the complex state")
    if not any(x.op == "real" for x in p.output.value.walk()):
        raise NoComplexKernel("the output does not take the real part of the complex readout")
    out_vars = p.output.vars
    if (value is None) != (len(out_vars) == 0) or (value is not None and out_vars[0].axis != value.axis):
        raise NoComplexKernel("the output is not indexed by the state's value axis")
    t = rd.terms[0]
    m = dict(zip(t.state.arg[1], main.axes))
    if out_vars:
        m[out_vars[0]] = value
    if tuple(m.get(v, v) for v in t.summed) != (key,):
        raise NoComplexKernel("the readout does not sum over the state's key axis")
    qf, nums, cf, gf = [], [], [], []
    for f in (rename(f, m) for f in t.factors):
        if _is_number(f):
            nums.append(f)
        elif not token_dependent(f):
            cf.append(f)
        elif key in f.idx:
            if value is not None and value in f.idx:
                raise NoComplexKernel(f"the readout factor {show(f)} depends on both state axes")
            qf.append(f)
        else:
            gf.append(f)
    if t.sign < 0:
        nums.append(Node("const", arg=-1))
    if any(f.dtype == "complex" for f in qf + gf):
        raise NoComplexKernel("a complex token factor in the readout")
    skip = None
    for s in rd.skip:
        f = product([rename(x, m) for x in s.factors]) or Node("const", arg=1)
        f = f if s.sign > 0 else Node("neg", (f,), None, f.idx, f.dtype)
        skip = f if skip is None else Node("add", (skip, f), None, tuple(dict.fromkeys(skip.idx + f.idx)), "real")
    for part in [*dec, *bf, *cf]:
        if set(part.idx) - kv:
            raise NoComplexKernel(f"the coefficient {show(part)} has axes outside the state")
    return ComplexPlan(main.name, tuple(main.axes), key, value, product(list(dec)), product(bf), product(cf),
                       product(qf), product(kf), product(vf) or Node("const", arg=1), nums, product(gf), skip,
                       token_history(p))


def _per_head(em, node: Node, cp: ComplexPlan) -> str:
    """A per-head coefficient as a complex [H, K|1, V|1] tensor."""
    lay = tuple(x for x in (cp.key, cp.value) if x is not None and x in node.idx)
    e, elay = em.val(node, "pre")
    e = em.expand(em.tensor(e, elay), elay or (), lay)
    full = ", ".join(["1, H"] + [em.sizes_var[x.axis] for x in lay])
    ix = ":" if cp.key in lay else "None"
    ix += ", " + (":" if cp.value is not None and cp.value in lay else "None")
    name = em.fresh()
    em.emit(f"{name} = ({e}).expand({full})[0].to(cplx)[..., {ix}]  # {show(node)}: [H, K|1, V|1]")
    return name


def _body(a: Analysis, cp: ComplexPlan, lines: list[str]):
    p = a.program
    extra = [n for n in (cp.a, cp.b, cp.c, cp.q, cp.k, cp.v, cp.gate, cp.skip, *cp.scale) if n is not None]
    em = prologue(p, lines, extra)
    fe = _feature_emitter(p, em) if not cp.history else em
    K = em.sizes_var[cp.key.axis]
    V = em.sizes_var[cp.value.axis] if cp.value is not None else "1"
    em.emit(f"# {cp.state}_t = a * {cp.state}_(t-1) + b * k'_t v'_t^T (complex, as real/imaginary pairs): "
            f"a = {show(cp.a)}, b = {show(cp.b) if cp.b is not None else '1'}")
    em.emit(f"# o_t = Re(sum_k c q' {cp.state}_t), c = {show(cp.c) if cp.c is not None else '1'}, "
            f"q' = {show(cp.q) if cp.q is not None else '1'}")
    q = _as_btd(fe, cp.q, (cp.key,), f"B, H, T, {K}") if cp.q is not None else "None"
    k = _as_btd(fe, cp.k, (cp.key,), f"B, H, T, {K}") if cp.k is not None else "None"
    if cp.value is not None:
        v = _as_btd(fe, cp.v, (cp.value,), f"B, H, T, {V}")
    else:
        v = f"{_as_btd(fe, cp.v, (), 'B, H, T')}[..., None]"
    coefs = [_per_head(em, n, cp) if n is not None else "None" for n in (cp.a, cp.b, cp.c)]
    scale = " * ".join(em._paren(em.val(f, "pre")[0]) for f in cp.scale) or "1.0"
    return em, V, (q, k, v, *coefs, scale)


def _epilogue(em, cp: ComplexPlan, V: str) -> None:
    if cp.value is None:
        em.emit("o = o[..., 0]  # a scalar output")
    lay = (cp.value,) if cp.value is not None else ()
    shape = f"B, H, T, {V}" if cp.value is not None else "B, H, T"
    if cp.gate is not None:
        em.emit(f"o = o * {_as_btd(em, cp.gate, lay, shape)}  # output gate {show(cp.gate)}")
    if cp.skip is not None:
        em.emit(f"o = o + {_as_btd(em, cp.skip, lay, shape)}  # skip {show(cp.skip)}")


def emit_complex(a: Analysis, cp: ComplexPlan) -> list[str]:
    """Lines of ``recurrent``, ``recurrent_step`` and the state helpers."""
    p = a.program
    lines = ["def recurrent(inputs, params, states, sizes, output_final_state=False, cu_seqlens=None):",
             f'    """The recurrent form of {p.name}: the complex diagonal recurrence of {cp.state} as one scan kernel',
             '    on real/imaginary pairs. inputs [B, T, H, ...]; returns (o, final states or None)."""']
    em, V, (q, k, v, ca, cb, cc, scale) = _body(a, cp, lines)
    em.emit("h0 = recurrent_pack(states, sizes)")
    em.emit(f"o, ht = recc_scan({q}, {k}, {v}, {ca}, {cb}, {cc}, h0, scale={scale})")
    _epilogue(em, cp, V)
    em.emit("final = recurrent_unpack(ht) if output_final_state else None")
    for name in cp.history:
        em.emit(f"if final is not None:\n        final[{history_name(name)!r}] = ext_{name}[:, :, T:]")
    em.emit("return o, final")
    lines += ["", "", "def recurrent_step(inputs, params, h, sizes, out, o32, states=None):",
              f'    """One token of {p.name} in place: inputs [B, 1, H, ...]; h [B, H, K, V, 2] fp32, the complex '
              'state as pairs;',
              '    states: the token history buffers (updated in place)."""']
    em, V, (q, k, v, ca, cb, cc, scale) = _body(a, cp, lines)
    em.emit(f"o = recc_step({q}, {k}, {v}, {ca}, {cb}, {cc}, h, o32, scale={scale})")
    _epilogue(em, cp, V)
    em.emit("out.copy_(o.reshape(out.shape))")
    for name in cp.history:
        em.emit(f"states[{history_name(name)!r}].copy_(ext_{name}[:, :, T:])  # the last tokens of {name}")
    em.emit("return out")
    Kx = f"sizes[{cp.key.axis!r}]"
    Vx = f"sizes[{cp.value.axis!r}]" if cp.value is not None else "1"
    transposed = cp.value is not None and cp.axes.index(cp.key) == 1
    lines += ["", "", "def recurrent_state_shape(B, H, sizes):",
              '    """The decoder\'s state buffer: the complex state as fp32 pairs [B, H, K, V, 2]."""',
              f"    return (B, H, {Kx}, {Vx}, 2)", "", "",
              "def recurrent_pack(states, sizes):",
              '    """The declared complex state -> [B, H, K, V] complex64 (None if not given)."""',
              f"    s = states.get({cp.state!r})",
              "    if s is None:",
              "        return None",
              "    s = s.to(torch.complex64)"]
    if cp.value is None:
        lines.append("    s = s[..., None]  # V = 1")
    elif transposed:
        lines.append("    s = s.transpose(-1, -2)  # declared [value, key]")
    lines += ["    return s.contiguous()", "", "",
              "def recurrent_unpack(h):",
              '    """[B, H, K, V] complex (or its fp32 pairs [..., 2]) -> the declared state (a view)."""',
              "    h = h if h.is_complex() else torch.view_as_complex(h)"]
    body = "h[..., 0]" if cp.value is None else "h.transpose(-1, -2)" if transposed else "h"
    lines.append(f"    return {{{cp.state!r}: {body}}}")
    return lines


def describe_complex(cp: ComplexPlan) -> list[str]:
    return [f"complex scan kernel: {cp.state}_t = a {cp.state}_(t-1) + b k' v'^T on real/imaginary pairs, "
            f"a = {show(cp.a)}, b = {show(cp.b) if cp.b is not None else '1'}, c = "
            f"{show(cp.c) if cp.c is not None else '1'} (per head, formed in PyTorch)"] + (
        [f"token history {', '.join(history_name(n) for n in cp.history)}: read by the prologue (the decoder keeps "
         "it in a buffer)"]
        if cp.history else [])


_ = T_VAR  # (imported for readers: token factors carry the token index)
