"""The chunked forms' PyTorch prologue and epilogue alone, on the CPU: every Triton launch is a no-op,
so the time is the elementwise work around the kernels (feature maps, products such as dt * B,
normaliser columns, skips) at B1 T4096 H16 D128 in bf16. A CPU proxy for the bytes those passes
move; GPU figures belong in BENCHMARKS.md.

    python benchmarks/prologue_cpu.py
"""
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import mixc  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from host_overhead import stub_kernels  # noqa: E402

torch.set_num_threads(2)
for n in ["mamba2", "linear_attention", "based", "gla"]:
    m = mixc.load(os.path.join(os.path.dirname(__file__), "..", "examples", f"{n}.mix"))
    stub_kernels(m)
    sz = {k: (16 if n == "based" and k == "K" else 128) for k in m.meta["sizes"]}
    x = {k: v.to(torch.bfloat16) for k, v in m.random_inputs(1, 4096, 16, seed=1, **sz).items()}
    with torch.no_grad():
        m(**x, form="chunked")
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            m(**x, form="chunked")
            best = min(best, time.perf_counter() - t)
    print(f"{n:<18} forward with kernels stubbed, CPU: {best*1e3:.1f} ms")
