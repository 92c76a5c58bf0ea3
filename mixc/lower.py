"""Lower the syntax tree to the typed IR, checking meaning (pass 2 of the pipeline).

Name resolution, index binding, shapes, complex-vs-real, arity, and the rules that make a
program a causal mixer all live here; every violation is a located :class:`MixError`.
The verifier passes that need the whole program (:func:`check_updates`,
:func:`check_linear`, :func:`check_mask_causal`) run after lowering.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import sympy

from . import ast
from .errors import MixError, Pos, Source, did_you_mean
from .ir import (
    COMPARE,
    REAL_ONLY,
    T_VAR,
    TOKEN_AXIS,
    U_VAR,
    Equation,
    Node,
    Program,
    TensorDecl,
    Var,
    canonical,
    toposort,
)

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


# ---- the lowering context ------------------------------------------------------------------


@dataclass
class _Let:
    stmt: ast.LetStmt
    node: Node | None = None
    vars: tuple[Var, ...] = ()
    busy: bool = False


@dataclass
class _Ctx:
    """Where an expression is being lowered: decides which names it may read."""

    kind: str  # const | init | mask | let | update | out
    env: dict[str, Var] = field(default_factory=dict)  # index names in scope
    funcs: dict[str, Node] = field(default_factory=dict)  # def parameters in scope
    where: str = ""
    owner: str = ""  # the parameter or buffer an initialiser belongs to (names its random draws)

    def with_vars(self, extra: dict[str, Var]) -> _Ctx:
        return _Ctx(self.kind, {**self.env, **extra}, self.funcs, self.where, self.owner)


class Lowerer:
    def __init__(self, module: ast.Module, source: Source, overrides: dict | None = None) -> None:
        self.module = module
        self.source = source
        self.overrides = {k: _plain_number(v) for k, v in (overrides or {}).items()}
        self.decl_pos: dict[str, Pos | None] = {}
        self.sizes: dict[str, int | None] = {}
        self.size_stmts: dict[str, ast.SizeStmt] = {}
        self.const_stmts: dict[str, ast.ConstStmt] = {}
        self.consts: dict[str, int | float] = {}
        self.tensors: dict[str, ast.TensorStmt] = {}
        self.defs: dict[str, ast.DefStmt] = {}
        self.lets: dict[str, _Let] = {}
        self._let_stack: list[str] = []  # lets being lowered, outermost first
        self._def_stack: list[str] = []  # functions being substituted
        self.current: Pos | None = None  # the statement being lowered (for errors without a better place)
        self.name: str | None = None

    # -- errors ------------------------------------------------------------------------------

    def err(self, msg: str, pos: Pos | None, *, expected: str | None = None, hint: str | None = None) -> MixError:
        return MixError(msg, pos, expected=expected, hint=hint, source=self.source)

    def text(self, pos: Pos | None) -> str:
        """The source text of a span (one line at most), for messages."""
        if pos is None:
            return "?"
        line = self.source.line(pos.line) or ""
        end = pos.end_col if pos.end_line == pos.line else len(line) + 1
        return line[pos.col - 1 : end - 1].strip()

    def find_after(self, pos: Pos | None, word: str) -> Pos | None:
        """Where the name ``word`` next occurs after ``pos`` (for a token the syntax tree keeps no position of)."""
        if pos is None:
            return None
        text = self.source.text
        rows = text.split("\n")
        start = sum(len(r) + 1 for r in rows[: pos.end_line - 1]) + pos.end_col - 1
        m = re.compile(rf"(?<![A-Za-z_0-9]){re.escape(word)}(?![A-Za-z_0-9])").search(text, start)
        if m is None:
            return None
        line = text.count("\n", 0, m.start()) + 1
        col = m.start() - text.rfind("\n", 0, m.start())
        return Pos(line, col, line, col + len(word))

    def name_in(self, pos: Pos | None, name: str, brackets: str = "[]", nth: int = 0) -> Pos | None:
        """The ``nth`` occurrence of the index ``name`` in the header of ``pos``: between its first
        ``brackets[0]`` and the ``brackets[1]`` after it (``S[i, j]``, ``sum(i, j: ...)``); else ``pos``."""
        if pos is None or pos.end_line != pos.line:
            return pos
        line = self.source.line(pos.line) or ""
        seg = line[pos.col - 1 : pos.end_col - 1]
        lo = seg.find(brackets[0]) + 1
        hi = seg.find(brackets[1], lo)
        if lo == 0 or hi < 0:
            return pos
        hits = list(re.finditer(rf"(?<![A-Za-z_0-9]){re.escape(name)}(?![A-Za-z_0-9])", seg[lo:hi]))
        if len(hits) <= nth:
            return pos
        col = pos.col + lo + hits[nth].start()
        return Pos(pos.line, col, pos.line, col + len(name))

    def all_names(self) -> set[str]:
        return set(self.sizes) | set(self.const_stmts) | set(self.tensors) | set(self.defs) | set(self.lets)

    # -- pass: collect declarations -------------------------------------------------------------

    def collect(self) -> None:
        """Gather declarations by name (order-free), rejecting duplicates and reserved names."""
        for st in self.module.statements:
            if isinstance(st, ast.MixerStmt):
                if self.name is not None:
                    raise self.err("duplicate 'mixer' statement", st.pos, hint="a file declares one mixer")
                self.name = st.name
                continue
            name = getattr(st, "name", None)
            if isinstance(st, ast.UpdateStmt | ast.OutStmt | ast.MaskStmt) or name is None:
                continue
            if name in RESERVED:
                raise self.err(f"'{name}' is a reserved name and cannot be declared", st.pos,
                               hint="t is the current token, u a key token, head the head index, H the number "
                                    "of heads (in initialisers), pi the constant; the others are built-in functions")
            if name in CALL_KEYWORDS and isinstance(st, ast.TensorStmt) and st.kind != "state":
                raise self.err(f"{st.kind} '{name}' has the name of a call keyword", st.pos,
                               expected="a name other than " + ", ".join(CALL_KEYWORDS),
                               hint=f"a mixer is called as m(**inputs, **parameters, {', '.join(CALL_KEYWORDS[:4])}"
                                    "=...): rename it")
            if name in self.decl_pos:
                first = self.decl_pos[name]
                where = f" (first declared on line {first.line})" if first else ""
                raise self.err(f"duplicate declaration of '{name}'{where}", st.pos,
                               hint="each name is declared once; rename one of them")
            self.decl_pos[name] = st.pos
            if isinstance(st, ast.SizeStmt):
                self.sizes[name] = st.default
                self.size_stmts[name] = st
            elif isinstance(st, ast.ConstStmt):
                self.const_stmts[name] = st
            elif isinstance(st, ast.TensorStmt):
                self.tensors[name] = st
                if st.kind == "input" and st.sampler is not None and st.sampler not in SAMPLERS:
                    raise self.err(f"unknown sampler '{st.sampler}' for input '{name}'",
                                   self.find_after(st.pos, st.sampler) or st.pos,
                                   expected=", ".join(SAMPLERS),
                                   hint=did_you_mean(st.sampler, SAMPLERS))
                for ax in st.axes:
                    self._check_axis(ax, st)
            elif isinstance(st, ast.DefStmt):
                self.defs[name] = st
            elif isinstance(st, ast.LetStmt):
                self.lets[name] = _Let(st)
        for name in self.overrides:
            if name not in self.sizes and name not in self.const_stmts:
                known = sorted(set(self.sizes) | set(self.const_stmts))
                raise MixError(
                    f"unknown constant '{name}' passed to load",
                    None,
                    expected="one of " + (", ".join(known) if known else "(this mixer declares no constants)"),
                    hint=did_you_mean(name, known),
                    source=self.source,
                )

    def _check_axis(self, ax: ast.Axis, st: ast.TensorStmt) -> None:
        if ax.size == TOKEN_AXIS or ax.size in ("t", "u"):
            raise self.err(f"'{st.name}' declares a token axis", ax.pos,
                           hint="inputs are per token already: declare only their feature axes")

    # -- pass: constants and sizes --------------------------------------------------------------

    def bind_constants(self) -> None:
        for name, st in self.size_stmts.items():
            if st.default is not None and st.default < 1:
                raise self.err(f"size '{name}' must be a positive integer, got {st.default}", st.pos,
                               hint="an axis has at least one element")
            if st.default is not None and st.default > INT64_MAX:
                raise self.err(f"size '{name}' is too large ({_short(st.default)})", st.pos)
            if name in self.overrides:
                val = self.overrides[name]
                if not isinstance(val, int) or isinstance(val, bool) or val < 1 or val > INT64_MAX:
                    raise self.err(f"size '{name}' must be a positive integer, got {_short(val)}", st.pos)
                self.sizes[name] = val
        for name in self.const_stmts:
            self._const_value(name, set())

    def _const_value(self, name: str, busy: set[str], ref: Pos | None = None):
        if name in self.consts:
            return self.consts[name]
        st = self.const_stmts[name]
        if name in self.overrides:
            val = self.overrides[name]
            if isinstance(val, bool) or not isinstance(val, int | float):
                raise self.err(f"constant '{name}' must be a real number, got {_short(val)}", st.pos)
            if isinstance(val, int) and abs(val) > INT64_MAX:
                raise self.err(f"constant '{name}' is too large: {_short(val)} does not fit in 64 bits", st.pos,
                               hint="pass it as a float")
        else:
            if name in busy:
                raise self.err(f"constant '{name}' is defined in terms of itself", ref or st.pos)
            busy.add(name)
            self.current = st.pos
            node = self.expr(st.value, _Ctx("const", where=f"constant '{name}'"), const_busy=busy)
            if node.op != "const" or node.dtype != "real":
                raise self.err(f"constant '{name}' must be a real number known when the file is loaded",
                               st.value.pos, hint="constants may use numbers, other constants and arithmetic")
            val = node.arg
            if isinstance(val, float) and val.is_integer() and isinstance(st.value, ast.Num) and abs(val) < 2**53:
                val = int(val)
        if isinstance(val, float) and not math.isfinite(val):
            raise self.err(f"constant '{name}' must be a finite number, got {_short(val)}",
                           st.pos if name in self.overrides else st.value.pos)
        self.consts[name] = val
        return val

    def axis_known(self, name: str) -> bool:
        return name in self.sizes or name in self.const_stmts

    # -- expressions --------------------------------------------------------------------------

    def expr(self, e: ast.Expr, ctx: _Ctx, const_busy: set[str] | None = None) -> Node:  # noqa: C901
        pos = e.pos
        if isinstance(e, ast.Num):
            return const(e.value, pos)
        if isinstance(e, ast.Imag):
            return const(e.value, pos)
        if isinstance(e, ast.Name):
            return self.name_ref(e.name, pos, ctx, const_busy)
        if isinstance(e, ast.Index):
            return self.index_ref(e, ctx)
        if isinstance(e, ast.Call):
            return self.call(e, ctx, const_busy)
        if isinstance(e, ast.Neg):
            x = self.expr(e.x, ctx, const_busy)
            self.need_number(x, e.x.pos)
            return make_checked("neg", (x,), pos)
        if isinstance(e, ast.Bin):
            a = self.expr(e.a, ctx, const_busy)
            b = self.expr(e.b, ctx, const_busy)
            op = BINOPS[e.op]
            for n, sub in ((a, e.a), (b, e.b)):
                self.need_number(n, sub.pos)
                if op in REAL_ONLY:
                    self.need_real(n, sub.pos, f"'{e.op}'")
            return make_checked(op, (a, b), pos)
        if isinstance(e, ast.Pow):
            a = self.expr(e.a, ctx, const_busy)
            b = self.expr(e.b, ctx, const_busy)
            self.need_number(a, e.a.pos)
            self.need_number(b, e.b.pos)
            return make_checked("pow", (a, b), pos)
        if isinstance(e, ast.Compare):
            args = [self.expr(x, ctx, const_busy) for x in e.args]
            for n, sub in zip(args, e.args):
                self.need_number(n, sub.pos)
                self.need_real(n, sub.pos, "a comparison")
            links = [make_checked(CMPOPS[op], (args[i], args[i + 1]), pos) for i, op in enumerate(e.ops)]
            out = links[0]
            for link in links[1:]:
                out = make_checked("and", (out, link), pos)
            return out
        if isinstance(e, ast.BoolOp):
            args = [self.expr(x, ctx, const_busy) for x in e.args]
            for n, sub in zip(args, e.args):
                self.need_bool(n, sub.pos, f"'{e.op}'")
            out = args[0]
            for x in args[1:]:
                out = make_checked(e.op, (out, x), pos)
            return out
        if isinstance(e, ast.Not):
            x = self.expr(e.x, ctx, const_busy)
            self.need_bool(x, e.x.pos, "'not'")
            return make_checked("not", (x,), pos)
        if isinstance(e, ast.Reduce):
            return self.reduce(e, ctx)
        raise self.err(f"unsupported expression {type(e).__name__}", pos)  # pragma: no cover

    def need_number(self, n: Node, pos: Pos | None) -> None:
        if n.dtype == "bool":
            raise self.err("a condition is used where a number is needed", pos,
                           hint="use where(condition, a, b) to turn a condition into a number")

    def need_bool(self, n: Node, pos: Pos | None, what: str) -> None:
        if n.dtype != "bool":
            raise self.err(f"{what} needs a condition, got a number", pos, hint="compare with <, <=, ==, ...")

    def need_real(self, n: Node, pos: Pos | None, what: str) -> None:
        if n.dtype == "complex":
            raise self.err(f"a complex value where a real one is needed (by {what})", pos,
                           hint="take real(...), imag(...) or abs(...) first")

    # -- names ----------------------------------------------------------------------------

    def name_ref(self, name: str, pos: Pos | None, ctx: _Ctx, const_busy=None) -> Node:
        if name in ctx.funcs:
            return ctx.funcs[name]
        if name in ctx.env:
            return Node("iota", arg=ctx.env[name], idx=(ctx.env[name],), pos=pos)
        if name == "pi":
            return const(math.pi, pos)
        if name in ("t", "u") and name not in self.decl_pos:
            if ctx.kind in ("const", "init"):
                raise self.err(f"'{name}' (a token index) cannot be used in {ctx.where}", pos,
                               hint="initialisers and constants do not depend on tokens")
            var = T_VAR if name == "t" else U_VAR
            return Node("iota", arg=var, idx=(var,), pos=pos)
        if name == "head":
            if ctx.kind != "init":
                raise self.err("'head' (the head index) can only be used in a param or buffer initialiser", pos)
            return Node("head", pos=pos)
        if name == "H":
            if ctx.kind != "init":
                raise self.err("'H' (the number of heads) can only be used in a param or buffer initialiser", pos,
                               hint="a mixer's maths is per head; initialisers may depend on the head index "
                                    "and the number of heads")
            return Node("dim", arg="H", pos=pos)
        if name in self.const_stmts:
            if ctx.kind == "const":
                return const(self._const_value(name, const_busy if const_busy is not None else set(), pos), pos)
            return const(self.consts[name], pos)
        if name in self.sizes:
            if ctx.kind == "const":
                raise self.err(f"constant uses size '{name}', which is only known at call time", pos,
                               hint="use it in a let instead: let scale = K ** -0.5")
            return Node("dim", arg=name, pos=pos)
        if name in self.defs:
            raise self.err(f"'{name}' is a function; call it as {name}(...)", pos)
        if name in self.lets:
            return self.let_ref(name, (), pos, ctx)
        if name in self.tensors:
            return self.tensor_ref(self.tensors[name], (), pos, ctx)
        raise self.unknown(name, pos, ctx)

    def unknown(self, name: str, pos: Pos | None, ctx: _Ctx) -> MixError:
        known = self.all_names() | set(ctx.env) | set(ctx.funcs)
        shown = ", ".join(sorted(known)) if known else "(nothing declared)"
        return self.err(f"unknown name '{name}'", pos, expected=f"one of {shown}", hint=did_you_mean(name, known)
                        or "declare it first (input, param, buffer, state, const, size, let or def)")

    def index_ref(self, e: ast.Index, ctx: _Ctx) -> Node:
        name = e.name
        if name in ctx.funcs or name in ctx.env or name in self.const_stmts or name in self.sizes:
            raise self.err(f"'{name}' is a scalar and cannot be indexed", _head(e.pos, name))
        if name in self.defs:
            raise self.err(f"'{name}' is a function; call it with ( ) not [ ]", _head(e.pos, name))
        if name in self.lets:
            return self.let_ref(name, e.args, e.pos, ctx)
        if name in self.tensors:
            return self.tensor_ref(self.tensors[name], e.args, e.pos, ctx)
        raise self.unknown(name, _head(e.pos, name), ctx)

    def index_var(self, a: ast.Expr, ctx: _Ctx, axis: str, owner: str, k: int, shape: str) -> Var:
        """An index expression on a feature axis: must be an index name running over ``axis``."""
        if not isinstance(a, ast.Name):
            raise self.err(f"axis {k} of '{owner}' must be indexed by a plain index name", a.pos,
                           hint="only the token position may be an expression (e.g. x[t - 1, i])")
        if a.name not in ctx.env:
            if a.name in ("t", "u"):
                raise self.err(f"'{a.name}' is a token index, but axis {k} of '{owner}' runs over {axis}", a.pos,
                               hint=f"a token index goes first: {owner}[{a.name}, ...]")
            hint = (f"sum over it with sum({a.name}: ...) or put it on the left-hand side"
                    if ctx.kind in ("update", "out", "let") else None)
            if a.name in self.all_names():
                raise self.err(f"'{a.name}' is not an index name", a.pos, hint=hint)
            raise self.err(f"index '{a.name}' is not bound", a.pos, hint=hint)
        var = ctx.env[a.name]
        if var.axis != axis:
            raise self.err(
                f"shape mismatch: index '{a.name}' runs over {var.axis}, but axis {k} of '{owner}' is {axis}",
                a.pos, expected=f"'{owner}' has shape {shape}; '{a.name}' was bound to {var.axis}",
                hint=f"use an index that runs over {axis}")
        return var

    def tensor_ref(self, st: ast.TensorStmt, args, pos: Pos | None, ctx: _Ctx) -> Node:
        rank = len(st.axes)
        shape = "[" + ", ".join(a.size for a in st.axes) + "]"
        if ctx.kind in ("const", "init", "mask"):
            raise self.err(f"{st.kind} '{st.name}' cannot be read in {ctx.where}", pos,
                           hint="initialisers, constants and masks see only numbers, sizes and indices")
        per_token = st.kind == "input"
        allowed = (rank, rank + 1) if per_token else (rank,)
        # k[i, j] on an input k[K]: two feature indices, not a token index and one feature index
        feature_first = per_token and len(args) == rank + 1 and isinstance(args[0], ast.Name) and \
            ctx.env.get(args[0].name) not in (None, T_VAR, U_VAR)
        if len(args) not in allowed or feature_first:
            want = f"{rank} {'index' if rank == 1 else 'indices'}" + (
                f", or {rank + 1} with a token index first" if per_token else "")
            raise self.err(
                f"wrong number of indices for '{st.name}': it has shape {shape}, indexed as "
                f"{self.given_shape(args, ctx)}", pos,
                expected=want,
                hint=f"index each axis of {shape} once" + (", optionally after a token index: "
                                                          f"{st.name}[t - 1, ...]" if per_token else "")
                if rank else f"write {st.name} (it is a scalar)")
        token: Node | None = None
        if per_token:
            if len(args) == rank + 1:
                token = self.token_index(args[0], ctx, st.name)
                args = args[1:]
            else:
                token = Node("iota", arg=T_VAR, idx=(T_VAR,), pos=pos)
        vars_ = tuple(self.index_var(a, ctx, ax.size, st.name, k, shape) for k, (a, ax) in
                      enumerate(zip(args, st.axes)))
        if len(set(vars_)) != len(vars_):
            raise self.err(f"'{st.name}' is indexed twice by the same index (a diagonal)", pos,
                           hint="use eye(i, j) to select a diagonal")
        # (a let that reads a state is substituted where used: the previous state in an update,
        # the updated one in the output)
        op = st.kind
        src = (token,) if token is not None else ()
        idx = canonical(([v for v in token.idx] if token is not None else []) + list(vars_))
        return Node(op, src, (st.name, vars_), idx, "complex" if st.complex else "real", pos)

    def given_shape(self, args, ctx: _Ctx) -> str:
        """The axes an index list runs over, as far as they are known: `[K, ?]`."""
        axes = []
        for a in args:
            var = ctx.env.get(a.name) if isinstance(a, ast.Name) else None
            if var is not None:
                axes.append(var.axis)
            elif isinstance(a, ast.Name) and a.name in ("t", "u") and a.name not in self.decl_pos:
                axes.append(TOKEN_AXIS)
            else:
                axes.append("?")
        return "[" + ", ".join(axes) + "]"

    def token_index(self, a: ast.Expr, ctx: _Ctx, owner: str) -> Node:
        """The token position of a per-token read: t or u minus a non-negative offset."""
        node = self.expr(a, ctx)
        tokens = [v for v in node.idx if v in (T_VAR, U_VAR)]
        if len(tokens) != 1:
            raise self.err(f"the token index of '{owner}' must be relative to t or u", a.pos,
                           hint="write t, t - 1, t - m, u, ...")
        tok = tokens[0]
        sym = to_sympy(node)
        if sym is None or sym.is_integer is not True:
            raise self.err(f"the token index of '{owner}' must be an integer expression", a.pos)
        ahead = sympy.simplify(sym - sympy.Symbol(tok.name, integer=True, nonnegative=True))
        if ahead.is_nonpositive is not True:
            raise self.err(f"'{owner}[{self.text(a.pos)}, ...]' reads a future token", a.pos,
                           expected=f"{tok.name} minus a non-negative offset",
                           hint="a causal mixer may only read the current and earlier tokens")
        return node

    def let_ref(self, name: str, args, pos: Pos | None, ctx: _Ctx) -> Node:
        let = self.lets[name]
        node, vars_ = self.lower_let(name, _head(pos, name))
        shape = "[" + ", ".join(v.axis for v in vars_) + "]"
        if len(args) != len(vars_):
            raise self.err(f"wrong number of indices for '{name}': it has shape {shape}, indexed as "
                           f"{self.given_shape(args, ctx)}", pos,
                           expected=f"{len(vars_)} {'index' if len(vars_) == 1 else 'indices'}",
                           hint=f"it is defined as {self.text(let.stmt.pos)}")
        mapping = {}
        for k, (a, v) in enumerate(zip(args, vars_)):
            mapping[v] = self.index_var(a, ctx, v.axis, name, k, shape)
        if ctx.kind in ("const", "init", "mask"):
            raise self.err(f"'{name}' cannot be read in {ctx.where}", pos)
        return rename(node, mapping) if mapping else node

    def lower_let(self, name: str, ref: Pos | None = None) -> tuple[Node, tuple[Var, ...]]:
        """Lower a let once (``ref``: where it is read, to point at a cycle)."""
        let = self.lets[name]
        if let.node is not None:
            return let.node, let.vars
        if let.busy:
            chain = self._let_stack[self._let_stack.index(name):] + [name] if name in self._let_stack else []
            via = f" ({' -> '.join(chain)})" if len(chain) > 2 else ""
            raise self.err(f"'{name}' is defined in terms of itself{via}", ref or let.stmt.pos,
                           hint="a let names an expression; a quantity carried over time is a state")
        let.busy = True
        self._let_stack.append(name)
        try:
            return self._lower_let(name, let)
        finally:
            let.busy = False
            self._let_stack.pop()

    def _lower_let(self, name: str, let: _Let) -> tuple[Node, tuple[Var, ...]]:
        st = let.stmt
        self.current = st.pos
        env = self.infer_vars(st.vars, st.value, st.pos, f"let '{name}'")
        ctx = _Ctx("let", env, where=f"let '{name}'")
        node = self.expr(st.value, ctx)
        vars_ = tuple(env[v] for v in st.vars)
        extra = [v for v in node.idx if v not in vars_ and v not in (T_VAR, U_VAR)]
        if extra:
            raise self.err(f"index '{extra[0].name}' is free on the right of '{name}' but not on its left",
                           st.value.pos,
                           hint=f"write let {name}[{', '.join([*st.vars, extra[0].name])}] = ... or sum over it")
        let.node, let.vars = node, vars_
        return node, vars_

    # -- calls ----------------------------------------------------------------------------

    def call(self, e: ast.Call, ctx: _Ctx, const_busy=None) -> Node:
        name, pos = e.name, e.pos
        if name in self.defs:
            d = self.defs[name]
            if len(e.args) != len(d.params):
                raise self.err(f"wrong number of arguments to '{name}': it takes {len(d.params)}, given {len(e.args)}",
                               pos, expected=f"{name}({', '.join(d.params)})")
            if name in self._def_stack:
                raise self.err(f"function '{name}' calls itself", _head(pos, name),
                               hint="functions are substituted where called, so they cannot recurse")
            args = [self.expr(a, ctx, const_busy) for a in e.args]
            inner = _Ctx(ctx.kind, ctx.env, dict(zip(d.params, args)), ctx.where, ctx.owner)
            self._def_stack.append(name)
            try:
                return self.expr(d.body, inner, const_busy)
            finally:
                self._def_stack.pop()
        if name == "eye":
            self._arity(e, 2, "eye(i, j)")
            vs = []
            for a in e.args:
                if not isinstance(a, ast.Name) or a.name not in ctx.env:
                    raise self.err("eye takes two index names", a.pos, expected="eye(i, j)")
                vs.append(ctx.env[a.name])
            if vs[0] == vs[1]:
                raise self.err(f"eye({e.args[0].name}, {e.args[1].name}) takes two different indices", pos,
                               expected="eye(i, j)", hint="eye(i, i) is 1 everywhere: write 1")
            if vs[0].axis != vs[1].axis:
                raise self.err(f"shape mismatch: eye({e.args[0].name}, {e.args[1].name}) joins axes "
                               f"{vs[0].axis} and {vs[1].axis}", pos, hint="an identity matrix is square")
            return Node("eye", arg=(vs[0], vs[1]), idx=canonical(vs), pos=pos)
        if name in RANDOM_FUNCS:
            self._arity(e, 2, RANDOM_FUNCS[name])
            if ctx.kind != "init":
                raise self.err(f"random draw '{name}' is only allowed in a param or buffer initialiser", pos,
                               hint=f"draw it once in an initialiser: param w[...] = {RANDOM_FUNCS[name]}")
            lo, hi = (self.expr(a, ctx) for a in e.args)
            for n, a in zip((lo, hi), e.args):
                self.need_number(n, a.pos)
                self.need_real(n, a.pos, name)
            idx = canonical(list(ctx.env.values()))
            # the draw belongs to its tensor (seeded by its name): equal formulas are distinct draws
            return Node("rand", (lo, hi), (name, ctx.owner), idx, "real", pos)
        if name == "where":
            self._arity(e, 3, "where(condition, a, b)")
            c, a, b = (self.expr(x, ctx, const_busy) for x in e.args)
            self.need_bool(c, e.args[0].pos, "where's first argument")
            self.need_number(a, e.args[1].pos)
            self.need_number(b, e.args[2].pos)
            return make_checked("where", (c, a, b), pos)
        if name in UNARY_FUNCS:
            self._arity(e, 1, f"{name}(x)")
            x = self.expr(e.args[0], ctx, const_busy)
            self.need_number(x, e.args[0].pos)
            if name in REAL_ONLY:
                self.need_real(x, e.args[0].pos, f"{name}")
            return make_checked(name, (x,), pos)
        if name in BINARY_FUNCS:
            self._arity(e, 2, f"{name}(a, b)")
            a, b = (self.expr(x, ctx, const_busy) for x in e.args)
            for n, x in zip((a, b), e.args):
                self.need_number(n, x.pos)
                if name in REAL_ONLY or name == "complex":
                    self.need_real(n, x.pos, name)
            return make_checked(name, (a, b), pos)
        if name in self.tensors or name in self.lets:
            raise self.err(f"'{name}' is not a function; index it with [ ]", _head(pos, name))
        known = set(self.defs) | BUILTIN_FUNCS
        raise self.err(f"unknown function '{name}'", _head(pos, name), expected="one of " + ", ".join(sorted(known)),
                       hint=did_you_mean(name, known) or f"define it: def {name}(x) = ...")

    def _arity(self, e: ast.Call, n: int, form: str) -> None:
        if len(e.args) != n:
            raise self.err(f"wrong number of arguments to '{e.name}': it takes {n}, given {len(e.args)}", e.pos,
                           expected=form)

    # -- reductions -------------------------------------------------------------------------

    def reduce(self, e: ast.Reduce, ctx: _Ctx) -> Node:
        if ctx.kind in ("const", "mask"):
            raise self.err(f"{e.kind}(...) cannot be used in {ctx.where}", e.pos)
        new: dict[str, Var] = {}
        for name in e.vars:
            at = self.name_in(e.pos, name, "(:", nth=1 if name in new else 0)
            if name == "t":
                raise self.err("t is the current token and cannot be summed over", at,
                               hint="sum over key tokens with sum(u: ...)")
            if e.kind == "softmax" and name == "u" and ctx.env.get("u") == U_VAR:
                continue  # softmax(u: ...) inside sum(u: ...): the same key token
            if name in ctx.env or name in new:
                raise self.err(f"index '{name}' is already bound here", at, hint="pick another index name")
            if name == "u" and name not in self.decl_pos:
                if ctx.kind not in ("let", "out"):
                    raise self.err("sums over key tokens (u) belong in the output", at)
                new[name] = U_VAR
                continue
            if name in self.all_names() or name in RESERVED:
                raise self.err(f"'{name}' is already a name here and cannot be an index", at)
            new[name] = Var(name, self.infer_axis(name, e.body, at))
        if e.kind == "softmax" and list(new.values()) not in ([U_VAR], []):
            raise self.err("softmax normalises over key tokens: write softmax(u: score)", e.pos)
        body = self.expr(e.body, ctx.with_vars(new))
        self.need_number(body, e.body.pos)
        # A sum over key tokens is masked by mask(t, u), so it depends on t.
        keyed = canonical((*body.idx, T_VAR)) if U_VAR in new.values() or e.kind == "softmax" else body.idx
        if e.kind == "softmax":
            self.need_real(body, e.body.pos, "softmax")
            if U_VAR not in body.idx:
                raise self.err("the score of softmax(u: ...) does not depend on the key token u", e.body.pos,
                               hint="score each key, e.g. sum(i: q[t, i] * k[u, i]); for a plain average over "
                                    "the visible keys write sum(u: x) / sum(u: 1)")
            return Node("softmax", (body,), U_VAR, keyed, "real", e.pos)
        vars_ = tuple(new.values())
        idx = tuple(v for v in keyed if v not in vars_)
        return Node("sum", (body,), vars_, idx, body.dtype, e.pos)

    # -- index inference --------------------------------------------------------------------

    def infer_axis(self, name: str, body: ast.Expr, pos: Pos | None) -> str:
        uses = self._uses(name, body)
        if not uses:
            raise self.err(f"cannot tell which axis index '{name}' runs over", pos,
                           hint=f"use '{name}' to index a declared tensor, e.g. x[{name}]")
        axis, where = uses[0]
        for other, opos in uses[1:]:
            if other != axis:
                raise self.err(f"shape mismatch: index '{name}' is used over {axis} ({self.text(where)}) "
                               f"and over {other} ({self.text(opos)})", opos,
                               expected=f"{axis} in both places")
        return axis

    def infer_vars(self, names, body: ast.Expr, pos: Pos | None, where: str) -> dict[str, Var]:
        env: dict[str, Var] = {}
        for n in names:
            at = self.name_in(pos, n, nth=1 if n in env else 0)
            if n in ("t", "u"):
                raise self.err(f"'{n}' is a token index: it is implicit on the left of {where}", at)
            if n in env:
                raise self.err(f"index '{n}' appears twice on the left of {where}", at)
            env[n] = Var(n, self.infer_axis(n, body, at))
        return env

    def _uses(self, name: str, e) -> list[tuple[str, Pos | None]]:
        """(axis, position) for every place `name` indexes a declared tensor or let in `e`."""
        out: list[tuple[str, Pos | None]] = []

        def visit(x) -> None:
            if isinstance(x, ast.Reduce):
                if name in x.vars:
                    return  # shadowed (rejected later)
                visit(x.body)
                return
            if isinstance(x, ast.Index):
                axes: list[str] | None = None
                args = list(x.args)
                if x.name in self.tensors:
                    st = self.tensors[x.name]
                    axes = [a.size for a in st.axes]
                    if st.kind == "input" and len(args) == len(axes) + 1:
                        args = args[1:]
                elif x.name in self.lets:
                    _, lv = self.lower_let(x.name, _head(x.pos, x.name))
                    axes = [v.axis for v in lv]
                if axes is not None and len(axes) == len(args):
                    for a, ax in zip(args, axes):
                        if isinstance(a, ast.Name) and a.name == name:
                            out.append((ax, a.pos))
                for a in x.args:
                    visit(a)
                return
            if isinstance(x, ast.Call) and x.name in self.defs:
                for a in x.args:
                    visit(a)
                return
            for child in _children(x):
                visit(child)

        visit(e)
        return out

    # -- statements ------------------------------------------------------------------------

    def init_decl(self, st: ast.TensorStmt) -> TensorDecl:
        self.current = st.pos
        axes = tuple(a.size for a in st.axes)
        for a in st.axes:
            if not self.axis_known(a.size):
                raise self.err(f"unknown size '{a.size}' in the shape of '{st.name}'", _tail(a.pos, a.size),
                               expected="a declared size or constant",
                               hint=did_you_mean(a.size, set(self.sizes) | set(self.const_stmts))
                               or f"declare it: size {a.size}")
            val = self.consts.get(a.size, 1)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                huge = isinstance(val, float) and val.is_integer()  # an integer beyond 64 bits became a float
                raise self.err(f"constant '{a.size}' is used as a size in the shape of '{st.name}' and must be a "
                               f"positive integer{' below 2**63' if huge else ''}, got {val!r}", _tail(a.pos, a.size),
                               hint="write it as an integer ('//' divides integers)"
                               if isinstance(val, float) and not huge else None)
        if st.kind in ("input", "state"):
            return TensorDecl(st.kind, st.name, axes, st.complex, st.sampler, pos=st.pos)
        init_vars = []
        for k, a in enumerate(st.axes):
            var_name = a.var if a.var is not None else f"_{k}"
            if a.var in RESERVED or a.var in self.all_names():
                raise self.err(f"'{a.var}' is already a name and cannot be an index", a.pos)
            init_vars.append(Var(var_name, a.size))
        ctx = _Ctx("init", {v.name: v for v in init_vars}, where=f"the initialiser of '{st.name}'", owner=st.name)
        node = self.expr(st.init, ctx)
        self.need_number(node, st.init.pos)
        self.need_real(node, st.init.pos, f"{st.kind} '{st.name}'")
        return TensorDecl(st.kind, st.name, axes, False, None, node, tuple(init_vars), st.pos)

    def lower(self) -> Program:
        self.collect()
        self.bind_constants()
        decls = {name: self.init_decl(st) for name, st in self.tensors.items()}
        updates: list[Equation] = []
        output: Equation | None = None
        mask: Node | None = None
        updated: dict[str, Pos | None] = {}
        for st in self.module.statements:
            self.current = st.pos
            if isinstance(st, ast.UpdateStmt):
                eq = self.lower_update(st)
                if eq.target in updated:
                    raise self.err(f"state '{eq.target}' is updated twice (first on line {updated[eq.target].line})",
                                   st.pos, hint="combine the two into one update")
                updated[eq.target] = st.pos
                updates.append(eq)
            elif isinstance(st, ast.OutStmt):
                if output is not None:
                    raise self.err(f"a second output '{st.name}' (the first is '{output.target}')", st.pos,
                                   hint="a mixer has one output; use let for intermediate values")
                if st.name in self.decl_pos:
                    raise self.err(f"output '{st.name}' has the name of a declaration", st.pos)
                output = self.lower_out(st)
            elif isinstance(st, ast.MaskStmt):
                if mask is not None:
                    raise self.err("a second mask statement", st.pos, hint="combine conditions with 'and'")
                mask = self.expr(st.cond, _Ctx("mask", where="the mask"))
                if mask.dtype != "bool":
                    raise self.err("the mask must be a condition on t and u", st.cond.pos, hint="e.g. mask u <= t")
        for name in self.lets:  # a let that is never used is still checked
            self.lower_let(name)
        states = [d for d in decls.values() if d.kind == "state"]
        for d in states:
            if d.name not in updated:
                raise self.err(f"state '{d.name}' is never updated", d.pos,
                               hint=f"add an update: {d.name}[...] = ... (or remove the state)")
        if output is None:
            last = len(self.source.text.rstrip().split("\n")) or 1
            raise self.err("the mixer has no output", Pos(last, 1, last, 2),
                           hint="declare one: out o[j] = ...")
        if not any(d.kind == "input" for d in decls.values()):
            raise self.err("the mixer has no input", output.pos,
                           hint="declare the per-token inputs it mixes: input x[K]")
        self.check_sizes_bound(decls, updates, output, mask)
        prog = Program(
            name=self.name or _stem(self.source.path),
            source=self.source,
            sizes=tuple(self.sizes.items()),
            consts=tuple(self.consts.items()),
            inputs=tuple(d for d in decls.values() if d.kind == "input"),
            params=tuple(d for d in decls.values() if d.kind == "param"),
            buffers=tuple(d for d in decls.values() if d.kind == "buffer"),
            states=tuple(states),
            updates=tuple(updates),
            output=output,
            mask=mask,
            lets=tuple((n, let.node) for n, let in self.lets.items()),
        )
        return prog

    def check_sizes_bound(self, decls: dict, updates: list, output: Equation, mask: Node | None) -> None:
        """A size without a default must be the extent of some input, parameter, buffer or state: a call
        binds sizes from tensor shapes, so a size read only as a value would never get one."""
        shaped = {a for d in decls.values() for a in d.axes}
        roots = [eq.value for eq in updates] + [output.value] + ([mask] if mask is not None else [])
        roots += [d.init for d in decls.values() if d.init is not None]
        for n in toposort(roots):
            if n.op == "dim" and n.arg in self.sizes and self.sizes[n.arg] is None and n.arg not in shaped:
                raise self.err(f"size '{n.arg}' is used as a value but no tensor has it, so no call can bind it",
                               n.pos, hint=f"give it a default (size {n.arg} = ...) or use it in a shape")

    def lower_update(self, st: ast.UpdateStmt) -> Equation:
        if st.name not in self.tensors or self.tensors[st.name].kind != "state":
            what = self.tensors[st.name].kind if st.name in self.tensors else None
            if what:
                msg = f"'{st.name}' is an {what}, not a state; only states can be updated"
            elif st.name in self.lets or st.name in self.const_stmts or st.name in self.sizes:
                msg = f"'{st.name}' is not a state; only states can be updated"
            else:
                msg = f"'{st.name}' is assigned but not declared"
            raise self.err(msg, st.pos, hint=f"declare 'state {st.name}[...]', or name a value with 'let'")
        decl = self.tensors[st.name]
        if len(st.vars) != len(decl.axes):
            shape = "[" + ", ".join(a.size for a in decl.axes) + "]"
            raise self.err(f"wrong number of indices for state '{st.name}': it has shape {shape}, given "
                           f"{len(st.vars)}", st.pos, expected=f"{len(decl.axes)}")
        env: dict[str, Var] = {}
        for v, ax in zip(st.vars, decl.axes):
            if v in env:
                raise self.err(f"index '{v}' appears twice on the left of the update", self.name_in(st.pos, v, nth=1))
            if v in RESERVED or v in self.all_names():
                raise self.err(f"'{v}' is already a name and cannot be an index", self.name_in(st.pos, v))
            env[v] = Var(v, ax.size)
        ctx = _Ctx("update", env, where=f"the update of '{st.name}'")
        node = self.expr(st.value, ctx)
        self.need_number(node, st.value.pos)
        if node.dtype == "complex" and not decl.complex:
            where = _origin(node, st.value.pos, lambda n: n.dtype == "complex")
            raise self.err(f"a complex value where a real one is needed: state '{st.name}' is real, but "
                           f"'{self.text(where)}' is complex", where,
                           hint=f"declare 'state {st.name}[...] complex', or take real(...)")
        self._check_free(node, env, st, st.name)
        for n in node.walk():
            if n.op in ("sum", "softmax") and U_VAR in (n.arg if n.op == "sum" else (n.arg,)):
                raise self.err("a state update cannot sum over key tokens (u)", n.pos,
                               hint="a recurrence sees the past through its state")
        return Equation(st.name, tuple(env[v] for v in st.vars), node, st.pos)

    def lower_out(self, st: ast.OutStmt) -> Equation:
        env = self.infer_vars(st.vars, st.value, st.pos, f"output '{st.name}'")
        ctx = _Ctx("out", env, where=f"the output '{st.name}'")
        node = self.expr(st.value, ctx)
        self.need_number(node, st.value.pos)
        if node.dtype == "complex":
            where = _origin(node, st.value.pos, lambda n: n.dtype == "complex")
            raise self.err(f"a complex value where a real one is needed: the output '{st.name}' must be real, but "
                           f"'{self.text(where)}' is complex", where, hint="take real(...) of the complex part")
        self._check_free(node, env, st, st.name)
        return Equation(st.name, tuple(env[v] for v in st.vars), node, st.pos)

    def _check_free(self, node: Node, env: dict[str, Var], st, target: str) -> None:
        allowed = set(env.values()) | {T_VAR}
        for v in node.idx:
            if v not in allowed:
                pos = _origin(node, st.value.pos, lambda n, v=v: v in n.idx)
                if v == U_VAR:
                    raise self.err(f"key token u is free in '{target}'", pos,
                                   hint="sum over key tokens: sum(u: ...)")
                raise self.err(f"index '{v.name}' is free on the right of '{target}' but not on its left",
                               pos, hint=f"sum over it with sum({v.name}: ...) or add it on the left")


def _children(x):
    if isinstance(x, ast.Index | ast.Call):
        return x.args
    if isinstance(x, ast.Bin | ast.Pow):
        return (x.a, x.b)
    if isinstance(x, ast.Neg | ast.Not):
        return (x.x,)
    if isinstance(x, ast.Compare | ast.BoolOp):
        return x.args
    if isinstance(x, ast.Reduce):
        return (x.body,)
    return ()


def _head(pos: Pos | None, name: str) -> Pos | None:
    """The span of the name that starts ``pos`` (``kk`` in ``kk[i]``, ``frob`` in ``frob(x)``)."""
    if pos is None:
        return None
    return Pos(pos.line, pos.col, pos.line, pos.col + len(name))


def _inside(pos: Pos | None, span: Pos | None) -> bool:
    return pos is not None and span is not None and (span.line, span.col) <= (pos.line, pos.col) and \
        (pos.end_line, pos.end_col) <= (span.end_line, span.end_col)


def _origin(node: Node, span: Pos | None, follow) -> Pos | None:
    """The innermost operand of ``node`` written inside ``span`` (a statement's right-hand side, so
    not inside a let defined elsewhere) that still has the property ``follow`` (is complex, has a free
    index): where the problem comes from."""
    while (inner := next((s for s in node.src if follow(s) and _inside(s.pos, span)), None)) is not None:
        node = inner
    return node.pos if _inside(node.pos, span) else span


def _tail(pos: Pos | None, name: str) -> Pos | None:
    """The span of the name that ends ``pos`` (``N`` in ``n: N``)."""
    if pos is None:
        return None
    return Pos(pos.end_line, max(1, pos.end_col - len(name)), pos.end_line, pos.end_col)


def _stem(path: str) -> str:
    """The default mixer name: the file's stem made an ASCII identifier (``my-mixer.mix`` -> ``my_mixer``).
    It names the generated module, so it never carries quotes, separators or control characters."""
    import os

    base = os.path.basename(path.replace("\\", "/"))
    stem = base[:-4] if base.endswith(".mix") else base
    if stem.startswith("<") and stem.endswith(">"):  # "<string>": text passed to loads without a path
        return "mixer"
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem)[:64]
    if not name or not name.strip("_"):
        return "mixer"
    return "_" + name[:63] if name[0].isdigit() else name


def _plain_number(value):
    """A constant passed to ``load``/``loads`` as a plain int or float (numpy scalars, IntEnum members and other
    ``numbers`` become Python numbers; anything else is returned unchanged for the checks to reject)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


# ---- renaming ----------------------------------------------------------------------------------


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


# ---- sympy view of integer/index expressions -------------------------------------------------


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


# ---- verifier passes ----------------------------------------------------------------------------


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
