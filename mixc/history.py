"""Token history: reads of past tokens (``k[t - m, p]``) carry the last few tokens across calls.

A read of an input at ``t - offset`` needs, at the start of a call, the last ``L = max offset``
tokens of the previous call. They form a hidden state named ``"<input>@past"`` with shape
``[B, H, L, ...]`` (oldest first), returned with the final state and accepted as initial
state, so splitting a sequence and chaining the states gives the same output as one call.
"""

from __future__ import annotations

import itertools

from .errors import MixError
from .ir import T_VAR, U_VAR, Program, toposort
from .lower import eval_int_expr


def history_name(inp: str) -> str:
    return f"{inp}@past"


def token_history(p: Program) -> dict[str, int]:
    """{input name: L} for every input read at a past token offset (L = the largest offset)."""
    consts = dict(p.consts)
    out: dict[str, int] = {}
    for n in toposort(p.roots()):
        if n.op != "input" or not n.src:
            continue
        tok = n.src[0]
        if tok.op == "iota" and tok.arg in (T_VAR, U_VAR):
            continue
        base = next(v for v in tok.idx if v in (T_VAR, U_VAR))
        others = [v for v in tok.idx if v not in (T_VAR, U_VAR)]
        unknown = [v for v in others if v.axis not in consts]
        if unknown:
            v = unknown[0]
            raise MixError(f"the lookback of '{n.arg[0]}' must be bounded by constants: index '{v.name}' runs over "
                           f"{v.axis}, known only at call time", tok.pos,
                           hint=f"declare the bound with const: const {v.axis} = 4", source=p.source)
        ranges = [range(int(consts[v.axis])) for v in others]
        if len(ranges) and eval_size(ranges) > 1_000_000:
            raise MixError(f"the lookback of '{n.arg[0]}' ranges over too many offsets", tok.pos, source=p.source)
        worst = 0
        for combo in itertools.product(*ranges):
            env = {v.name: c for v, c in zip(others, combo)}
            env[base.name] = 0
            pos = eval_int_expr(tok, env, {k: int(v) for k, v in consts.items() if float(v).is_integer()})
            worst = max(worst, -int(pos))
        if worst > 0:
            out[n.arg[0]] = max(out.get(n.arg[0], 0), worst)
    return dict(sorted(out.items()))


def eval_size(ranges) -> int:
    """How many offsets the ranges span (Python ints: no overflow for huge constants)."""
    total = 1
    for r in ranges:
        total *= max(0, r.stop - r.start)
    return total
