"""Where does a chunked forward+backward spend its time? Per-call kernel timings and a torch profile.

    python benchmarks/profile_chunked.py [NAME ...]
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import mixc
from mixc.backends.chunked import chunk_run

ROOT = Path(__file__).resolve().parent.parent


def main(names):
    B, T, H, D = 4, 4096, 16, 128
    dev = "cuda"
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    gs = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev))
    h0 = torch.zeros(B, H, D, D, device=dev)
    for label, kw in [("plain", {}), ("gs", {"gs": gs})]:
        for mode in ({}, {"reverse": True, "shift_g": True}):
            ms = do_bench(lambda: chunk_run(q, k, v, h0=h0, output_final_state=True, **kw, **mode),
                          return_mode="median")
            print(f"chunk_run {label:<5} {'bwd-mode' if mode else 'fwd-mode'}: {ms:.3f} ms", flush=True)
    for name in names:
        m = mixc.load(ROOT / "examples" / f"{name}.mix")
        sizes = {k_: D for k_ in m.meta["sizes"]}
        x = {k_: v_.to(dev, torch.bfloat16).requires_grad_() for k_, v_ in
             m.random_inputs(B, T, H, seed=1, **sizes).items()}
        o = m(**x, form="chunked")
        do = torch.randn_like(o)
        o.backward(do)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                o = m(**x, form="chunked")
                o.backward(do)
            torch.cuda.synchronize()
        print(f"== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main(sys.argv[1:] or ["retnet", "linear_attention"])
