"""Host-side cost of one chunked call, without a GPU: every Triton launch is replaced by a no-op,
so what is timed is Python, argument checks, the PyTorch prologue and autograd bookkeeping.

    python benchmarks/host_overhead.py [NAME ...] [--profile] [--bf16]

``--bf16``: the inputs in bf16, as the GPU benchmarks take them (the default fp32 skips every cast).

Shapes are tiny (B1 T64 H2 D16) so tensor work is negligible; the figure is microseconds per call on
this machine's CPU (the GPU host's CPU differs, so compare before/after on one machine only).
"""

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the chunked form run on CPU tensors

import torch  # noqa: E402

import mixc  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def kernel_names():
    """Every Triton kernel of the chunked backend (the names its module and the mixers' modules share)."""
    from mixc.backends import chunked

    return [n for n in dir(chunked) if n.endswith("_kernel")]


def stub_kernels(m):
    """No-op launches in the mixer's module and in mixc's own copy of the kernels (the custom operator
    is shared by every module that pastes the same kernel source, so it may be mixc's)."""
    from mixc.backends import chunked

    for k in kernel_names():
        setattr(m._module, k, _NoLaunch())
        setattr(chunked, k, _NoLaunch())


def per_call_us(fn, n=200, repeats=7):
    """The best of several timed loops (the least disturbed by other work on the machine)."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main(argv):
    prof = "--profile" in argv
    names = [a for a in argv if not a.startswith("--")] or ["retnet", "gla", "mamba2", "linear_attention"]
    for name in names:
        m = mixc.load(os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.mix"))
        stub_kernels(m)
        sizes = {k: 16 for k in m.meta["sizes"]}
        dt = torch.bfloat16 if "--bf16" in argv else torch.float32
        x = {k: v.to(dt).requires_grad_() for k, v in m.random_inputs(1, 64, 2, seed=1, **sizes).items()}
        o = m(**x, form="chunked")
        do = torch.ones_like(o)

        def fwd():
            with torch.no_grad():
                m(**x, form="chunked")

        def fb():
            m(**x, form="chunked").backward(do)
        print(f"{name:<18} forward {per_call_us(fwd):7.1f} us   forward+backward {per_call_us(fb):7.1f} us", flush=True)
        if prof:
            import cProfile
            import pstats

            cProfile.runctx("for _ in range(200): fb()", globals(), {"fb": fb}, "/tmp/host.prof")
            pstats.Stats("/tmp/host.prof").sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main(sys.argv[1:])
