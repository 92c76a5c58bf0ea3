"""The lowerer: :class:`Lowerer` collects declarations, binds sizes and constants, lowers each statement
(declarations' initialisers, updates, the output, the mask) and checks what statements require (free
indices, bound sizes); errors point at the exact place in the source.
"""

from __future__ import annotations

import math
import re

from .. import ast
from ..errors import MixError, Pos, Source, did_you_mean
from ..ir import T_VAR, TOKEN_AXIS, U_VAR, Equation, Node, Program, TensorDecl, Var, toposort
from .exprs import ExprLowering, _Ctx, _Let
from .nodes import CALL_KEYWORDS, INT64_MAX, RESERVED, SAMPLERS, _short


class Lowerer(ExprLowering):
    """A ``.mix`` syntax tree to a :class:`~mixc.ir.Program`: declarations collected, sizes and constants
    bound, then every statement lowered (expressions by :class:`ExprLowering`)."""

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
