"""The normal form of the output: ``o_t = gate * (q'_t^T S_t) (+ skip)``, or a ratio of two such readouts
(a normaliser), as a :class:`Readout` (:func:`readout`; None when the output is not linear in the states).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Node, toposort
from .terms import Term, _eliminate_eye, _flatten_mul, expand_terms, state_free


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
