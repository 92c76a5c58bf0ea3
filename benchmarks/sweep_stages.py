"""Time the per-key (or another decay's) chunked kernels under other warps and pipeline depths
(num_stages), one kernel at a time, on the GPU (B4 T4096 H16 D128 bf16, tune_launch.py's inputs).

    python benchmarks/sweep_stages.py [--decay key] [--set NAME=VALUE ...] [KERNEL ...]

``--set`` first sets a module constant of ``mixc.backends.chunked`` (a Python literal: ``WARPS=4``,
``SCORES_LAUNCH={'num_warps': 8}``) or a LAUNCH entry (``LAUNCH.out=128,4``).

Each kernel object of ``mixc.backends.chunked`` named here is replaced, for one configuration at a
time, by a wrapper that adds ``num_warps``/``num_stages`` to its launches; the forward (chunk_fwd) and
the backward alone (chunk_bwd from one saved forward) are timed with do_bench (median ms), the
kernel's own launch first. Each launch's outputs (o and the gradients, at this shape and at B1 T80 H2
D16, where the key loops have one iteration) are compared with the own launch's: a launch whose
differ by more than 1e-2 is marked WRONG. ``num_stages`` is Triton's software pipelining depth of a kernel's loops
(its default on the H100 is 3): more stages buffer more loads in shared memory, fewer leave room for
more programs per SM. A kernel used by both passes (the walk) changes both.
"""

import argparse

from tune_launch import apply_settings, checked_run, wrong  # (this script's folder is on the path)

from mixc.backends import chunked as C

CONFIGS = {  # kernel: (warps, stages) to try; None keeps the kernel's own value
    "_local_cumsum_kernel": [(2, None), (8, None)],
    "_state_walk_kernel": [(4, 1), (4, 2), (4, 4), (8, 2)],
    "_intra_key_kernel": [(8, 1), (8, 2), (8, 4), (4, 1), (4, 2), (4, 3), (2, 2)],
    "_intra_diag_kernel": [(4, 1), (4, 2), (2, 2)],
    "_out_kernel": [(8, 1), (8, 2), (8, 4), (4, 1), (4, 2)],
    "_dqk_key_off_kernel": [(8, 1), (8, 2), (8, 4), (4, 1), (4, 2)],
    "_dqk_key_diag_kernel": [(4, 1), (4, 2), (8, 2)],
    "_dv_kernel": [(8, 1), (8, 2), (4, 2)],
    "_dg_key_kernel": [(4, 1), (4, 2), (8, 2)],
    "_dqk_kernel": [(4, 1), (4, 2), (4, 4), (8, 2)],
}
DECAYS = {  # kernels that a decay kind runs
    "key": ["_local_cumsum_kernel", "_state_walk_kernel", "_intra_key_kernel", "_intra_diag_kernel", "_out_kernel",
            "_dqk_key_off_kernel", "_dqk_key_diag_kernel", "_dv_kernel", "_dg_key_kernel"],
    "scalar": ["_state_walk_kernel", "_out_kernel", "_dv_kernel", "_dqk_kernel"],
    "none": ["_state_walk_kernel", "_out_kernel", "_dv_kernel", "_dqk_kernel"],
}
GATE = {"none": 0, "scalar": 1, "key": 2}


class Override:
    """kernel[grid](...) with num_warps / num_stages replaced."""

    def __init__(self, kernel, warps, stages):
        self.kernel, self.extra = kernel, {}
        if warps is not None:
            self.extra["num_warps"] = warps
        if stages is not None:
            self.extra["num_stages"] = stages

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{**kwargs, **self.extra})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decay", default="key", choices=list(GATE))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("kernels", nargs="*")
    a = ap.parse_args()
    apply_settings(a.set)
    if a.set:
        print("set " + ", ".join(a.set), flush=True)
    gate = GATE[a.decay]

    for name in a.kernels or DECAYS[a.decay]:
        own = getattr(C, name)
        row, want = [], None
        for cfg in [None] + CONFIGS[name]:
            setattr(C, name, own if cfg is None else Override(own, *cfg))
            try:
                f, b, got = checked_run(gate)
                want = got if cfg is None else want
                bad = wrong(want, got)
                row.append(f"{'own' if cfg is None else '/'.join(map(str, cfg))}: fwd {f:.3f} bwd {b:.3f}{bad}")
            except Exception as e:  # a launch that does not fit (registers, shared memory), or a fault (after
                # an illegal memory access every later launch in this process fails too)
                row.append(f"{'own' if cfg is None else '/'.join(map(str, cfg))}: {type(e).__name__}")
            finally:
                setattr(C, name, own)
        print(f"{name} (warps/stages): " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
