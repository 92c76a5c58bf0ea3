"""Read the attention form of a program into sympy: the score, its derivatives, the mask, the cache.

An attention-form file computes ``o[t, j] = sum(u: softmax(u: s(t, u)) * v[u, j])`` under
``mask(t, u)``. :func:`plan` finds in the IR the one dot product ``qk = sum(i: q[t, i] * k[u, i])``
the score is built on, and turns the rest of the score into a sympy expression in ``qk``, the token
positions ``t`` and ``u``, the head index, the sizes and the per-head parameters and buffers. The
mask becomes a sympy boolean in ``t`` and ``u``. Everything is read from the IR, never from a
mechanism's name; what cannot be read says why (:class:`NoAttentionForm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from mixc.ir import T_VAR, U_VAR, Node, Program

QK = sympy.Symbol("qk", real=True)  # the dot product q_t . k_u
T_SYM = sympy.Symbol("t", integer=True, nonnegative=True)  # query position (absolute, cache included)
U_SYM = sympy.Symbol("u", integer=True, nonnegative=True)  # key position
HEAD = sympy.Symbol("head", integer=True, nonnegative=True)  # head index
CACHE_AXIS = "T@cache"  # the size name of a key/value cache's token axis (meta["states"])


class NoAttentionForm(Exception):
    """Why a program has no tiled attention form in this backend."""


@dataclass
class AttentionPlan:
    q: str  # input read at the query token t over the key width
    k: str  # input read at the key token u over the key width
    v: str  # input read at the key token u over the value width
    kdim: str  # size name of the q/k width
    vdim: str  # size name of the v width (the output's)
    score: sympy.Expr  # s(qk, t, u, head, params, sizes)
    mask: sympy.Basic | None  # mask(t, u) (None: causal u <= t)
    params: list[str] = field(default_factory=list)  # per-head scalars the score reads, learnable ones first
    learnable: list[str] = field(default_factory=list)  # the params among them (gradients)
    sizes: list[str] = field(default_factory=list)  # size names the score reads
    window: int | None = None  # the cache keeps this many last keys (None: all of them)

    @property
    def mask_expr(self) -> sympy.Basic:
        return self.mask if self.mask is not None else sympy.Le(U_SYM, T_SYM)

    def dscore(self, x: sympy.Symbol) -> sympy.Expr:
        return sympy.diff(self.score, x)


def param_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(f"p_{name}", real=True)


def size_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(f"dim_{name}", positive=True)


def _token(n: Node) -> str | None:
    """'t' or 'u' for an input read at the current or key token, else None."""
    if n.op != "input" or not n.src or n.src[0].op != "iota":
        return None
    return n.src[0].arg.name if n.src[0].arg in (T_VAR, U_VAR) else None


def _factors(n: Node) -> list[Node]:
    return _factors(n.src[0]) + _factors(n.src[1]) if n.op == "mul" else [n]


_UNARY = {
    "exp": sympy.exp, "log": sympy.log, "sqrt": sympy.sqrt, "abs": sympy.Abs, "tanh": sympy.tanh,
    "floor": sympy.floor, "neg": lambda x: -x, "sigmoid": lambda x: 1 / (1 + sympy.exp(-x)),
    "softplus": lambda x: sympy.log(1 + sympy.exp(x)), "relu": lambda x: sympy.Max(x, 0),
    "not": sympy.Not,
}
_BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "div": lambda a, b: a / b,
    "pow": lambda a, b: a**b, "min": sympy.Min, "max": sympy.Max, "floordiv": lambda a, b: sympy.floor(a / b),
    "lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge, "eq": sympy.Eq, "ne": sympy.Ne,
    "and": sympy.And, "or": sympy.Or,
}


def to_sympy(n: Node, p: Program, dot: Node | None = None, used: dict | None = None) -> sympy.Basic:
    """The sympy form of a score or mask node (``dot`` becomes ``qk``); ``used`` collects the params,
    buffers and sizes met."""
    used = {} if used is None else used
    memo: dict[Node, sympy.Basic] = {}

    def go(x: Node) -> sympy.Basic:
        if x in memo:
            return memo[x]
        if dot is not None and x == dot:
            out = QK
        elif x.op == "const":
            if isinstance(x.arg, complex):
                raise NoAttentionForm(f"the score has a complex constant {x.arg}")
            out = sympy.Integer(x.arg) if float(x.arg).is_integer() else sympy.Float(x.arg)
        elif x.op == "dim":
            used.setdefault("sizes", []).append(x.arg)
            out = size_symbol(x.arg)
        elif x.op == "iota" and x.arg in (T_VAR, U_VAR):
            out = T_SYM if x.arg == T_VAR else U_SYM
        elif x.op == "head":
            out = HEAD
        elif x.op in ("param", "buffer"):
            name, vars_ = x.arg
            if vars_:
                raise NoAttentionForm(f"the score reads {x.op} {name}[{', '.join(v.name for v in vars_)}]; only "
                                      "per-head scalars (declared name[]) are compiled into the tile loop")
            used.setdefault(x.op, []).append(name)
            out = param_symbol(name)
        elif x.op in _UNARY:
            out = _UNARY[x.op](go(x.src[0]))
        elif x.op in _BINARY:
            out = _BINARY[x.op](go(x.src[0]), go(x.src[1]))
        elif x.op == "input":
            raise NoAttentionForm(f"the score reads input {x.arg[0]} outside the one dot product q_t . k_u")
        elif x.op == "sum":
            raise NoAttentionForm("the score has a sum other than the one dot product q_t . k_u")
        else:
            raise NoAttentionForm(f"the score or mask uses '{x.op}', which the tile loop cannot compute")
        memo[x] = out
        return out

    return go(n)


def _find_dot(s: Node) -> Node:
    dots = []
    for n in s.walk():
        if n.op != "sum" or len(n.arg) != 1 or n.arg[0] in (T_VAR, U_VAR):
            continue
        fs = _factors(n.src[0])
        toks = sorted(_token(f) or "" for f in fs)
        if len(fs) == 2 and toks == ["t", "u"] and all(f.arg[1] == n.arg for f in fs):
            dots.append(n)
    if len(dots) != 1:
        raise NoAttentionForm("the score is not built on exactly one dot product sum(i: q[t, i] * k[u, i]) "
                              f"(found {len(dots)})")
    return dots[0]


def translation_window(mask: sympy.Basic) -> int | None:
    """N when mask(t, u) depends only on d = t - u and is false for every d >= N, else None: then a key
    cache needs only the last N keys."""
    d = sympy.Symbol("d", integer=True)
    md = mask.subs(T_SYM, U_SYM + d)
    md = sympy.simplify(md)
    if U_SYM in md.free_symbols:
        return None
    from .intervals import interval_bool  # noqa: PLC0415

    big = 2**40
    if interval_bool(md, {d: (2**30, big)}) != "empty":
        return None
    lo, hi = 1, 2**30  # smallest N with the mask empty over [N, big]
    if interval_bool(md, {d: (lo, big)}) == "empty":
        return 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if interval_bool(md, {d: (mid, big)}) == "empty":
            hi = mid
        else:
            lo = mid
    return hi


def plan(p: Program) -> AttentionPlan:
    """The attention plan of ``p`` or :class:`NoAttentionForm` saying why there is none."""
    out = p.output.value
    if out.op != "sum" or out.arg != (U_VAR,):
        raise NoAttentionForm("the output is not one sum over key tokens sum(u: softmax(u: s) * v[u, j])")
    fs = _factors(out.src[0])
    sm = [f for f in fs if f.op == "softmax"]
    vs = [f for f in fs if _token(f) == "u"]
    if len(fs) != 2 or len(sm) != 1 or len(vs) != 1:
        raise NoAttentionForm("the output is not sum(u: softmax(u: s) * v[u, j]) (a softmax-weighted sum of one "
                              "input read at the key token)")
    v = vs[0]
    if len(v.arg[1]) != 1 or tuple(v.arg[1]) != tuple(p.output.vars):
        raise NoAttentionForm("the value read v[u, j] must run over the output's one axis")
    s = sm[0].src[0]
    dot = _find_dot(s)
    qn, kn = sorted(_factors(dot.src[0]), key=lambda f: _token(f))
    used: dict = {}
    score = to_sympy(s, p, dot, used)
    mask = None
    if p.mask is not None:
        mused: dict = {}
        mask = to_sympy(p.mask, p, None, mused)
        if set(mused) - {"sizes"} or (mask.free_symbols - {T_SYM, U_SYM, *map(size_symbol, mused.get("sizes", []))}):
            raise NoAttentionForm("the mask depends on something other than t, u and sizes")
        if mused.get("sizes"):
            raise NoAttentionForm("the mask reads a size bound at call time; make it a constant")
    learnable = sorted(set(used.get("param", [])))
    buffers = sorted(set(used.get("buffer", [])))
    ap = AttentionPlan(q=qn.arg[0], k=kn.arg[0], v=v.arg[0], kdim=dot.arg[0].axis, vdim=v.arg[1][0].axis,
                       score=score, mask=mask, params=learnable + buffers, learnable=learnable,
                       sizes=sorted(set(used.get("sizes", []))))
    if T_SYM in score.free_symbols or U_SYM in score.free_symbols:
        sd = sympy.simplify(score.subs(T_SYM, U_SYM + sympy.Symbol("d", integer=True)))
        translation = U_SYM not in sd.free_symbols
    else:
        translation = True
    if translation:
        ap.window = translation_window(ap.mask_expr)
    return ap


def cache_meta(p: Program) -> dict:
    """The key/value cache a program's attention form carries as its states, as ``meta['states']`` entries
    ({input read at u: axes [T@cache, width]}); empty when the program has no softmax attention form."""
    try:
        ap = plan(p)
    except NoAttentionForm:
        return {}
    decls = {d.name: d for d in p.inputs}
    return {n: {"axes": [CACHE_AXIS, *decls[n].axes], "complex": False} for n in dict.fromkeys([ap.k, ap.v])}


def reference_cache_lines(p: Program) -> list[str] | None:
    """A ``reference`` that honours the key/value cache of an attention-form program: the call runs as the
    full sequence [cache; inputs] through ``_reference_tokens`` (the plain meaning) and keeps its last T
    outputs; the final cache is the cached inputs' last keys. None when the program has no cache."""
    states = cache_meta(p)
    if not states:
        return None
    window = plan(p).window
    decls = {d.name: d for d in p.inputs}
    keep = f"max(0, ext[n].shape[1] - {window})" if window else "0"
    return [
        "def reference(inputs, params, states, sizes, output_final_state=False):",
        '    """The meaning with a key/value cache: states {name: [B, H, Tc, width]} hold the keys and values of',
        "    the Tc tokens before this call; the call is the full run over [cache; inputs] (inputs read only at",
        '    the query token are zero there, their outputs dropped) and returns its last T outputs."""',
        f"    names = {list(states)!r}",
        "    cache = {n: states[n] for n in names if states.get(n) is not None}",
        "    Tc = next(iter(cache.values())).shape[2] if cache else 0",
        "    ext = {}",
        "    for name, x in inputs.items():",
        "        c = cache.get(name)",
        "        if c is None and cache:",
        "            if name in names:",
        "                raise MixerCallError(f\"initial_state needs the whole cache ({', '.join(names)}); "
        "'{name}' is missing\")",
        "            c = x.new_zeros(x.shape[0], x.shape[2], Tc, *x.shape[3:])",
        "        ext[name] = x if c is None else torch.cat([c.to(x.dtype).transpose(1, 2), x], 1)",
        "    o, _ = _reference_tokens(ext, params, {}, sizes)",
        "    o = o[:, Tc:]",
        "    if not output_final_state:",
        "        return o, None",
        f"    return o, {{n: ext[n][:, {keep}:].transpose(1, 2).contiguous() for n in names}}",
    ] if decls else None
