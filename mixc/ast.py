"""The syntax tree of a `.mix` file: what the parser produces, positions on every node.

These are plain frozen dataclasses; :mod:`mixc.lower` turns them into the typed IR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Pos


@dataclass(frozen=True)
class Node:
    pos: Pos | None = field(default=None, compare=False, repr=False, kw_only=True)


# ---- expressions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Num(Node):
    value: int | float


@dataclass(frozen=True)
class Imag(Node):
    value: complex


@dataclass(frozen=True)
class Name(Node):
    name: str


@dataclass(frozen=True)
class Index(Node):
    """`x[i, j]`, `k[t - m, p]`: a tensor read with one expression per axis."""

    name: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Call(Node):
    name: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Bin(Node):
    op: str  # + - * / // %
    a: Expr
    b: Expr


@dataclass(frozen=True)
class Pow(Node):
    a: Expr
    b: Expr


@dataclass(frozen=True)
class Neg(Node):
    x: Expr


@dataclass(frozen=True)
class Compare(Node):
    """`a < b <= c` (a chain means the conjunction of its links)."""

    ops: tuple[str, ...]
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class BoolOp(Node):
    op: str  # and, or
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Not(Node):
    x: Expr


@dataclass(frozen=True)
class Reduce(Node):
    """`sum(i, j: body)` or `softmax(u: body)`."""

    kind: str
    vars: tuple[str, ...]
    body: Expr


Expr = Num | Imag | Name | Index | Call | Bin | Pow | Neg | Compare | BoolOp | Not | Reduce


# ---- statements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis(Node):
    """One axis of a declared tensor: its size name and, optionally, an index name for the
    initialiser (`A[n: N, p: P] = -(n + 1)`)."""

    size: str
    var: str | None = None


@dataclass(frozen=True)
class MixerStmt(Node):
    name: str


@dataclass(frozen=True)
class SizeStmt(Node):
    name: str
    default: int | None


@dataclass(frozen=True)
class ConstStmt(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class TensorStmt(Node):
    """`input`, `param`, `buffer` or `state` declaration of one tensor."""

    kind: str
    name: str
    axes: tuple[Axis, ...]
    init: Expr | None = None  # param/buffer initialiser
    sampler: str | None = None  # input: how random test inputs are drawn
    complex: bool = False  # state: complex valued


@dataclass(frozen=True)
class DefStmt(Node):
    name: str
    params: tuple[str, ...]
    body: Expr


@dataclass(frozen=True)
class LetStmt(Node):
    name: str
    vars: tuple[str, ...]
    value: Expr


@dataclass(frozen=True)
class MaskStmt(Node):
    cond: Expr


@dataclass(frozen=True)
class OutStmt(Node):
    name: str
    vars: tuple[str, ...]
    value: Expr


@dataclass(frozen=True)
class UpdateStmt(Node):
    name: str
    vars: tuple[str, ...]
    value: Expr


Stmt = MixerStmt | SizeStmt | ConstStmt | TensorStmt | DefStmt | LetStmt | MaskStmt | OutStmt | UpdateStmt


@dataclass(frozen=True)
class Module:
    """A parsed file: its statements in source order."""

    statements: tuple[Stmt, ...]
