"""Lowering expressions: the context an expression is lowered in (:class:`_Ctx`: which names it may read),
lazily lowered lets (:class:`_Let`), and :class:`ExprLowering`, the methods of the lowerer that turn
syntax-tree expressions into typed IR nodes (name resolution, index binding, shapes, arity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy

from .. import ast
from ..errors import MixError, Pos, did_you_mean
from ..ir import REAL_ONLY, T_VAR, TOKEN_AXIS, U_VAR, Node, Var, canonical
from .nodes import BINARY_FUNCS, BINOPS, BUILTIN_FUNCS, CMPOPS, RANDOM_FUNCS, RESERVED, UNARY_FUNCS, const, make_checked
from .rewrite import rename, to_sympy


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


class ExprLowering:
    """The expression half of :class:`~mixc.lower.lowerer.Lowerer` (its base class): names, indices,
    tensor reads, lets, function calls and reductions to IR nodes, each violation a located error. The
    state it reads (declarations, sizes, constants, lets) is set up by ``Lowerer.__init__`` and
    ``Lowerer.collect``."""

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
