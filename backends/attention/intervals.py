"""Interval reasoning on a mask predicate over tiles: which (query tile, key tile) pairs are empty
(no visible key), full (every key visible) or partial.

For a tile ``t in [t_lo, t_hi]``, ``u in [u_lo, u_hi]`` every sub-expression of the mask gets an
interval (sums add, a constant factor scales or swaps, ``floor`` is monotone, ...), and each comparison
``a <= b`` is *true on the whole tile* when ``min(b - a) >= 0`` and *false on the whole tile* when
``max(b - a) < 0``; ``and``/``or``/``not`` combine these in three-valued logic. The answer is exact for
linear predicates in which each position appears once (causal, sliding window, segment masks) and
conservative otherwise (a tile said partial is masked element by element, so it is always correct).

:func:`interval_code` writes this as Python source over torch tensors of tile bounds (pasted into the
generated module: no sympy there); :func:`interval_bool` runs the same code on numbers at compile time.
"""

from __future__ import annotations

import sympy


class NoInterval(Exception):
    """A sub-expression with no interval rule: every tile is then partial."""


class _Gen:
    def __init__(self, names: dict[sympy.Symbol, tuple[str, str]]) -> None:
        self.names = names
        self.lines: list[str] = []
        self.n = 0

    def tmp(self, lo: str, hi: str) -> tuple[str, str]:
        self.n += 1
        a, b = f"lo{self.n}", f"hi{self.n}"
        self.lines.append(f"{a}, {b} = {lo}, {hi}")
        return a, b

    def num(self, e: sympy.Basic) -> tuple[str, str]:  # noqa: C901
        if e.is_Number:
            v = repr(int(e)) if e.is_Integer else repr(float(e))
            return v, v
        if e.is_Symbol:
            if e not in self.names:
                raise NoInterval(f"no interval for {e}")
            return self.names[e]
        if isinstance(e, sympy.Add):
            parts = [self.num(a) for a in e.args]
            return self.tmp(" + ".join(f"({p[0]})" for p in parts), " + ".join(f"({p[1]})" for p in parts))
        if isinstance(e, sympy.Mul):
            const = sympy.Integer(1)
            rest = []
            for a in e.args:
                if a.is_Number:
                    const *= a
                else:
                    rest.append(a)
            cur = self.num(rest[0]) if rest else ("1", "1")
            for a in rest[1:]:
                lo2, hi2 = self.num(a)
                prods = [f"({x}) * ({y})" for x in cur for y in (lo2, hi2)]
                cur = self.tmp(f"_attn_min4({', '.join(prods)})", f"_attn_max4({', '.join(prods)})")
            c = repr(float(const)) if not const.is_Integer else repr(int(const))
            if const == 1:
                return cur
            if const > 0:
                return self.tmp(f"{c} * ({cur[0]})", f"{c} * ({cur[1]})")
            return self.tmp(f"{c} * ({cur[1]})", f"{c} * ({cur[0]})")
        if isinstance(e, sympy.floor):
            lo, hi = self.num(e.args[0])
            return self.tmp(f"_attn_floor({lo})", f"_attn_floor({hi})")
        if isinstance(e, sympy.ceiling):
            lo, hi = self.num(e.args[0])
            return self.tmp(f"-_attn_floor(-({lo}))", f"-_attn_floor(-({hi}))")
        if isinstance(e, (sympy.Min, sympy.Max)):
            parts = [self.num(a) for a in e.args]
            f = "_attn_min" if isinstance(e, sympy.Min) else "_attn_max"
            lo, hi = parts[0]
            for a, b in parts[1:]:
                lo, hi = self.tmp(f"{f}({lo}, {a})", f"{f}({hi}, {b})")
            return lo, hi
        raise NoInterval(f"no interval rule for {type(e).__name__} ({e})")

    def boolean(self, e: sympy.Basic) -> tuple[str, str]:
        """(all true, all false) over the tile."""
        if e is sympy.true:
            return "True", "False"
        if e is sympy.false:
            return "False", "True"
        if isinstance(e, (sympy.And, sympy.Or)):
            parts = [self.boolean(a) for a in e.args]
            if isinstance(e, sympy.And):
                t = " & ".join(f"({p[0]})" for p in parts)
                f = " | ".join(f"({p[1]})" for p in parts)
            else:
                t = " | ".join(f"({p[0]})" for p in parts)
                f = " & ".join(f"({p[1]})" for p in parts)
            return self.tmp(t, f)
        if isinstance(e, sympy.Not):
            t, f = self.boolean(e.args[0])
            return f, t
        if isinstance(e, (sympy.LessThan, sympy.StrictLessThan, sympy.GreaterThan, sympy.StrictGreaterThan)):
            small, big = (e.lhs, e.rhs) if isinstance(e, (sympy.LessThan, sympy.StrictLessThan)) else (e.rhs, e.lhs)
            lo, hi = self.num(big - small)  # big - small >= 0 (or > 0)
            if isinstance(e, (sympy.LessThan, sympy.GreaterThan)):
                return self.tmp(f"({lo}) >= 0", f"({hi}) < 0")
            return self.tmp(f"({lo}) > 0", f"({hi}) <= 0")
        if isinstance(e, (sympy.Equality, sympy.Unequality)):
            lo, hi = self.num(e.lhs - e.rhs)
            t, f = self.tmp(f"(({lo}) == 0) & (({hi}) == 0)", f"(({lo}) > 0) | (({hi}) < 0)")
            return (t, f) if isinstance(e, sympy.Equality) else (f, t)
        raise NoInterval(f"no interval rule for {type(e).__name__} ({e})")


def interval_code(mask: sympy.Basic, names: dict[sympy.Symbol, tuple[str, str]]) -> tuple[list[str], str, str]:
    """Lines computing (all true, all false) of ``mask`` over boxes whose bounds are the expressions in
    ``names`` (symbol -> (lo, hi)); falls back to (False, False), 'partial everywhere', when an operation
    has no interval rule."""
    g = _Gen(names)
    try:
        t, f = g.boolean(mask)
    except NoInterval:
        return [], "False", "False"
    return g.lines, t, f


HELPERS = {
    "_attn_floor": lambda x: x.floor() if hasattr(x, "floor") else float(int(x // 1)),
}


def interval_bool(mask: sympy.Basic, box: dict[sympy.Symbol, tuple[int, int]]) -> str:
    """'full', 'empty' or 'partial' for ``mask`` over a box of integer ranges (compile-time use)."""
    import torch

    names = {s: (f"_b['{s}'][0]", f"_b['{s}'][1]") for s in box}
    lines, t, f = interval_code(mask, names)
    env = {"_b": {str(s): (torch.tensor(float(a), dtype=torch.float64), torch.tensor(float(b), dtype=torch.float64))
                  for s, (a, b) in box.items()},
           "_attn_floor": torch.floor, "_attn_min": torch.minimum, "_attn_max": torch.maximum,
           "_attn_min4": lambda *xs: torch.stack(xs).amin(0), "_attn_max4": lambda *xs: torch.stack(xs).amax(0)}
    exec("\n".join(lines + [f"_t, _f = {t}, {f}"]), env)
    if bool(env["_t"]):
        return "full"
    if bool(env["_f"]):
        return "empty"
    return "partial"
