"""Print sympy expressions of the score and mask as Triton source (one printer, loud on what it cannot print).

Symbols print as the names the tile loop binds: ``qk`` the q.k tile (fp32), ``f_t`` / ``f_u`` the query and
key positions (fp32, broadcast along the tile), ``f_h`` the head index, ``p_<name>`` a per-head parameter,
``dim_<size>`` a size (an fp32 kernel argument).
"""

from __future__ import annotations

import sympy

from .plan import HEAD, QK, T_SYM, U_SYM


class NotPrintable(Exception):
    """A sympy node the Triton printer has no rule for."""


def _float(x: sympy.Basic) -> str:
    v = float(x)
    return repr(v) if v >= 0 else f"({v!r})"


def triton_expr(e: sympy.Basic, names: dict[sympy.Symbol, str] | None = None) -> str:  # noqa: C901
    """Triton source for ``e``; ``names`` overrides how symbols print."""
    names = names or {}
    base = {QK: "qk", T_SYM: "f_t", U_SYM: "f_u", HEAD: "f_h"}
    p = lambda x: triton_expr(x, names)  # noqa: E731
    if e.is_Symbol:
        if e in names:
            return names[e]
        if e in base:
            return base[e]
        return str(e)  # p_<name>, dim_<size>
    if e is sympy.true:
        return "True"
    if e is sympy.false:
        return "False"
    if e.is_Number:
        return _float(e)
    if isinstance(e, sympy.Add):
        return "(" + " + ".join(p(a) for a in e.args) + ")"
    if isinstance(e, sympy.Mul):
        num, den = [], []
        for a in e.args:
            if isinstance(a, sympy.Pow) and a.exp.is_Number and a.exp < 0:
                den.append(a.base ** (-a.exp))
            else:
                num.append(a)
        top = " * ".join(p(a) for a in num) if num else "1.0"
        if not den:
            return f"({top})"
        bottom = " * ".join(p(a) for a in den)
        if not any(x.free_symbols & {QK, T_SYM, U_SYM} for x in den):  # a per-head scalar: one reciprocal, then
            return f"({top} * (1.0 / ({bottom})))"  # a product per element (a division costs several)
        return f"({top} / ({bottom}))"
    if isinstance(e, sympy.Pow):
        b, x = e.base, e.exp
        xv = float(x) if x.is_Number else None
        if xv == 0.5:
            return f"tl.sqrt({p(b)})"
        if xv == -0.5:
            return f"(1.0 / tl.sqrt({p(b)}))"
        if xv is not None and xv.is_integer() and 1 <= xv <= 4:
            return "(" + " * ".join([p(b)] * int(xv)) + ")"
        if xv is not None and xv.is_integer() and -4 <= xv <= -1:
            return "(1.0 / (" + " * ".join([p(b)] * -int(xv)) + "))"
        if b.is_Number and b > 0:
            return f"tl.exp2({p(x)} * {float(sympy.log(b, 2))!r})"
        return f"tl.exp({p(x)} * tl.log({p(b)}))"
    if isinstance(e, sympy.exp):
        return f"tl.exp({p(e.args[0])})"
    if isinstance(e, sympy.log):
        return f"tl.log({p(e.args[0])})"
    if isinstance(e, sympy.tanh):  # tanh(x) = 2 sigmoid(2x) - 1
        return f"(2.0 * tl.sigmoid(2.0 * {p(e.args[0])}) - 1.0)"
    if isinstance(e, sympy.floor):
        return f"tl.floor({p(e.args[0])})"
    if isinstance(e, sympy.Abs):
        return f"tl.abs({p(e.args[0])})"
    if isinstance(e, (sympy.Min, sympy.Max)):
        f = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
        out = p(e.args[0])
        for a in e.args[1:]:
            out = f"{f}({out}, {p(a)})"
        return out
    rel = {sympy.LessThan: "<=", sympy.StrictLessThan: "<", sympy.GreaterThan: ">=", sympy.StrictGreaterThan: ">",
           sympy.Equality: "==", sympy.Unequality: "!="}
    for cls, op in rel.items():
        if isinstance(e, cls):
            return f"({p(e.lhs)} {op} {p(e.rhs)})"
    if isinstance(e, (sympy.And, sympy.Or)):
        op = " & " if isinstance(e, sympy.And) else " | "
        return "(" + op.join(p(a) for a in e.args) + ")"
    if isinstance(e, sympy.Not):
        return f"({p(e.args[0])} == 0)"
    raise NotPrintable(f"the Triton printer has no rule for {type(e).__name__} ({e})")
