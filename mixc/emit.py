"""Assemble a standalone Python module for a program (the last pass before running).

The module needs only torch (and triton once kernel forms exist). It holds the mixer's
metadata, the call-time support of :mod:`mixc.backends.runtime` pasted in, and one function
per available form. Its bytes depend only on the program, so it is cached by content hash.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import linecache
import os
import pprint
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from . import __version__
from .backends import reference, runtime
from .backends.registry import SHORT_T
from .history import history_name, token_history
from .ir import Program


def _header_comment(text: str) -> list[str]:
    """The comment block that opens the .mix file (its maths and paper)."""
    out = []
    for line in text.split("\n"):  # lines as the parser counts them: a comment runs to the next '\n'
        s = line.strip()
        if s.startswith("#"):
            out.append(s[1:].strip() if s[1:2] == " " or s == "#" else s[1:])
        elif s:
            break
    return out


def metadata(p: Program) -> dict:
    """What the runtime needs to bind a call, as plain data."""

    def axes(d):
        return {"axes": list(d.axes)}

    consts = dict(p.consts)
    all_axes = {a for d in p.inputs + p.params + p.buffers + p.states for a in d.axes}
    history = token_history(p)
    decls = {d.name: d for d in p.inputs}
    hidden = {history_name(n): {"axes": [history_name(n), *decls[n].axes], "complex": False} for n in history}
    from .backends.attention.plan import CACHE_AXIS, cache_meta

    cache = cache_meta(p)  # attention form: the key/value cache is the state ({} otherwise)
    return {
        "name": p.name,
        "source": p.source.path,
        "sizes": {n: d for n, d in p.sizes} | ({CACHE_AXIS: 0} if cache else {}),
        "consts": consts,
        "consts_as_sizes": {**{n: int(v) for n, v in consts.items() if n in all_axes},
                            **{history_name(n): L for n, L in history.items()}},
        "inputs": {d.name: {**axes(d), "sampler": d.sampler} for d in p.inputs},
        "params": {d.name: axes(d) for d in p.params},
        "buffers": {d.name: axes(d) for d in p.buffers},
        "states": {**{d.name: {**axes(d), "complex": d.complex} for d in p.states}, **hidden, **cache},
        "output": {"name": p.output.target, "axes": [v.axis for v in p.output.vars]},
        "forms": ["reference"],
    }


def _comment(text: str) -> str:
    """``text`` for a ``#`` comment: one line, printable (a path's quotes, newlines and escapes as ``repr`` writes
    them, so nothing in it can end the comment)."""
    shown = repr(str(text))[1:-1]
    return shown if shown.isprintable() else ascii(str(text))[1:-1]


def docstring_literal(text: str) -> str:
    """A triple-quoted Python literal whose value is ``text`` exactly, for any text: backslashes, quotes that would
    close it, NULs, control characters and lone surrogates are escaped; ordinary text (newlines included) is kept
    as it reads."""
    out = []
    for i, c in enumerate(text):
        if c == "\\":
            out.append("\\\\")
        elif c == '"' and (i + 1 == len(text) or text[i + 1] == '"' or (i > 0 and text[i - 1] == '"')):
            out.append('\\"')
        elif c == "\n" or c == "\t" or (c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF):
            out.append(c)
        else:
            out.append(ascii(c)[1:-1])  # \x00, \r, \u2028, \ud800, ...
    return '"""' + "".join(out) + '"""'


def _strip_module_docstring(src: str) -> str:
    """Drop a module's leading docstring (the pasted text keeps its code and comments)."""
    s = src.lstrip()
    if s.startswith('"""'):
        end = s.index('"""', 3)
        return s[end + 3 :].lstrip("\n")
    return src


def form_plan(p: Program, analysis=None):
    """(analysis, the :class:`~mixc.backends.registry.FormPlan`) for program ``p``: which forms are
    emitted, by which backend, and the default among them."""
    from .analysis import analyse
    from .backends.registry import plan_forms

    a = analysis if analysis is not None else analyse(p)
    try:
        return a, plan_forms(a)
    except Exception as err:  # a bug in a backend's emitter: the file still runs, by its reference
        if os.environ.get("MIXC_DEBUG"):
            raise
        from .backends.registry import FormPlan

        why = f"its emitter failed ({type(err).__name__}: {err}); this is a bug in mixc"
        warnings.warn(f"mixer '{p.name}': {why}; running the reference only", RuntimeWarning, stacklevel=2)
        return a, FormPlan(not_emitted={f: why for f in a.forms}, default="reference",
                           default_reason=f"no kernel form: {why}")


def module_source(p: Program, analysis=None, plan=None) -> str:
    """The full text of the standalone module for program ``p`` (deterministic). ``analysis`` and
    ``plan`` are ``analyse(p)`` and its form plan when the caller already has them."""
    text = p.source.text
    digest = hashlib.sha256(text.encode()).hexdigest()
    about = _header_comment(text)
    if plan is None:
        analysis, plan = form_plan(p, analysis)
    forms = plan.forms
    default = plan.default
    meta = metadata(p)
    meta["forms"] = forms
    meta["default_form"] = default
    meta["default_reason"] = plan.default_reason
    meta["not_emitted"] = dict(plan.not_emitted)
    meta["short_sequences"] = {"form": plan.short_form, "max_T": SHORT_T} if plan.short_form else None
    needs = "torch and triton" if any(b.triton for b, _ in plan.emitted.values()) else "only torch"
    doc = "\n".join(about) if about else f"Mixer '{p.name}'."
    doc += "\n\n" + (
        "Call ``forward(**inputs, initial_state=None, output_final_state=False, cu_seqlens=None)``;\n"
        "inputs are [B, T, H, ...] tensors, parameters [H, ...] (defaults from ``init_params``).\n")
    lines = [
        f"# Generated by mixc {__version__} from {_comment(p.source.path)} (mixer {p.name!r}).",
        f"# Source sha256: {digest}",
        f"# Constants: {_comment(', '.join(f'{k}={v!r}' for k, v in p.consts) or '(none)')}",
        f"# Forms: {', '.join(forms)} (default {default}). Do not edit: regenerate with `mixc compile`. "
        f"Needs {needs}.",
        docstring_literal(doc),
        "",
        "import os as _os",
        "",
        "# How triton.jit built this module's kernels: for the interpreter (TRITON_INTERPRET=1 when the module was",
        "# imported) or compiled for a GPU. Setting the variable later does not change the kernels.",
        "TRITON_INTERPRETED = _os.environ.get('TRITON_INTERPRET', '0') == '1'",
        "",
        "# ---- call-time support (mixc/backends/runtime.py) ----",
        _strip_module_docstring(inspect.getsource(runtime)).rstrip(),
        "",
        "# ---- reference form helpers ----",
        reference.PRELUDE.strip("\n"),
        "",
    ]
    for mod in plan.support():
        rel = mod.__name__.replace("mixc.backends", "backends").replace(".", "/")
        lines += [
            f"# ---- {mod.__name__.rsplit('.', 1)[-1]} ({'mixc/' + rel}.py) ----",
            _strip_module_docstring(inspect.getsource(mod)).rstrip(),
            "",
        ]
    lines += [
        "",
        "MIXER = " + pprint.pformat(meta, sort_dicts=True, width=100),
        "",
        "",
    ]
    lines += reference.emit_reference(p)
    table = []
    triton_forms = [f for f in forms[:-1] if plan.emitted[f][0].triton]
    for form in forms[:-1]:
        backend, form_lines = plan.emitted[form]
        lines += ["", ""]
        lines += form_lines
        if backend.native_varlen:
            lines += ["", "", f"{form}.native_varlen = True  # runs packed sequences (cu_seqlens) in one launch"]
        table.append(f'"{form}": {form}')
    form_table = "{" + ", ".join(table + ['"reference": reference']) + "}"
    lines += [
        "",
        "",
        f"FORMS = {form_table}",
        'KERNEL_FORMS = ("chunked", "recurrent", "fft", "attention")',
        f"TRITON_FORMS = ({''.join(repr(f) + ', ' for f in triton_forms).rstrip()})  # forms whose kernels are Triton",
        "",
        "",
        "def pick_form(form, inputs):",
        '    """The form to run: ``form`` if given, else the default when the inputs are on CUDA (or the Triton',
        '    interpreter is on) and not float64 (the kernels compute in float32), else the reference. A form of',
        '    plain PyTorch (not in TRITON_FORMS) runs anywhere."""',
        "    name = form or MIXER['default_form']",
        "    short = MIXER['short_sequences']",
        "    if form is None and short is not None and inputs:",
        "        x = next(iter(inputs.values()))",
        "        if getattr(x, 'ndim', 0) >= 2 and x.shape[1] <= short['max_T']:",
        "            name = short['form']  # a short sequence (decoding): see 'short sequences' in mixc explain",
        "    if name not in FORMS:",
        "        raise MixerCallError(f\"form {name!r} is not available for mixer {MIXER['name']!r}; \"",
        "                             f\"available: {', '.join(FORMS)}\")",
        "    if name in KERNEL_FORMS:",
        "        if form is None and any(getattr(x, 'dtype', None) == torch.float64 for x in inputs.values()):",
        "            return 'reference'  # the kernels compute in float32; float64 asks for the exact meaning",
        "        on_gpu = any(getattr(x, 'is_cuda', False) for x in inputs.values())",
        "        if not on_gpu and not TRITON_INTERPRETED:",
        "            if form is None:",
        "                return 'reference'",
        "            if name in TRITON_FORMS:",
        "                late = _os.environ.get('TRITON_INTERPRET', '0') == '1'",
        "                why = \" (it was set after this mixer's kernels were built for a GPU)\" if late else \"\"",
        "                raise MixerCallError(f\"form {name!r} runs Triton kernels: pass CUDA tensors, or set \"",
        "                                     \"TRITON_INTERPRET=1 before loading the mixer to run them on CPUs\"",
        "                                     + why)",
        "    return name",
        "",
        "",
        "def forward(*, initial_state=None, output_final_state=False, cu_seqlens=None, form=None, **inputs):",
        '    """Run the mixer. ``form`` picks one of FORMS (default: see ``pick_form``)."""',
        "    name = pick_form(form, inputs)",
        "    return run_call(MIXER, FORMS[name], inputs, initial_state, output_final_state, cu_seqlens, init_params)",
        "",
    ]
    return "\n".join(lines)


def cache_dir() -> Path | None:
    """Where generated modules are cached (``$MIXC_CACHE_DIR``, else ~/.cache/mixc), or None when it cannot be
    made."""
    d = os.environ.get("MIXC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mixc")
    try:
        Path(d).mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError):
        return None
    return Path(d)


_private: list[Path] = []


def private_dir() -> Path | None:
    """A temporary directory of this process (mode 0700, removed at exit): where generated modules go when the
    cache cannot be written. Triton's ``@jit`` reads a kernel's source from its file, so a module needs one."""
    if not _private:
        try:
            _private.append(Path(tempfile.mkdtemp(prefix="mixc-")))
        except OSError:
            return None
        atexit.register(shutil.rmtree, str(_private[0]), True)
    return _private[0]


class GeneratedCodeError(RuntimeError):
    """The generated module does not compile: a bug in mixc (never written, never imported)."""


def check_source(source: str, filename: str = "<mixc generated module>"):
    """Compile generated source (the code object), or raise :class:`GeneratedCodeError` saying why not."""
    try:
        return compile(source, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as err:
        raise GeneratedCodeError(f"internal error: the generated module does not compile ({err}); "
                                 "this is a bug in mixc") from None


def _write_cached(d: Path, file_name: str, source: str) -> Path | None:
    """``d/file_name`` holding exactly ``source`` (written atomically when absent or different: a corrupted entry
    is rebuilt), or None when that cannot be done."""
    path = d / file_name
    data = source.encode("utf-8")
    try:
        if path.is_file() and path.read_bytes() == data:
            return path
        tmp = path.with_name(f".{file_name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        if path.read_bytes() != data:
            return None
    except (OSError, ValueError):
        return None
    linecache.checkcache(str(path))
    return path


_loaded: dict[str, ModuleType] = {}


def load_module(source: str, name: str) -> ModuleType:
    """Import generated source, cached on disk and in memory under its content hash.

    The source is compiled before anything is written (:class:`GeneratedCodeError` if it does not compile). It
    is executed from its file in the cache (``cache_dir``), else in a private temporary directory, compiled
    from the text each time (no ``.pyc``: a corrupted one cannot break a load)."""
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:20]
    if digest in _loaded:
        return _loaded[digest]
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)[:40]
    mod_name = f"mixc_gen_{safe}_{digest}"
    code = check_source(source, f"<mixc {safe}>")
    path = None
    for d in (cache_dir(), private_dir()):
        if d is not None and (path := _write_cached(d, f"{mod_name}.py", source)) is not None:
            code = compile(source, str(path), "exec", dont_inherit=True)
            break
    # Another module object under this name (a cleared in-memory cache loads the text again): a name of its own,
    # since torch.compile and Triton find a function's globals through sys.modules[fn.__module__].
    base, n = mod_name, 1
    while mod_name in sys.modules:
        n += 1
        mod_name = f"{base}_{n}"
    module = ModuleType(mod_name)
    if path is not None:
        module.__file__ = str(path)
    sys.modules[mod_name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    _loaded[digest] = module
    return module
