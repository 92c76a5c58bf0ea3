"""The ``mixc`` command line: ``check``, ``explain``, ``compile`` and ``run``.

Every subcommand takes ``--help``. Problems in a ``.mix`` file (or in how it is called) are
printed to stderr as rendered diagnostics and exit with status 1; usage errors exit with 2
(argparse). A Python traceback is shown only for a bug in mixc itself, and only when
``MIXC_TRACEBACK=1`` is set; otherwise such a bug is reported in one line too.

Structure: one ``_add_<command>`` function builds each subparser and one ``cmd_<command>``
function runs it; ``explain_text`` is the text ``mixc explain`` prints, so more views of a
mixer (analysis, ``--json``, ``--graph``) slot in next to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .errors import MixError

DTYPES = ("float32", "float64", "float16", "bfloat16")
DEFAULT_SIZE = 16  # for a size with no default in the file and none given with --size


class CliError(Exception):
    """A user-facing error that is not located in a .mix file (printed as ``mixc: error: ...``)."""


# ---- argument types ----------------------------------------------------------------------------


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _assignment(kind: str, convert):
    def parse(text: str):
        name, eq, value = text.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier():
            raise argparse.ArgumentTypeError(f"{kind} must look like NAME=VALUE, got {text!r}")
        try:
            return name, convert(value.strip())
        except ValueError:
            what = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"{kind} {name}: VALUE must be {what}, got {value!r}") from None

    parse.__name__ = kind  # argparse names the type in its messages
    return parse


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _add_defines(p: argparse.ArgumentParser) -> None:
    p.add_argument("-D", "--define", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                   type=_assignment("-D", _number),
                   help="override a declared constant or size (value parsed as int, else float); repeatable")


# ---- loading -----------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise MixError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MixError(f"cannot read {path}: not UTF-8 text (byte {err.start})") from None


def load_program(path: str, defines=()):
    """Parse and lower one file (no code generation). Raises :class:`MixError`."""
    from .api import compile_program

    return compile_program(_read(path), path, **dict(defines))


def load_mixer(path: str, defines=()):
    """Compile one file all the way to a runnable :class:`mixc.Mixer`. Raises :class:`MixError`."""
    from .api import Mixer

    return Mixer(load_program(path, defines))


# ---- check -------------------------------------------------------------------------------------


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="compile .mix files and report errors",
                       description="Compile each FILE (parse, lower, verify, generate code) and print "
                                   "'FILE: ok (mixer NAME)' or its diagnostics. Exits 1 if any file fails.")
    p.add_argument("files", nargs="+", metavar="FILE", help="a .mix file")
    p.set_defaults(run=cmd_check)


def cmd_check(args) -> int:
    status = 0
    for path in args.files:
        try:
            m = load_mixer(path)
        except MixError as err:
            _eprint(str(err))
            status = 1
            continue
        except Exception as err:  # a bug in mixc: report it for this file and go on
            _internal_error(err, path)
            status = 1
            continue
        print(f"{path}: ok (mixer {m.name})")
    return status


# ---- explain -----------------------------------------------------------------------------------


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="print the IR and the analysis of a mixer",
                       description="Compile FILE and print its typed IR (declarations, parameter "
                                   "initialisers, the key-token mask, the state step and the output), then "
                                   "the analysis: normal form, transition class, separability, time "
                                   "invariance, and the legal forms with the reason for each.")
    p.add_argument("file", metavar="FILE", help="a .mix file")
    p.add_argument("--json", action="store_true",
                   help="print the analysis as JSON (forms, default_form, separable, feature_width, "
                        "transition, time_invariant, reasons, ...)")
    p.add_argument("--graph", metavar="OUT",
                   help="also write the dataflow graph to OUT.dot (and OUT.png when matplotlib is installed)")
    _add_defines(p)
    p.set_defaults(run=cmd_explain)


def _plan_lines(mixer) -> list[str]:
    """The emitted forms' plan lines (``describe`` of each backend that has one)."""
    out = []
    for form, (backend, _) in mixer.plan.emitted.items():
        if backend.describe is not None:
            lines = backend.describe(mixer.analysis)
            if lines:
                out.append(f"  {form} kernels:" + "".join(f"\n    {line}" for line in lines))
    return out


def explain_text(mixer) -> str:
    """What ``mixc explain`` prints for a compiled :class:`mixc.Mixer`: the IR, then the analysis, then
    what was emitted (a legal form that was not, with the reason) and the default as it runs."""
    from .ir import format_program

    plan = mixer.plan
    out = [format_program(mixer.program), "", mixer.analysis.explain(),
           f"  emitted: {', '.join(mixer.forms)} (run with form=...; 'reference' is the plain-PyTorch meaning)"]
    out += [f"  not emitted: {f} -- {why}" for f, why in plan.not_emitted.items()]
    if plan.default != mixer.analysis.default_form:
        out.append(f"  runs by default: {plan.default} -- {plan.default_reason}")
    if plan.short_form:
        out.append(f"  short sequences: {plan.short_reason}")
    out += _plan_lines(mixer)
    return "\n".join(out)


def explain_json(mixer) -> dict:
    """What ``mixc explain --json`` prints: the analysis, what was emitted, and ``<form>_plan`` for each emitted
    form whose backend describes its plan (``chunked_plan`` is always there, empty when not emitted)."""
    plan = mixer.plan
    plans = {f"{form}_plan": backend.describe(mixer.analysis) if backend.describe else []
             for form, (backend, _) in plan.emitted.items()}
    return {**mixer.analysis.to_json(), "emitted_forms": mixer.forms, "default_form": plan.default,
            "analysis_default_form": mixer.analysis.default_form, "default_reason": plan.default_reason,
            "not_emitted": dict(plan.not_emitted), "short_sequences": mixer.meta.get("short_sequences"),
            "chunked_plan": [], **plans}


def cmd_explain(args) -> int:
    mixer = load_mixer(args.file, args.defines)
    if args.json:
        import json

        print(json.dumps(explain_json(mixer), indent=2))
    else:
        print(explain_text(mixer))
    if args.graph:
        from .graph import write_graph

        try:
            written = write_graph(mixer.program, args.graph)
        except OSError as err:
            raise CliError(f"cannot write the graph {args.graph}: {err.strerror or err}"
                           + (f" ({err.filename})" if err.filename else "")) from None
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0


# ---- compile -----------------------------------------------------------------------------------


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="write a standalone Python module for a mixer",
                       description="Compile FILE to a standalone Python module that does not need mixc: "
                                   "torch, and triton when the mixer has a kernel form (chunked, ...); the "
                                   "module's first lines say which. Call its forward(**inputs, "
                                   "initial_state=None, output_final_state=False, cu_seqlens=None, form=None). "
                                   "The module is compiled before it is written: nothing is written if it "
                                   "would not import.")
    p.add_argument("file", metavar="FILE", help="a .mix file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.py", help="where to write the module")
    _add_defines(p)
    p.set_defaults(run=cmd_compile)


def cmd_compile(args) -> int:
    from .emit import check_source, module_source

    program = load_program(args.file, args.defines)
    source = module_source(program)
    out = Path(args.output)
    check_source(source, str(out))  # a module that would not import is never written
    try:
        out.write_text(source, encoding="utf-8")
    except OSError as err:
        raise CliError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"{out}: mixer {program.name} ({len(source.splitlines())} lines)")
    return 0


# ---- run ---------------------------------------------------------------------------------------


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run every available form on random inputs and time it",
                       description="Draw random inputs (each input's ~ sampler) and the file's default "
                                   "parameters in --dtype, run every available form of the mixer, and print "
                                   "each form's relative error against the float64 reference on the same "
                                   "values, norm(out - ref) / norm(ref), and its median time. A Triton kernel "
                                   "form is skipped unless --device is CUDA or TRITON_INTERPRET=1 is set.")
    p.add_argument("file", metavar="FILE", help="a .mix file")
    p.add_argument("--B", type=_positive_int, default=2, metavar="N", help="batch size (default 2)")
    p.add_argument("--T", type=_positive_int, default=64, metavar="N", help="sequence length (default 64)")
    p.add_argument("--H", type=_positive_int, default=2, metavar="N", help="number of heads (default 2)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to run the forms in (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--size", dest="sizes", action="append", default=[], metavar="NAME=VALUE",
                   type=_assignment("--size", int),
                   help=f"bind a size (one with no default in the file gets {DEFAULT_SIZE}); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs and parameters (default 0)")
    p.add_argument("--repeat", type=_positive_int, default=5, metavar="N",
                   help="timed runs per form, after one warm-up; the median is shown (default 5)")
    _add_defines(p)
    p.set_defaults(run=cmd_run)


def _device(name: str):
    import torch

    try:
        dev = torch.device(name)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise CliError(f"device {name!r} is not usable: {str(err).splitlines()[0] if str(err) else err}") from None
    return dev


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rel_err(out, ref) -> float:
    import torch

    out = out.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(device="cpu", dtype=torch.float64)
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def cmd_run(args) -> int:
    import torch

    mixer = load_mixer(args.file, args.defines)
    meta = mixer.meta
    given = dict(args.sizes)
    for name in given:
        if name not in meta["sizes"]:
            if name in meta["consts"]:
                raise CliError(f"{name} is a constant of mixer '{mixer.name}', not a size: use -D {name}=...")
            raise CliError(f"unknown size {name!r}; mixer '{mixer.name}' has sizes "
                           f"{', '.join(meta['sizes']) or '(none)'}")
    sizes = {n: given.get(n, DEFAULT_SIZE if d is None else d) for n, d in meta["sizes"].items()}
    dev = _device(args.device)
    dtype = getattr(torch, args.dtype)
    B, T, H = args.B, args.T, args.H

    # Draw in float64 and round to --dtype; the reference sees the rounded values in float64, so
    # the error measures each form's arithmetic, not the rounding of its arguments.
    inputs = mixer.random_inputs(B, T, H, dtype=torch.float64, device=dev, seed=args.seed, **sizes)
    params = mixer.parameters_init(H, seed=args.seed, dtype=torch.float64, device=dev, **sizes)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    params = {k: v.to(dtype) for k, v in params.items()}
    ref = mixer.reference(**{k: v.double() for k, v in {**inputs, **params}.items()})

    shape = ", ".join(f"{k}={v}" for k, v in {"B": B, "T": T, "H": H, **sizes}.items())
    print(f"mixer {mixer.name} ({args.file}): {shape}; {args.dtype} on {dev}; seed {args.seed}")
    default = meta.get("default_form")
    print(f"output {meta['output']['name']}: {list(ref.shape)}" + (f"; default form {default}" if default else ""))
    rows, failed = [], False
    for form in mixer.forms:
        why_not = _cannot_run_here(mixer, form, dev)
        if why_not:
            rows.append((form, "-", "-", f"skipped: {why_not}"))
            continue
        try:
            err, ms = _time_form(mixer, form, inputs, params, ref, dev, args.repeat)
        except Exception as exc:  # report every form, then exit 1
            if os.environ.get("MIXC_TRACEBACK"):
                traceback.print_exception(type(exc), exc, exc.__traceback__)
            message = str(exc).splitlines()[0] if str(exc) else ""
            rows.append((form, "-", "-", f"failed: {type(exc).__name__}: {message}"))
            failed = True
            continue
        f32 = args.dtype == "float64" and form != "reference"  # the kernels compute in float32
        rows.append((form, f"{err:.2e}", f"{ms:.3f}", "computed in float32 (float64 calls default to the reference)"
                     if f32 else ""))
    header = ("form", "rel err vs float64 reference", "time (ms)", "")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]
    for r in [header, *rows]:
        line = f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}"
        print(line.rstrip())
    return 1 if failed else 0


def _cannot_run_here(mixer, form: str, dev) -> str | None:
    """Why a form cannot run on this device (Triton kernel forms need CUDA or the interpreter)."""
    kernel_forms = getattr(mixer._module, "TRITON_FORMS", getattr(mixer._module, "KERNEL_FORMS", ()))
    interpreted = getattr(mixer._module, "TRITON_INTERPRETED", os.environ.get("TRITON_INTERPRET", "0") == "1")
    if form in kernel_forms and dev.type != "cuda" and not interpreted:
        return "runs Triton kernels: use --device cuda, or set TRITON_INTERPRET=1 to interpret them on the CPU"
    return None


def _time_form(mixer, form: str, inputs: dict, params: dict, ref, dev, repeat: int) -> tuple[float, float]:
    """(relative error against ``ref``, median milliseconds over ``repeat`` runs after a warm-up)."""
    times = []
    out = None
    for i in range(repeat + 1):
        _sync(dev)
        start = time.perf_counter()
        out = mixer(**inputs, **params, form=form)
        _sync(dev)
        if i:  # the first run is a warm-up
            times.append((time.perf_counter() - start) * 1e3)
    return _rel_err(out, ref), statistics.median(times)


# ---- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixc",
        description="mixc compiles declarative sequence-mixer descriptions (.mix files) to PyTorch and Triton.",
        epilog="Run 'mixc COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"mixc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_check(sub)
    _add_explain(sub)
    _add_compile(sub)
    _add_run(sub)
    return parser


def _eprint(text: str) -> None:
    print(text, file=sys.stderr)


def _internal_error(err: BaseException, where: str | None = None) -> None:
    if os.environ.get("MIXC_TRACEBACK"):
        traceback.print_exception(type(err), err, err.__traceback__)
    prefix = f"{where}: " if where else "mixc: "
    _eprint(f"{prefix}internal error: {type(err).__name__}: {err}")
    _eprint("  this is a bug in mixc; set MIXC_TRACEBACK=1 to see the traceback")


def main(argv: list[str] | None = None) -> int:
    """Run the ``mixc`` command line; returns the exit status (argparse exits 2 on usage errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MixError as err:
        _eprint(str(err))
    except CliError as err:
        _eprint(f"mixc: error: {err}")
    except ValueError as err:  # a compiled mixer rejecting a call (MixerCallError) or bad sizes
        _eprint(f"mixc: error: {err}")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`mixc explain ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as err:
        _internal_error(err, getattr(args, "file", None))
    return 1


if __name__ == "__main__":
    sys.exit(main())
