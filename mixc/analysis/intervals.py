"""Bounds of expressions by interval arithmetic (:func:`bounds`), and whether a decay's factors stay in
(0, 1] (:func:`decay_in_unit_interval`): what makes a recurrence's log decays safe to sum.
"""

from __future__ import annotations

import math

from ..ir import Node, Program, toposort
from .printing import show

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
