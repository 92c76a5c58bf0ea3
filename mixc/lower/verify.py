"""The verifier passes that need the whole lowered program: the update is linear in the states
(:func:`check_linear`, :func:`state_degree`), the mask is causal (:func:`check_mask_causal`), expressions
are not nested too deeply (:func:`check_depth`) and an output is a recurrence or attention, not both
(:func:`check_attention_shape`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import Pos
from ..ir import Node, Program, toposort
from .rewrite import _NotEvaluable, eval_int_expr

if TYPE_CHECKING:
    from .lowerer import Lowerer


def state_degree(n: Node, memo: dict | None = None) -> tuple[int, Node | None]:
    """Polynomial degree of ``n`` in the (previous) states, and the first term that makes it
    non-linear (degree > 1 or a non-linear function of a state), if any. Degree 99 = non-polynomial."""
    memo = {} if memo is None else memo
    if id(n) in memo:
        return memo[id(n)]
    if n.op == "state":
        res = (1, None)
    elif not n.src:
        res = (0, None)
    else:
        subs = [state_degree(s, memo) for s in n.src]
        bad = next((b for _, b in subs if b is not None), None)
        degs = [d for d, _ in subs]
        if bad is not None:
            res = (99, bad)
        elif n.op in ("add", "sub", "neg", "real", "imag", "conj", "complex", "sum"):
            res = (max(degs), None)
        elif n.op == "mul":
            d = degs[0] + degs[1]
            res = (d, n if d > 1 else None)
        elif n.op == "div":
            res = (degs[0], n if degs[1] > 0 else None)
        elif n.op == "where":
            res = (max(degs[1:]), n if degs[0] > 0 else None)
        elif n.op == "pow":
            if degs[1] > 0:
                res = (99, n)
            elif degs[0] == 0:
                res = (0, None)
            elif n.src[1].op == "const" and n.src[1].arg == 1:
                res = (degs[0], None)
            else:
                res = (99, n)
        else:
            res = (99, n) if any(degs) else (0, None)
    memo[id(n)] = res
    return res


def check_linear(prog: Program, lowerer: Lowerer) -> None:
    """Each update must be affine in the states: S_t = A_t(S_{t-1}) + B_t."""
    for eq in prog.updates:
        _, bad = state_degree(eq.value)
        if bad is not None:
            term = lowerer.text(bad.pos)
            raise lowerer.err(f"the update of '{eq.target}' is not linear in the state: '{term}'", bad.pos,
                              expected="S_t = A_t(S_{t-1}) + B_t: states appear at most once in each product "
                                       "and never inside a function",
                              hint="mixc compiles linear recurrences; a non-linear RNN has no chunked form")


def check_mask_causal(prog: Program, lowerer: Lowerer, stmt_pos: Pos | None) -> None:
    """The mask must not admit a key token after the query token (u > t)."""
    if prog.mask is None:
        return
    import torch

    nums = [abs(v) for _, v in prog.consts if isinstance(v, int | float)] + [8]
    n = int(min(1024, max(32, 4 * max(nums) + 8)))
    tt = torch.arange(n).view(n, 1)
    uu = torch.arange(n).view(1, n)
    sizes = {k: (v if v is not None else n) for k, v in prog.sizes}
    try:
        allowed = eval_int_expr(prog.mask, {"t": tt, "u": uu}, sizes)
    except _NotEvaluable as ex:
        raise lowerer.err(f"the mask cannot be evaluated: {ex}", ex.pos or prog.mask.pos) from None
    allowed = torch.as_tensor(allowed).expand(n, n)
    future = allowed & (uu > tt)
    if bool(future.any()):
        t0, u0 = (int(x) for x in future.nonzero()[0])
        raise lowerer.err(f"the mask reads future tokens: it admits key u={u0} for query t={t0}", stmt_pos,
                          expected="a condition that implies u <= t", hint="add 'and u <= t'")


# Expressions deeper than this (after lets and functions are substituted) are rejected:
# the passes and emitters after lowering recurse over the expression tree.
MAX_DEPTH = 200


def node_depth(root: Node) -> int:
    """Longest operand chain under ``root`` (iteratively: no recursion)."""
    depth: dict[int, int] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        n, done = stack.pop()
        if id(n) in depth:
            continue
        if done:
            depth[id(n)] = 1 + max((depth[id(s)] for s in n.src), default=0)
            continue
        stack.append((n, True))
        stack.extend((s, False) for s in n.src if id(s) not in depth)
    return depth[id(root)]


def check_depth(prog: Program, lowerer: Lowerer) -> None:
    for eq in (*prog.updates, prog.output):
        d = node_depth(eq.value)
        if d > MAX_DEPTH:
            raise lowerer.err(f"the value of '{eq.target}' is nested too deeply ({d} levels once lets and functions "
                              f"are substituted; at most {MAX_DEPTH})", eq.pos,
                              hint="split long chains into fewer, flatter expressions")


def check_attention_shape(prog: Program, lowerer: Lowerer) -> None:
    """An output either reads states or sums over key tokens, not both."""
    out = prog.output.value
    nodes = toposort([out])
    if any(n.op == "state" for n in nodes) and prog.has_key_tokens:
        raise lowerer.err("the output both reads a state and sums over key tokens", prog.output.pos,
                          hint="write either a recurrence (states) or attention (sum over u), not both")
    if prog.mask is not None and not prog.has_key_tokens:
        raise lowerer.err("a mask is declared but the output never sums over key tokens u", prog.output.pos,
                          hint="the mask restricts sum(u: ...) and softmax(u: ...)")
