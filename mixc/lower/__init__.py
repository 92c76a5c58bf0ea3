"""Lower the syntax tree to the typed IR, checking meaning (pass 2 of the pipeline).

Name resolution, index binding, shapes, complex-vs-real, arity, and the rules that make a
program a causal mixer all live here; every violation is a located :class:`MixError`.
The verifier passes that need the whole program (:func:`check_linear`, :func:`check_mask_causal`,
:func:`check_depth`, :func:`check_attention_shape`) run after lowering.

The package, in the order a program goes through it:
    nodes.py    reserved names and the IR node constructors with their type rules (:func:`make`)
    exprs.py    expressions to IR nodes (:class:`~.exprs.ExprLowering`, the lowerer's base class)
    lowerer.py  :class:`Lowerer`: declarations, sizes, constants, then each statement
    verify.py   the whole-program checks run after lowering (linearity, causal mask, depth, shape)
    rewrite.py  :func:`rename`, :func:`to_sympy`, :func:`eval_int_expr`: used by lowering and the passes after it
"""

from __future__ import annotations

from .. import ast
from ..errors import Source
from ..ir import Program
from .exprs import ExprLowering
from .lowerer import Lowerer
from .nodes import (
    BINARY_FUNCS,
    BINOPS,
    BUILTIN_FUNCS,
    CALL_KEYWORDS,
    CMPOPS,
    RANDOM_FUNCS,
    RESERVED,
    SAMPLERS,
    SPECIAL_FUNCS,
    UNARY_FUNCS,
    const,
    make,
    make_checked,
)
from .rewrite import eval_int_expr, rename, to_sympy
from .verify import (
    MAX_DEPTH,
    check_attention_shape,
    check_depth,
    check_linear,
    check_mask_causal,
    node_depth,
    state_degree,
)

__all__ = ["BINARY_FUNCS", "BINOPS", "BUILTIN_FUNCS", "CALL_KEYWORDS", "CMPOPS", "MAX_DEPTH", "RANDOM_FUNCS",
           "RESERVED", "SAMPLERS", "SPECIAL_FUNCS", "UNARY_FUNCS", "ExprLowering", "Lowerer",
           "check_attention_shape", "check_depth", "check_linear", "check_mask_causal", "const", "eval_int_expr",
           "lower", "make", "make_checked", "node_depth", "rename", "state_degree", "to_sympy"]


def lower(module: ast.Module, source: Source, overrides: dict | None = None) -> Program:
    """Syntax tree -> verified IR program."""
    lw = Lowerer(module, source, overrides)
    try:
        prog = lw.lower()
        check_depth(prog, lw)
        check_linear(prog, lw)
        mask_stmt = next((s for s in module.statements if isinstance(s, ast.MaskStmt)), None)
        check_mask_causal(prog, lw, mask_stmt.cond.pos if mask_stmt else None)
        check_attention_shape(prog, lw)
    except RecursionError:
        raise lw.err("the program is nested too deeply to compile", lw.current,
                     hint="split long chains into fewer, flatter expressions") from None
    return prog

