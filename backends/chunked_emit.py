"""Emit the chunked form of a program: a PyTorch prologue forming q', k', v' and the log decays
from the analysis's normal form, one call of the generic kernel in :mod:`mixc.backends.chunked`,
and an epilogue (output gate, skip, normaliser division).

:func:`plan` reads only the analysis (never a mechanism's name) and either returns a
:class:`ChunkPlan` or says, in words, why this program has no chunked form yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.analysis import Analysis, Readout, StateForm, Term, _flatten_mul, _k_factors, product, show
from mixc.ir import T_VAR, Node, Var
from mixc.lower import make, rename

from .reference import INFIX, TORCH_UNARY, input_dtype_emitter, prologue

# power_features' width rounded up to a multiple of this with zero features: a 153-wide bf16 row (based at
# K = 16) starts at an odd address and every kernel moves it 2 bytes at a time; a 160-wide one, 16 at a time
FEATURE_PAD = 16


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


def _as_btd(em, node: Node, lay_vars: tuple[Var, ...], shape: str) -> str:
    """Emit ``node`` laid out [B, T, H, *lay_vars] (expanded to full size). An input read as
    declared is passed through untouched (no copy, its own dtype)."""
    key = ("btd", node, lay_vars)
    if key in em.memo:
        return em.memo[key]
    if node.op == "input" and node.src[0].op == "iota" and node.src[0].arg == T_VAR and \
            tuple(node.arg[1]) == tuple(lay_vars):
        name = f"inputs[{node.arg[0]!r}]"
    elif _is_number(node):  # a number (a constant decay, v' = 1): one value per head, broadcast (stride 0)
        e, _ = em.val(node, "pre")
        name = em.fresh()
        full = ", ".join(["B, T, H"] + [em.sizes_var[v.axis] for v in lay_vars])
        ones = ", ".join(["1", "1", "H"] + ["1"] * len(lay_vars))
        em.emit(f"{name} = torch.full(({ones}), {e}, dtype={em.rdt}, device=dev).expand({full})  # {show(node)}")
    elif (direct := _elementwise_btd(em, node, lay_vars)) is not None:
        name = em.fresh()
        dims = ", ".join(["B, T, H"] + [v.axis for v in lay_vars])
        em.emit(f"{name} = {direct}  # [{dims}], the inputs' own layout (no permutes)")
    elif (per_head := _per_head(em, node, lay_vars)) is not None:
        name = em.fresh()
        full = ", ".join(["B, T, H"] + [em.sizes_var[v.axis] for v in lay_vars])
        em.emit(f"{name} = ({per_head}).expand({full})  # per head: one value per head at every token (stride 0)")
    else:
        e, lay = em.val(node, "pre")
        e = em.expand(em.tensor(e, lay), lay if lay is not None else (), (T_VAR, *lay_vars))
        perm = ", ".join(["0", "2", "1"] + [str(3 + i) for i in range(len(lay_vars))])
        name = em.fresh()
        em.emit(f"{name} = ({e}).expand({shape}).permute({perm})")
    em.memo[key] = name
    return name


def _per_head(em, node: Node, lay_vars: tuple[Var, ...]) -> str | None:
    """``node`` as one expression over [H, *lay_vars] when it varies with the head (and ``lay_vars``) only:
    an elementwise formula of parameters, as :func:`_elementwise_btd` has it but without the token axis,
    so that it is formed once per head and broadcast over [B, T] by an expand (no copy, no permutes; the
    kernels read a time-invariant scalar decay per head). None for anything else, numbers included."""
    if T_VAR in node.idx or _is_number(node):
        return None
    return _elementwise_btd(em, node, lay_vars, tok=False)


def _elementwise_btd(em, node: Node, lay_vars: tuple[Var, ...], tok: bool = True) -> str | None:
    """``node`` as one expression in the inputs' own [B, T, H, *lay_vars] layout, when it is an
    elementwise formula (numbers, infix operators, the unary functions) of inputs each read as declared
    at token t over exactly ``lay_vars`` and of parameters (per head, over some of ``lay_vars`` in order),
    every operation taking the full layout: then it needs no permute to [B, H, T, ...] and back, nor
    the views' autograd nodes, which a short call pays for on the host. None for anything else."""
    if _is_number(node):
        e, lay = em.val(node, "pre")
        return e if lay is None else None
    if node.op == "input":
        src = node.src[0]
        if tok and src.op == "iota" and src.arg == T_VAR and tuple(node.arg[1]) == tuple(lay_vars):
            return _input_in(em, node, "as_dtype")
        return None
    if node.op in ("param", "buffer"):  # [H, *axes] broadcast onto [B, T, H, *lay_vars] (axes in that order)
        name, axes = node.arg
        if [v for v in lay_vars if v in axes] != list(axes):
            return None
        ix = [":"] + [":" if v in axes else "None" for v in lay_vars]
        while len(ix) > 1 and ix[-1] == ":":
            ix.pop()
        # (on the inputs' device: the call's checks made sure of it)
        return f"as_dtype(params[{name!r}], real)" + (f"[{', '.join(ix)}]" if len(ix) > 1 else "")
    full = (T_VAR, *lay_vars) if tok else tuple(lay_vars)
    if tuple(node.idx) != full or not (node.op == "neg" or node.op in TORCH_UNARY or node.op in INFIX):
        return None
    args = [_elementwise_btd(em, s, lay_vars, tok) for s in node.src]
    if any(a is None for a in args):
        return None
    if node.op in _PROMOTING and em.rdt == "real":  # an input beside an fp32 tensor: no copy of it first
        for i, (a, b) in enumerate((node.src, node.src[::-1])):
            if a.op == "input" and _real_tensor(b):
                args[i] = _input_in(em, a, "promoted")
                break
    if node.op == "neg":
        return f"(-{em._paren(args[0])})"
    if node.op in TORCH_UNARY:
        return f"{TORCH_UNARY[node.op]}({args[0]})"
    return f"({em._paren(args[0])} {INFIX[node.op]} {em._paren(args[1])})"


def _input_in(em, node: Node, cast: str) -> str:
    """An input read at token t in the emitter's dtype, through runtime ``cast`` (as_dtype or promoted)."""
    return f"{cast}(inputs[{node.arg[0]!r}], {em.rdt})"


_PROMOTING = ("add", "sub", "mul", "div")  # arithmetic that type promotion carries out in the wider dtype


def _real_tensor(n: Node) -> bool:
    """Whether :func:`_elementwise_btd`'s expression for ``n`` is a tensor with dimensions in the real
    dtype (fp32, or fp64 for fp64 inputs): a parameter or input (which it converts), or an operation
    with one such operand. Beside it, a bf16 or fp16 operand of +, -, *, / is computed in the real dtype
    by type promotion, as if converted first, without the copy (runtime ``promoted``)."""
    if n.op in ("param", "buffer", "input"):
        return True
    if _is_number(n):
        return False
    return (n.op == "neg" or n.op in TORCH_UNARY or n.op in INFIX) and any(_real_tensor(x) for x in n.src)


def _is_number(n: Node) -> bool:
    """Whether a value is a plain number at run time (built from constants and sizes only)."""
    return not n.idx and all(x.op not in ("input", "param", "buffer", "state", "iota", "head", "rand", "eye")
                             for x in n.walk())


def _scale_by(em, factors: list[Node]) -> str:
    """`` * f`` for each per-token scalar factor (numbers stay numbers)."""
    out = ""
    for f in factors:
        e, lay = em.val(f, "pre")
        out += f" * {em._paren(e)}" if lay is None else f" * {_as_btd(em, f, (), 'B, H, T')}[..., None]"
    return out


def _feature_emitter(p, em, products: bool = False):
    """An emitter for q', k', v' (and feature maps) in the dtype the kernels take (``dt_in``: the
    inputs' own bf16/fp16, else fp32): one rounding per operation instead of fp32 copies of every
    input and a cast at the end. Decays and the epilogue stay with ``em``, in fp32 at least.
    ``products``: feature maps that multiply inputs together (q (x) q of inputs of 1e3 is 1e6), formed
    in fp32 for fp16 inputs, whose range (65504) they would overflow; bf16 has fp32's range."""
    half = "(torch.bfloat16,)" if products else "(torch.bfloat16, torch.float16)"
    em.emit(f"dt_in = x0.dtype if x0.dtype in {half} else torch.float32")
    return input_dtype_emitter(p, em, "dt_in", "lp")


def _kernel_skip(cp: ChunkPlan) -> Node | None:
    """The per-head coefficient of a skip term the output kernel adds (none with an output gate, which
    multiplies before the skip is added), or None."""
    return _skip_coefficient(cp.skip, cp.v) if cp.skip is not None and cp.gate is None else None


def _normaliser_in_kernel(cp: ChunkPlan) -> bool:
    """Whether the kernels carry the normaliser (no decay or a scalar one, dividing by the denominator itself;
    chunk_normalised otherwise makes it a value column)."""
    return cp.normaliser is not None and cp.decay in ("none", "scalar") and cp.den_fn is None


def _den_fn_expr(em, n: Node, X: Node) -> str:
    """f(d) as a PyTorch expression of the tensor ``d`` (the denominator q'^T z, [B, T, H, 1] fp32), for the
    elementwise function f of Readout.den_fn: X (the readout) is ``d``, numbers are numbers."""
    if n == X:
        return "d"
    if _is_number(n):
        return em._paren(em.val(n, "pre")[0])
    args = [_den_fn_expr(em, x, X) for x in n.src]
    if n.op == "neg":
        return f"(-{args[0]})"
    if n.op in TORCH_UNARY:
        return f"{TORCH_UNARY[n.op]}({args[0]})"
    if n.op in ("min", "max") and len(args) == 2:
        a, b = args if not _is_number(n.src[0]) else args[::-1]
        if _is_number(n.src[0]) or _is_number(n.src[1]):
            return f"torch.clamp_{'max' if n.op == 'min' else 'min'}({a}, {b})"  # (max(a, b): b the least)
        return f"torch.{'minimum' if n.op == 'min' else 'maximum'}({a}, {b})"
    if n.op in ("add", "sub", "mul", "div", "pow"):
        return f"({args[0]} {INFIX[n.op]} {args[1]})"
    raise NoChunkedForm(f"the denominator's function {show(n)} is not elementwise arithmetic of numbers "
                        "and the readout")


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


def _header(doc: str) -> list[str]:
    """The chunked form's signature and its (two-line) docstring."""
    return ["def chunked(inputs, params, states, sizes, output_final_state=False, cu_seqlens=None):",
            f'    """{doc}."""']


def emit_chunked(a: Analysis, cp: ChunkPlan) -> list[str]:
    """Lines of ``chunked(inputs, params, states, sizes, output_final_state, cu_seqlens)``."""
    p = a.program
    lines = _header(f"The chunked form of {p.name}: q', k', v' and log decays in PyTorch, then one chunked\n"
                    f"    kernel for the {a.transition} recurrence of state {cp.state}"
                    + (f" (with its normaliser {cp.normaliser}, divided in the kernel)" if _normaliser_in_kernel(cp)
                       else f" (with its normaliser {cp.normaliser} as a value column)" if cp.normaliser else ""))
    extra = [n for n in (cp.q, cp.k, cp.v, cp.g, cp.gate, cp.skip) if n is not None]
    em = prologue(p, lines, extra)  # decays and the epilogue: in the compute dtype (fp32 at least)
    fe = _feature_emitter(p, em)  # q', k', v': in the kernels' input dtype
    K, V = em.sizes_var[cp.key.axis], em.sizes_var[cp.value.axis]
    upd = next((eq for eq in p.updates if eq.target == cp.state), None)
    src = p.source.path
    where_u = f"{src}:{upd.pos.line}" if upd is not None and upd.pos else src
    where_o = f"{src}:{p.output.pos.line}" if p.output.pos else src
    em.emit(f"# k'_t = {show(cp.k)},  v'_t = {show(cp.v)}  (the update of {cp.state}, {where_u})")
    em.emit(f"# q'_t = {show(cp.q)}  (the output {p.output.target}, {where_o})")
    # number factors of q' (such as K ** -0.5) scale the kernel's output instead of a copy of q
    numbers, tensors = [], []
    for f in _flatten_mul(cp.q):
        (numbers if _is_number(f) else tensors).append(f)
    scale = " * ".join(em._paren(em.val(f, "pre")[0]) for f in numbers) or "1.0"
    q = _as_btd(fe, product(tensors) if tensors else _const(1), (cp.key,), f"B, H, T, {K}")
    kscale, k_rest = _key_scale(cp)
    k = _as_btd(fe, k_rest, (cp.key,), f"B, H, T, {K}")
    v = _as_btd(fe, cp.v, (cp.value,), f"B, H, T, {V}")
    gargs = ""
    if cp.decay != "none":
        em.emit(f"# log decay ({cp.decay}): {show(cp.g)}")
        if cp.decay == "scalar":
            g = _as_btd(em, cp.g, (), "B, H, T")
            gargs = f", gs={g}"
        elif cp.decay == "key":
            g = _as_btd(em, cp.g, (cp.key,), f"B, H, T, {K}")
            gargs = f", gk={g}"
        else:
            g = _as_btd(em, cp.g, (cp.value,), f"B, H, T, {V}")
            gargs = f", gv={g}"
    if kscale is not None:
        ks = _as_btd(em, kscale, (), "B, H, T")
        em.emit(f"# key scale {show(kscale)}: the kernels multiply k by it as they load k")
        gargs += f", kscale={ks}"
    st = f"states.get({cp.state!r})"
    em.emit(f"h0 = {st}")
    tr = ".transpose(-1, -2)" if cp.transposed else ""
    em.emit(f"h0 = None if h0 is None else as_dtype(h0, torch.float32){tr}")
    skip = cp.skip
    if (coef := _kernel_skip(cp)) is not None:
        sk = em.fresh()
        if (per_head := _per_head(em, coef, ())) is not None:  # [H] as it is (no views)
            em.emit(f"{sk} = {per_head}  # skip {show(skip)}: added in the kernel")
        else:
            e, lay = em.val(coef, "pre")
            em.emit(f"{sk} = ({em.tensor(e, lay)}).expand(1, H).reshape(H)  # skip {show(skip)}: added in the kernel")
        gargs += f", skip={sk}"
        skip = None
    if cp.normaliser:
        em.emit(f"z0 = states.get({cp.normaliser!r})")
        em.emit("z0 = None if z0 is None else as_dtype(z0, torch.float32)")
        gargs += ", h0=h0, z0=z0"
    else:
        gargs += ", h0=h0"
    # the kernel's output stays in the inputs' dtype unless an epilogue follows (then fp32)
    epilogue = cp.gate is not None or skip is not None
    args = (f"as_dtype({q}, dt_in), as_dtype({k}, dt_in), as_dtype({v}, dt_in){gargs}, cu_seqlens=cu_seqlens, "
            f"output_final_state=output_final_state, scale={scale}" + (", out_dtype=real)" if epilogue else ")"))
    if cp.normaliser and cp.den_fn is not None:
        X, fden = cp.den_fn
        em.emit(f"# o = (q'^T {cp.state}) / f(d), d = q'^T {cp.normaliser}, f(d) = {show(fden)}: "
                f"{cp.normaliser} as one more value column, f and the division in PyTorch (autograd)")
        em.emit("def den_fn(d):  # [B, T, H, 1] fp32")
        em.emit(f"    return {_den_fn_expr(em, fden, X)}")
        em.emit(f"o, ht, zt = chunk_normalised({args[:-1]}, den_fn=den_fn)")
        final = (f"{{{cp.state!r}: as_dtype(ht{tr}, real), {cp.normaliser!r}: as_dtype(zt, real)}} "
                 "if output_final_state else None")
    elif cp.normaliser:
        em.emit(f"# o = (q'^T {cp.state}) / (q'^T {cp.normaliser}): " + ("the kernels carry it and divide"
                if _normaliser_in_kernel(cp) else f"{cp.normaliser} as one more value column"))
        em.emit(f"o, ht, zt = chunk_normalised({args}")
        final = (f"{{{cp.state!r}: as_dtype(ht{tr}, real), {cp.normaliser!r}: as_dtype(zt, real)}} "
                 "if output_final_state else None")
    else:
        em.emit(f"o, ht = chunk_recurrence({args}")
        final = f"{{{cp.state!r}: as_dtype(ht{tr}, real)}} if output_final_state else None"
    if cp.gate is not None:
        gname = _as_btd(em, cp.gate, (cp.value,), f"B, H, T, {V}")
        em.emit(f"o = o * {gname}")
    if skip is not None:
        sname = _as_btd(em, skip, (cp.value,), f"B, H, T, {V}")
        em.emit(f"o = o + {sname}")
    em.emit(f"return o, ({final})")
    return lines


def chunk_plan_or_reason(a: Analysis) -> tuple[ChunkPlan | None, str]:
    try:
        return plan(a), "chunked kernel emitted"
    except NoChunkedForm as ex:
        return None, str(ex)


# ---- attention form with a separable weight: features, then linear attention ----------------------


@dataclass
class FeatureBlock:
    """One block of the feature maps: coeff * prod(q-side factors) * (A_1 x ... x A_n) against
    prod(k-side factors) * (B_1 x ... x B_n) (x = flattened outer product)."""

    coeff: float
    pairs: list[tuple[Node, Node]]  # (A over the query token, B over the key token), one per factor
    q_factors: list[Node]
    k_factors: list[Node]


def _power_of_one_pair(b: FeatureBlock) -> bool:
    """Whether a feature block is (a . b)^e of one dot product, e >= 2 (a symmetric power serves it)."""
    return len(b.pairs) > 1 and all(pr == b.pairs[0] for pr in b.pairs)


def _polynomial_of_one_pair(blocks: list[FeatureBlock]) -> tuple[Node, Node, int] | None:
    """(A, B, D) if the feature blocks are the degrees 0 .. D (D >= 1, each once) of one dot product A . B
    of two vectors, with number coefficients only: then the whole map is one weighted symmetric power
    of [A, 1] (power_features: C(K + D, D) features, written by one kernel per side on a GPU)."""
    pairs = {pr for b in blocks for pr in b.pairs}
    degrees = sorted(len(b.pairs) for b in blocks)
    if len(pairs) != 1 or degrees != list(range(len(blocks))) or len(blocks) < 2:
        return None
    if not all(_is_number(f) for b in blocks for f in b.q_factors + b.k_factors):
        return None
    ((A, B),) = pairs
    if any(len([v for v in n.idx if v != T_VAR]) != 1 for n in (A, B)):
        return None
    return A, B, degrees[-1]


@dataclass
class FeaturePlan:
    blocks: list[FeatureBlock]
    value: Node  # v'_t[j]
    value_var: Var
    normalised: bool
    width: str
    width_symmetric: str  # with each power of one pair as its symmetric power


def _to_t(n: Node) -> Node:
    """A key-token expression read at the current token instead (u -> t)."""
    from mixc.ir import U_VAR

    return rename(n, {U_VAR: T_VAR})


def plan_features(a: Analysis) -> FeaturePlan:
    from mixc.analysis import _side
    from mixc.ir import U_VAR

    p = a.program
    if not (a.separable and "chunked" in a.forms):
        raise NoChunkedForm(a.reasons.get("chunked", "the weight is not separable"))
    out = p.output.value
    num, den = (out.src[0], out.src[1]) if out.op == "div" else (out, None)
    for s in (num, den):
        if s is not None and not (s.op == "sum" and s.arg == (U_VAR,)):
            raise NoChunkedForm("the output is not sum(u: w * v) or sum(u: w * v) / sum(u: w)")
    factors = _flatten_mul(num.src[0])
    (j,) = p.output.vars if len(p.output.vars) == 1 else (None,)
    if j is None:
        raise NoChunkedForm("the output must have one value axis")
    vf = [f for f in factors if j in f.idx]
    wf = [f for f in factors if j not in f.idx]
    if any(set(f.idx) - {T_VAR, U_VAR, j} for f in vf) or not vf:
        raise NoChunkedForm("the value factor must depend on the key token and the output axis only")
    w = product(wf) if wf else _const(1)
    if den is not None and den.src[0] != w:
        raise NoChunkedForm("the denominator's weight differs from the numerator's")
    from mixc.analysis import separability

    sep = separability(w)
    if not sep.separable:
        raise NoChunkedForm(sep.reason)
    blocks = []
    for coeff, atoms, ranks in sep.terms:
        pairs = []
        for sym, e in atoms.items():
            node = sep.atom_nodes[sym]
            if len(node.arg) != 1:
                raise NoChunkedForm("a dot product over several indices")
            side_t = [f for f in _flatten_mul(node.src[0]) if _side(f) in ("t", "none")]
            side_u = [f for f in _flatten_mul(node.src[0]) if _side(f) == "u"]
            A = product(side_t) if side_t else _const(1)
            B = _to_t(product(side_u)) if side_u else _const(1)
            pairs += [(A, B)] * int(e)
        qf, kf = [], []
        for sym, e in ranks.items():
            node = sep.rank_one_nodes[sym]
            (kf if _side(node) == "u" else qf).extend([_to_t(node) if _side(node) == "u" else node] * e)
        blocks.append(FeatureBlock(float(coeff), pairs, qf, kf))
    from mixc.analysis import sizes_str

    return FeaturePlan(blocks, _to_t(product(vf)), j, den is not None, a.feature_width or "?",
                       sizes_str(sep.width_symmetric) if sep.width_symmetric is not None else "?")


def emit_chunked_features(a: Analysis, fp: FeaturePlan) -> list[str]:
    """Lines of ``chunked(...)`` for an attention-form file with a separable weight."""
    p = a.program
    poly = _polynomial_of_one_pair(fp.blocks)
    lines = _header(f"The chunked form of {p.name}: the weight w(t, u) factors through feature maps of width\n"
                    f"    {fp.width} ({fp.width_symmetric} with symmetric powers); phi(q) and psi(k) are formed "
                    + (f"by power_features\n    (zero features up to a multiple of {FEATURE_PAD}), then one "
                       if poly is not None else "in PyTorch,\n    then one ")
                    + "linear-attention kernel"
                    + (" that carries the normaliser and divides" if fp.normalised else ""))
    nodes = [n for b in fp.blocks for pair in b.pairs for n in pair] + [n for b in fp.blocks for n in
                                                                       b.q_factors + b.k_factors] + [fp.value]
    em = prologue(p, lines, nodes)
    fe = _feature_emitter(p, em, products=True)  # the feature maps: in the kernels' input dtype
    where = f"{p.source.path}:{p.output.pos.line}" if p.output.pos else p.source.path
    em.emit(f"# w(t, u) = {a.separability.weight}  ({where}); feature width {fp.width}")
    j = fp.value_var
    V = em.sizes_var[j.axis]
    if poly is not None:
        A, B, D = poly
        by_degree = sorted(fp.blocks, key=lambda b: len(b.pairs))
        em.emit(f"# a polynomial of degree {D} in ({show(A)}) . ({show(B)}): one weighted symmetric power of "
                f"[x, 1] per side, width {fp.width_symmetric}")
        em.emit(f"# (rounded up to a multiple of {FEATURE_PAD} with zero features: aligned rows for the kernels)")
        sides = []
        for x, factors in ((A, [[_const(b.coeff), *b.q_factors] for b in by_degree]),
                           (B, [b.k_factors for b in by_degree])):
            (i,) = [v for v in x.idx if v != T_VAR]
            xs = _as_btd(fe, x, (i,), f"B, H, T, {em.sizes_var[i.axis]}")
            coeffs = ", ".join(" * ".join(em._paren(em.val(f, "pre")[0]) for f in fs) or "1.0" for fs in factors)
            sides.append(f"power_features(as_dtype({xs}, dt_in), {D}, ({coeffs}), pad={FEATURE_PAD})")
        em.emit(f"phi_q = {sides[0]}")
        em.emit(f"psi_k = {sides[1]}")
    qs, ks = [], []
    for bi, b in enumerate(fp.blocks if poly is None else []):
        em.emit(f"# feature block {bi}: {b.coeff!r} * " + (" x ".join(f"({show(A)})" for A, _ in b.pairs) or "1"))
        qa, ka = [], []
        for A, B in b.pairs:
            (i,) = [v for v in A.idx if v != T_VAR] or [None]
            qa.append(_as_btd(fe, A, (i,), f"B, H, T, {em.sizes_var[i.axis]}") if i else None)
            (i2,) = [v for v in B.idx if v != T_VAR] or [None]
            ka.append(_as_btd(fe, B, (i2,), f"B, H, T, {em.sizes_var[i2.axis]}") if i2 else None)
        if _power_of_one_pair(b) and qa[0] and ka[0]:
            # (a . b)^e through symmetric powers: C(K + e - 1, e) features instead of K^e
            qterm, kterm = (f"symmetric_power({x[0]}, {len(b.pairs)})" for x in (qa, ka))
        else:
            qterm = f"tensor_product({', '.join(qa)})" if qa else "torch.ones(B, T, H, 1, dtype=dt_in, device=dev)"
            kterm = f"tensor_product({', '.join(ka)})" if ka else "torch.ones(B, T, H, 1, dtype=dt_in, device=dev)"
        qterm += _scale_by(fe, b.q_factors)
        kterm += _scale_by(fe, b.k_factors)
        if b.coeff != 1.0:
            qterm = f"{b.coeff!r} * {qterm}"
        qn, kn = em.fresh(), em.fresh()
        em.emit(f"{qn} = {qterm}")
        em.emit(f"{kn} = {kterm}")
        qs.append(qn)
        ks.append(kn)
    v = _as_btd(fe, fp.value, (j,), f"B, H, T, {V}")
    if poly is None:
        em.emit(f"phi_q = torch.cat([{', '.join(qs)}], dim=-1)  # [B, T, H, {fp.width_symmetric}]")
        em.emit(f"psi_k = torch.cat([{', '.join(ks)}], dim=-1)")
    if fp.normalised:
        em.emit("# o = (phi_q^T S) / (phi_q^T z), z = sum psi_k: the kernels carry z and divide")
        em.emit(f"o, _, _ = chunk_normalised(as_dtype(phi_q, dt_in), as_dtype(psi_k, dt_in), as_dtype({v}, dt_in), "
                "cu_seqlens=cu_seqlens)")
    else:
        em.emit(f"o, _ = chunk_recurrence(as_dtype(phi_q, dt_in), as_dtype(psi_k, dt_in), as_dtype({v}, dt_in), "
                "cu_seqlens=cu_seqlens)")
    em.emit("return o, ({} if output_final_state else None)")
    return lines


def describe(a: Analysis) -> list[str]:
    """What the chunked form hands to the kernels and what stays in PyTorch, in words (for ``mixc
    explain``); empty when there is no chunked form."""
    try:
        if a.kind == "attention":
            fp = plan_features(a)
            blocks = []
            for b in fp.blocks:
                e = len(b.pairs)
                blocks.append("1" if not e else f"({show(b.pairs[0][0])})^{e} as a symmetric power"
                              if _power_of_one_pair(b) else " x ".join(f"({show(A)})" for A, _ in b.pairs))
            poly = _polynomial_of_one_pair(fp.blocks)
            if poly is not None:
                blocks = [f"a polynomial of degree {poly[2]} in ({show(poly[0])}) . ({show(poly[1])}), as one weighted "
                          "symmetric power of [x, 1] per side"]
            where = "one kernel per side, power_features" if poly is not None else "PyTorch"
            pad = f", rounded up to a multiple of {FEATURE_PAD} with zero features (aligned rows)" if poly else ""
            out = [f"feature maps ({where}): {' + '.join(blocks)}; width {fp.width}, "
                   f"{fp.width_symmetric} as stored{pad}"]
            if fp.normalised:
                out.append("normaliser: carried beside the state by the kernels; the output kernel divides")
            return out
        cp = plan(a)
    except NoChunkedForm:
        return []
    kscale, k_rest = _key_scale(cp)
    out = [f"q' = {show(cp.q)}, k' = {show(k_rest)}, v' = {show(cp.v)} (PyTorch prologue, in the inputs' dtype)"]
    if kscale is not None:
        out.append(f"key scale {show(kscale)}: k' is scaled by it per token as the kernels load it "
                   "(the scaled keys are never stored)")
    if cp.decay != "none":
        out.append(f"log decay ({cp.decay}): {show(cp.g)}, floored at -60 (a decay of 0 weighs e^-60) and summed "
                   "within each 64-token chunk by the kernels")
        if cp.decay == "key":
            out.append("per-key decay: a chunk whose summed gates stay within e^(+-50) of its middle row takes its "
                       "in-chunk products whole on tensor cores; a sharper chunk takes exact 16-row blocks")
            out.append("per-key decay in bf16/fp16 with 64+ keys: read as it is and summed by a tensor-core product "
                       "in the kernels (fp32 sums written only for the backward; no backward: two kernels)")
    if cp.den_fn is not None:
        out.append(f"normaliser {cp.normaliser}: an extra value column; o = num / f(den) with f(den) = "
                   f"{show(cp.den_fn[1])}, a PyTorch epilogue (its gradient by autograd)")
    elif cp.normaliser:
        out.append(f"normaliser {cp.normaliser}: " + ("carried beside the state by the kernels; the output kernel "
                                                       "divides" if _normaliser_in_kernel(cp) else "an extra value "
                                                       f"column (per-{cp.decay} decay); divided in PyTorch"))
    if cp.gate is not None:
        out.append(f"output gate {show(cp.gate)}: PyTorch epilogue")
    if cp.skip is not None:
        out.append(f"skip {show(cp.skip)}: " + ("added by the output kernel" if _kernel_skip(cp) is not None
                                                 else "PyTorch epilogue"))
    return out


def emit_any(a: Analysis) -> tuple[list[str] | None, str]:
    """The chunked form's lines for any analysed program, or None and the reason there is none."""
    try:
        if a.kind == "attention":
            return emit_chunked_features(a, plan_features(a)), "chunked kernel emitted"
        return emit_chunked(a, plan(a)), "chunked kernel emitted"
    except NoChunkedForm as ex:
        return None, str(ex)


def _backend():
    from . import chunked
    from .registry import FormBackend

    return FormBackend(form="chunked", emit=emit_any, support=(chunked,), native_varlen=True, describe=describe)


BACKEND = _backend()
