"""The one benchmark harness: run suites (one per form) and print/write their rows.

    python benchmarks/bench.py SUITE[,SUITE...] [--smoke] [--out DIR] [--only REGEX] [--breakdown]

Each suite (``benchmarks/suites/<name>.py``) times our form against its anchor in the same run (fla 0.6.0,
torch SDPA, torch.fft, ...) and checks our result against the reference in that run. ``--smoke`` runs tiny
shapes (CPU, under TRITON_INTERPRET=1) to show the suite works, not to time anything. Writes
``bench_<suite>.json`` and a markdown table ``bench_<suite>.md`` under ``--out`` (default: print only).
``--breakdown`` (GPU) also prints, for the timings a suite labels, the milliseconds each Triton kernel takes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    out = ["| case | ours (ms) | anchor | anchor (ms) | ratio | check (rel RMS) | note |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {_fmt(r['ours_ms'], '.4f')} | {r['anchor'] or '-'} "
                   f"| {_fmt(r['anchor_ms'], '.4f')} | {_fmt(r['ratio'], '.2f')} | {_fmt(r['check'], '.1e')} "
                   f"| {r['note']} |")
    return "\n".join(out)


def environment() -> dict:
    import torch
    import triton

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"}
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        env["fla"] = None
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", help="comma-separated suite names (modules under benchmarks/suites/)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the suite runs (CPU is fine)")
    ap.add_argument("--out", help="folder for bench_<suite>.json and .md")
    ap.add_argument("--only", help="a regular expression: run only the cases it matches (suites that check it)")
    ap.add_argument("--breakdown", action="store_true", help="also print each Triton kernel's time (GPU)")
    args = ap.parse_args(argv)
    from suites import common

    common.ONLY, common.BREAKDOWN = args.only, args.breakdown
    env = environment()
    print("env", json.dumps(env), flush=True)
    status = 0
    for name in args.suites.split(","):
        mod = importlib.import_module(f"suites.{name}")
        try:
            rows = mod.run(args.smoke)
        except Exception as e:  # one suite failing must not hide the others' rows
            import traceback

            traceback.print_exc()
            print(f"suite {name} failed: {e!r}", flush=True)
            status = 1
            continue
        md = f"### {name} ({env['date']}, {env['device']}, torch {env['torch']}, triton {env['triton']}, " \
             f"fla {env['fla']})\n\n{table(rows)}\n"
        print(md, flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"bench_{name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
            (out / f"bench_{name}.md").write_text(md)
    return status


if __name__ == "__main__":
    sys.exit(main())
