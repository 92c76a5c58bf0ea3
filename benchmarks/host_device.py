"""Where a small call's time goes on the GPU host: Python, PyTorch ops, Triton launches, GPU work.

    python benchmarks/host_device.py [NAME ...] [--shape B,T,H,D] [--trace]

At B8 T1024 H16 D64 a chunked call is bound by the host: the GPU finishes each kernel before the
next is launched. Per mixer, forward and forward+backward, this prints (microseconds per call):

- ``bench``: the GPU-timeline time per call, as benchmarks/bench_chunked.py measures it (do_bench);
- ``host``: wall time per call of a loop that never synchronises (short enough not to fill the
  launch queue): what the host spends issuing one call;
  both with Triton's own launch dispatch (``_triton``) and with the compiled handles (``_fast``,
  backends/chunked.py's _Launch), alternately in one process, the best of three rounds each;
- ``no_triton``: the same with every Triton launch replaced by a no-op (Python, checks, PyTorch ops);
- ``launches`` and ``per_launch`` = (host - no_triton) / launches: what one Triton launch costs;
- ``gpu``: the sum of the call's kernel times in a torch profile (the GPU's own work);
- ``busy``: one call issued while the GPU is busy for ~20 ms: about ``host`` if the call never waits
  for the GPU, about 20000 if it does.

``--trace`` adds each call's host-side operations by self CPU time.

Also the cost of launching an empty Triton kernel with 20 arguments, the floor of one launch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from time_chunk import profiled  # (this script's folder is on the path)
from triton.testing import do_bench

import mixc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@triton.jit
def _empty(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9,
           C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr):
    pass


class _Counting:
    """Stands in for a kernel: counts launches, and launches nothing when ``stub`` is set."""

    def __init__(self, kernel, tally, stub):
        self.kernel, self.tally, self.stub = kernel, tally, stub

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tally[0] += 1
            if not self.stub:
                self.kernel[grid](*args, **kwargs)
        return launch


def set_fast(m, on):
    """Kernel launches through their compiled handles (on) or Triton's dispatch (off): backends/chunked.py."""
    from mixc.backends import chunked

    m._module.FAST_LAUNCH = chunked.FAST_LAUNCH = on


def patched(m, stub):
    """Swap the kernels in the mixer's module and in mixc's copy; returns (tally, restore)."""
    from mixc.backends import chunked

    tally = [0]
    saved = []
    for mod in (m._module, chunked):
        for k in [n for n in dir(chunked) if n.endswith("_kernel")]:
            if hasattr(mod, k):
                saved.append((mod, k, getattr(mod, k)))
                setattr(mod, k, _Counting(getattr(mod, k), tally, stub))

    def restore():
        for mod, k, v in saved:
            setattr(mod, k, v)
    return tally, restore


def host_us(fn, n=40, repeats=7):
    """Wall time per call of n unsynchronised calls (best of several loops)."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return best


def busy_us(fn):
    """Host time of one call issued while the GPU is still busy (a 20 ms sleep kernel queued first):
    a call that waits for the GPU anywhere (a copy to the host, a synchronisation) takes ~20 ms here."""
    torch.cuda.synchronize()
    torch.cuda._sleep(40_000_000)
    t = time.perf_counter()
    fn()
    us = (time.perf_counter() - t) * 1e6
    torch.cuda.synchronize()
    return us


def host_top(fn, rows=12):
    """The host-side operations of one call, by self CPU time (a torch profile of 5 calls)."""
    return profiled(fn, 5, cpu=True).key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                                          max_name_column_width=50)


def gpu_us(fn, calls=5):
    """Sum of the GPU kernels' own times per call, from a torch profile."""
    return sum(e.device_time_total for e in profiled(fn, calls).key_averages()) / calls


def one(name, B, T, H, D, trace=False):
    m = mixc.load(ROOT / "examples" / f"{name}.mix")
    sizes = {k: (16 if name == "based" and k == "K" else D) for k in m.meta["sizes"]}
    x = {k: v.to("cuda", torch.bfloat16).requires_grad_() for k, v in
         m.random_inputs(B, T, H, seed=1, **sizes).items()}
    do = torch.randn_like(m(**x, form="chunked"))

    xf = {k: v.detach() for k, v in x.items()}  # the forward as bench_chunked.py times it: no autograd

    def fwd():
        m(**xf, form="chunked")

    def fb():
        for v in x.values():
            v.grad = None
        m(**x, form="chunked").backward(do)

    for label, fn in (("fwd", fwd), ("fwd+bwd", fb)):
        fn()
        row = {}
        for _ in range(3):  # the two launch paths alternately, in one process: the host's speed drifts
            for fast in (False, True):
                set_fast(m, fast)
                fn()
                tag = "fast" if fast else "triton"
                row[f"bench_{tag}"] = min(row.get(f"bench_{tag}", 1e9), do_bench(fn, return_mode="median") * 1e3)
                row[f"host_{tag}"] = min(row.get(f"host_{tag}", 1e9), host_us(fn))
        row["gpu"], row["busy"] = gpu_us(fn), busy_us(fn)
        tally, restore = patched(m, stub=True)
        try:
            fn()
            tally[0] = 0
            fn()
            row["launches"] = tally[0]
            row["no_triton"] = host_us(fn)
        finally:
            restore()
        for tag in ("triton", "fast"):
            row[f"per_launch_{tag}"] = (row[f"host_{tag}"] - row["no_triton"]) / max(row["launches"], 1)
        print(f"{name:<17} {label:<8} " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items()), flush=True)
        if trace:
            print(host_top(fn), flush=True)


def empty_launch_us():
    a = torch.empty(16, device="cuda")
    args = [a] * 10 + list(range(1, 11))
    _empty[(1,)](*args, C0=1, C1=2, C2=3)
    return host_us(lambda: _empty[(1,)](*args, C0=1, C1=2, C2=3), n=200)


def main(argv):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("host_device.py times the compiled kernels on a GPU: unset TRITON_INTERPRET")
    shape = (8, 1024, 16, 64)
    if "--shape" in argv:
        i = argv.index("--shape")
        shape = tuple(int(s) for s in argv[i + 1].split(","))
        argv = argv[:i] + argv[i + 2:]
    trace = "--trace" in argv
    argv = [a for a in argv if a != "--trace"]
    names = argv or ["gla", "retnet", "mamba2", "linear_attention", "based"]
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()} shape {shape}")
    print(f"empty Triton launch (20 args, 3 constexprs): {empty_launch_us():.1f} us")
    for n in names:
        one(n, *shape, trace=trace)


if __name__ == "__main__":
    main(sys.argv[1:])
