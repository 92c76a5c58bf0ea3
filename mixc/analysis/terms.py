"""The normal form of a state update: ``S_t = A_t(S_{t-1}) + k'_t v'_t^T`` as a sum of :class:`Term`
(factors, the state read, summed indices, sign; :func:`expand_terms`), gathered per state in
:class:`StateForm` (:func:`normal_form`), and the transition's class (:func:`classify_transition`:
identity, constant_scalar, scalar, diagonal_key, diagonal_value, elementwise, delta, gated_delta).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import T_VAR, U_VAR, Node, Program, Var, toposort
from ..lower import make
from .printing import factors_str, show


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


def _flatten_mul(n: Node) -> list[Node]:
    if n.op == "mul":
        return _flatten_mul(n.src[0]) + _flatten_mul(n.src[1])
    return [n]


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
    from ..lower import rename

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
