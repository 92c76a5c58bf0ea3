"""Parse `.mix` source text into the syntax tree of :mod:`mixc.ast` (pass 1 of the pipeline)."""

from __future__ import annotations

import math
import re
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


def _number(text: str, meta=None) -> int | float:
    """A number literal's value: an int when written with digits only and within 64 bits, else a float.
    A literal too large for a double (``1e999``) is a located error, not infinity."""
    if all(c.isdigit() for c in text) and len(text) <= 19:
        value = int(text)
        if value < 2**63:
            return value
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"
        raise MixError(f"the number {shown} is too large", Pos.of(meta) if meta is not None else None,
                       hint="numbers must be finite in double precision (below about 1.8e308)")
    return value


@v_args(meta=True)
class _ToAst(Transformer):
    """lark tree -> :mod:`mixc.ast` (positions kept on every node)."""

    # expressions
    def number(self, meta, c):
        return ast.Num(_number(str(c[0]), meta), pos=Pos.of(meta))

    def imag(self, meta, c):
        return ast.Imag(complex(0, float(_number(str(c[0])[:-1], meta))), pos=Pos.of(meta))

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


_PAIRS = {"(": ")", "[": "]"}
# Characters that other languages use, and what a .mix file writes instead.
_CHAR_HINTS = {
    "&": "write 'and'",
    "|": "write 'or'",
    "!": "write 'not' (or '!=' to compare)",
    "^": "write '**' for a power",
    ";": "write one statement per line",
}


def _offset(text: str, line: int, col: int) -> int:
    """Character offset of a 1-based (line, column)."""
    rows = text.split("\n")
    return sum(len(r) + 1 for r in rows[: line - 1]) + col - 1


def _open_brackets(text: str, end: int) -> list[tuple[str, Pos]]:
    """The brackets still open at offset ``end`` (innermost last), skipping comments."""
    stack: list[tuple[str, Pos]] = []
    line, col, i = 1, 1, 0
    while i < end and i < len(text):
        c = text[i]
        if c == "#":
            while i < end and i < len(text) and text[i] != "\n":
                i += 1
                col += 1
            continue
        if c in _PAIRS:
            stack.append((c, Pos(line, col, line, col + 1)))
        elif c in ")]" and stack:
            stack.pop()
        if c == "\n":
            line, col = line + 1, 1
        else:
            col += 1
        i += 1
    return stack


def _filter_expected(expected, stack) -> set[str]:
    """Drop what cannot follow here (lark's LALR tables merge states: ')' may be offered at depth 0)."""
    out = set(expected)
    if not stack:
        out -= {"RPAR", "RSQB"}
    else:
        out -= {"RSQB" if stack[-1][0] == "(" else "RPAR", "_NL", "$END"}
    return out or set(expected)


_KEYWORDS = {"MIXER", "SIZE", "CONST", "INPUT", "PARAM", "BUFFER", "STATE", "DEF", "LET", "MASK", "OUT"}
_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*\s*(\[[^\]\n]*\])?\s*=(?!=)")


def _starts_statement(tok: Token, text: str, offset: int) -> bool:
    """Whether ``tok`` opens a line that reads like a new statement (a keyword or ``x[...] = ...``)."""
    line_start = text.rfind("\n", 0, offset) + 1
    if text[line_start:offset].strip():
        return False
    return tok.type in _KEYWORDS or (tok.type == "NAME" and _ASSIGNMENT.match(text, offset) is not None)


def _syntax_error(err: lark.exceptions.UnexpectedInput, source: Source) -> MixError:
    text = source.text
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else "?"
        pos = Pos(err.line, err.column, err.line, err.column + 1)
        stack = _open_brackets(text, err.pos_in_stream)
        hint = _CHAR_HINTS.get(char)
        if hint is None and char in "{}$@`'\"?\\":
            hint = "a .mix file uses only names, numbers, operators, ( ) [ ] , : = ~ and #comments"
        return MixError(f"unexpected character {char!r}", pos, expected=_describe(_filter_expected(err.allowed, stack)),
                        hint=hint, source=source)
    if not isinstance(err, lark.exceptions.UnexpectedToken):  # pragma: no cover - not raised by the LALR parser
        line, col = getattr(err, "line", None), getattr(err, "column", None)
        pos = Pos(line, col, line, col + 1) if isinstance(line, int) and isinstance(col, int) and line > 0 else None
        return MixError("syntax error", pos, source=source)
    tok = err.token
    if tok.type == "$END":
        stack = _open_brackets(text, len(text))
        expected = _describe(_filter_expected(err.expected, stack))
        if stack:
            br, bpos = stack[-1]
            return MixError(f"unexpected end of file: '{br}' is never closed", bpos, expected=f"'{_PAIRS[br]}'",
                            hint=f"close it with '{_PAIRS[br]}'", source=source)
        if tok.end_line and tok.end_column:  # lark's end token borrows the position of the last token
            pos = Pos(tok.end_line, tok.end_column, tok.end_line, tok.end_column + 1)
        else:
            rows = text.rstrip().split("\n")
            pos = Pos(len(rows), len(rows[-1]) + 1, len(rows), len(rows[-1]) + 2)
        return MixError("unexpected end of file", pos, expected=expected, hint="the last statement is incomplete",
                        source=source)
    pos = _tok_pos(tok)
    start = tok.start_pos if tok.start_pos is not None else _offset(text, tok.line, tok.column)
    stack = _open_brackets(text, start)
    expected = _filter_expected(err.expected, stack)
    what = "end of line" if tok.type == "_NL" else repr(str(tok))
    if tok.type == "_NL" and not re.sub(r"#[^\n]*|\s", "", text[tok.end_pos :] if tok.end_pos is not None else "x"):
        what = "end of file"  # only blank lines and comments follow
    if tok.type == "_NL":
        pos = Pos(tok.line, tok.column, tok.line, tok.column + 1)
    if stack and tok.line > stack[-1][1].line and _starts_statement(tok, text, start):
        # Inside brackets a newline continues the statement, so a missing ')' shows up on a later line.
        br, bpos = stack[-1]
        return MixError(f"'{br}' is never closed (the statement runs on into {what} on line {tok.line})", bpos,
                        expected=f"'{_PAIRS[br]}' before the end of line {bpos.line}",
                        hint=f"close it with '{_PAIRS[br]}'", source=source)
    if tok.type in ("RPAR", "RSQB"):
        if not stack:
            return MixError(f"unmatched {what}", pos, expected=_describe(expected),
                            hint="no bracket is open here; remove it or add the opening bracket", source=source)
        br, bpos = stack[-1]
        if _PAIRS[br] != str(tok):
            return MixError(f"{what} does not match the '{br}' opened at line {bpos.line}, column {bpos.col}", pos,
                            expected=_describe(expected), source=source)
    nxt = text[tok.end_pos : tok.end_pos + 2] if tok.end_pos is not None else ""
    if tok.type in ("ADDOP", "MULOP", "POW", "PLUS", "MINUS") and nxt[:1] == "=" and nxt != "==":
        op = f"{tok}="
        lhs = text[text.rfind("\n", 0, start) + 1 : start].strip()
        if not re.fullmatch(r"[A-Za-z_]\w*\s*(\[[^\]]*\])?", lhs):
            lhs = "x"
        example = f"{lhs} = {lhs} {tok} ..."
        return MixError(f"'{op}' is not an operator in .mix", Pos(pos.line, pos.col, pos.line, pos.col + len(op)),
                        expected="'='", hint=f"write the whole update: {example}", source=source)
    hint = "the last statement is incomplete" if what == "end of file" else None
    if str(tok) == "=" and "EQUAL" not in expected:
        hint = "use '==' to compare; '=' only appears once, after the name being defined"
    elif tok.type in ("NAME", "NUMBER", "IMAG", "REDUCER", "LPAR") and "MULOP" in expected:
        return MixError(f"missing operator before {what}", pos, expected=_describe(expected),
                        hint="two operands cannot stand side by side: write '*' for a product", source=source)
    return MixError(f"unexpected {what}", pos, expected=_describe(expected), hint=hint, source=source)


# Deeper expressions than this are rejected: later passes recurse over the expression tree.
MAX_DEPTH = 100


def _check_depth(tree: lark.Tree, source: Source) -> None:
    """Reject absurdly nested expressions with a located error (iteratively: no recursion)."""
    for stmt in tree.children:
        if not isinstance(stmt, lark.Tree):
            continue
        stack = [(stmt, 0)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise MixError(f"expression nested too deeply (more than {MAX_DEPTH} levels)", _pos(stmt),
                               hint="split it into named parts with let", source=source)
            stack.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))


def parse(text: str, path: str = "<string>") -> ast.Module:
    """Parse `.mix` source. Raises :class:`MixError` (located) on a syntax error."""
    source = Source(path, text)
    bad = _NOT_TEXT.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        col = bad.start() - text.rfind("\n", 0, bad.start())
        raise MixError(f"the text contains {ascii(bad.group())}, which is not a character",
                       Pos(line, col, line, col + 1), source=source,
                       hint="a lone surrogate is not valid Unicode: the text was decoded wrongly")
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise _syntax_error(err, source) from None
    _check_depth(tree, source)
    try:
        return _ToAst().transform(tree)
    except lark.exceptions.VisitError as err:  # a located error raised while building the tree
        if isinstance(err.orig_exc, MixError):
            raise err.orig_exc.located(source) from None
        raise


_NOT_TEXT = re.compile("[\ud800-\udfff]")
