"""IR expressions printed as maths (:func:`show`; the analysis's reasons and ``mixc explain`` quote them),
factor lists and sympy sizes as text.
"""

from __future__ import annotations

import math

import sympy

from ..ir import T_VAR, Node

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
