"""Fuzzing the front end: mutated examples, random programs from the grammar and odd file names go through
load / loads / compile. Each must compile, or raise a located MixError; a compiled mixer's reference runs on
tiny inputs, or rejects the call with a MixerCallError (a ValueError naming the argument). No other exception,
no internal error, and nothing a name holds is ever executed (a marker file it would create never appears).

Deterministic (fixed seeds) and fast: a few hundred cases.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import pytest
import torch

import mixc
from mixc import cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.mix"))
MARKER = "FUZZ_PWNED"


def _exercise(text: str, path: str = "fuzz.mix") -> str:
    """Compile ``text`` and, when it compiles, run its reference on tiny inputs. Returns what happened
    ('error', 'call-error' or 'ran'); any other exception fails the test with the input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = mixc.loads(text, path=path)
    except mixc.MixError as err:
        rendered = str(err)
        assert "internal error" not in rendered
        return "error"
    except Exception as err:  # pragma: no cover - the failure report
        pytest.fail(f"compile: {type(err).__name__}: {err}\n--- input ---\n{text}")
    sizes = {k: 2 for k, d in m.meta["sizes"].items() if d is None}
    try:
        x = m.random_inputs(1, 3, 2, dtype=torch.float64, **sizes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = m.reference(**x, **{k: v for k, v in m.parameters_init(2, dtype=torch.float64, **sizes).items()})
    except ValueError as err:  # MixerCallError (the call's arguments) or a size the call must bind
        assert "Traceback" not in str(err)
        return "call-error"
    except Exception as err:  # pragma: no cover - the failure report
        pytest.fail(f"call: {type(err).__name__}: {err}\n--- input ---\n{text}")
    assert out.shape[:3] == (1, 3, 2)
    return "ran"


# ---- mutations of every example ------------------------------------------------------------------------

_REPLACEMENTS = ["0", "-1", "1e999", "10 ** 30", "1" * 30, "0.0", "1j", "t", "u", "H", "head", "form", "S",
                 "log(0)", "0 / 0", "x[t - 1]", "sum(i: k[i])", "where(t > 0, 1, 0)", "exp(1000)", "eye(i, i)",
                 "softmax(u: 1)", "-", "(", "]", "\\", '"""', "'", "\x00", "\ud800", "#", "\n"]


def _mutate(text: str, rng: random.Random) -> str:
    """Replace a token (a name, a number or an operator) by something odd, or drop or repeat a line."""
    tokens = list(re.finditer(r"[A-Za-z_]\w*|\d+(\.\d*)?([eE][-+]?\d+)?j?|\*\*|//|[-+*/%<>=()\[\],:~]", text))
    r = rng.random()
    if r < 0.7 and tokens:
        tok = rng.choice(tokens)
        new = rng.choice(_REPLACEMENTS + [t.group() for t in rng.sample(tokens, min(3, len(tokens)))])
        return text[: tok.start()] + new + text[tok.end():]
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    if r < 0.85:
        del lines[i]
    else:
        lines.insert(i, lines[rng.randrange(len(lines))])
    return "\n".join(lines)


def test_mutated_examples():
    rng = random.Random(17)
    seen = {"error": 0, "call-error": 0, "ran": 0}
    for path in EXAMPLES:
        text = path.read_text()
        for _ in range(10):
            seen[_exercise(_mutate(_mutate(text, rng), rng) if rng.random() < 0.3 else _mutate(text, rng))] += 1
    assert seen["error"] > 0 and seen["ran"] > 0, seen


# ---- random programs from the grammar ---------------------------------------------------------------------

UNARY = ["exp", "log", "sqrt", "abs", "sigmoid", "logsigmoid", "softplus", "silu", "relu", "tanh", "elu", "cos",
         "sin", "floor", "real", "imag", "conj"]
NUMBERS = ["0", "1", "2", "0.5", "-1", "1e-3", "3.0", "1e30", "K", "V", "pi", "1j"]


class _Gen:
    """Random programs: sizes K and V, inputs q[K], k[K], v[V], g[K], maybe a parameter, a state S[K, V] (or
    none: attention) and random expressions at every place the grammar allows one."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def scalar(self, depth: int, leaves: list[str]) -> str:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.3:
            return rng.choice(leaves + NUMBERS)
        r = rng.random()
        a = self.scalar(depth - 1, leaves)
        if r < 0.35:
            return f"({a} {rng.choice(['+', '-', '*', '/', '//', '%', '**'])} {self.scalar(depth - 1, leaves)})"
        if r < 0.65:
            return f"{rng.choice(UNARY)}({a})"
        if r < 0.75:
            return f"{rng.choice(['min', 'max', 'complex'])}({a}, {self.scalar(depth - 1, leaves)})"
        if r < 0.85:
            cmp = rng.choice(["<", "<=", ">", "==", "!="])
            return f"where({a} {cmp} {self.scalar(0, leaves)}, {self.scalar(depth - 1, leaves)}, {a})"
        return f"-{a}"

    def program(self) -> str:
        rng = self.rng
        lines = []
        if rng.random() < 0.5:
            lines.append(f"mixer {rng.choice(['fuzz', 'lambda', 'class', 'H', 'x' * 80, 'import'])}")
        lines.append(f"size K{rng.choice(['', ' = 3', ' = 0'])}, V{rng.choice(['', ' = 2'])}")
        if rng.random() < 0.3:
            lines.append(f"const C = {self.scalar(2, [])}")
        lines.append(f"input q[K], k[K], v[V], g[K] ~ {rng.choice(['logsigmoid', 'sigmoid', 'normal', 'unit'])}")
        leaves_k = ["q[i]", "k[i]", "g[i]", "q[t, i]", "k[t - 1, i]"]
        if rng.random() < 0.5:
            lines.append(f"param w[K] = {self.scalar(2, ['head', 'H', 'uniform(0, 1)', 'normal(0, 1)'])}")
            leaves_k.append("w[i]")
        if rng.random() < 0.25:  # attention
            if rng.random() < 0.5:
                lines.append(f"mask u <= t and t - u < {rng.choice(['2', 'K', '0', '-1'])}")
            score = f"sum(i: q[t, i] * k[u, i] * {self.scalar(1, leaves_k)})"
            lines.append(f"out o[j] = sum(u: softmax(u: {score}) * v[u, j])")
            return "\n".join(lines) + "\n"
        lines.append(f"state S[K, V]{rng.choice(['', '', ' complex'])}")
        decay = self.scalar(2, leaves_k)
        lines.append(f"S[i, j] = {decay} * S[i, j] + {self.scalar(1, leaves_k)} * v[j]")
        read = f"sum(i: {self.scalar(1, leaves_k)} * S[i, j])"
        if rng.random() < 0.3:
            read = f"{rng.choice(['tanh', 'real', 'abs'])}({read})"
        lines.append(f"out o[j] = {read} * {self.scalar(1, ['v[j]', 'K'])}")
        return "\n".join(lines) + "\n"


def test_random_grammar_programs():
    gen = _Gen(random.Random(1717))
    seen = {"error": 0, "call-error": 0, "ran": 0}
    for _ in range(150):
        seen[_exercise(gen.program())] += 1
    assert seen["error"] > 0 and seen["ran"] > 10, seen


# ---- odd file names ----------------------------------------------------------------------------------

_NAME_PARTS = ['"""', "'''", '"', "'", "\\", "\\x41", "\\N{x}", "\n", "\r", "\t", "\x00", "\u2028", "é", "中",
               "\ud800", "$(touch FUZZ_PWNED)", f'__import__("os").system("touch {MARKER}")', "#", " ", "..", "/",
               "x" * 250, "{", "}", "%s", "-", "9"]


def test_odd_file_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIXC_CACHE_DIR", str(tmp_path / "cache"))
    text = "size K = 2, V = 2\ninput k[K], v[V]\nout o[j] = sum(i: k[i]) * v[j]\n"
    rng = random.Random(7)
    names = ["".join(rng.choice(_NAME_PARTS) for _ in range(rng.randint(1, 4))) for _ in range(40)]
    (tmp_path / "d").mkdir()
    for name in names:
        assert _exercise(text, path=name + ".mix") == "ran"
        try:
            f = tmp_path / "d" / (name.replace("/", "_") + ".mix")
            f.write_text(text)
        except (OSError, ValueError, UnicodeEncodeError):  # the file system refuses this name
            continue
        m = mixc.load(f)
        assert m.name.isidentifier()
        out = tmp_path / "out.py"
        code = cli.main(["compile", str(f), "-o", str(out)])
        assert code == 0
        compile(out.read_text(), str(out), "exec")
        out.unlink()
    assert not list(tmp_path.rglob(MARKER)) and not (ROOT / MARKER).exists(), "a file name ran as code"
