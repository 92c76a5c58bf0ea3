"""Separability of a pairwise score ``w(t, u)``: whether it factors into finite feature maps
``phi(q_t) . psi(k_u)``, of what width (sympy), or why not (:func:`separability`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..ir import T_VAR, U_VAR, Node, Var, toposort
from .printing import _EXPLICIT_T, show, sizes_str
from .terms import _flatten_mul


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
