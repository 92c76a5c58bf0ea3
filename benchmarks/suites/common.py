"""What every suite shares: timing, relative errors, inputs, and the row format.

A row is a dict: ``suite``, ``case`` (what is timed, with its shape), ``ours_ms``, ``anchor`` (the op we are
compared with, in the same run), ``anchor_ms``, ``ratio`` (anchor_ms / ours_ms: above 1 we are faster),
``check`` (relative RMS error of our result against the reference, measured in the same run) and ``note``.
"""

from __future__ import annotations

import time

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


DEV = "cuda" if on_gpu() else "cpu"
ONLY: str | None = None  # bench.py --only: a regular expression a case must match to run (None: every case)


def wanted(case: str) -> bool:
    """Whether ``bench.py --only`` selects this case (suites check it before timing one)."""
    import re

    return ONLY is None or re.search(ONLY, case) is not None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``: triton's do_bench on a GPU, a wall clock on the CPU (smoke runs)."""
    if on_gpu():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[1]


def row(suite: str, case: str, ours_ms: float | None, anchor: str | None = None, anchor_ms: float | None = None,
        check: float | None = None, note: str = "", **extra) -> dict:
    ratio = anchor_ms / ours_ms if (ours_ms and anchor_ms) else None
    return {"suite": suite, "case": case, "ours_ms": ours_ms, "anchor": anchor, "anchor_ms": anchor_ms,
            "ratio": ratio, "check": check, "note": note, **extra}


def fwd_bwd(fn, inputs: dict, grad_out: torch.Tensor | None = None):
    """A closure that runs ``fn(**inputs)`` forward and backward (inputs that require grad)."""

    def go():
        o = fn(**inputs)
        o = o[0] if isinstance(o, tuple) else o
        o.backward(grad_out if grad_out is not None else torch.ones_like(o))

    return go
