"""Analysis: the compiler's decisions, each with its reason in words (pass 3 of the pipeline).

Every backend reads an :class:`Analysis`; nothing downstream looks at a mechanism's name.

* :func:`normal_form` rewrites each state update as ``S_t = A_t(S_{t-1}) + k'_t v'_t^T`` and
  the output as ``o_t = q'_t^T S_t (+ skip)``, naming the expressions that play each part.
* :func:`classify_transition` names the structure of ``A_t`` (identity, constant_scalar,
  scalar, diagonal_key, diagonal_value, elementwise, delta, gated_delta).
* :func:`separability` decides whether a pairwise score ``w(t, u)`` factors into finite
  feature maps, and of what width (sympy), or says why not.
* :func:`time_invariance` decides whether the system is a convolution, and its kernel.
* :func:`choose_forms` turns the above into the legal forms and the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy

from .ir import T_VAR, U_VAR, Node, Program, Var, toposort
from .lower import make

# ---- printing IR expressions as maths ---------------------------------------------------------

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "**",
          "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "and", "or": "or"}
_PREC = {"or": 1, "and": 2, "lt": 4, "le": 4, "gt": 4, "ge": 4, "eq": 4, "ne": 4, "add": 5, "sub": 5,
         "mul": 6, "div": 6, "floordiv": 6, "mod": 6, "neg": 7, "pow": 8}


def sizes_str(e: sympy.Expr) -> str:
    """A size expression, lowest degree first (``1 + K + K**2``)."""
    from sympy.printing.str import StrPrinter

    return StrPrinter({"order": "rev-lex"}).doprint(e)


def factors_str(factors: list[Node]) -> str:
    if not factors:
        return "1"
    if len(factors) == 1:
        return show(factors[0])
    return " * ".join(show(f, 6) for f in factors)


_EXPLICIT_T = [False]  # print q[t, i] rather than q[i] (in attention form, beside k[u, i])


def show(n: Node, prec: int = 0) -> str:
    """An IR expression in the surface notation (``exp(g[i])``, ``dt * B[n]``)."""
    op = n.op
    if op == "const":
        v = n.arg
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
            v = int(v)
        if isinstance(v, float) and abs(v - math.pi) < 1e-15:
            return "pi"
        s = repr(v)
        return f"({s})" if (isinstance(v, int | float) and v < 0 and prec > 0) else s
    if op == "dim":
        return n.arg
    if op == "iota":
        return n.arg.name
    if op == "head":
        return "head"
    if op in ("input", "param", "buffer", "state"):
        name, vars_ = n.arg
        ix = [v.name for v in vars_]
        if op == "input":
            tok = n.src[0]
            if _EXPLICIT_T[0] or not (tok.op == "iota" and tok.arg == T_VAR):
                ix = [show(tok)] + ix
        return f"{name}[{', '.join(ix)}]" if ix else name
    if op == "eye":
        return f"eye({n.arg[0].name}, {n.arg[1].name})"
    if op == "sum":
        return f"sum({', '.join(v.name for v in n.arg)}: {show(n.src[0])})"
    if op == "softmax":
        return f"softmax(u: {show(n.src[0])})"
    if op == "rand":
        return f"{n.arg[0]}({show(n.src[0])}, {show(n.src[1])})"
    if op == "neg":
        s = "-" + show(n.src[0], _PREC["neg"])
        return f"({s})" if prec > _PREC["neg"] else s
    if op == "not":
        return f"not {show(n.src[0], 3)}"
    if op in _INFIX:
        p = _PREC[op]
        right_p = p + 1 if op in ("sub", "div", "floordiv", "mod") else p
        if op == "pow":
            s = f"{show(n.src[0], p + 1)} ** {show(n.src[1], p)}"
        else:
            s = f"{show(n.src[0], p)} {_INFIX[op]} {show(n.src[1], right_p)}"
        return f"({s})" if prec > p else s
    return f"{op}({', '.join(show(s) for s in n.src)})"


# ---- helpers ---------------------------------------------------------------------------------


def token_dependent(n: Node) -> bool:
    """Whether the value changes from token to token (reads inputs or the token index)."""
    return any(x.op == "input" or (x.op == "iota" and x.arg in (T_VAR, U_VAR)) for x in toposort([n]))


def state_free(n: Node) -> bool:
    return not any(x.op == "state" for x in toposort([n]))


def product(factors: list[Node]) -> Node | None:
    """The product of the factors as one node (None for no factors)."""
    out = None
    for f in factors:
        out = f if out is None else make("mul", (out, f), None)
    return out


# ---- normal form of a recurrence --------------------------------------------------------------


@dataclass
class Term:
    """``sign * prod(factors) * S[read_vars]`` summed over ``summed`` (a linear term), or a
    state-free term when ``state`` is None."""

    factors: list[Node]
    state: Node | None = None
    summed: tuple[Var, ...] = ()
    sign: int = 1

    def show(self) -> str:
        parts = [show(f, 6) for f in self.factors]
        if self.state is not None:
            parts.append(show(self.state))
        body = " * ".join(parts) if parts else "1"
        if self.summed:
            body = f"sum({', '.join(v.name for v in self.summed)}: {body})"
        return ("-" if self.sign < 0 else "") + body


def expand_terms(n: Node) -> list[Term]:
    """Write ``n`` as a sum of products, each with at most one state read (``n`` is affine).

    Sums are split everywhere; a state-free product stays one term (its factors flattened), and
    a state-free coefficient is split into its summands only where it multiplies a state."""
    op = n.op
    if state_free(n):
        if op == "const" and n.arg == 1:
            return [Term([])]
        return [Term(_flatten_mul(n))]
    if op == "add":
        return expand_terms(n.src[0]) + expand_terms(n.src[1])
    if op == "sub":
        return expand_terms(n.src[0]) + [_neg(t) for t in expand_terms(n.src[1])]
    if op == "neg":
        return [_neg(t) for t in expand_terms(n.src[0])]
    if op == "mul":
        a, b = (_coefficient_terms(x) if state_free(x) else expand_terms(x) for x in n.src)
        out = []
        for x in a:
            for y in b:
                out.append(Term(x.factors + y.factors, x.state or y.state, x.summed + y.summed, x.sign * y.sign))
        return out
    if op == "div" and state_free(n.src[1]):
        inv = Node("div", (Node("const", arg=1), n.src[1]), None, n.src[1].idx, n.src[1].dtype)
        return [Term(t.factors + [inv], t.state, t.summed, t.sign) for t in expand_terms(n.src[0])]
    if op == "sum":
        return [Term(t.factors, t.state, t.summed + tuple(n.arg), t.sign) for t in expand_terms(n.src[0])]
    if op in ("real", "conj"):  # R-linear: the structure is that of the argument
        return expand_terms(n.src[0])
    if op == "state":
        return [Term([], n)]
    return [Term([n])]


def _coefficient_terms(n: Node) -> list[Term]:
    """A state-free coefficient of a state: split into summands only when it holds an identity
    matrix (so ``(I - b k k^T) S`` becomes ``S - b k (k^T S)``), else kept whole."""
    if any(x.op == "eye" for x in toposort([n])):
        return expand_terms_free(n)
    return [Term(_flatten_mul(n))]


def expand_terms_free(n: Node) -> list[Term]:
    if n.op == "add":
        return expand_terms_free(n.src[0]) + expand_terms_free(n.src[1])
    if n.op == "sub":
        return expand_terms_free(n.src[0]) + [_neg(t) for t in expand_terms_free(n.src[1])]
    if n.op == "neg":
        return [_neg(t) for t in expand_terms_free(n.src[0])]
    if n.op == "mul":
        out = []
        for x in expand_terms_free(n.src[0]):
            for y in expand_terms_free(n.src[1]):
                out.append(Term(x.factors + y.factors, None, (), x.sign * y.sign))
        return out
    return [Term([n])]


def _neg(t: Term) -> Term:
    return Term(t.factors, t.state, t.summed, -t.sign)


def _eliminate_eye(t: Term) -> Term:
    """sum(l: eye(i, l) * X[l]) = X[i]: substitute and drop the summed index."""
    from .lower import rename

    changed = True
    while changed:
        changed = False
        for f in t.factors:
            if f.op != "eye":
                continue
            a, b = f.arg
            gone, keep = (b, a) if b in t.summed else (a, b) if a in t.summed else (None, None)
            if gone is None:
                continue
            m = {gone: keep}
            others = [rename(x, m) for x in t.factors if x is not f]
            state = rename(t.state, m) if t.state is not None else None
            t = Term(others, state, tuple(v for v in t.summed if v != gone), t.sign)
            changed = True
            break
    return t


@dataclass
class StateForm:
    """The normal form of one state's update."""

    name: str
    axes: tuple[Var, ...]  # the update's left-hand index variables
    linear: list[Term]  # terms of A_t(S_{t-1}) that read this state
    coupled: list[Term]  # terms that read another state
    inputs: list[Term]  # state-free terms: sum of k'_t v'_t^T
    transition: str = ""
    transition_reason: str = ""
    key_axis: Var | None = None
    k: str | None = None
    v: str | None = None
    k_factors: tuple[Node, ...] = ()
    decay: str | None = None
    normaliser_of: str | None = None


def normal_form(p: Program, eq) -> StateForm:
    terms = [_eliminate_eye(t) for t in expand_terms(eq.value)]
    lin = [t for t in terms if t.state is not None and t.state.arg[0] == eq.target]
    coupled = [t for t in terms if t.state is not None and t.state.arg[0] != eq.target]
    inputs = [t for t in terms if t.state is None]
    return StateForm(eq.target, eq.vars, lin, coupled, inputs)


def classify_transition(sf: StateForm, key_axis: Var | None) -> tuple[str, str]:
    """Name the structure of A_t from the linear terms (and say why)."""
    if sf.coupled:
        return "coupled", f"the update of {sf.name} reads another state ({sf.coupled[0].show()})"
    if not sf.linear:
        return "none", f"{sf.name} does not depend on its past (no transition)"
    lhs = sf.axes
    diag: list[Term] = []
    rank_one: list[Term] = []
    other: list[Term] = []
    for t in sf.linear:
        read = t.state.arg[1]
        if tuple(read) == tuple(lhs) and not t.summed:
            diag.append(t)
        elif len(t.summed) == 1 and t.summed[0] in read and len(lhs) >= 1:
            rank_one.append(t)
        else:
            other.append(t)
    if other:
        return "general", f"the term {other[0].show()} mixes state entries in a way mixc does not classify"
    if len(diag) > 1:
        return "general", "the state is scaled by several separate terms"
    coef = product(diag[0].factors) if diag else None
    coef_axes = set(coef.idx) - {T_VAR} if coef is not None else set()
    sign_ok = not diag or diag[0].sign > 0
    if rank_one:
        if len(rank_one) > 1 or not sign_ok:
            return "general", "more than one rank-one correction of the state"
        r = rank_one[0]
        l = r.summed[0]
        outs = [f for f in r.factors if set(f.idx) - {T_VAR} and l not in f.idx]
        ins = [f for f in r.factors if l in f.idx]
        if any(set(f.idx) - {T_VAR} - {l} for f in ins) or not outs or not diag:
            return "general", f"the correction {r.show()} is not of the form (I - a b^T) S"
        if coef is None or (coef.op == "const" and coef.arg == 1):
            return "delta", (f"A_t = I - ({' * '.join(show(f, 6) for f in r.factors if l not in f.idx)})"
                             f" ({' * '.join(show(f, 6) for f in ins)})^T: identity minus rank one (delta rule)")
        if coef_axes:
            return "general", "a rank-one correction together with a per-entry decay"
        return "gated_delta", (f"A_t = {show(coef)} (I - rank one): a scalar decay times a delta-rule transition")
    if coef is None:
        return "identity", f"{sf.name}_t = {sf.name}_(t-1) + ...: the state only accumulates"
    if diag and diag[0].sign < 0:
        return "general", "the state is negated"
    if coef.op == "const" and coef.arg == 1:
        return "identity", f"{sf.name}_t = {sf.name}_(t-1) + ...: the state only accumulates"
    if not coef_axes:
        if token_dependent(coef):
            return "scalar", f"A_t = {show(coef)}: one decay per head and token"
        return "constant_scalar", f"A = {show(coef)}: one fixed decay per head"
    if len(lhs) == 1:
        return "elementwise", f"A_t = Diag({show(coef)}): one decay per state entry"
    if coef_axes >= set(lhs):
        return "elementwise", (f"A_t = {show(coef)} varies along both state axes "
                               f"({', '.join(v.name for v in lhs)}): no per-head T x T decay mask exists")
    if key_axis is not None and coef_axes == {key_axis}:
        return "diagonal_key", f"A_t = Diag({show(coef)}) along the key axis {key_axis.name}"
    if key_axis is not None:
        return "diagonal_value", f"A_t = Diag({show(coef)}) along the value axis"
    return "diagonal_key" if coef_axes == {lhs[0]} else "diagonal_value", f"A_t = Diag({show(coef)})"


def _k_factors(t: Term, value: Var | None) -> list[Node]:
    return [f for f in t.factors if value is None or value not in f.idx]


def _split_outer(t: Term, key: Var, value: Var | None) -> tuple[str, str | None]:
    """k'_t (factors over the key axis, with the scalars) and v'_t (over the value axis)."""
    kf = _k_factors(t, value)
    vf = [f for f in t.factors if value is not None and value in f.idx]
    if any(key in f.idx for f in vf):
        return None, None
    ks = factors_str(kf)
    vs = factors_str(vf)
    if t.sign < 0:
        ks = "-" + ks
    return ks, vs


# ---- readout -------------------------------------------------------------------------------------


@dataclass
class Readout:
    terms: list[Term]  # linear in states (current values)
    skip: list[Term]
    ratio: tuple[Readout, Readout] | None = None  # o = num / den (a normalised readout)
    real: bool = False  # the output takes the real part of a complex readout
    # o = num / f(den): (the linear readout den, the whole denominator f(den)), f elementwise and state-free
    # apart from den (such as max(abs(den), 1)); None when the output divides by den itself
    den_fn: tuple[Node, Node] | None = None


def _function_of_one_readout(n: Node) -> Node | None:
    """The one linear readout X (a sum over a state read) that ``n`` is an elementwise function of, or None:
    every state read in ``n`` lies inside X, and X's readout is linear with no state-free term."""
    sums = [x for x in toposort([n]) if x.op == "sum" and not state_free(x)]
    outer = [x for x in sums if not any(x is not y and x in toposort([y]) for y in sums)]
    if len({x for x in outer}) != 1:
        return None
    X = outer[0]
    r = readout(X)
    if r is None or r.skip or not r.terms:
        return None

    def free_outside(y: Node) -> bool:
        return y == X or (y.op != "state" and all(free_outside(z) for z in y.src))

    return X if free_outside(n) else None


def readout(n: Node) -> Readout | None:
    if n.op == "div" and not state_free(n.src[0]) and not state_free(n.src[1]):
        a, b = readout(n.src[0]), readout(n.src[1])
        if a is None:
            return None
        if b is None:  # o = num / f(den), f an elementwise function (an mLSTM-like max(|q'n|, 1))
            X = _function_of_one_readout(n.src[1])
            if X is None:
                return None
            return Readout([], [], (a, readout(X)), den_fn=(X, n.src[1]))
        return Readout([], [], (a, b))
    if n.op == "mul":
        for x, y in ((n.src[0], n.src[1]), (n.src[1], n.src[0])):
            if state_free(x) and not state_free(y):  # an output gate times a readout
                inner = readout(y)
                if inner is None:
                    return None
                xs = _flatten_mul(x)
                return Readout([Term(xs + t.factors, t.state, t.summed, t.sign) for t in inner.terms],
                               [Term(xs + t.factors, t.state, t.summed, t.sign) for t in inner.skip], inner.ratio)
    if n.op == "real" and not state_free(n):
        inner = readout(n.src[0])
        if inner is not None:
            inner.real = True
        return inner
    try:
        terms = [_eliminate_eye(t) for t in expand_terms(n)]
    except RecursionError:  # pragma: no cover
        return None
    lin = [t for t in terms if t.state is not None]
    skip = [t for t in terms if t.state is None]
    if any(not state_free(f) for t in skip + lin for f in t.factors):
        return None  # a state read inside a non-linear function (tanh(q'S)): not a linear readout
    return Readout(lin, skip)


# ---- separability of pairwise scores -----------------------------------------------------------


@dataclass
class Separability:
    separable: bool
    width: sympy.Expr | None = None
    width_symmetric: sympy.Expr | None = None
    weight: str = ""
    reason: str = ""
    atoms: list[str] = field(default_factory=list)
    # the factorisation itself, for emitters: w = sum over terms of
    #   coeff * prod_k atom_k ** e_k * prod_r rank_one_r ** f_r
    terms: list[tuple[sympy.Expr, dict, dict]] = field(default_factory=list)
    atom_nodes: dict = field(default_factory=dict)  # sympy symbol -> the sum node (a dot product)
    rank_one_nodes: dict = field(default_factory=dict)  # sympy symbol -> a node of t only, u only or neither


class _NotSeparable(Exception):
    pass


def _side(n: Node) -> str:
    """Which tokens a value depends on: 'none', 't', 'u' or 'tu'."""
    vs = set(n.idx)
    has_t = T_VAR in vs or any(x.op == "input" and T_VAR in x.src[0].idx for x in toposort([n]))
    has_u = U_VAR in vs
    return ("t" if has_t else "") + ("u" if has_u else "") or "none"


def separability(w: Node) -> Separability:
    """Does ``w(t, u)`` equal ``sum_i phi_i(t) psi_i(u)`` for finitely many i, and how many?"""
    _EXPLICIT_T[0] = True
    try:
        return _separability(w)
    finally:
        _EXPLICIT_T[0] = False


def _separability(w: Node) -> Separability:
    atoms: dict[Node, sympy.Symbol] = {}
    widths: dict[sympy.Symbol, sympy.Expr] = {}
    rank_one: dict[Node, sympy.Symbol] = {}

    def size(v: Var) -> sympy.Expr:
        return sympy.Symbol(v.axis, positive=True, integer=True)

    def go(n: Node):
        side = _side(n)
        if side != "tu":
            if n.op == "const":
                return sympy.nsimplify(n.arg) if not isinstance(n.arg, complex) else sympy.sympify(n.arg)
            if n not in rank_one:
                rank_one[n] = sympy.Symbol(f"r{len(rank_one)}")
            return rank_one[n]
        if n.op == "sum":
            body = n.src[0]
            factors = _flatten_mul(body)
            sides = [_side(f) for f in factors]
            if "tu" not in sides and all(set(f.idx) & set(n.arg) or _side(f) == "none" for f in factors):
                # sum_i a_t[i] b_u[i] ...: an inner product of width prod(extents)
                if n not in atoms:
                    sym = sympy.Symbol(f"s{len(atoms)}")
                    atoms[n] = sym
                    widths[sym] = sympy.Mul(*[size(v) for v in n.arg])
                return atoms[n]
            raise _NotSeparable(f"the sum {show(n)} does not split into a query part and a key part")
        if n.op == "add":
            return go(n.src[0]) + go(n.src[1])
        if n.op == "sub":
            return go(n.src[0]) - go(n.src[1])
        if n.op == "neg":
            return -go(n.src[0])
        if n.op == "mul":
            return go(n.src[0]) * go(n.src[1])
        if n.op == "div":
            if _side(n.src[1]) == "tu":
                raise _NotSeparable(f"division by {show(n.src[1])}, which depends on both t and u")
            return go(n.src[0]) / go(n.src[1])
        if n.op == "pow":
            e = n.src[1]
            if e.op == "const" and float(e.arg).is_integer() and e.arg >= 0:
                return go(n.src[0]) ** int(e.arg)
            raise _NotSeparable(f"{show(n)} is not an integer power of a pairwise term")
        if n.op in ("input", "iota", "eye"):
            raise _NotSeparable(f"{show(n)} couples t and u directly")
        fname = n.op
        arg = show(n.src[0]) if n.src else ""
        what = "a dot product" if any(x.op == "sum" for x in toposort([n])) else "a pairwise term"
        raise _NotSeparable(f"{fname} of {what} has no finite feature map ({fname}({arg}))")

    try:
        expr = sympy.expand(go(w))
    except _NotSeparable as ex:
        return Separability(False, reason=str(ex), weight=show(w))
    syms = list(widths)
    if not syms:
        return Separability(True, sympy.Integer(1), sympy.Integer(1), show(w),
                            "the score factors into a query part times a key part (rank one)")
    try:
        poly = sympy.Poly(expr, *syms)
    except sympy.PolynomialError:
        return Separability(False, reason="the score is not a polynomial in its dot products", weight=show(w))
    width = sympy.Integer(0)
    sym_width = sympy.Integer(0)
    for monom, coeff in poly.terms():
        rank = len(sympy.Add.make_args(sympy.expand(coeff)))
        full = sympy.Integer(1)
        sym = sympy.Integer(1)
        for s, e in zip(syms, monom):
            full *= widths[s] ** e
            sym *= sympy.binomial(widths[s] + e - 1, e) if e else 1
        width += rank * full
        sym_width += rank * sym
    sym_width = sympy.expand(sympy.expand_func(sym_width))
    descr = [f"{s} = {show(n)} (width {widths[s]})" for n, s in atoms.items()]
    degrees = sorted({sum(m) for m, _ in poly.terms()})
    reason = (f"w is a polynomial of degree {max(degrees)} in {', '.join(str(s) for s in syms)}: tensor-power "
              f"features of degrees {', '.join(map(str, degrees))} give width {sizes_str(width)}"
              + (f" ({sizes_str(sym_width)} with symmetric features)" if sym_width != width else ""))
    terms = []
    r_syms = list(rank_one.values())
    for monom, coeff in poly.terms():
        for part in sympy.Add.make_args(sympy.expand(coeff)):
            num, rest = part.as_independent(*r_syms, as_Add=False)
            powers = rest.as_powers_dict() if rest != 1 else {}
            terms.append((num, {s: e for s, e in zip(syms, monom) if e}, {r: int(e) for r, e in powers.items()}))
    return Separability(True, sympy.expand(width), sym_width, show(w), reason, descr, terms,
                        {s: n for n, s in atoms.items()}, {s: n for n, s in rank_one.items()})


def _flatten_mul(n: Node) -> list[Node]:
    if n.op == "mul":
        return _flatten_mul(n.src[0]) + _flatten_mul(n.src[1])
    return [n]


# ---- bounds of decays (interval arithmetic) -----------------------------------------------------

_INF = math.inf
_ALL = (-_INF, _INF)


def _imul(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """The product of two intervals (0 * inf taken as 0: a bound, not a value)."""
    ps = [0.0 if (x == 0 or y == 0) else x * y for x in a for y in b]
    return min(ps), max(ps)


def _iexp(a: tuple[float, float]) -> tuple[float, float]:
    def e(x: float) -> float:
        try:
            return math.exp(x)
        except OverflowError:
            return _INF
    return e(a[0]), e(a[1])


def _ilog(a: tuple[float, float]) -> tuple[float, float]:
    if a[0] < 0:
        return _ALL
    return (-_INF if a[0] == 0 else math.log(a[0])), (_INF if a[1] == _INF else math.log(a[1]) if a[1] > 0
                                                       else -_INF)


def _idiv(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    if b[0] > 0 or b[1] < 0:  # 1 / b is bounded away from a pole
        inv = tuple(sorted((0.0 if abs(x) == _INF else 1 / x) for x in b))
        return _imul(a, inv)
    return _ALL


def _ipow(a: tuple[float, float], b: tuple[float, float], exponent: Node) -> tuple[float, float]:
    if a[0] > 0:  # a ** b = exp(b log a)
        return _iexp(_imul(_ilog(a), b))
    if exponent.op == "const" and isinstance(exponent.arg, int | float) and float(exponent.arg).is_integer():
        e = int(exponent.arg)
        if e >= 0:
            ends = [x ** e if abs(x) != _INF else (_INF if e else 1.0) * (1 if e % 2 == 0 or x > 0 else -1)
                    for x in a]
            lo, hi = min(ends), max(ends)
            if e % 2 == 0 and a[0] <= 0 <= a[1]:
                lo = 0.0
            return lo, hi
    return _ALL


def bounds(n: Node, p: Program, depth: int = 0) -> tuple[float, float]:
    """An interval holding every value of a real expression, for any inputs, tokens, heads and sizes:
    inputs and learnable parameters are unbounded (a parameter's value at call time is not its
    initialiser), a buffer takes its initialiser's bounds, the head index, index variables and the
    token index are >= 0, sizes >= 1, random draws lie in their range. (-inf, inf) when unknown."""
    if n.dtype != "real" or depth > 60:
        return _ALL
    op, src = n.op, n.src

    def b(x: Node) -> tuple[float, float]:
        return bounds(x, p, depth + 1)

    if op == "const":
        v = n.arg
        return (float(v), float(v)) if isinstance(v, int | float) and not isinstance(v, bool) else _ALL
    if op == "dim":
        return 1.0, _INF
    if op in ("iota", "head"):
        return 0.0, _INF
    if op == "buffer":
        decl = p.decl(n.arg[0])
        return b(decl.init) if decl is not None and decl.init is not None else _ALL
    if op == "rand":
        if n.arg[0] == "uniform":
            lo, hi = b(src[0]), b(src[1])
            return min(lo[0], hi[0]), max(lo[1], hi[1])
        return _ALL
    if op in ("input", "param", "state"):
        return _ALL
    if op == "neg":
        lo, hi = b(src[0])
        return -hi, -lo
    if op == "add":
        (a0, a1), (b0, b1) = b(src[0]), b(src[1])
        return a0 + b0, a1 + b1
    if op == "sub":
        (a0, a1), (b0, b1) = b(src[0]), b(src[1])
        return a0 - b1, a1 - b0
    if op == "mul":
        return _imul(b(src[0]), b(src[1]))
    if op == "div":
        return _idiv(b(src[0]), b(src[1]))
    if op == "pow":
        return _ipow(b(src[0]), b(src[1]), src[1])
    if op == "exp":
        return _iexp(b(src[0]))
    if op == "log":
        return _ilog(b(src[0]))
    if op == "sqrt":
        lo, hi = b(src[0])
        return (math.sqrt(max(lo, 0.0)), math.sqrt(hi) if hi >= 0 else 0.0) if hi >= 0 else _ALL
    if op == "sigmoid":
        lo, hi = b(src[0])
        s = [0.0 if x == -_INF else 1.0 if x == _INF else 1 / (1 + math.exp(-x)) if x > -700 else 0.0
             for x in (lo, hi)]
        return s[0], s[1]
    if op == "tanh":
        lo, hi = b(src[0])
        return math.tanh(lo), math.tanh(hi)
    if op == "logsigmoid":
        return -_INF, 0.0
    if op in ("softplus", "abs", "relu"):
        lo, hi = b(src[0])
        if op == "relu":
            return max(lo, 0.0), max(hi, 0.0)
        if op == "abs":
            return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
        return 0.0, _INF
    if op in ("min", "max"):
        (a0, a1), (b0, b1) = b(src[0]), b(src[1])
        return (min(a0, b0), min(a1, b1)) if op == "min" else (max(a0, b0), max(a1, b1))
    if op in ("sin", "cos"):
        return -1.0, 1.0
    if op == "where":
        (a0, a1), (b0, b1) = b(src[1]), b(src[2])
        return min(a0, b0), max(a1, b1)
    return _ALL


def decay_in_unit_interval(factors: list[Node], p: Program) -> str | None:
    """None when the decay ``prod(factors)`` is provably in [0, 1] as the chunked kernels need it (they take
    its logarithm, summed within chunks, and assume the sums never grow: a decay exactly 0, log = -inf, is
    fine), else why not, in words. A factor exp(x) of a real x is positive (its being at most 1 is the
    gate's own contract, as a log-space forget gate is); any other factor must lie in [0, 1] for every
    input, token, head and size (:func:`bounds`)."""
    for f in factors:
        if f.dtype != "real":
            return f"the decay {show(f)} is complex: the chunked kernels take real log decays"
        if f.op == "exp":
            continue
        lo, hi = bounds(f, p)
        if not (lo >= 0 and hi <= 1):
            what = ("a learnable parameter (its value at call time is not its initialiser)"
                    if any(x.op == "param" for x in toposort([f])) else
                    "an input (any value can be passed)" if any(x.op == "input" for x in toposort([f])) else
                    f"bounded by [{lo:g}, {hi:g}]")
            return (f"the decay {show(f)} is not provably in [0, 1] ({what}): the chunked kernels take the log of "
                    "the decay and need it in [0, 1]; write a gate as exp(...) of a log gate <= 0, e.g. "
                    "exp(logsigmoid(x)), or sigmoid(x)")
    return None


# ---- the whole analysis ------------------------------------------------------------------------


@dataclass
class Analysis:
    program: Program
    kind: str  # recurrence | attention | pointwise
    transition: str | None
    transition_reason: str
    states: list[StateForm]
    readout_text: list[str]
    separable: bool | None
    separability: Separability | None
    feature_width: str | None
    time_invariant: bool
    ti_reason: str
    kernel: str | None
    forms: list[str]
    default_form: str
    reasons: dict[str, str]
    notes: list[str]
    mask_causal: bool | None = None

    def to_json(self) -> dict:
        return {
            "mixer": self.program.name,
            "kind": self.kind,
            "forms": self.forms,
            "default_form": self.default_form,
            "separable": self.separable,
            "feature_width": self.feature_width,
            "feature_width_symmetric": (sizes_str(self.separability.width_symmetric)
                                        if self.separability and self.separability.separable else None),
            "transition": self.transition,
            "states": {s.name: {"transition": s.transition, "k": s.k, "v": s.v, "decay": s.decay,
                                "normaliser_of": s.normaliser_of} for s in self.states},
            "time_invariant": self.time_invariant,
            "kernel": self.kernel,
            "reasons": self.reasons,
            "notes": self.notes,
        }

    def explain(self) -> str:
        out = [f"analysis of {self.program.name}:"]
        out.append(f"  kind: {self.kind}")
        if self.kind == "attention":
            sep = self.separability
            out.append(f"  pairwise weight: w(t, u) = {sep.weight}" if sep else "")
            for a in (sep.atoms if sep else []):
                out.append(f"    {a}")
            out.append(f"  separable: {'yes' if self.separable else 'no'} -- {sep.reason}")
            if self.separable:
                out.append(f"  feature width: {self.feature_width}")
            out.append(f"  mask: {'causal (u <= t)' if self.mask_causal else 'not the plain causal mask'}")
        for s in self.states:
            out.append(f"  state {s.name}[{', '.join(str(v) for v in s.axes)}]: transition {s.transition} -- "
                       f"{s.transition_reason}")
            if s.normaliser_of:
                out.append(f"    normaliser: a running sum of {s.k} under {s.normaliser_of}'s decay, i.e. an extra "
                           f"value column of {s.normaliser_of} (v' = 1); the chunked kernels carry it beside "
                           f"{s.normaliser_of} and divide")
            elif s.k is not None and len(s.axes) == 1:
                out.append(f"    input: {s.name}_t = A_t({s.name}_(t-1)) + {s.k}")
            elif s.k is not None:
                out.append(f"    normal form: {s.name}_t = A_t({s.name}_(t-1)) + k'_t v'_t^T with k' = {s.k}, "
                           f"v' = {s.v}")
            elif s.inputs:
                out.append(f"    input: {' + '.join(t.show() for t in s.inputs)}")
        out.extend(f"  {line}" for line in self.readout_text)
        if self.kind == "recurrence":
            out.append(f"  time invariant: {'yes' if self.time_invariant else 'no'} -- {self.ti_reason}")
            if self.kernel:
                out.append(f"    kernel: {self.kernel}")
        for note in self.notes:
            out.append(f"  note: {note}")
        out.append("  forms:")
        for f in ("chunked", "recurrent", "fft", "attention"):
            mark = "yes" if f in self.forms else "no "
            out.append(f"    {f:<10} {mark}  {self.reasons.get(f, '')}")
        out.append(f"  default: {self.default_form} -- {self.reasons.get('default', '')}")
        return "\n".join(x for x in out if x)


def _mask_is_causal(p: Program) -> bool:
    if p.mask is None:
        return True
    import torch

    from .lower import eval_int_expr

    n = 64
    tt = torch.arange(n).view(n, 1)
    uu = torch.arange(n).view(1, n)
    sizes = {k: (v if v is not None else n) for k, v in p.sizes}
    got = torch.as_tensor(eval_int_expr(p.mask, {"t": tt, "u": uu}, sizes)).expand(n, n)
    return bool((got == (uu <= tt)).all())


def analyse(p: Program) -> Analysis:
    """Run every analysis on a verified program."""
    reasons: dict[str, str] = {}
    notes: list[str] = []
    out = p.output
    if p.has_key_tokens:
        return _analyse_attention(p, reasons, notes)
    if not p.states:
        reasons["recurrent"] = "no state and no key tokens: the output is a per-token function"
        return Analysis(p, "pointwise", None, "no state", [], [], None, None, None, False, "no state", None,
                        ["recurrent"], "recurrent", {**reasons, "default": "the only form"}, notes)
    rd = readout(out.value)
    # key axis of each state: the axis its readout sums over
    key_axes: dict[str, Var | None] = {}
    readout_lines: list[str] = []
    if rd is not None:
        parts = [rd] if rd.ratio is None else list(rd.ratio)
        for part in parts:
            for t in part.terms:
                name, read = t.state.arg
                summed = [v for v in read if v in t.summed]
                key_axes.setdefault(name, summed[0] if len(summed) == 1 else None)
    states: list[StateForm] = []
    for eq in p.updates:
        sf = normal_form(p, eq)
        decl_axes = eq.vars
        ka = key_axes.get(eq.target)
        key = None
        if ka is not None:  # map the readout's index to the update's own index variable
            decl = p.decl(eq.target)
            pos = [i for i, a in enumerate(decl.axes) if a == ka.axis]
            key = decl_axes[pos[0]] if len(pos) == 1 else (decl_axes[0] if decl_axes else None)
        elif len(decl_axes) == 2:
            key = decl_axes[0]
        sf.key_axis = key
        sf.transition, sf.transition_reason = classify_transition(sf, key)
        if len(sf.inputs) == 1 and key is not None:
            value = next((v for v in decl_axes if v != key), None)
            sf.k, sf.v = _split_outer(sf.inputs[0], key, value)
            sf.k_factors = tuple(_k_factors(sf.inputs[0], value))
        elif len(sf.inputs) == 1 and len(decl_axes) <= 1:
            sf.k, sf.v = sf.inputs[0].show(), None
            sf.k_factors = tuple(sf.inputs[0].factors)
        states.append(sf)
    # normaliser states: same transition as a matrix state, input = that state's k', read as a ratio
    for z in states:
        if len(z.axes) != 1 or z.k is None:
            continue
        for s in states:
            if s is z or len(s.axes) != 2 or s.k is None or not _same_decay(z, s):
                continue
            same_k = _same_up_to_names(z.k_factors, s.k_factors, z.axes[0], s.key_axis)
            if same_k and z.inputs[0].sign == s.inputs[0].sign:
                z.normaliser_of = s.name
    main = max(states, key=lambda s: (len(s.axes), s.normaliser_of is None))
    if rd is not None:
        readout_lines = _readout_lines(rd)
    transition = main.transition
    # time invariance
    ti, ti_reason, kernel = time_invariance(p, states, rd)
    # forms
    forms = ["recurrent"]
    reasons["recurrent"] = "a linear recurrence always runs as a scan over tokens (decode, and training fallback)"
    chunkable = {"identity", "constant_scalar", "scalar", "diagonal_key", "diagonal_value", "delta", "gated_delta"}
    others = [s for s in states if s is not main and s.normaliser_of is None]
    bad_decay = _decay_problem(main, p) if main.transition in chunkable else None
    if (len(main.axes) == 2 and main.transition in chunkable and main.k is not None and main.v is not None
            and not others and bad_decay is None and rd is not None):
        forms.insert(0, "chunked")
        how = {"delta": "the WY representation of products of (I - b k k^T)",
               "gated_delta": "the WY representation with cumulative scalar gates"}.get(
            main.transition, "a T x T decay mask per head")
        reasons["chunked"] = (f"{main.transition} transition of a {' x '.join(v.axis for v in main.axes)} state "
                              f"with an outer-product input: chunks become masked matmuls ({how})")
    else:
        if len(main.axes) < 2:
            why = (f"the state {main.name} has one axis: each entry is an independent scalar scan, with no "
                   "matrix products to put on tensor cores")
        elif main.transition == "elementwise":
            why = f"{main.transition_reason}; the compiler emits a scan"
        elif main.k is None:
            why = "the input term is not an outer product k' v'^T"
        elif others:
            why = f"several independent states ({', '.join(s.name for s in [main] + others)})"
        elif bad_decay is not None:
            why = bad_decay
        elif rd is None:
            why = "the output is not linear in the states (a state read inside a non-linear function)"
        else:
            why = f"the {main.transition} transition has no chunked algorithm"
        reasons["chunked"] = f"not available: {why}"
    if ti:
        forms.append("fft")
        reasons["fft"] = f"time invariant: the output is a causal convolution of the input ({kernel})"
    else:
        reasons["fft"] = f"not available: {ti_reason}"
    reasons["attention"] = "not available: the file is a recurrence with no pairwise score"
    default, rule = _default(forms)
    reasons["default"] = rule
    width = main.key_axis.axis if main.key_axis is not None and len(main.axes) == 2 else None
    return Analysis(p, "recurrence", transition, main.transition_reason, states, readout_lines, None, None, width,
                    ti, ti_reason, kernel, forms, default, reasons, notes)


def _decay_problem(s: StateForm, p: Program) -> str | None:
    """Why the decay of a chunkable state is not one the chunked kernels can take (None when it is): the
    factors of its diagonal term (the scalar gate of a gated delta rule) must be provably in [0, 1]."""
    diag = [t for t in s.linear if not t.summed and tuple(t.state.arg[1]) == tuple(s.axes)]
    return decay_in_unit_interval(list(diag[0].factors), p) if diag else None


def _same_decay(z: StateForm, s: StateForm) -> bool:
    """Whether the vector state z decays exactly as the matrix state s along s's key axis (then z is
    s's recurrence with v' = 1): one linear term each, the same sign and the same factors once z's
    axis is renamed to s's key axis (the state itself left out)."""
    if len(z.linear) != len(s.linear):
        return False
    if not z.linear:
        return True
    tz, ts = z.linear[0], s.linear[0]
    if len(z.linear) != 1 or tz.sign != ts.sign:
        return False
    return _same_up_to_names(tuple(tz.factors), tuple(ts.factors), z.axes[0], s.key_axis)


def _same_up_to_names(a: tuple[Node, ...], b: tuple[Node, ...], va: Var, vb: Var | None) -> bool:
    """Whether two factor lists are equal once the index ``va`` is renamed ``vb``."""
    from .lower import rename

    if vb is None or va.axis != vb.axis or len(a) != len(b):
        return False
    return sorted(map(hash, (rename(x, {va: vb}) for x in a))) == sorted(map(hash, b)) and \
        set(rename(x, {va: vb}) for x in a) == set(b)


def _readout_lines(rd: Readout) -> list[str]:
    def one(r: Readout) -> str:
        parts = [t.show() for t in r.terms] + [t.show() for t in r.skip]
        return " + ".join(parts) if parts else "0"

    if rd.ratio is not None and rd.den_fn is not None:
        return [f"readout: o_t = ({one(rd.ratio[0])}) / f(d), d = {one(rd.ratio[1])}, f(d) = {show(rd.den_fn[1])}"
                "  (a normalised readout through an elementwise function of its denominator)"]
    if rd.ratio is not None:
        return [f"readout: o_t = ({one(rd.ratio[0])}) / ({one(rd.ratio[1])})  (a normalised readout)"]
    lines = []
    for t in rd.terms:
        q = " * ".join(show(f, 6) for f in t.factors) or "1"
        lines.append(f"readout: q' = {('-' if t.sign < 0 else '') + q} against {show(t.state)}"
                     + (f" summed over {', '.join(v.name for v in t.summed)}" if t.summed else ""))
    if rd.skip:
        lines.append(f"skip: {' + '.join(t.show() for t in rd.skip)}")
    return lines


def time_invariance(p: Program, states: list[StateForm], rd: Readout | None) -> tuple[bool, str, str | None]:
    """LTI when the transition, the input map and the readout do not change with the tokens; the
    token-dependent parts may only be a signal on channel axes entering the state and a gate on the
    output. Returns (time_invariant, reason, kernel)."""
    for s in states:
        for t in s.linear + s.coupled:
            for f in t.factors:
                if token_dependent(f):
                    return False, f"the transition of {s.name} depends on the tokens ({show(f)})", None
    if rd is None:
        return False, "the readout is not linear in the states", None
    if rd.ratio is not None:
        return False, "the output divides one readout by another (a normalised readout)", None
    kernels = []
    for s in states:
        if len(s.inputs) != 1:
            return False, f"the input of {s.name} is not one product", None
        inp = s.inputs[0]
        modes = set()
        for t in rd.terms:
            if t.state.arg[0] == s.name:
                modes |= {v.axis for v in t.state.arg[1] if v in t.summed}
        for f in inp.factors:
            axes = {v.axis for v in f.idx if v != T_VAR}
            if token_dependent(f) and axes & modes:
                return False, (f"the input map of {s.name} changes with the tokens ({show(f)} varies along the "
                               f"state axis summed by the readout)"), None
        for t in rd.terms:
            for f in t.factors:
                axes = {v.axis for v in f.idx if v != T_VAR}
                if token_dependent(f) and axes & modes:
                    return False, f"the readout changes with the tokens ({show(f)})", None
        coef = " * ".join(show(f, 6) for t in s.linear for f in t.factors) or "1"
        maps = " * ".join(show(f, 6) for f in inp.factors if not token_dependent(f)) or "1"
        sig = " * ".join(show(f, 6) for f in inp.factors if token_dependent(f)) or "1"
        ro = " * ".join(show(f, 6) for t in rd.terms if t.state.arg[0] == s.name for f in t.factors
                        if not token_dependent(f)) or "1"
        mode_vars = sorted({v.name for t in rd.terms if t.state.arg[0] == s.name for v in t.summed})
        lead = f"sum({', '.join(mode_vars)}: " if mode_vars else "("
        body = f"{lead}{ro} * ({coef}) ** l * {maps})"
        if rd.real or any(x.op == "real" and not state_free(x) for x in toposort([p.output.value])):
            body = f"Re({body})"
        kernels.append(f"K_l = {body} (Vandermonde in the modes), "
                       f"applied to the signal {sig}")
    firs = [n for n in toposort(p.roots()) if n.op == "input" and n.src and not (n.src[0].op == "iota")]
    reason = "the transition, input map and readout do not depend on the tokens"
    if firs:
        taps = sorted({v.axis for n in firs for v in n.src[0].idx if v not in (T_VAR, U_VAR)})
        reason += f"; reads of past tokens ({show(firs[0])}) are finite causal filters over {', '.join(taps)}"
    return True, reason, "; ".join(kernels)


def _default(forms: list[str]) -> tuple[str, str]:
    for f, rule in (("chunked", "chunked when legal: tensor-core matmuls for training"),
                    ("fft", "fft for time-invariant systems: O(T log T) convolution"),
                    ("attention", "attention when no finite state exists"),
                    ("recurrent", "recurrent: the scan is the only form")):
        if f in forms:
            return f, rule
    return forms[0], "the only form"  # pragma: no cover


def _analyse_attention(p: Program, reasons: dict, notes: list) -> Analysis:
    sums = [n for n in toposort([p.output.value]) if n.op == "sum" and U_VAR in n.arg]
    softmaxes = [n for n in toposort([p.output.value]) if n.op == "softmax"]
    causal = _mask_is_causal(p)
    if softmaxes:
        sep = Separability(False, weight=f"softmax over u of {show(softmaxes[0].src[0])}",
                           reason="softmax normalises exp of the score, and exp of a dot product has no finite "
                                  "feature map: no recurrent state exists")
    else:
        seps = []
        for s in sums:
            factors = _flatten_mul(s.src[0])
            weight = [f for f in factors if not (set(f.idx) - {T_VAR, U_VAR})]
            w = product(weight) if weight else Node("const", arg=1)
            seps.append(separability(w))
        bad = [x for x in seps if not x.separable]
        sep = bad[0] if bad else seps[0]
        if not bad and len({str(x.width) for x in seps}) > 1:
            notes.append("the sums over u have different feature widths")
    separable = sep.separable
    width = sizes_str(sep.width) if separable else None
    forms = ["attention"]
    reasons["attention"] = "masked quadratic attention over (t, u) tiles computes any score exactly"
    if separable and causal:
        forms = ["chunked", "recurrent", "attention"]
        reasons["chunked"] = (f"the weight is separable (feature width {width}): a state of width {width} "
                              "carries the past, and chunks become masked matmuls")
        reasons["recurrent"] = f"separable weight: a recurrent state of width {width} (and a constant-size decode)"
    elif separable:
        why = "the mask is not the plain causal mask u <= t, so a running state cannot drop the tokens it hides"
        reasons["chunked"] = f"not available: {why}"
        reasons["recurrent"] = f"not available: {why}"
    else:
        reasons["chunked"] = f"not available: {sep.reason}"
        reasons["recurrent"] = (f"not available as a fixed-size state: {sep.reason}; decoding uses a key/value "
                                "cache in the attention form")
    reasons["fft"] = "not available: the weight depends on the token contents, not only on t - u"
    default, rule = _default(forms)
    reasons["default"] = rule
    return Analysis(p, "attention", None, "", [], [], separable, sep, width, False,
                    "attention depends on token contents", None, forms, default, reasons, notes, causal)
