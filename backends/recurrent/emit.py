"""Emit the recurrent form: a PyTorch prologue forming q', k', v' and the decay's factors from the
analysis's normal form, the scan kernels of :mod:`mixc.backends.recurrent.kernels`, and an epilogue
(normaliser division, output gate, skip).

:func:`plan` reads only the analysis (the transition class, the normal form's terms, the readout),
never a mechanism's name, and either returns a :class:`RecPlan` or says in words why this program has
no recurrent kernel yet. The decay ``A_t`` (one linear term ``coef * S``) is handed over as two
factors: ``coef = exp(at * ap)`` when it is one exponential of a product, else ``coef = at * ap``, with
``at`` the token-dependent factors and ``ap`` the per-head ones, each over any subset of the state's
axes (so mamba's ``exp(dt[p] * A[n, p])`` is never formed per token in memory). A one-axis state
(``h[d]``) is a K = 1 state; a normaliser ``z`` (the state's recurrence with ``v' = 1``) is one more
value column.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.analysis import Analysis, StateForm, Term, _flatten_mul, product, readout, show, token_dependent
from mixc.ir import T_VAR, Node, Var
from mixc.lower import make, rename

from .. import hostint
from ..chunked import launcher
from ..chunked.emit_tensors import _as_btd, _feature_emitter, _is_number
from ..reference import prologue

SCAN_CLASSES = ("identity", "constant_scalar", "scalar", "diagonal_key", "diagonal_value", "elementwise", "delta",
                "gated_delta")


class NoRecurrentKernel(Exception):
    """Why a program with a legal recurrent form has no recurrent kernel in this backend."""


@dataclass
class RecPlan:
    state: str  # the main state
    axes: tuple[Var, ...]  # its update's index variables, as declared
    key: Var | None  # the key axis (None: a one-axis state, K = 1)
    value: Var  # the value axis
    q: Node | None  # q'_t[key] without number factors (None: 1)
    scale: list[Node]  # number factors of the readout
    k: Node | None  # k'_t[key] (sign included; None: 1)
    v: Node  # v'_t[value]
    decay: str  # none | exp | product
    at: Node | None  # the decay's token-dependent factor (over a subset of key, value)
    ap: Node | None  # its per-head factor
    gate: Node | None  # output gate over the value axis (multiplies the readout)
    skip: Node | None  # state-free part of the output (over the value axis)
    normaliser: str | None  # a state carried as one more value column; o = num / den
    u: Node | None = None  # delta rule: S <- S - u'[key] (w'^T S) before the decay
    w: Node | None = None

    @property
    def transposed(self) -> bool:
        return self.key is not None and self.axes.index(self.key) == 1


def _const(v) -> Node:
    return Node("const", arg=v)


def _split_decay(factors: list[Node]) -> tuple[str, Node | None, Node | None]:
    """(mode, at, ap): the decay ``prod(factors)`` as exp(at * ap) or at * ap."""
    if len(factors) == 1 and factors[0].op == "exp":
        mode, parts = "exp", _flatten_mul(factors[0].src[0])
    else:
        mode, parts = "product", factors
    tok = [f for f in parts if token_dependent(f)]
    per = [f for f in parts if not token_dependent(f)]
    return mode, product(tok), product(per)


def _readout_split(t: Term, key: Var | None, value: Var) -> tuple[list[Node], list[Node], list[Node]]:
    """(q' factors, number factors, gate factors) of one readout term (already in the update's names)."""
    qf, nums, gf = [], [], []
    for f in t.factors:
        axes = set(f.idx) - {T_VAR}
        if key is not None and key in axes and value in axes:
            raise NoRecurrentKernel(f"the readout factor {show(f)} depends on both state axes")
        if _is_number(f):
            nums.append(f)
        elif key is not None and key in axes:
            qf.append(f)
        elif value in axes or key is None:
            gf.append(f)
        else:
            qf.append(f)  # a per-token or per-head scalar: part of q'
    if t.sign < 0:
        nums.append(_const(-1))
    return qf, nums, gf


def _read_term(terms: list[Term], sf: StateForm, out_var: Var, key: Var | None, value: Var) -> Term:
    """The single term of ``terms`` reading ``sf``, renamed to the update's index variables."""
    if len(terms) != 1 or terms[0].state is None or terms[0].state.arg[0] != sf.name:
        raise NoRecurrentKernel(f"the output does not read {sf.name} through a single linear term")
    t = terms[0]
    read = t.state.arg[1]
    m = dict(zip(read, sf.axes))
    if out_var is not None:
        for r, d in zip(read, sf.axes):
            if r == out_var:
                m[r] = d
    summed = tuple(m.get(v, v) for v in t.summed)
    want = (key,) if key is not None else ()
    if summed != want:
        raise NoRecurrentKernel(f"the readout of {sf.name} sums over {[v.name for v in summed]}, not its key axis")
    return Term([rename(f, m) for f in t.factors], rename(t.state, m), summed, t.sign)


def plan(a: Analysis):  # noqa: C901
    """The recurrent plan of an analysed program: a :class:`RecPlan`, or for a complex state an
    :class:`~mixc.backends.recurrent.emit_complex.ComplexPlan` (raises NoRecurrentKernel with the reason)."""
    from mixc.history import token_history

    p = a.program
    if "recurrent" not in a.forms:
        raise NoRecurrentKernel(a.reasons.get("recurrent", "not a recurrence"))
    if a.kind != "recurrence":
        raise NoRecurrentKernel(f"no recurrent kernel for {a.kind}-form programs yet (their state would come from "
                                "feature maps)")
    main: StateForm = max(a.states, key=lambda s: (len(s.axes), s.normaliser_of is None))
    if len(a.states) > 1 and p.decl(main.name).complex:
        raise NoRecurrentKernel("more than one state beside a complex state")
    if p.decl(main.name).complex:
        from .emit_complex import NoComplexKernel, plan_complex

        try:
            return plan_complex(a, main)
        except NoComplexKernel as ex:
            raise NoRecurrentKernel(str(ex)) from None
    if token_history(p):
        raise NoRecurrentKernel("reads of past tokens (a token history state) are covered for complex states only")
    if main.transition not in SCAN_CLASSES:
        raise NoRecurrentKernel(f"the {main.transition} transition has no scan kernel in this backend yet")
    normaliser = next((s for s in a.states if s.normaliser_of == main.name), None)
    others = [s for s in a.states if s is not main and s is not normaliser]
    if others:
        raise NoRecurrentKernel(f"more than one independent state ({', '.join(s.name for s in [main] + others)})")
    if len(main.inputs) != 1:
        raise NoRecurrentKernel(f"the input of {main.name} is not a single product k' v'^T")
    if len(main.axes) == 2:
        key = main.key_axis
        value = next(v for v in main.axes if v != key)
    elif len(main.axes) == 1:
        key, value = None, main.axes[0]
    else:
        raise NoRecurrentKernel(f"the state {main.name} has {len(main.axes)} axes (1 or 2 are covered)")
    inp = main.inputs[0]
    kf = [f for f in inp.factors if value not in f.idx] if key is not None else []
    vf = [f for f in inp.factors if value in f.idx] if key is not None else list(inp.factors)
    if key is not None and any(key in f.idx for f in vf):
        raise NoRecurrentKernel("the input term is not an outer product k' v'^T")
    k_node = product(kf)
    if inp.sign < 0:
        if k_node is not None:
            k_node = make("neg", (k_node,), None)
        else:
            vf = [make("neg", (product(vf) or _const(1),), None)]
    v_node = product(vf) or _const(1)
    decay, at, ap = "none", None, None
    u = w = None
    linear = list(main.linear)
    if main.transition in ("delta", "gated_delta"):
        u, w, linear = _delta_parts(main, key, value)
    if main.transition != "identity" and linear and linear[0].factors:
        (lt,) = linear
        if lt.sign < 0:
            raise NoRecurrentKernel("a negated state")
        decay, at, ap = _split_decay(list(lt.factors))
    allowed = {v for v in (key, value) if v is not None}
    for part in (at, ap):
        if part is not None and set(part.idx) - {T_VAR} - allowed:
            raise NoRecurrentKernel(f"the decay factor {show(part)} has axes outside the state")
    # readout
    rd = readout(p.output.value)
    if rd is None:
        raise NoRecurrentKernel("the output is not linear in the states")
    out_vars = p.output.vars
    if len(out_vars) != 1 or out_vars[0].axis != value.axis:
        raise NoRecurrentKernel("the output is not indexed by the state's value axis")
    outmap = {out_vars[0]: value}
    gate = skip = None
    if rd.ratio is not None:
        if normaliser is None:
            raise NoRecurrentKernel("the output divides two readouts but no normaliser state was recognised")
        num, den = rd.ratio
        if num.skip or den.skip:
            raise NoRecurrentKernel("a normalised readout with a skip term")
        if at is not None and value in at.idx or ap is not None and value in ap.idx:
            raise NoRecurrentKernel("a normaliser under a decay that varies along the value axis")
        tn = _read_term(_rn(num.terms, outmap), main, out_vars[0], key, value)
        tz = _read_term(den.terms, normaliser, None, normaliser.axes[0], value)
        qf, nums, gf = _readout_split(tn, key, value)
        qz, nz, gz = _readout_split(Term([rename(f, {normaliser.axes[0]: key}) for f in tz.factors], None, (),
                                         tz.sign), key, value)
        if sorted(map(hash, qf)) != sorted(map(hash, qz)) or gf or gz or nums != nz:
            raise NoRecurrentKernel("the normaliser is read with another query than the state")
    else:
        if normaliser is not None:
            raise NoRecurrentKernel("a normaliser state that the output does not divide by")
        t = _read_term(_rn(rd.terms, outmap), main, out_vars[0], key, value)
        qf, nums, gf = _readout_split(t, key, value)
        gate = product(gf)
        if rd.skip:
            parts = []
            for s in rd.skip:
                f = rename(product(s.factors) or _const(1), outmap)
                parts.append(f if s.sign > 0 else make("neg", (f,), None))
            skip = parts[0]
            for x in parts[1:]:
                skip = make("add", (skip, x), None)
    if key is None and (qf or k_node is not None):  # (a one-axis readout has no key: its factors are gates)
        raise NoRecurrentKernel("a one-axis state read or written through a key factor")
    if any(n is not None and n.dtype == "complex" for n in (k_node, v_node, at, ap, gate, skip, *qf)):
        raise NoRecurrentKernel("complex-valued factors have no scan kernel yet")
    return RecPlan(main.name, tuple(main.axes), key, value, product(qf), nums, k_node, v_node, decay, at, ap,
                   gate, skip, normaliser.name if normaliser is not None else None, u, w)


def _delta_parts(sf: StateForm, key: Var | None, value: Var) -> tuple[Node, Node, list[Term]]:
    """(u', w', [the diagonal term]) of a delta-rule transition coef * (S - u' (w'^T S)): the rank-one
    term's factors less the diagonal term's (its decay), split into those without the summed index (u',
    with the sign) and those with it (w', renamed onto the key axis)."""
    diag = [t for t in sf.linear if not t.summed]
    (r,) = [t for t in sf.linear if t.summed]
    if key is None or len(diag) != 1:
        raise NoRecurrentKernel("a delta-rule transition without a key axis or a diagonal term")
    (l,) = r.summed
    read = r.state.arg[1]
    pos = sf.axes.index(key)
    if read[pos] != l or read[1 - pos] != value:
        raise NoRecurrentKernel("the rank-one correction does not act along the key axis")
    rest = list(r.factors)
    for f in diag[0].factors:
        if f not in rest:
            raise NoRecurrentKernel(f"the decay {show(f)} does not scale the rank-one correction too")
        rest.remove(f)
    outs = [f for f in rest if l not in f.idx]
    ins = [rename(f, {l: key}) for f in rest if l in f.idx]
    if any(value in f.idx for f in outs + ins) or any(l in f.idx for f in outs):
        raise NoRecurrentKernel("the rank-one correction is not u' w'^T over the key axis")
    u = product(outs) or _const(1)
    if r.sign * diag[0].sign > 0:  # coef * (S + u w^T S): u' = -u
        u = make("neg", (u,), None)
    return u, product(ins) or _const(1), diag


def _rn(terms: list[Term], m: dict) -> list[Term]:
    return [Term([rename(f, m) for f in t.factors], rename(t.state, m) if t.state is not None else None,
                 tuple(m.get(v, v) for v in t.summed), t.sign) for t in terms]


def _kv_view(lay: tuple[Var, ...], key: Var | None, value: Var) -> str:
    """Index that turns a [..., *lay] tensor (lay a subset of (key, value), in order) into [..., K|1, V|1]."""
    ix = [":" if (key is not None and key in lay) else "None", ":" if value in lay else "None"]
    return "[..., " + ", ".join(ix) + "]"


def _emit_common(a: Analysis, rp: RecPlan, lines: list[str]):
    """The prologue: sizes, inputs, q', k', v', at, ap. Returns (emitter, K, V, the call's operands)."""
    p = a.program
    extra = [n for n in (rp.q, rp.k, rp.v, rp.at, rp.ap, rp.gate, rp.skip, rp.u, rp.w, *rp.scale) if n is not None]
    em = prologue(p, lines, extra)
    fe = _feature_emitter(p, em)
    K = em.sizes_var[rp.key.axis] if rp.key is not None else "1"
    V = em.sizes_var[rp.value.axis]
    upd = next(eq for eq in p.updates if eq.target == rp.state)
    src = p.source.path
    em.emit(f"# {rp.state}_t = A_t({rp.state}_(t-1)) + k'_t v'_t^T  ({src}:{upd.pos.line if upd.pos else '?'}), "
            f"k' = {show(rp.k) if rp.k is not None else '1'}, v' = {show(rp.v)}")
    em.emit(f"# o_t = {show(rp.q) if rp.q is not None else '1'} . {rp.state}_t" + (
        f" over {rp.key.name}" if rp.key is not None else " (no sum: a one-axis state, K = 1)"))
    q = _as_btd(fe, rp.q, (rp.key,), f"B, H, T, {K}") if rp.q is not None else "None"
    k = _as_btd(fe, rp.k, (rp.key,), f"B, H, T, {K}") if rp.k is not None else "None"
    v = _as_btd(fe, rp.v, (rp.value,), f"B, H, T, {V}")
    if rp.u is not None:
        em.emit(f"# delta rule: {rp.state} <- {rp.state} - u' (w'^T {rp.state}) with u' = {show(rp.u)}, "
                f"w' = {show(rp.w)}")
        u = _as_btd(fe, rp.u, (rp.key,), f"B, H, T, {K}")
        w = _as_btd(fe, rp.w, (rp.key,), f"B, H, T, {K}")
        scale_delta = f", u={u}, w={w}"
    else:
        scale_delta = ""
    if rp.normaliser:
        em.emit(f"# the normaliser {rp.normaliser}: one more value column with v' = 1")
        vn = em.fresh()
        em.emit(f"{vn} = torch.cat([as_dtype({v}, dt_in), torch.ones(B, T, H, 1, dtype=dt_in, device=dev)], dim=-1)")
        v = vn
    at = ap = "None"
    if rp.decay != "none":
        em.emit(f"# A_t = {'exp(at * ap)' if rp.decay == 'exp' else 'at * ap'}: at = "
                f"{show(rp.at) if rp.at is not None else '1'} (per token), ap = "
                f"{show(rp.ap) if rp.ap is not None else '1'} (per head)")
        kv = tuple(x for x in (rp.key, rp.value) if x is not None)
        if rp.at is not None:
            lay = tuple(x for x in kv if x in rp.at.idx)
            shape = ", ".join(["B, H, T"] + [em.sizes_var[x.axis] for x in lay])
            at = f"{_as_btd(em, rp.at, lay, shape)}{_kv_view(lay, rp.key, rp.value)}"
        if rp.ap is not None:
            lay = tuple(x for x in kv if x in rp.ap.idx)
            e, elay = em.val(rp.ap, "pre")
            e = em.expand(em.tensor(e, elay), elay or (), lay)
            full = ", ".join(["1, H"] + [em.sizes_var[x.axis] for x in lay])
            ap = em.fresh()
            em.emit(f"{ap} = ({e}).expand({full})[0]{_kv_view(lay, rp.key, rp.value)}  # [H, K|1, V|1]")
    scale = " * ".join(em._paren(em.val(f, "pre")[0]) for f in rp.scale) or "1.0"
    return em, K, V, (q, k, v, at, ap, scale + scale_delta)


def _epilogue(em, rp: RecPlan, V: str) -> None:
    """o (fp32 [B, T, H, V(+1)]) -> the output: normaliser division, gate, skip."""
    if rp.normaliser:
        em.emit(f"o = o[..., :{V}] / o[..., {V}:]  # q'^T {rp.state} / q'^T {rp.normaliser}")
    if rp.gate is not None:
        em.emit(f"o = o * {_as_btd(em, rp.gate, (rp.value,), f'B, H, T, {V}')}  # output gate {show(rp.gate)}")
    if rp.skip is not None:
        em.emit(f"o = o + {_as_btd(em, rp.skip, (rp.value,), f'B, H, T, {V}')}  # skip {show(rp.skip)}")


def _pack_lines(rp: RecPlan) -> list[str]:
    """``recurrent_pack(states, sizes)`` and ``recurrent_unpack(h)``: declared states <-> the kernels' layout."""
    s, z = rp.state, rp.normaliser
    V = f"sizes[{rp.value.axis!r}]"
    out = ["def recurrent_pack(states, sizes):",
           f'    """The declared states -> the kernels\' state [B, H, K, V{" + 1" if z else ""}] fp32 (None: none '
           'given)."""',
           f"    s = states.get({s!r})"]
    if z:
        out += [f"    z = states.get({z!r})",
                "    if s is None and z is None:",
                "        return None",
                "    ref = s if s is not None else z",
                f"    if s is None:\n        s = torch.zeros(*z.shape, {V}, dtype=torch.float32, device=z.device)",
                "    if z is None:\n        z = torch.zeros(s.shape[:-1], dtype=torch.float32, device=s.device)",
                "    del ref"]
    else:
        out += ["    if s is None:", "        return None"]
    if rp.key is None:
        out.append("    s = s[:, :, None, :]  # a one-axis state: K = 1")
    elif rp.transposed:
        out.append("    s = s.transpose(-1, -2)  # declared [value, key]")
    if z:
        out.append("    s = torch.cat([s.to(torch.float32), z.to(torch.float32)[..., None]], dim=-1)")
    out.append("    return s.to(torch.float32).contiguous()")
    out += ["", "", "def recurrent_unpack(h):",
            '    """The kernels\' state [B, H, K, V] fp32 -> the declared states (views of h)."""']
    body = "h[..., :-1]" if z else "h"
    body = f"{body}[:, :, 0]" if rp.key is None else f"{body}.transpose(-1, -2)" if rp.transposed else body
    out.append(f"    return {{{s!r}: {body}" + (f", {z!r}: h[..., -1]}}" if z else "}"))
    return out


def emit_recurrent(a: Analysis, rp: RecPlan) -> list[str]:
    """Lines of ``recurrent(...)`` (the whole sequence), ``recurrent_step(...)`` (one token, in place) and
    the state packing helpers."""
    p = a.program
    lines = ["def recurrent(inputs, params, states, sizes, output_final_state=False, cu_seqlens=None):",
             f'    """The recurrent form of {p.name}: the {a.transition} recurrence of {rp.state} as one scan kernel',
             "    (state in registers, checkpoints every REC_CHUNK tokens for the backward). inputs [B, T, H, ...];",
             '    returns (o [B, T, H, ...], final states or None)."""']
    em, K, V, (q, k, v, at, ap, scale) = _emit_common(a, rp, lines)
    em.emit("h0 = recurrent_pack(states, sizes)")
    epilogue = bool(rp.normaliser or rp.gate is not None or rp.skip is not None)
    odt = "torch.float32" if epilogue else "x0.dtype"  # (no epilogue: the kernel stores the output's dtype)
    if rp.key is None:  # a one-axis state: the element-wise kernels ([BV] vector state, chunked scans)
        em.emit(f"o, ht = rec_ew_scan({v}, {at}, {ap}, h0, exp_decay={rp.decay == 'exp'}, scale={scale}, "
                f"o_dtype={odt}, cu_seqlens=cu_seqlens)")
    else:
        em.emit(f"o, ht = rec_scan({q}, {k}, {v}, {at}, {ap}, h0, exp_decay={rp.decay == 'exp'}, scale={scale}, "
                f"o_dtype={odt}, cu_seqlens=cu_seqlens)")
    _epilogue(em, rp, V)
    em.emit("return o, (recurrent_unpack(ht) if output_final_state else None)")
    lines += ["", "", "recurrent.native_varlen = True  # runs packed sequences (cu_seqlens) in one launch"]
    lines += ["", "", "def recurrent_step(inputs, params, h, sizes, out, o32, states=None):",
              f'    """One token of {p.name} in place: inputs [B, 1, H, ...], h the kernels\' state (recurrent_pack),',
              "    updated in place; o32 [B, 1, H, V(+1)] fp32 and out [B, 1, H, ...] preallocated. Returns out."
              '"""']
    em, K, V, (q, k, v, at, ap, scale) = _emit_common(a, rp, lines)
    call = f"rec_ew_step({v}, " if rp.key is None else f"rec_step({q}, {k}, {v}, "
    if rp.normaliser or rp.gate is not None or rp.skip is not None:
        em.emit(f"o = {call}{at}, {ap}, h, o32, exp_decay={rp.decay == 'exp'}, scale={scale})")
        _epilogue(em, rp, V)
        em.emit("out.copy_(o)")
    else:  # no epilogue: the kernel writes the output in out's dtype
        em.emit(f"{call}{at}, {ap}, h, out, exp_decay={rp.decay == 'exp'}, scale={scale})")
    em.emit("return out")
    replay = not (rp.normaliser or rp.gate is not None or rp.skip is not None)
    lines += ["", "", f"RECURRENT_STEP_REPLAY = {replay}  # recurrent_step is its launch alone (nothing after it): "
              "the decoder may record and replay it", "", "",
              "def recurrent_state_shape(B, H, sizes):",
              '    """The kernels\' state shape for B sequences and H heads."""',
              f"    return (B, H, {'1' if rp.key is None else f'sizes[{rp.key.axis!r}]'}, "
              f"sizes[{rp.value.axis!r}]{' + 1' if rp.normaliser else ''})", "", ""]
    lines += _pack_lines(rp)
    return lines


def describe(a: Analysis) -> list[str]:
    """What the recurrent form hands to the kernels, in words (for ``mixc explain``)."""
    from .emit_complex import ComplexPlan, describe_complex

    try:
        rp = plan(a)
    except NoRecurrentKernel:
        return []
    if isinstance(rp, ComplexPlan):
        return describe_complex(rp)
    out = [f"scan kernel: S_t = A_t * S_(t-1) + k' v'^T with k' = {show(rp.k) if rp.k is not None else '1'}, "
           f"v' = {show(rp.v)}, q' = {show(rp.q) if rp.q is not None else '1'} (one program per batch, head and "
           "value tile; fp32 state in registers)"]
    if rp.decay != "none":
        out.append(f"decay A_t = {'exp(at * ap)' if rp.decay == 'exp' else 'at * ap'}, at = "
                   f"{show(rp.at) if rp.at is not None else '1'} per token, ap = "
                   f"{show(rp.ap) if rp.ap is not None else '1'} per head: formed in the kernel")
    if rp.normaliser:
        out.append(f"normaliser {rp.normaliser}: one more value column (v' = 1), divided in PyTorch")
    if rp.gate is not None:
        out.append(f"output gate {show(rp.gate)}: PyTorch epilogue")
    if rp.skip is not None:
        out.append(f"skip {show(rp.skip)}: PyTorch epilogue")
    out.append("backward: states checkpointed every REC_CHUNK tokens, each chunk recomputed in reverse; "
               "decode: one in-place step kernel (recurrent_step)")
    return out


def emit_any(a: Analysis) -> tuple[list[str] | None, str]:
    from .emit_complex import ComplexPlan, emit_complex

    try:
        rp = plan(a)
        if isinstance(rp, ComplexPlan):
            return emit_complex(a, rp), "recurrent kernel emitted (complex state as real/imaginary pairs)"
        return emit_recurrent(a, rp), "recurrent kernel emitted"
    except NoRecurrentKernel as ex:
        return None, str(ex)


def _backend():
    from .. import custom_op
    from ..registry import FormBackend
    from . import complex, elementwise, kernels, launch

    return FormBackend(form="recurrent", emit=emit_any,
                       support=(custom_op, hostint, launcher, kernels, launch, elementwise, complex),
                       native_varlen=False, describe=describe)


BACKEND = _backend()
