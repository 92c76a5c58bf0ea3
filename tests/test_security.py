"""Nothing a file name, a path or a header comment holds can run as code or break the generated module;
the module cache survives a directory it cannot write and entries that were corrupted."""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import pytest
import torch

import mixc
from mixc import cli, emit

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"

TINY = """\
size K = 2, V = 3
input k[K], v[V]
out o[j] = sum(i: k[i]) * v[j]
"""

# File names (stems) an attacker could choose; each would create the marker file PWNED if it ran.
EVIL_STEMS = [
    'x"""if __import__("os").system("touch PWNED") else """',
    "x'''if __import__('os').system('touch PWNED') else '''",
    'a"\nimport os; os.system("touch PWNED")\n#',
    "a\\\nimport os; os.system('touch PWNED')",
    "a\r__import__('os').system('touch PWNED')",
    "é ü \u2028 \u00a0 name",
    "x" * 240,
    "9lives",
    "-",
]


def _no_marker(where: Path) -> None:
    assert not (where / "PWNED").exists(), "a file name ran as code"


@pytest.mark.parametrize("stem", EVIL_STEMS)
def test_a_file_stem_never_runs_and_names_an_identifier(tmp_path, monkeypatch, stem):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    try:
        path = d / f"{stem}.mix"
        path.write_text(TINY)
    except OSError:  # a name this file system refuses: loads(path=...) still sees it
        path = None
    m = mixc.load(path) if path is not None else mixc.loads(TINY, path=f"{stem}.mix")
    assert m.name.isidentifier() and m.name.isascii() and len(m.name) <= 64
    x = m.random_inputs(1, 2, 1)
    assert m(**x).shape == (1, 2, 1, 3)
    _no_marker(tmp_path)


@pytest.mark.parametrize("path", [
    'x"""if __import__("os").system("touch PWNED") else """.mix',
    'dir"""\n__import__("os").system("touch PWNED")\n"""/m.mix',
    "dir\\'\n__import__('os').system('touch PWNED')#/m.mix",
    "dir\x00/m.mix",
])
def test_loads_path_never_reaches_the_source_unescaped(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    m = mixc.loads(TINY, path=path)
    assert m.name.isidentifier()
    assert m._module.MIXER["source"] == path
    head = m.source_code.split('"""', 1)[0]
    assert all(line.startswith("#") for line in head.splitlines()), "the path broke out of its comment"
    _no_marker(tmp_path)


def test_the_stem_is_sanitised_and_the_mixer_statement_wins():
    assert mixc.loads(TINY, path="my-mixer.mix").name == "my_mixer"
    assert mixc.loads(TINY, path="dir/3d.mix").name == "_3d"
    assert mixc.loads(TINY).name == "mixer"
    assert mixc.loads("mixer named\n" + TINY, path="my-mixer.mix").name == "named"


HEADERS = [
    r"# \x41 and \N{LATIN SMALL LETTER A} and \N{nope} and \u12 and \ ",
    "# a NUL \x00 here",
    '# """ closes it',
    '# ends in a quote"',
    "# ''' too",
    "# a backslash at the end \\",
    "# carriage\rreturn and a form feed \x0c and \x1b[31m escape",
    "# \u2028 line separator",
]


@pytest.mark.parametrize("header", HEADERS)
def test_a_header_comment_gives_an_importable_module(header):
    m = mixc.loads(header + "\n#\n" + TINY, path="h.mix")
    doc = m._module.__doc__
    assert doc.startswith(header[2:].strip() + "\n")  # the comment, exactly
    assert m(**m.random_inputs(1, 2, 1)).shape == (1, 2, 1, 3)


@pytest.mark.parametrize("header", HEADERS)
def test_compile_writes_a_module_that_imports(tmp_path, header):
    src = tmp_path / "h.mix"
    src.write_text(header + "\n" + TINY)
    out = tmp_path / "h_mod.py"
    assert cli.main(["compile", str(src), "-o", str(out)]) == 0
    spec = importlib.util.spec_from_file_location("h_mod", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = {"k": torch.randn(1, 2, 1, 2), "v": torch.randn(1, 2, 1, 3)}
    assert mod.forward(**x).shape == (1, 2, 1, 3)


def test_compile_never_writes_a_module_that_does_not_compile(tmp_path, monkeypatch, capsys):
    src = tmp_path / "m.mix"
    src.write_text(TINY)
    out = tmp_path / "m.py"
    monkeypatch.setattr(emit, "module_source", lambda p: "def broken(:\n")
    assert cli.main(["compile", str(src), "-o", str(out)]) == 1
    assert not out.exists()
    assert "does not compile" in capsys.readouterr().err


def test_docstring_literal_round_trips_any_text():
    import ast

    for text in ['"', '""', '"""', 'a"', '\\', '\\"""\\', "\x00\r\n\t\ud800\udfff", "\\N{x}", "x" * 10]:
        assert ast.literal_eval(emit.docstring_literal(text)) == text


# ---- the module cache ------------------------------------------------------------------------------


def _gla_runs_chunked(K: int) -> None:
    """A fresh compile of gla (K picks a module not loaded before), run by its Triton kernels: needs a real
    file for @jit."""
    m = mixc.load(EX / "gla.mix", K=K)
    x = m.random_inputs(1, 3, 1, V=2)
    assert "chunked" in m.forms
    torch.testing.assert_close(m(**x, form="chunked"), m.reference(**x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["/proc/mixc-cache", "a-file/below", "x" * 300])
def test_an_unwritable_cache_falls_back_to_a_private_directory(tmp_path, monkeypatch, where):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("MIXC_CACHE_DIR", where if where.startswith("/") else str(tmp_path / where))
    monkeypatch.setattr(emit, "_loaded", {})
    _gla_runs_chunked(K=3)
    m = mixc.load(EX / "gla.mix", K=3)
    assert Path(m._module.__file__).parent == emit.private_dir()


def test_a_too_long_mixer_name_still_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXC_CACHE_DIR", str(tmp_path))
    long = "m" * 240
    text = (EX / "gla.mix").read_text().replace("mixer gla", f"mixer {long}")
    m = mixc.loads(text, K=5)
    assert m.name == long and "chunked" in m.forms
    x = m.random_inputs(1, 3, 1, V=2)
    torch.testing.assert_close(m(**x, form="chunked"), m.reference(**x), rtol=1e-4, atol=1e-5)


def _entry(tmp_path: Path, m) -> Path:
    files = [f for f in tmp_path.iterdir() if f.suffix == ".py" and f.name.startswith("mixc_gen_gla_")]
    assert len(files) == 1
    return files[0]


@pytest.mark.parametrize("damage", ["bad-utf8", "truncated", "bad-pyc"])
def test_a_corrupted_cache_entry_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("MIXC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(emit, "_loaded", {})
    m = mixc.load(EX / "gla.mix", K=6)
    entry = _entry(tmp_path, m)
    good = entry.read_bytes()
    if damage == "bad-utf8":
        entry.write_bytes(b"\xff\xfe\x00 not python" + good[:100])
    elif damage == "truncated":
        entry.write_bytes(good[: len(good) // 2])
    else:  # a .pyc whose header matches the source (mtime, size) but whose code is garbage
        cache = entry.parent / "__pycache__"
        cache.mkdir(exist_ok=True)
        st = os.stat(entry)
        pyc = cache / f"{entry.stem}.{importlib.util.cache_from_source(str(entry)).split('.')[-2]}.pyc"
        pyc.write_bytes(importlib.util.MAGIC_NUMBER + struct.pack("<III", 0, int(st.st_mtime) & 0xFFFFFFFF,
                                                                  st.st_size & 0xFFFFFFFF) + b"\xffgarbage")
    monkeypatch.setattr(emit, "_loaded", {})
    _gla_runs_chunked(K=6)
    assert entry.read_bytes() == good
