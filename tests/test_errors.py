"""Malformed `.mix` inputs: every one must raise a located :class:`mixc.MixError`.

Each case names the exact line and column the error points at (the offending token, not the
statement), a key phrase of the message, and checks that the rendered diagnostic shows the
source line with a caret under that column. A robustness test then feeds truncated and mutated
versions of every example: each must either load or raise MixError, never another exception.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import mixc

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.mix"))

# A recurrent mixer (lines 1-4); the cases append lines 5, 6, ...
REC = """\
size K, V
input q[K], k[K], v[V]
input g[K] ~ logsigmoid
state S[K, V]
"""
UPDATE = "S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]\n"
OUT = "out o[j] = sum(i: q[i] * S[i, j])\n"

# An attention mixer (lines 1-3); the cases append lines 4, 5, ...
ATT = """\
size K, V
input q[K], k[K], v[V]
let s = sum(i: q[t, i] * k[u, i])
"""
ATT_OUT = "out o[j] = sum(u: softmax(u: s) * v[u, j])\n"

# A complex diagonal state (lines 1-3).
CPX = """\
size N = 4
input x[]
state h[N] complex
"""


def load_error(src: str, **constants) -> mixc.MixError:
    with pytest.raises(mixc.MixError) as info:
        mixc.loads(src, path="bad.mix", **constants)
    return info.value


def caret_line(col: int) -> str:
    """How the caret line of a rendered error starts (source lines are indented by 4)."""
    return "\n    " + " " * (col - 1) + "^"


# (id, source, line, column, phrase in the message, {"hint": ..., "expected": ...} substrings)
CASES = [
    # -- names, functions, arity ------------------------------------------------------------
    ("unknown-name", REC + "S[i, j] = exp(g[i]) * S[i, j] + kk[i] * v[j]\n" + OUT,
     5, 33, "unknown name 'kk'", {"hint": "did you mean 'k'?", "expected": "one of"}),
    ("unknown-name-plain", REC + UPDATE + "out o[j] = sum(i: q[i] * S[i, j]) * scale\n",
     6, 37, "unknown name 'scale'", {"hint": "declare it"}),
    ("unknown-function", REC + "S[i, j] = exq(g[i]) * S[i, j] + k[i] * v[j]\n" + OUT,
     5, 11, "unknown function 'exq'", {"hint": "did you mean 'exp'?"}),
    ("function-arity", REC + "S[i, j] = exp(g[i], 2) * S[i, j] + k[i] * v[j]\n" + OUT,
     5, 11, "wrong number of arguments to 'exp': it takes 1, given 2", {"expected": "exp(x)"}),
    ("def-arity", REC + "def phi(x) = elu(x) + 1\nS[i, j] = S[i, j] + phi(k[i], v[j])\n" + OUT,
     6, 21, "wrong number of arguments to 'phi'", {"expected": "phi(x)"}),
    ("tensor-arity-state", REC + "S[i, j] = exp(g[i]) * S[i] + k[i] * v[j]\n" + OUT,
     5, 23, "it has shape [K, V], indexed as [K]", {"expected": "2 indices"}),
    ("tensor-arity-input", REC + "S[i, j] = exp(g[i]) * S[i, j] + k[i, j] * v[j]\n" + OUT,
     5, 33, "it has shape [K], indexed as [K, V]", {"expected": "token index first"}),
    ("let-arity", REC + "let w[i] = exp(g[i])\nS[i, j] = w[i, j] * S[i, j] + k[i] * v[j]\n" + OUT,
     6, 11, "wrong number of indices for 'w': it has shape [K], indexed as [K, V]", {}),
    ("shape-mismatch", REC + "S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[i]\n" + OUT,
     5, 42, "shape mismatch: index 'i' runs over K, but axis 0 of 'v' is V",
     {"expected": "'v' has shape [V]; 'i' was bound to K"}),
    ("unbound-index", REC + "S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[l]\n" + OUT,
     5, 42, "index 'l' is not bound", {"hint": "sum(l: ...)"}),
    ("free-key-token", ATT + "mask u <= t\nout o[j] = sum(u: softmax(u: s) * v[u, j]) + u\n",
     5, 46, "key token u is free in 'o'", {"hint": "sum(u: ...)"}),
    ("index-twice-on-left", REC + "S[i, i] = exp(g[i]) * S[i, i] + k[i] * v[i]\n" + OUT,
     5, 6, "index 'i' appears twice on the left of the update", {}),
    ("index-bound-twice", REC + UPDATE + "out o[j] = sum(i, i: q[i] * S[i, j])\n",
     6, 19, "index 'i' is already bound here", {}),
    ("sum-over-current-token", REC + UPDATE + "out o[j] = sum(i: sum(t: q[i] * S[i, j]))\n",
     6, 23, "t is the current token and cannot be summed over", {"hint": "sum(u: ...)"}),
    ("index-of-unknown-axis", REC + UPDATE + "out o[j, l] = sum(i: q[i] * S[i, j])\n",
     6, 10, "cannot tell which axis index 'l' runs over", {}),
    ("not-a-function", REC + "S[i, j] = exp(g[i]) * S[i, j] + k(i) * v[j]\n" + OUT,
     5, 33, "'k' is not a function", {}),
    # -- program structure ------------------------------------------------------------------
    ("state-never-updated", REC + "state z[K]\n" + UPDATE + OUT,
     5, 7, "state 'z' is never updated", {"hint": "add an update"}),
    ("no-output", REC + UPDATE, 5, 1, "the mixer has no output", {"hint": "out o[j] = ..."}),
    ("two-outputs", REC + UPDATE + OUT + "out p[j] = sum(i: k[i] * S[i, j])\n",
     7, 5, "a second output 'p'", {}),
    ("duplicate-declaration", REC + "input q[V]\n" + UPDATE + OUT,
     5, 7, "duplicate declaration of 'q' (first declared on line 2)", {}),
    ("update-an-input", REC + UPDATE + "k[i] = q[i]\n" + OUT,
     6, 1, "'k' is an input, not a state", {}),
    ("updated-twice", REC + UPDATE + UPDATE + OUT, 6, 1, "state 'S' is updated twice", {}),
    # -- linearity and causality --------------------------------------------------------------
    ("nonlinear-product", REC + "S[i, j] = S[i, j] * S[i, j] + k[i] * v[j]\n" + OUT,
     5, 11, "not linear in the state: 'S[i, j] * S[i, j]'", {}),
    ("nonlinear-function", REC + "S[i, j] = exp(S[i, j]) + k[i] * v[j]\n" + OUT,
     5, 11, "not linear in the state: 'exp(S[i, j])'", {}),
    ("mask-future-offset", ATT + "mask u <= t + 1\n" + ATT_OUT,
     4, 6, "the mask reads future tokens", {"hint": "u <= t"}),
    ("mask-future-only", ATT + "mask u > t\n" + ATT_OUT, 4, 6, "the mask reads future tokens", {}),
    ("future-token-read", REC + "S[i, j] = exp(g[i]) * S[i, j] + k[t + 1, i] * v[j]\n" + OUT,
     5, 35, "'k[t + 1, ...]' reads a future token", {"expected": "t minus a non-negative offset"}),
    ("softmax-score-without-u", ATT + "mask u <= t\nout o[j] = sum(u: softmax(u: 1) * v[u, j])\n",
     5, 30, "does not depend on the key token u", {}),
    # -- complex vs real ---------------------------------------------------------------------
    ("complex-output", CPX + "h[n] = h[n] + x\nout y = sum(n: h[n])\n",
     5, 16, "the output 'y' must be real, but 'h[n]' is complex", {"hint": "real(...)"}),
    ("complex-into-real-state", "size N = 4\ninput x[]\nstate h[N]\nh[n] = h[n] + 1j * x\nout y = sum(n: h[n])\n",
     4, 15, "a complex value where a real one is needed: state 'h' is real, but '1j' is complex",
     {"hint": "complex"}),
    ("elu-of-complex", CPX + "h[n] = h[n] + x\nout y = sum(n: elu(h[n]))\n",
     5, 20, "a complex value where a real one is needed (by elu)", {}),
    # -- where things may be used -------------------------------------------------------------
    ("random-outside-init", REC + "S[i, j] = exp(g[i]) * S[i, j] + normal(0, 1) * k[i] * v[j]\n" + OUT,
     5, 33, "random draw 'normal' is only allowed in a param or buffer initialiser", {}),
    ("head-outside-init", REC + "S[i, j] = exp(g[i]) * S[i, j] + head * k[i] * v[j]\n" + OUT,
     5, 33, "'head' (the head index) can only be used in a param or buffer initialiser", {}),
    ("condition-as-number", REC + "S[i, j] = exp(g[i]) * S[i, j] + (k[i] > 0) * v[j]\n" + OUT,
     5, 34, "a condition is used where a number is needed", {"hint": "where("}),
    ("let-self-reference", REC + "let w = w + 1\n" + UPDATE + OUT, 5, 9, "'w' is defined in terms of itself", {}),
    ("let-cycle", REC + "let a = b * 2\nlet b = a + 1\n" + UPDATE + OUT,
     6, 9, "'a' is defined in terms of itself (a -> b -> a)", {}),
    ("const-self-reference", REC + "const W = W + 1\n" + UPDATE + OUT,
     5, 11, "constant 'W' is defined in terms of itself", {}),
    ("recursive-def", REC + "def f(x) = f(x) + 1\n" + UPDATE + "out o[j] = f(sum(i: q[i] * S[i, j]))\n",
     5, 12, "function 'f' calls itself", {}),
    ("unknown-sampler", REC + "input z[] ~ sigmod\n" + UPDATE + OUT,
     5, 13, "unknown sampler 'sigmod' for input 'z'", {"hint": "did you mean 'sigmoid'?"}),
    ("unknown-size", REC + "input z[M]\n" + UPDATE + OUT,
     5, 9, "unknown size 'M' in the shape of 'z'", {"hint": "size M"}),
    ("unknown-size-named-axis", REC + "param A[n: N] = n\n" + UPDATE + OUT,
     5, 12, "unknown size 'N' in the shape of 'A'", {}),
    ("const-size-not-integer", "size P\nconst M = 2.5\ninput x[P]\nparam w[P, M] = 1\nstate h[P]\n"
     "h[p] = h[p] + sum(m: w[p, m]) * x[p]\nout y[p] = h[p]\n",
     4, 12, "constant 'M' is used as a size in the shape of 'w' and must be a positive integer", {}),
    ("token-axis-declared", "size T\ninput x[T]\nstate h[]\nh = h + x\nout y = h\n",
     2, 9, "'x' declares a token axis", {}),
    # -- syntax -------------------------------------------------------------------------------
    ("missing-paren-next-statement", REC + "S[i, j] = exp(g[i] * S[i, j] + k[i] * v[j]\n" + OUT,
     5, 14, "'(' is never closed", {"hint": "close it with ')'"}),
    ("missing-paren-eof", REC + UPDATE + "out o[j] = sum(i: q[i] * S[i, j]\n",
     6, 15, "unexpected end of file: '(' is never closed", {}),
    ("unexpected-eof", REC + UPDATE + "out o[j] =", 6, 11, "unexpected end of file", {}),
    ("unexpected-eof-newline", REC + UPDATE + "out o[j] = 2 *\n\n# the end\n", 6, 15, "unexpected end of file",
     {"hint": "incomplete"}),
    ("unexpected-end-of-line", REC + "S[i, j] = exp(g[i]) * S[i, j] +\n" + OUT, 5, 32, "unexpected end of line", {}),
    ("plus-equals", REC + "S[i, j] += k[i] * v[j]\n" + OUT,
     5, 9, "'+=' is not an operator", {"hint": "S[i, j] = S[i, j] + ..."}),
    ("stray-dollar", REC + "S[i, j] = exp(g[i]) * S[i, j] + k[i] * $v[j]\n" + OUT,
     5, 40, "unexpected character '$'", {}),
    ("stray-ampersand", ATT + "mask u <= t & u > t - 8\n" + ATT_OUT,
     4, 13, "unexpected character '&'", {"hint": "'and'"}),
    ("missing-operator", REC + "S[i, j] = exp(g[i]) * S[i, j] + k[i] v[j]\n" + OUT,
     5, 38, "missing operator before 'v'", {"hint": "'*'"}),
    ("missing-operator-number", REC + "S[i, j] = exp(g[i]) * S[i, j] + 2 k[i] * v[j]\n" + OUT,
     5, 35, "missing operator before 'k'", {}),
    ("unmatched-paren", REC + "S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j])\n" + OUT,
     5, 44, "unmatched ')'", {}),
    ("mismatched-bracket", REC + "S[i, j] = exp(g[i]] * S[i, j] + k[i] * v[j]\n" + OUT,
     5, 19, "']' does not match the '('", {}),
    ("assign-in-mask", ATT + "mask u = t\n" + ATT_OUT, 4, 8, "unexpected '='", {"hint": "'=='"}),
    # -- issue 17: internal errors and call-time failures that are now located compile errors --------
    ("no-input", "size V = 2\nparam w[V] = 1\nout o[j] = w[j]\n", 3, 5, "the mixer has no input", {}),
    ("log-of-zero", REC + UPDATE + "out o[j] = log(0) * sum(i: q[i] * S[i, j])\n", 6, 12,
     "log(0) is undefined", {}),
    ("zero-over-zero", REC + UPDATE + "out o[j] = 0 / 0 * sum(i: q[i] * S[i, j])\n", 6, 12,
     "0 / 0 is undefined", {}),
    ("floordiv-by-zero", REC + UPDATE + "out o[j] = 1 // 0 * sum(i: q[i] * S[i, j])\n", 6, 12,
     "1 // 0 is undefined", {}),
    ("zero-to-negative-power", REC + UPDATE + "out o[j] = 0 ** -0.5 * sum(i: q[i] * S[i, j])\n", 6, 12,
     "0 ** -0.5 is undefined", {}),
    ("overflowing-constant", REC + UPDATE + "out o[j] = exp(1000) * sum(i: q[i] * S[i, j])\n", 6, 12,
     "exp(1000) overflows", {}),
    ("4301-digit-literal", REC + UPDATE + "out o[j] = " + "1" * 4301 + " * sum(i: q[i] * S[i, j])\n", 6, 12,
     "is too large", {}),
    ("infinite-imaginary-literal", REC + UPDATE + "out o[j] = real(1e999j) * sum(i: q[i] * S[i, j])\n", 6, 17,
     "the number 1e999 is too large", {}),
    ("eye-same-index", REC + UPDATE + "out o[j] = sum(i: eye(i, i) * q[i] * S[i, j])\n", 6, 19,
     "eye(i, i) takes two different indices", {}),
    ("size-zero", "size K = 0, V\n" + REC.split("\n", 1)[1] + UPDATE + OUT, 1, 6,
     "size 'K' must be a positive integer, got 0", {}),
    ("input-named-form", REC.replace("v[V]\n", "v[V], form[K]\n") + UPDATE + OUT, 2, 25,
     "input 'form' has the name of a call keyword", {}),
    ("input-named-self", REC.replace("v[V]\n", "v[V], self[K]\n") + UPDATE + OUT, 2, 25,
     "has the name of a call keyword", {}),
    ("input-named-initial-state", REC.replace("v[V]\n", "v[V], initial_state[K]\n") + UPDATE + OUT, 2, 25,
     "has the name of a call keyword", {}),
    ("param-named-cu-seqlens", REC + "param cu_seqlens[] = 1\n" + UPDATE + OUT, 5, 7,
     "param 'cu_seqlens' has the name of a call keyword", {}),
    ("size-only-a-value", REC.replace("size K, V", "size K, V, W") + UPDATE
     + "out o[j] = W * sum(i: q[i] * S[i, j])\n", 6, 12, "size 'W' is used as a value but no tensor has it",
     {"hint": "size W = "}),
    ("size-named-H", "size H\n" + REC + UPDATE + OUT, 1, 6, "'H' is a reserved name", {"hint": "number of heads"}),
    ("H-outside-initialiser", REC + UPDATE + "out o[j] = H * sum(i: q[i] * S[i, j])\n", 6, 12,
     "'H' (the number of heads) can only be used in a param or buffer initialiser", {}),
    ("lone-surrogate", REC + "# \ud800\n" + UPDATE + OUT, 5, 3, "not a character", {}),
    ("too-deep", REC + UPDATE + "out o[j] = sum(i: q[i] * S[i, j]) * (" + "+".join(["v[j]"] * 150) + ")\n",
     6, 1, "nested too deeply", {}),
]


@pytest.mark.parametrize(("src", "line", "col", "phrase", "extra"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_malformed(src, line, col, phrase, extra):
    err = load_error(src)
    text = str(err)
    assert err.pos is not None, text
    assert (err.pos.line, err.pos.col) == (line, col), text
    assert phrase in err.message, text
    assert text.startswith(f"bad.mix:{line}:{col}: error: "), text
    assert src.split("\n")[line - 1] in text.split("\n")[1], text  # the source line is shown ...
    assert caret_line(col) in text, text  # ... with a caret under the column
    for key, want in extra.items():
        got = getattr(err, key)
        assert got is not None and want in got, text


def test_case_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


def test_caret_spans_the_offending_name():
    err = load_error(REC + "S[i, j] = exp(g[i]) * S[i, j] + kk[i] * v[j]\n" + OUT)
    assert caret_line(33) + "~\n" in str(err)  # '^~' under 'kk', not under all of 'kk[i]'


def test_unknown_constant_passed_to_load():
    src = REC + UPDATE + OUT
    err = load_error(src, Q=3)
    assert "unknown constant 'Q' passed to load" in err.message
    assert err.expected is not None and "K, V" in err.expected
    assert err.pos is None  # it is not in the file: no line to show
    assert str(err).startswith("bad.mix: error: unknown constant 'Q'")
    err = load_error(Path(EXAMPLES[0]).parent.joinpath("sliding_window_attention.mix").read_text(), w=3)
    assert err.hint == "did you mean 'W'?"


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_bad_size_passed_to_load(value):
    err = load_error(REC + UPDATE + OUT, K=value)
    assert (err.pos.line, err.pos.col) == (1, 6)
    assert "size 'K' must be a positive integer" in err.message
    assert caret_line(6) in str(err)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_constant_passed_to_load(value):
    src = ATT + "const W = 8\nmask t - W < u <= t\n" + ATT_OUT
    err = load_error(src, W=value)
    assert (err.pos.line, err.pos.col) == (4, 7)
    assert "must be a finite number" in err.message


def test_every_example_loads():
    assert len(EXAMPLES) >= 10
    for path in EXAMPLES:
        mixc.load(path)


def _mutate(text: str, rng: random.Random) -> str:
    chars = list(text)
    alphabet = "abijkqtuvSKV019 +-*/%()[],:=~<>!.#\n$j_"
    for _ in range(rng.randint(1, 3)):
        p = rng.randrange(len(chars) + 1)
        r = rng.random()
        if r < 0.4 and chars:
            del chars[min(p, len(chars) - 1)]
        elif r < 0.8:
            chars.insert(p, rng.choice(alphabet))
        else:
            q = rng.randrange(len(chars) + 1)
            chars[p:p] = chars[q : q + rng.randint(1, 8)]
    return "".join(chars)


def test_only_mixerror_escapes():
    """Truncated and mutated examples, garbage and all the cases above: load, or raise MixError."""
    rng = random.Random(20240611)
    inputs = [c[1] for c in CASES]
    inputs += ["", "\n", "#", "(", ")", "[", "]", "=", "~", "out", "out o", "out o =", "mixer", "size",
               "size K = 0", "state", "$$$", "\\", "'", "\x00", "\t\x0c\n", "1j", "out o = 1j", "out o = 1 +* 2",
               "out o = ((((", "out o = sum(", "out o = sum(i:", "mask", "def f(", "let = 1", "\u00e9 = 1"]
    deep_lets = "".join(f"let a{n}[j] = a{n - 1}[j] + 1\n" for n in range(1, 400))
    inputs += [REC + UPDATE + "let a0[j] = v[j]\n" + deep_lets + "out o[j] = a399[j]\n",
               REC + UPDATE + "out o[j] = " + "-" * 3000 + "v[j]\n",
               REC + UPDATE + "out o[j] = " + "exp(" * 1000 + "v[j]" + ")" * 1000 + "\n",
               REC + UPDATE + "const Z = 10 ** 10 ** 10\n" + OUT]
    inputs += ["".join(rng.choice("abcijkstuvSK (),:=+-*/[]~<>\n#0123.j") for _ in range(rng.randint(1, 60)))
               for _ in range(40)]
    for path in EXAMPLES:
        text = path.read_text()
        inputs += [text[: rng.randrange(len(text) + 1)] for _ in range(12)]
        inputs += [_mutate(text, rng) for _ in range(12)]
    for src in inputs:
        try:
            mixc.loads(src, path="bad.mix")
        except mixc.MixError as err:
            str(err)  # rendering never fails either
        except Exception as err:  # pragma: no cover - the failure report
            pytest.fail(f"{type(err).__name__}: {err}\n--- input ---\n{src}")


def test_a_huge_lookback_is_a_located_error():
    src = next(p for p in EXAMPLES if p.stem == "h3").read_text().replace("const M = 4", "const M = 10 ** 30")
    with pytest.raises(mixc.MixError) as e:
        mixc.loads(src, "h3big.mix")
    # 10 ** 30 does not fit in 64 bits: a float, so not a size (before: an integer, then too many offsets)
    msg = e.value.message
    assert ("too many offsets" in msg or "positive integer below 2**63" in msg) and e.value.pos is not None


@pytest.mark.parametrize("value", [99999999999999999999999, -(2**63)])
def test_a_constant_beyond_64_bits_is_a_located_error(value):
    src = REC + "const W = 2\n" + UPDATE + "out o[j] = W * sum(i: q[i] * S[i, j])\n"
    err = load_error(src, W=value)
    assert (err.pos.line, err.pos.col) == (5, 7) and "does not fit in 64 bits" in err.message
    err = load_error(REC + UPDATE + OUT, K=value)
    assert (err.pos.line, err.pos.col) == (1, 6) and "must be a positive integer" in err.message


def test_number_like_constants_are_plain_numbers():
    """numpy scalars and IntEnum members passed to load are their numbers (before: NameError 'np' and a
    SyntaxError in the generated module)."""
    import enum

    import numpy as np
    import torch

    class Width(enum.IntEnum):
        THREE = 3

    src = "size V = 2\nconst W = 1\ninput v[V]\nout o[j] = W * v[j]\n"
    for value in (np.float64(3), np.int64(3), np.float32(3), Width.THREE):
        m = mixc.loads(src, W=value)
        assert type(m.program.consts[0][1]) in (int, float) and m.program.consts[0][1] == 3
        x = m.random_inputs(1, 2, 1)
        torch.testing.assert_close(m(**x), 3 * x["v"])


def test_finite_constants_that_used_to_fail_at_call_time():
    """const BIG = 1e30 (was: int too big to convert at call time); where() on sizes (was: KeyError 'where');
    a literal beyond 64 bits is a float."""
    import torch

    src = "size V = 2\nconst BIG = 1e30\ninput v[V]\nout o[j] = {} * v[j]\n"
    for expr, want in [("BIG", 1e30), ("where(V > 0, 0, V)", 0.0), ("where(V > 5, 0, V)", 2.0),
                       ("where(V > 0 and not V > 5, 7, V)", 7.0), ("99999999999999999999999", 1e23),
                       ("real(2j + 1)", 1.0), ("imag(2j + 1)", 2.0)]:
        m = mixc.loads(src.format(expr))
        x = m.random_inputs(1, 3, 1, dtype=torch.float64)
        torch.testing.assert_close(m(**x), want * x["v"], msg=expr)


def test_a_size_read_only_as_a_value_takes_its_default():
    import torch

    m = mixc.loads("size K, V = 5\ninput k[K]\nout o[i] = k[i] * V\n")
    x = m.random_inputs(1, 3, 1, K=2)
    torch.testing.assert_close(m(**x), 5 * x["k"])


def test_a_nonlinear_function_of_a_state_read_in_the_output():
    """o = q'S + tanh(q'S): was an internal error (KeyError 'S') while emitting the chunked form. The readout
    is not linear in the state, so the analysis offers no chunked form (and says why) and no emitter fails."""
    import warnings

    import torch

    src = REC + UPDATE + "out o[j] = sum(i: q[i] * S[i, j]) + tanh(sum(i: q[i] * S[i, j]))\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an emitter that fails warns: none may here
        m = mixc.loads(src, K=3, V=2)
    assert "chunked" not in m.analysis.forms and "not linear in the states" in m.analysis.reasons["chunked"]
    x = m.random_inputs(1, 4, 1, dtype=torch.float64)
    S = torch.zeros(3, 2, dtype=torch.float64)
    want = []
    for t in range(4):
        S = torch.exp(x["g"][0, t, 0])[:, None] * S + x["k"][0, t, 0][:, None] * x["v"][0, t, 0][None, :]
        r = x["q"][0, t, 0] @ S
        want.append(r + torch.tanh(r))
    torch.testing.assert_close(m(**x)[0, :, 0], torch.stack(want))
    torch.testing.assert_close(m.reference(**x)[0, :, 0], torch.stack(want))
