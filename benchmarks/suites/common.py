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
BREAKDOWN = False  # bench.py --breakdown: time_ms(label=...) also prints each Triton kernel's share (GPU only)


def wanted(case: str) -> bool:
    """Whether ``bench.py --only`` selects this case (suites check it before timing one)."""
    import re

    return ONLY is None or re.search(ONLY, case) is not None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kernel_times(fn, reps: int = 10) -> dict[str, float]:
    """Mean milliseconds a call of ``fn()`` spends in each Triton kernel (ours and the anchor's alike: every
    ``kernel[grid](...)`` launch, autotuned ones under their kernel's name), from CUDA events around each launch,
    plus "(rest)": the call's time outside them (torch ops, gaps). For finding where a form's time goes."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import KernelInterface

    fn()  # compiled and tuned outside the measurement
    torch.cuda.synchronize()
    events: list = []

    def timing(orig, name_of):
        def getitem(self, grid):
            launch = orig(self, grid)
            name = name_of(self)

            def timed(*args, **kwargs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = launch(*args, **kwargs)
                end.record()
                events.append((name, start, end))
                return out

            return timed

        return getitem

    def jit_name(k):
        while hasattr(k, "fn"):
            k = k.fn
        return getattr(k, "__name__", "?")

    # kernel[grid](...) through Triton, and compiled[grid](...): a launcher's direct launch of a compiled handle
    # (Triton's own launches call the handle's run, not this, so nothing is counted twice)
    saved = {KernelInterface: KernelInterface.__getitem__, CompiledKernel: CompiledKernel.__getitem__}
    KernelInterface.__getitem__ = timing(saved[KernelInterface], jit_name)
    CompiledKernel.__getitem__ = timing(saved[CompiledKernel], lambda k: k.name)
    try:
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(reps):
            fn()
        t1.record()
        torch.cuda.synchronize()
    finally:
        for cls, orig in saved.items():
            cls.__getitem__ = orig
    out: dict[str, float] = {}
    for name, start, end in events:
        out[name] = out.get(name, 0.0) + start.elapsed_time(end) / reps
    out["(rest)"] = t0.elapsed_time(t1) / reps - sum(out.values())
    return out


def time_ms(fn, warmup: int = 25, rep: int = 100, label: str | None = None) -> float:
    """Median milliseconds of ``fn()``: triton's do_bench on a GPU, a wall clock on the CPU (smoke runs).
    With ``bench.py --breakdown`` and a ``label``, also prints the kernels' shares (:func:`kernel_times`)."""
    if on_gpu():
        from triton.testing import do_bench

        ms = float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        if BREAKDOWN and label:
            parts = sorted(kernel_times(fn).items(), key=lambda kv: -kv[1])
            print(f"breakdown {label} ({ms:.3f} ms): " + ", ".join(f"{k} {v:.3f}" for k, v in parts), flush=True)
        return ms
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
