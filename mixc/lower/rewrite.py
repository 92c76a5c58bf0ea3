"""Rewrites and evaluations of lowered IR that later passes share: :func:`rename` (substitute index
variables), :func:`to_sympy` (integer/index expressions as sympy) and :func:`eval_int_expr` (an index
or mask expression evaluated on integer tensors).
"""

from __future__ import annotations

import sympy

from ..ir import T_VAR, U_VAR, Node, Var, canonical


def rename(node: Node, mapping: dict[Var, Var]) -> Node:
    """Substitute free index variables (bound ones are renamed apart when they would clash)."""
    memo: dict[int, Node] = {}
    targets = set(mapping.values())

    def sub_var(v: Var, m: dict[Var, Var]) -> Var:
        return m.get(v, v)

    def go(n: Node, m: dict[Var, Var]) -> Node:
        key = id(n)
        if not m:
            return n
        if key in memo and m is mapping:
            return memo[key]
        if n.op == "sum" or n.op == "softmax":
            bound = n.arg if n.op == "sum" else (n.arg,)
            inner = {k: v for k, v in m.items() if k not in bound}
            fresh = {}
            for b in bound:
                if b in targets and b not in (T_VAR, U_VAR):
                    fresh[b] = Var(b.name + "'", b.axis)
            inner.update(fresh)
            body = go(n.src[0], inner)
            new_bound = tuple(fresh.get(b, b) for b in bound)
            arg = new_bound if n.op == "sum" else new_bound[0]
            keyed = canonical((*body.idx, T_VAR)) if U_VAR in new_bound else body.idx
            idx = tuple(v for v in keyed if v not in new_bound) if n.op == "sum" else keyed
            out = Node(n.op, (body,), arg, idx, n.dtype, n.pos)
        else:
            src = tuple(go(s, m) for s in n.src)
            arg = n.arg
            if n.op == "iota":
                arg = sub_var(n.arg, m)
            elif n.op in ("input", "param", "buffer", "state"):
                arg = (n.arg[0], tuple(sub_var(v, m) for v in n.arg[1]))
            elif n.op == "eye":
                arg = (sub_var(n.arg[0], m), sub_var(n.arg[1], m))
            idx = canonical([sub_var(v, m) for v in n.idx])
            out = Node(n.op, src, arg, idx, n.dtype, n.pos)
        if m is mapping:
            memo[key] = out
        return out

    return go(node, mapping)


def to_sympy(n: Node, symbols: dict | None = None):
    """A sympy expression for an arithmetic node over indices, sizes and constants (else None)."""
    syms = {} if symbols is None else symbols

    def sym(name: str, **kw):
        if name not in syms:
            syms[name] = sympy.Symbol(name, **kw)
        return syms[name]

    def go(x: Node):
        if x.op == "const":
            v = x.arg
            if isinstance(v, complex):
                return None
            return sympy.Integer(v) if isinstance(v, int) else sympy.Float(v)
        if x.op == "iota":
            return sym(x.arg.name, integer=True, nonnegative=True)
        if x.op == "dim":
            return sym(x.arg, integer=True, positive=True)
        args = [go(s) for s in x.src]
        if any(a is None for a in args):
            return None
        ops = {
            "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
            "neg": lambda a: -a, "floordiv": lambda a, b: sympy.floor(a / b), "div": lambda a, b: a / b,
            "floor": lambda a: sympy.floor(a), "mod": lambda a, b: sympy.Mod(a, b),
        }
        if x.op not in ops:
            return None
        return ops[x.op](*args)

    return go(n)


class _NotEvaluable(Exception):
    def __init__(self, msg: str, pos=None) -> None:
        super().__init__(msg)
        self.pos = pos


def eval_int_expr(n: Node, env: dict, sizes: dict):
    """Evaluate an index/mask expression on integer tensors (used by the causality check)."""
    import torch

    memo: dict[int, object] = {}

    def go(x: Node):
        if id(x) in memo:
            return memo[id(x)]
        if x.op == "const":
            r = x.arg
        elif x.op == "dim":
            r = sizes[x.arg]
        elif x.op == "iota":
            if x.arg.name not in env:
                raise _NotEvaluable(f"index '{x.arg.name}' is not t or u", x.pos)
            r = env[x.arg.name]
        else:
            a = [go(s) for s in x.src]
            fns = {
                "add": lambda: a[0] + a[1], "sub": lambda: a[0] - a[1], "mul": lambda: a[0] * a[1],
                "div": lambda: a[0] / a[1], "floordiv": lambda: a[0] // a[1], "mod": lambda: a[0] % a[1],
                "neg": lambda: -a[0], "floor": lambda: torch.floor(torch.as_tensor(a[0])),
                "lt": lambda: a[0] < a[1], "le": lambda: a[0] <= a[1], "gt": lambda: a[0] > a[1],
                "ge": lambda: a[0] >= a[1], "eq": lambda: a[0] == a[1], "ne": lambda: a[0] != a[1],
                "and": lambda: torch.as_tensor(a[0]) & torch.as_tensor(a[1]),
                "or": lambda: torch.as_tensor(a[0]) | torch.as_tensor(a[1]),
                "not": lambda: ~torch.as_tensor(a[0]),
                "min": lambda: torch.minimum(torch.as_tensor(a[0]), torch.as_tensor(a[1])),
                "max": lambda: torch.maximum(torch.as_tensor(a[0]), torch.as_tensor(a[1])),
            }
            if x.op not in fns:
                raise _NotEvaluable(f"'{x.op}' is not allowed in a mask", x.pos)
            r = fns[x.op]()
        memo[id(x)] = r
        return r

    return go(n)
