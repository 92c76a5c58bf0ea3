"""Located, user-facing errors.

Every problem found in a `.mix` file is raised as a :class:`MixError` that knows
the file, the line and column, and renders like a compiler diagnostic::

    examples/bad.mix:4:18: error: unknown name 'kk'
        S[i, j] = S[i, j] + kk[i] * v[j]
                            ^~
      expected: one of q, k, v, S
      hint: did you mean 'k'?
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    """A span in a source file (1-based line and column, end exclusive)."""

    line: int
    col: int
    end_line: int
    end_col: int

    @staticmethod
    def of(meta) -> Pos | None:
        """Position of a lark tree meta or token, or None when it carries none."""
        line = getattr(meta, "line", None)
        if line is None:
            return None
        end_line = getattr(meta, "end_line", None) or line
        end_col = getattr(meta, "end_column", None) or meta.column + 1
        return Pos(line, meta.column, end_line, end_col)


class MixError(Exception):
    """An error in a `.mix` program or in how a compiled mixer is called."""

    def __init__(
        self,
        message: str,
        pos: Pos | None = None,
        *,
        expected: str | None = None,
        hint: str | None = None,
        source: Source | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.expected = expected
        self.hint = hint
        self.source = source

    def located(self, source: Source) -> MixError:
        """Attach the source (once) so the message can show the line."""
        if self.source is None:
            self.source = source
        return self

    def __str__(self) -> str:  # noqa: D105
        return self.render()

    def render(self) -> str:
        """The full diagnostic: location, message, source line with caret, expected, hint."""
        src = self.source
        head = "error"
        if src is not None and self.pos is not None:
            head = f"{src.path}:{self.pos.line}:{self.pos.col}: error"
        elif src is not None:
            head = f"{src.path}: error"
        lines = [f"{head}: {self.message}"]
        if src is not None and self.pos is not None:
            text = src.line(self.pos.line)
            if text is not None:
                lines.append("    " + text.rstrip("\n").expandtabs(1))
                width = 1
                if self.pos.end_line == self.pos.line:
                    width = max(1, self.pos.end_col - self.pos.col)
                width = min(width, max(1, len(text) - self.pos.col + 1))
                lines.append("    " + " " * (self.pos.col - 1) + "^" + "~" * (width - 1))
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Source:
    """The text of a `.mix` program and the path it is reported under."""

    path: str
    text: str

    def line(self, n: int) -> str | None:
        rows = self.text.split("\n")  # lines as the parser counts them (only '\n' ends a line)
        return rows[n - 1].rstrip("\r") if 1 <= n <= len(rows) else None


def did_you_mean(name: str, choices) -> str | None:
    """A hint naming the closest known name, if any is close."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close:  # then ignoring case: 'w' for 'W'
        folded: dict[str, str] = {}
        for c in choices:
            folded.setdefault(c.lower(), c)
        close = [folded[c] for c in difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.6)]
    return f"did you mean '{close[0]}'?" if close else None
