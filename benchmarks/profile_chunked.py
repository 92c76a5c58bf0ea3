"""Where does a chunked call spend its time? Kernel-level timings and a torch profile per mixer.

    python benchmarks/profile_chunked.py [--mixers-only] [NAME ...]

``--mixers-only`` skips the kernel-level timings; each mixer gets a forward-only profile and a
forward+backward one. Launch alternatives (value blocks, warps): benchmarks/tune_launch.py.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import mixc
from mixc.backends.chunked import chunk_recurrence

ROOT = Path(__file__).resolve().parent.parent


def kernels_alone(decays=("none", "scalar", "per key"), B=4, T=4096, H=16, D=128):
    dev = "cuda"
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gs = F.logsigmoid(torch.randn(B, T, H, device=dev)).requires_grad_()
    gk = F.logsigmoid(torch.randn(B, T, H, D, device=dev)).requires_grad_()
    do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    for label, kw in [("none", {}), ("scalar", {"gs": gs}), ("per key", {"gk": gk})]:
        if label not in decays:
            continue
        fwd = do_bench(lambda: chunk_recurrence(q, k, v, **kw), return_mode="median")

        def fb():
            chunk_recurrence(q, k, v, **kw)[0].backward(do)
        both = do_bench(fb, return_mode="median")
        print(f"chunk_recurrence decay={label:<8} fwd {fwd:.3f} ms  fwd+bwd {both:.3f} ms", flush=True)


def main(names, mixers_only=False):
    from mixc.backends import chunked

    if not mixers_only:
        print(f"-- kernels launched as chunked.LAUNCH says: {chunked.LAUNCH}")
        kernels_alone()
    mixer_profiles(names)


def mixer_profiles(names):
    B, T, H, D = 4, 4096, 16, 128
    for name in names:
        m = mixc.load(ROOT / "examples" / f"{name}.mix")
        sizes = {k_: (16 if name == "based" and k_ == "K" else D) for k_ in m.meta["sizes"]}
        x = {k_: v_.to("cuda", torch.bfloat16).requires_grad_() for k_, v_ in
             m.random_inputs(B, T, H, seed=1, **sizes).items()}
        o = m(**x, form="chunked")
        do = torch.randn_like(o)
        o.backward(do)
        torch.cuda.synchronize()
        for label, backward in (("forward", False), ("forward+backward", True)):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    o = m(**x, form="chunked")
                    if backward:
                        o.backward(do)
                torch.cuda.synchronize()
            print(f"== {name} {label} (3 calls)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    args = sys.argv[1:]
    only = "--mixers-only" in args
    args = [a for a in args if a != "--mixers-only"]
    main(args, mixers_only=only)
