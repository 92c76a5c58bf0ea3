"""The names the language reserves (built-in functions, call keywords, samplers, operators) and the IR
node constructors with their type rules: :func:`make` (constant folding, dtype and index rules),
:func:`make_checked` (the same, raising located errors) and :func:`const`.
"""

from __future__ import annotations

import math

from ..errors import MixError, Pos
from ..ir import COMPARE, Node, canonical

UNARY_FUNCS = {
    "exp", "log", "sqrt", "abs", "real", "imag", "conj", "elu", "sigmoid", "logsigmoid", "softplus",
    "silu", "relu", "tanh", "cos", "sin", "floor",
}
BINARY_FUNCS = {"complex", "min", "max"}
RANDOM_FUNCS = {"uniform": "uniform(low, high)", "normal": "normal(mean, std)"}
SPECIAL_FUNCS = {"where": 3, "eye": 2}
BUILTIN_FUNCS = UNARY_FUNCS | BINARY_FUNCS | set(RANDOM_FUNCS) | set(SPECIAL_FUNCS)
# `t` (current token) and `u` (key token) are not reserved: a declaration of that name wins
# (s4d names its input u), and then the token index is simply not available under that name.
RESERVED = {"head", "H", "pi"} | BUILTIN_FUNCS | {"sum", "softmax"}
# Inputs, parameters and buffers are passed to a mixer as keyword arguments, next to these.
CALL_KEYWORDS = ("initial_state", "output_final_state", "cu_seqlens", "form", "self")
INT64_MAX = 2**63 - 1
SAMPLERS = ("normal", "uniform", "logsigmoid", "sigmoid", "softplus", "unit", "positive")
BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "//": "floordiv", "%": "mod"}
CMPOPS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


# ---- node constructors with type rules -------------------------------------------------------


def const(value, pos: Pos | None = None) -> Node:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        value = _as_float(value, pos)  # torch computes in 64 bits: an integer beyond them is a float
    return Node("const", arg=value, dtype="complex" if isinstance(value, complex) else "real", pos=pos)


def _as_float(value: int, pos: Pos | None) -> float:
    try:
        return float(value)
    except OverflowError:
        raise MixError(f"the number {_short(value)} is too large", pos,
                       hint="numbers must be finite in double precision (below about 1.8e308)") from None


def _short(value) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else f"{str(value)[:12]}... "
    return text if len(text) < 40 else text[:36] + "..."


_FOLD_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "**"}


def _shown(op: str, vals: list) -> str:
    """A folded operation as written: ``0 / 0``, ``log(0)``."""
    args = [_short(v) for v in vals]
    if op in _FOLD_SYMBOLS:
        return f"{args[0]} {_FOLD_SYMBOLS[op]} {args[1]}"
    return f"-{args[0]}" if op == "neg" else f"{op}({', '.join(args)})"


_FOLD_WORDS = {"div": "a division by zero", "floordiv": "a division by zero", "mod": "a division by zero",
               "log": "log of a number <= 0", "sqrt": "sqrt of a negative number", "pow": "an undefined power"}


def _fold(op: str, vals: list, pos: Pos | None = None):
    """The value of ``op`` on constants ``vals``; None when it is not folded here. Raises a located
    :class:`MixError` when the value is undefined or not finite (log(0), 0/0, 0 ** -0.5, overflow)."""
    a = vals[0]
    b = vals[1] if len(vals) > 1 else None
    try:
        table = {
            "add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b,
            "floordiv": lambda: a // b, "mod": lambda: a % b, "pow": lambda: a ** b,
            "neg": lambda: -a, "complex": lambda: complex(a, 0) + complex(0, 1) * b,
            "min": lambda: min(a, b), "max": lambda: max(a, b),
            "exp": lambda: (math.exp(a) if not isinstance(a, complex) else __import__("cmath").exp(a)),
            "log": lambda: math.log(a), "sqrt": lambda: math.sqrt(a), "abs": lambda: abs(a),
            "floor": lambda: math.floor(a), "cos": lambda: math.cos(a), "sin": lambda: math.sin(a),
            "real": lambda: complex(a).real, "imag": lambda: complex(a).imag, "conj": lambda: complex(a).conjugate(),
        }
        if op not in table:
            return None
        if op == "pow" and isinstance(a, int) and isinstance(b, int) and b > 1024 and abs(a) > 1:
            a = float(a)  # 10 ** 10 ** 10 as an exact integer would not finish; as a float it overflows
        out = table[op]()
    except TypeError:
        return None
    except (ValueError, ZeroDivisionError, OverflowError) as err:
        what = "overflows" if isinstance(err, OverflowError) else \
            f"is undefined ({_FOLD_WORDS.get(op, str(err))})"
        raise MixError(f"{_shown(op, vals)} {what}", pos,
                       hint="every constant expression must have a finite value") from None
    if isinstance(out, complex) and out.imag == 0 and op != "complex":
        out = out.real
    if isinstance(out, complex) and not (math.isfinite(out.real) and math.isfinite(out.imag)) or \
            isinstance(out, float) and not math.isfinite(out):
        raise MixError(f"{_shown(op, vals)} is not finite ({out!r})", pos,
                       hint="every constant expression must have a finite value")
    return out


def make(op: str, src: tuple[Node, ...], pos: Pos | None, arg=None) -> Node:
    """Build a node, computing its index set and dtype, folding constants (an operation on constants whose value
    is undefined or not finite is left unfolded: later passes build nodes with this too)."""
    if all(s.op == "const" for s in src) and src:
        try:
            val = _fold(op, [s.arg for s in src], pos)
            if val is not None:
                return const(val, pos)
        except MixError:
            pass
    return _node(op, src, pos, arg)


def make_checked(op: str, src: tuple[Node, ...], pos: Pos | None, arg=None) -> Node:
    """:func:`make` for what a file writes: an operation on constants must have a finite value (``log(0)``,
    ``0 / 0``, ``0 ** -0.5``, ``exp(1000)`` are located errors, not a failure when the mixer is called)."""
    if all(s.op == "const" for s in src) and src:
        val = _fold(op, [s.arg for s in src], pos)
        if val is not None:
            return const(val, pos)
    return _node(op, src, pos, arg)


def _node(op: str, src: tuple[Node, ...], pos: Pos | None, arg=None) -> Node:
    idx = canonical(v for s in src for v in s.idx)
    if op in COMPARE or op in ("and", "or", "not"):
        dtype = "bool"
    elif op in ("real", "imag", "abs"):
        dtype = "real"
    elif op == "complex" or any(s.dtype == "complex" for s in src):
        dtype = "complex"
    else:
        dtype = "real"
    return Node(op, src, arg, idx, dtype, pos)
