"""Parse `.mix` source text into the syntax tree of :mod:`mixc.ast` (pass 1 of the pipeline)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import lark
from lark import Token, Transformer, v_args

from . import ast
from .errors import MixError, Pos, Source



def _grammar_text() -> str:
    """The grammar ships as the `mixc.grammar` package (the repository's `grammar/` folder)."""
    try:
        from importlib.resources import files

        return (files("mixc.grammar") / "mix.lark").read_text()
    except ModuleNotFoundError:  # running from a checkout that was not installed
        return (Path(__file__).resolve().parent.parent / "grammar" / "mix.lark").read_text()


_OPEN = {"LPAR", "LSQB"}
_CLOSE = {"RPAR", "RSQB"}

# How terminals read in an error message.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "INT": "an integer",
    "IMAG": "an imaginary number",
    "_NL": "end of line",
    "$END": "end of file",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "COLON": "':'",
    "EQUAL": "'='",
    "TILDE": "'~'",
    "ADDOP": "'+' or '-'",
    "MULOP": "'*', '/', '//' or '%'",
    "COMPOP": "a comparison",
    "REDUCER": "sum(...) or softmax(...)",
    "COMPLEX": "'complex'",
    "MINUS": "'-'",
    "PLUS": "'+'",
    "POW": "'**'",
}


class _BracketNewlines:
    """Post-lexer: newlines inside (...) or [...] continue the statement."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in _OPEN:
                depth += 1
            elif tok.type in _CLOSE:
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth > 0:
                continue
            yield tok


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(
        _grammar_text(),
        parser="lalr",
        lexer="contextual",
        postlex=_BracketNewlines(),
        propagate_positions=True,
        maybe_placeholders=True,
    )


def _pos(x) -> Pos | None:
    return Pos.of(x.meta if hasattr(x, "meta") else x)


def _tok_pos(tok: Token) -> Pos:
    return Pos(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + len(tok))


def _number(text: str) -> int | float:
    if all(c.isdigit() for c in text):
        return int(text)
    return float(text)


@v_args(meta=True)
class _ToAst(Transformer):
    """lark tree -> :mod:`mixc.ast` (positions kept on every node)."""

    # expressions
    def number(self, meta, c):
        return ast.Num(_number(str(c[0])), pos=Pos.of(meta))

    def imag(self, meta, c):
        return ast.Imag(complex(0, float(str(c[0])[:-1])), pos=Pos.of(meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), pos=Pos.of(meta))

    def index(self, meta, c):
        return ast.Index(str(c[0]), tuple(x for x in c[1:] if x is not None), pos=Pos.of(meta))

    def call(self, meta, c):
        return ast.Call(str(c[0]), tuple(x for x in c[1:] if x is not None), pos=Pos.of(meta))

    def reduce(self, meta, c):
        kind = str(c[0])
        names = tuple(str(x) for x in c[1:-1])
        return ast.Reduce(kind, names, c[-1], pos=Pos.of(meta))

    def binop(self, meta, c):
        return ast.Bin(str(c[1]), c[0], c[2], pos=Pos.of(meta))

    def pow(self, meta, c):
        return ast.Pow(c[0], c[2], pos=Pos.of(meta))

    def neg(self, meta, c):
        return ast.Neg(c[0], pos=Pos.of(meta))

    def compare(self, meta, c):
        return ast.Compare(tuple(str(x) for x in c[1::2]), tuple(c[0::2]), pos=Pos.of(meta))

    def _boolop(self, op, meta, c):
        args: list[ast.Expr] = []
        for x in c:  # left-recursive rule: flatten `a and b and c`
            args.extend(x.args if isinstance(x, ast.BoolOp) and x.op == op else (x,))
        return ast.BoolOp(op, tuple(args), pos=Pos.of(meta))

    def and_op(self, meta, c):
        return self._boolop("and", meta, c)

    def or_op(self, meta, c):
        return self._boolop("or", meta, c)

    def not_op(self, meta, c):
        return ast.Not(c[0], pos=Pos.of(meta))

    # declarations
    def axis(self, meta, c):
        var, size = c
        return ast.Axis(str(size), str(var) if var is not None else None, pos=Pos.of(meta))

    def tensordef(self, meta, c):
        return (str(c[0]), tuple(a for a in c[1:] if a is not None), Pos.of(meta))

    def target(self, meta, c):
        return (str(c[0]), tuple(str(x) for x in c[1:] if x is not None), Pos.of(meta))

    def sizedef(self, meta, c):
        return ast.SizeStmt(str(c[0]), int(c[1]) if c[1] is not None else None, pos=Pos.of(meta))

    def constdef(self, meta, c):
        return ast.ConstStmt(str(c[0]), c[1], pos=Pos.of(meta))

    def inputdef(self, meta, c):
        name, axes, pos = c[0]
        return ast.TensorStmt("input", name, axes, sampler=str(c[1]) if c[1] else None, pos=pos)

    def statedef(self, meta, c):
        name, axes, pos = c[0]
        return ast.TensorStmt("state", name, axes, complex=c[1] is not None, pos=pos)

    # statements (a declaration list flattens into one statement per name)
    def mixer_stmt(self, meta, c):
        return [ast.MixerStmt(str(c[0]), pos=Pos.of(meta))]

    def size_stmt(self, meta, c):
        return list(c)

    const_stmt = input_stmt = state_stmt = size_stmt

    def _tensor_init(self, kind, c):
        name, axes, pos = c[0]
        return [ast.TensorStmt(kind, name, axes, init=c[1], pos=pos)]

    def param_stmt(self, meta, c):
        return self._tensor_init("param", c)

    def buffer_stmt(self, meta, c):
        return self._tensor_init("buffer", c)

    def def_stmt(self, meta, c):
        params = tuple(str(x) for x in c[1:-1] if x is not None)
        return [ast.DefStmt(str(c[0]), params, c[-1], pos=Pos.of(meta))]

    def let_stmt(self, meta, c):
        name, vars_, pos = c[0]
        return [ast.LetStmt(name, vars_, c[1], pos=pos)]

    def mask_stmt(self, meta, c):
        return [ast.MaskStmt(c[0], pos=Pos.of(meta))]

    def out_stmt(self, meta, c):
        name, vars_, pos = c[0]
        return [ast.OutStmt(name, vars_, c[1], pos=pos)]

    def update_stmt(self, meta, c):
        name, vars_, pos = c[0]
        return [ast.UpdateStmt(name, vars_, c[1], pos=pos)]

    def start(self, meta, c):
        out: list[ast.Stmt] = []
        for group in c:
            if group is not None:
                out.extend(group)
        return ast.Module(tuple(out))


def _describe(expected) -> str:
    words = sorted({_TERMINAL_WORDS.get(e, f"'{e.lower()}'" if e.isalpha() else e) for e in expected})
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _syntax_error(err: lark.exceptions.UnexpectedInput, source: Source) -> MixError:
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        char = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        pos = Pos(err.line, err.column, err.line, err.column + 1)
        hint = None
        if char in "{}$@`'\"":
            hint = "a .mix file uses only names, numbers, operators, ( ) [ ] , : = ~ and #comments"
        return MixError(f"unexpected character {char!r}", pos, expected=_describe(err.allowed), hint=hint,
                        source=source)
    assert isinstance(err, lark.exceptions.UnexpectedToken)
    tok = err.token
    if tok.type == "$END":
        rows = source.text.rstrip().splitlines() or [""]
        line = len(rows)
        pos = Pos(line, len(rows[-1]) + 1, line, len(rows[-1]) + 2)
        return MixError("unexpected end of file", pos, expected=_describe(err.expected),
                        hint="a bracket may be left open", source=source)
    pos = _tok_pos(tok)
    what = "end of line" if tok.type == "_NL" else repr(str(tok))
    if tok.type == "_NL":
        pos = Pos(tok.line, tok.column, tok.line, tok.column + 1)
    hint = None
    expected = set(err.expected)
    if tok.type == "_NL" and expected & {"RPAR", "RSQB"}:
        hint = "a bracket is left open on this line"
    elif str(tok) == "=" and "EQUAL" not in expected:
        hint = "use '==' to compare; '=' only appears once, after the name being defined"
    elif tok.type == "NAME" and expected <= {"_NL", "$END", "COMMA", "ADDOP", "MULOP", "COMPOP", "RPAR", "RSQB",
                                               "POW", "COLON", "EQUAL", "TILDE", "COMPLEX", "LSQB", "LPAR"}:
        hint = "an operator may be missing between two operands (write '*' for products)"
    elif str(tok) in {"+=", "-="}:
        hint = "write the whole update: S[i, j] = S[i, j] + ..."
    return MixError(f"unexpected {what}", pos, expected=_describe(expected), hint=hint, source=source)


def parse(text: str, path: str = "<string>") -> ast.Module:
    """Parse `.mix` source. Raises :class:`MixError` (located) on a syntax error."""
    source = Source(path, text)
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise _syntax_error(err, source) from None
    return _ToAst().transform(tree)
