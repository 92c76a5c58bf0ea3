"""The typed IR: one small immutable node type, the program around it, and its printed form.

A value is a :class:`Node` ``(op, src, arg, idx, dtype)``. ``idx`` lists the free index
variables of the value (each a :class:`Var`: a name and the axis it runs over), so a node
denotes a tensor over those indices, per batch row and head. The token axis is an index too:
``t`` is the current (query) token and ``u`` a key token, both over the axis ``T``.

Nodes are hash-consed by structure (positions are not part of identity), so shared
sub-expressions are shared nodes, and the dataflow is a DAG (:func:`dataflow_graph`).

Ops
  leaves    const(value) dim(name) iota(var) head input(name, vars)[token] param(name, vars)
            buffer(name, vars) state(name, vars) rand(kind)[lo, hi]
  unary     neg exp log sqrt abs real imag conj elu sigmoid logsigmoid softplus silu relu tanh
            cos sin floor not
  binary    add sub mul div floordiv mod pow complex min max lt le gt ge eq ne and or
  other     where[c, a, b] eye(var, var) sum(vars)[body] softmax(var)[body]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .errors import Pos, Source

TOKEN_AXIS = "T"


@dataclass(frozen=True, order=True)
class Var:
    """An index variable: a name and the axis (size name, or ``T`` for tokens) it runs over."""

    name: str
    axis: str

    def __str__(self) -> str:
        return f"{self.name}:{self.axis}"


T_VAR = Var("t", TOKEN_AXIS)  # the current token (query token in attention form)
U_VAR = Var("u", TOKEN_AXIS)  # a key token (only inside sum(u: ...) / softmax(u: ...))

UNARY = ("neg", "exp", "log", "sqrt", "abs", "real", "imag", "conj", "elu", "sigmoid", "logsigmoid",
         "softplus", "silu", "relu", "tanh", "cos", "sin", "floor", "not")
BINARY = ("add", "sub", "mul", "div", "floordiv", "mod", "pow", "complex", "min", "max",
          "lt", "le", "gt", "ge", "eq", "ne", "and", "or")
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
# Functions that have no meaning on complex numbers.
REAL_ONLY = ("elu", "sigmoid", "logsigmoid", "softplus", "silu", "relu", "tanh", "floor",
             "floordiv", "mod", "min", "max", "lt", "le", "gt", "ge", "and", "or", "not")
LEAVES = ("const", "dim", "iota", "head", "input", "param", "buffer", "state", "rand")


def canonical(vars_) -> tuple[Var, ...]:
    """Order index variables: t first, then u, then the rest in first-seen order."""
    seen: list[Var] = []
    for v in vars_:
        if v not in seen:
            seen.append(v)
    head = [v for v in (T_VAR, U_VAR) if v in seen]
    return tuple(head + [v for v in seen if v not in (T_VAR, U_VAR)])


@dataclass(frozen=True, eq=False)
class Node:
    """One IR value. Immutable; equality and hash are structural (positions excluded)."""

    op: str
    src: tuple[Node, ...] = ()
    arg: Any = None
    idx: tuple[Var, ...] = ()
    dtype: str = "real"  # real | complex | bool
    pos: Pos | None = field(default=None, compare=False, repr=False)
    _key: tuple = field(default=(), compare=False, repr=False)
    _hash: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        key = (self.op, self.src, self.arg, self.idx, self.dtype)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Node) or self._hash != other._hash:
            return False
        return self._key == other._key

    def __repr__(self) -> str:
        return f"Node({self.op}, arg={self.arg!r}, idx=[{', '.join(map(str, self.idx))}], {self.dtype})"

    def walk(self):
        """Every node reachable from this one, each once, operands before users."""
        return toposort([self])


def toposort(roots) -> list[Node]:
    """Nodes reachable from ``roots``, operands before users, deterministic order."""
    out: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(list(roots))]
    while stack:
        node, expanded = stack.pop()
        if id(node) in seen:
            continue
        if expanded:
            seen.add(id(node))
            out.append(node)
            continue
        stack.append((node, True))
        for s in reversed(node.src):
            if id(s) not in seen:
                stack.append((s, False))
    # de-duplicate structurally equal nodes (hash-consing) while keeping order
    uniq: dict[Node, Node] = {}
    for n in out:
        uniq.setdefault(n, n)
    return list(uniq.values())


def depends_on(node: Node, ops: tuple[str, ...]) -> bool:
    """Whether any node under ``node`` has one of these ops."""
    return any(n.op in ops for n in node.walk())


# ---- the program -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorDecl:
    """A declared input, parameter, buffer or state. ``axes`` are size names."""

    kind: str
    name: str
    axes: tuple[str, ...]
    complex: bool = False
    sampler: str | None = None
    init: Node | None = None
    init_vars: tuple[Var, ...] = ()
    pos: Pos | None = field(default=None, compare=False)

    def shape_str(self) -> str:
        return f"[{', '.join(self.axes)}]"


@dataclass(frozen=True)
class Equation:
    """``target[vars] = value`` (a state update, or the output)."""

    target: str
    vars: tuple[Var, ...]
    value: Node
    pos: Pos | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Program:
    """A whole mixer: declarations, state updates, the output and the key-token mask."""

    name: str
    source: Source
    sizes: tuple[tuple[str, int | None], ...]
    consts: tuple[tuple[str, int | float], ...]
    inputs: tuple[TensorDecl, ...]
    params: tuple[TensorDecl, ...]
    buffers: tuple[TensorDecl, ...]
    states: tuple[TensorDecl, ...]
    updates: tuple[Equation, ...]
    output: Equation
    mask: Node | None
    lets: tuple[tuple[str, Node], ...] = ()

    @property
    def has_key_tokens(self) -> bool:
        """Whether the output sums over key tokens (attention form)."""
        return any(n.op in ("sum", "softmax") and U_VAR in _reduced(n) for n in self.output.value.walk())

    def decl(self, name: str) -> TensorDecl | None:
        for d in self.inputs + self.params + self.buffers + self.states:
            if d.name == name:
                return d
        return None

    def roots(self) -> list[Node]:
        roots = [eq.value for eq in self.updates] + [self.output.value]
        if self.mask is not None:
            roots.append(self.mask)
        return roots

    def __str__(self) -> str:
        return format_program(self)


def _reduced(n: Node) -> tuple[Var, ...]:
    return n.arg if n.op == "sum" else (n.arg,)


# ---- printing --------------------------------------------------------------------------------


def _fmt_type(n: Node) -> str:
    dt = {"real": "f", "complex": "c", "bool": "b"}[n.dtype]
    return f"{dt}[{','.join(str(v) for v in n.idx)}]" if n.idx else dt


def _fmt_arg(n: Node, names: dict[Node, str]) -> str:
    ops = " ".join(names[s] for s in n.src)
    if n.op == "const":
        return repr(n.arg)
    if n.op in ("dim",):
        return n.arg
    if n.op == "iota":
        return f"iota {n.arg.name}"
    if n.op == "head":
        return "head"
    if n.op in ("input", "param", "buffer", "state"):
        name, vars_ = n.arg
        tok = f"{names[n.src[0]]}, " if n.src else ""
        pre = "prev " if n.op == "state" else ""
        return f"{n.op} {pre}{name}[{tok}{', '.join(v.name for v in vars_)}]"
    if n.op == "rand":
        return f"{n.arg[0]}({ops}) for {n.arg[1]}"
    if n.op == "sum":
        return f"sum[{','.join(v.name for v in n.arg)}] {ops}"
    if n.op == "softmax":
        return f"softmax[{n.arg.name}] {ops}"
    if n.op == "eye":
        return f"eye {n.arg[0].name} {n.arg[1].name}"
    return f"{n.op} {ops}"


def format_nodes(roots, names: dict[Node, str] | None = None, indent: str = "  ") -> tuple[list[str], dict]:
    """One line per node, jaxpr style: ``%3:f[t:T,i:K] = mul %1 %2``. Leaves print inline."""
    names = {} if names is None else names
    lines = []
    for n in toposort(roots):
        if n in names:
            continue
        if n.op == "const":
            names[n] = repr(n.arg)
            continue
        if n.op == "dim":
            names[n] = n.arg
            continue
        name = f"%{len([k for k in names.values() if k.startswith('%')])}"
        lines.append(f"{indent}{name}:{_fmt_type(n)} = {_fmt_arg(n, names)}")
        names[n] = name
    return lines, names


def format_program(p: Program) -> str:
    """The one stable printed form of a program (what `mixc explain` shows)."""
    out = [f"mixer {p.name}  # {p.source.path}"]
    if p.sizes:
        out.append("  sizes   " + ", ".join(n if d is None else f"{n}={d}" for n, d in p.sizes))
    if p.consts:
        out.append("  consts  " + ", ".join(f"{n}={v!r}" for n, v in p.consts))
    for label, decls in (("inputs", p.inputs), ("params", p.params), ("buffers", p.buffers), ("states", p.states)):
        if decls:
            row = []
            for d in decls:
                axes = ([TOKEN_AXIS] if label == "inputs" else []) + list(d.axes)
                row.append(f"{d.name}:{'c' if d.complex else 'f'}[{','.join(axes)}]")
            out.append(f"  {label:<7} " + " ".join(row))
    names: dict[Node, str] = {}
    for d in p.params + p.buffers:
        if d.init is not None:
            lines, names = format_nodes([d.init], names, indent="    ")
            out.append(f"  init {d.name}[{', '.join(v.name for v in d.init_vars)}]:")
            out.extend(lines)
            out.append(f"    {d.name} := {names[d.init]}")
    if p.mask is not None:
        out.append("  mask:")
        lines, names = format_nodes([p.mask], names, indent="    ")
        out.extend(lines)
        out.append(f"    mask(t, u) := {names[p.mask]}")
    if p.updates:
        out.append("  step:")
        lines, names = format_nodes([eq.value for eq in p.updates], names, indent="    ")
        out.extend(lines)
        for eq in p.updates:
            out.append(f"    {eq.target}[{', '.join(str(v) for v in eq.vars)}] <- {names[eq.value]}")
    out.append("  output:")
    lines, names = format_nodes([p.output.value], names, indent="    ")
    out.extend(lines)
    out.append(f"    {p.output.target}[{', '.join(str(v) for v in p.output.vars)}] = {names[p.output.value]}"
               + ("   (states after the step)" if p.updates else ""))
    return "\n".join(out)


def _graph_label(n: Node, names: dict[Node, str]) -> str:
    """A vertex label: the read for leaves (``g[t, i]``), the operation for the rest (``mul``)."""
    if n.op in ("const", "dim"):
        return names[n]
    if n.op in ("input", "param", "buffer", "state"):
        name, vars_ = n.arg
        tok = []
        if n.src:
            t = n.src[0]
            tok = [t.arg.name] if t.op == "iota" else ["t - ..."]
        return f"{name}[{', '.join(tok + [v.name for v in vars_])}]"
    if n.op == "sum":
        return f"sum[{','.join(v.name for v in n.arg)}]"
    if n.op == "softmax":
        return "softmax[u]"
    if n.op == "iota":
        return n.arg.name
    if n.op == "eye":
        return f"eye({n.arg[0].name}, {n.arg[1].name})"
    return n.op


def dataflow_graph(p: Program) -> nx.DiGraph:
    """The dataflow as a networkx DiGraph: one vertex per node (and per update/output target),
    an edge from each operand to its user. Vertex attribute ``label`` is printable."""
    g = nx.DiGraph()
    _, names = format_nodes(p.roots())
    ids: dict[Node, str] = {}
    for n in toposort(p.roots()):
        vid = f"n{len(ids)}"
        ids[n] = vid
        label = _graph_label(n, names)
        g.add_node(vid, label=label, op=n.op, dtype=n.dtype, idx=",".join(str(v) for v in n.idx))
        for s in n.src:
            g.add_edge(ids[s], vid)
    for eq in p.updates:
        g.add_node(f"update:{eq.target}", label=f"{eq.target} <-", op="update")
        g.add_edge(ids[eq.value], f"update:{eq.target}")
    g.add_node(f"out:{p.output.target}", label=f"out {p.output.target}", op="output")
    g.add_edge(ids[p.output.value], f"out:{p.output.target}")
    if p.mask is not None:
        g.add_node("mask", label="mask(t, u)", op="mask")
        g.add_edge(ids[p.mask], "mask")
    return g
