"""Sweep a form's launch table on the GPU: time one call per candidate tile configuration, side by side.

    python benchmarks/tune.py attention [--shape B,T,H,D] [--out DIR]
    python benchmarks/tune.py recurrent [--shape B,H,K,V] [--out DIR]    (the one-token step's tiles)
    python benchmarks/tune.py delta [--out DIR]      (the delta rule's value blocks and walk launches)

A form's launch table is a function pasted into the generated module (``_attn_config(kind, ...)`` for the
attention form). The sweep replaces it, for one kernel kind at a time, by each candidate (the others keep the
table's own choice), checks the output against the table's own result, and times the call that kind serves
(forward for ``fwd``; forward+backward for ``dkdv`` and ``dq``, whose difference is the kernel's share). A
candidate that does not compile or run (shared memory) is reported, not fatal. The best of each kind is what
the launch table should say; the table is edited by hand, with the figure in BENCHMARKS.md.
For the recurrent form the table is ``_rec_tiles(n_bh, K, V, step)``; the sweep replaces its one-token answer
(BV, num_warps; BK stays the whole key axis) and times a fresh decoder's step, CUDA-graph replayed, at
B256 H16 K=V=128 by default (the state-bandwidth row of the recurrent suite), each checked against the
reference.
For the delta form the candidates override the module's constants (DL_BV, DL_BVO, _DL_LAUNCH entries, and
DL_WORK16: the 16-bit work tensors, each case in a process of its own, since they may fault) and the sweep times
``dl_chunk_fwd`` and ``dl_chunk_fwd`` + ``dl_chunk_bwd`` directly (the operator may belong to another module),
bf16 deltanet inputs, checked against the table's own output and gradients.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from suites.common import DEV, rel, time_ms  # noqa: E402

# candidate (BM, BN, num_warps, num_stages) per kernel kind of the attention form
ATTN = {
    "fwd": list(itertools.product((64, 128), (64, 128), (4, 8), (2, 3))),
    "dkdv": list(itertools.product((32, 64), (64, 128), (4, 8), (2, 3))),
    "dq": list(itertools.product((64, 128), (32, 64), (4, 8), (2, 3))),
}


def tune_attention(shape: tuple[int, int, int, int]) -> list[dict]:
    import mixc

    B, T, H, D = shape
    m = mixc.load(ROOT / "examples" / "softmax_attention.mix")
    mod = m._module
    own = mod._attn_config
    g = torch.Generator(device=DEV).manual_seed(0)
    x = {n: torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_() for n in "qkv"}
    do = torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16, generator=g)

    def fwd():
        with torch.no_grad():
            return m(**x, form="attention")

    def fwd_bwd():
        return torch.autograd.grad(m(**x, form="attention"), list(x.values()), do)

    want_o, want_g = fwd(), fwd_bwd()
    rows = []
    for kind, cands in ATTN.items():
        base = own(kind, D, D, x["q"].device, T, 2)
        for cfg in [base] + [c for c in cands if c != base]:
            def table(k, dk, dv, device, T=None, esize=2, kind=kind, cfg=cfg):
                return cfg if k == kind else own(k, dk, dv, device, T, esize)

            mod._attn_config = table
            try:
                if kind == "fwd":
                    check = rel(fwd(), want_o)
                    ms = time_ms(fwd)
                else:
                    check = max(rel(a, b) for a, b in zip(fwd_bwd(), want_g))
                    ms = time_ms(fwd_bwd)
                r = {"kind": kind, "cfg": cfg, "ms": ms, "check": check, "table": cfg == base}
            except Exception as e:  # noqa: BLE001 (a configuration that does not fit is a row, not an end)
                r = {"kind": kind, "cfg": cfg, "ms": None, "check": None, "table": cfg == base,
                     "error": f"{type(e).__name__}: {e}"[:120]}
            finally:
                mod._attn_config = own
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


REC_STEP = list(itertools.product((16, 32, 64, 128), (1, 2, 4, 8)))  # (BV, num_warps) of a one-token step


def tune_recurrent(shape: tuple[int, int, int, int]) -> list[dict]:
    from suites.recurrent import EX, _gla_decoder, _graph

    import mixc

    B, H, K, V = shape
    mod = mixc.load(EX / "gla.mix")._module
    own = mod._rec_tiles
    base = own(B * H, K, V, True)
    moved = 2 * B * H * K * V * 4  # the fp32 state read and written
    src = torch.randn(B * H * K * V, device=DEV)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    rows = []
    for bv, warps in [base[1:]] + [c for c in REC_STEP if c != base[1:] and c[0] <= V]:
        def table(n_bh, k, v, step=False, bv=bv, warps=warps):
            return (own(n_bh, k, v, True)[0], bv, warps) if step else own(n_bh, k, v, step)

        mod._rec_tiles = table
        try:
            _, _, dec, step_in, _, check, path = _gla_decoder(B, H, K, V, torch.bfloat16)
            g, _ = _graph(lambda: dec.step(**step_in))
            ms = time_ms(g.replay if g is not None else (lambda: dec.step(**step_in)))
            r = {"kind": "step", "cfg": (base[0], bv, warps), "ms": ms, "check": check,
                 "table": (bv, warps) == base[1:], "bandwidth_share": copy_ms / ms, "path": path}
        except Exception as e:  # noqa: BLE001 (a configuration that does not fit is a row, not an end)
            r = {"kind": "step", "cfg": (base[0], bv, warps), "ms": None, "check": None,
                 "table": (bv, warps) == base[1:], "error": f"{type(e).__name__}: {e}"[:120]}
        finally:
            mod._rec_tiles = own
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"copy of the state's size: {copy_ms:.4f} ms ({moved / copy_ms / 1e6:.0f} GB/s)", flush=True)
    return rows


# candidates against the table: the table first, then one change each (2026-12-04: forward substitution in the prep
# kernel was slower than the doubling that replaced it, the prep kernel at 8 warps slower still; session 16: the
# inverse's small levels batched on the diagonal blocks no faster, the last backward kernel in key blocks of 64
# slower and wrong at K = 128 on the H200, the walks' value block 32 and the value loop's 32 no faster)
DELTA = [{}, {"DL_WORK16": False}, {"DL_INV_PREC": "tf32x3"}, {"DL_BV": 32}, {"DL_BVL": 32}]
# the 16-bit work tensors, each (shape, candidate) in its own process with CUDA_LAUNCH_BLOCKING=1: on the H200 they
# were wrong, and could fault (which ends a process's CUDA context), from key width 64 in session 14 and at 16 in
# session 15. Each process compares every saved
# work tensor of the forward (W and T from the prep kernel, U and hs from the walk, o from the output kernel) and
# every gradient with the fp32-work path's, so the first wrong one names the kernel.
# (fla met two Triton >= 3.4 Hopper miscompiles of this family: a BT = 64 kernel wrong or faulting at 4 warps and
# right at 2, fla#984/#988; and tl.trans of a dot's result fed to another dot, fla#640/#826)
# (session 15 also timed 2-warp rows. The path was right at B1 T128 H1 D64 with the inverse by doubling; the prep
# kernel at 2 warps hung past 300 s; tests/test_delta.py failed at key width 16, fp16 and bf16)
# DL_WORK16_MIN_K 16: the 16-bit path at every width, below the shipped floor too
DELTA16 = [{"DL_WORK16": True, "DL_WORK16_MIN_K": 16}]  # (session 15's 2-warp rows: the prep kernel's hung)
DELTA16_SHAPES = [(1, 150, 2, 16), (1, 150, 2, 64), (1, 256, 2, 128)]


def tune_delta_isolated(shape, cand) -> dict:
    """One (shape, candidate) of :func:`delta_stages` in a fresh process (``tune.py delta --one``) with
    CUDA_LAUNCH_BLOCKING=1, so a fault names its kernel (the last ``_dl_*_kernel`` of the traceback) and
    spares the sweep."""
    import os
    import re
    import subprocess

    one = json.dumps({"shape": list(shape), "cfg": cand})
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    r = subprocess.run([sys.executable, __file__, "delta", "--one", one], capture_output=True, text=True, env=env,
                       timeout=300)
    rows = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if rows and r.returncode == 0:
        return json.loads(rows[-1])
    kernels = re.findall(r"(_dl_\w+_kernel)", r.stderr + r.stdout)
    B, T, H, D = shape
    return {"kind": f"B{B} T{T} H{H} D{D}", "cfg": cand, "error": (r.stderr or r.stdout)[-300:],
            "kernel": kernels[-1] if kernels else None}


def _delta_case(mod, shape, gen_seed=0):
    """bf16 gated delta-rule inputs of ``shape`` (B, T, H, D) on the device and the two calls: forward (with
    the saved work tensors) and forward + backward (every gradient)."""
    B, T, H, D = shape
    g = torch.Generator(device=DEV).manual_seed(gen_seed)
    nrm = torch.nn.functional.normalize
    q, k = (nrm(torch.randn(B, T, H, D, device=DEV, generator=g), dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(B, T, H, D, device=DEV, generator=g).bfloat16()
    beta = torch.sigmoid(torch.randn(B, T, H, device=DEV, generator=g))
    lg = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=DEV, generator=g) + 3)
    do = torch.randn(B, T, H, D, device=DEV, generator=g).bfloat16()

    def fwd(save=False, gate=False):
        return mod.dl_chunk_fwd(q, k, k, v, lg if gate else None, None, D ** -0.5, False, None, save, beta, beta,
                                bool(mod.DL_WORK16))

    def fwd_bwd(gate=False):  # (a and b are one tensor, as a mixer call passes them: one cotangent, db None)
        o, _, saved = fwd(True, gate)
        return mod.dl_chunk_bwd(do, None, q, k, k, v, lg if gate else None, None, saved, D ** -0.5, beta, beta,
                                None, True)

    return fwd, fwd_bwd


def delta_stages(shape, cand) -> dict:
    """The 16-bit work path (``cand`` sets DL_WORK16 and launches) against the fp32 one, gated inputs: the
    relative error of each saved work tensor and of the output (forward) and of each gradient."""
    import mixc

    mod = mixc.load(ROOT / "examples" / "gated_deltanet.mix")._module
    fwd, fwd_bwd = _delta_case(mod, shape)
    o32, _, (W32, U32, G32, T32, hs32) = fwd(True, True)
    g32 = fwd_bwd(True)
    B, T, H, D = shape
    r = {"kind": f"B{B} T{T} H{H} D{D}", "cfg": cand}
    _apply(mod, cand)
    o16, _, (W16, U16, G16, T16, hs16) = fwd(True, True)
    if DEV == "cuda":
        torch.cuda.synchronize()
    r["work_dtype"] = str(W16.dtype)
    r.update({n: rel(x.float(), y.float()) for n, x, y in (("W", W16, W32), ("T", T16, T32), ("G", G16, G32),
                                                           ("U", U16, U32), ("hs", hs16, hs32), ("o", o16, o32))})
    names = ("dq", "da", "db", "dv", "dg", "dbs", "dvs")
    for n, x, y in zip(names, fwd_bwd(True), g32):
        if x is not None:
            r[n] = rel(x.float(), y.float())
    return r


def _apply(mod, cand):
    """Set a candidate's overrides on the module (DL_* constants; kernel names: (warps, stages)); returns the
    undo."""
    keep = {n: getattr(mod, n) for n in cand if n.startswith("DL_")}
    launch = dict(mod._DL_LAUNCH)
    for n, val in cand.items():
        if n.startswith("DL_"):
            setattr(mod, n, val)
        else:
            mod._DL_LAUNCH[n] = tuple(val)

    def undo():
        for n, val in keep.items():
            setattr(mod, n, val)
        mod._DL_LAUNCH.clear()
        mod._DL_LAUNCH.update(launch)
    return undo


def tune_delta(shapes) -> list[dict]:
    import mixc

    mod = mixc.load(ROOT / "examples" / "deltanet.mix")._module
    rows = []
    for shape, cands in shapes:
        fwd, fwd_bwd = _delta_case(mod, shape)
        want_o, want_g = fwd()[0], fwd_bwd()
        for cand in cands:
            undo = _apply(mod, cand)
            B, T, H, D = shape
            r = {"kind": f"B{B} T{T} H{H} D{D}", "cfg": cand}
            try:
                r["check"] = rel(fwd()[0], want_o)
                r["grad_check"] = max(rel(x, y) for x, y in zip(fwd_bwd(), want_g) if x is not None)
                r["fwd_ms"], r["ms"] = time_ms(lambda: fwd()[0]), time_ms(fwd_bwd)
            except Exception as e:  # noqa: BLE001
                r["error"] = f"{type(e).__name__}: {e}"[:160]
            finally:
                undo()
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("form", choices=["attention", "recurrent", "delta"])
    ap.add_argument("--shape", help="B,T,H,D (attention, default 4,4096,16,128) or B,H,K,V (recurrent, "
                    "default 256,16,128,128)")
    ap.add_argument("--out", help="folder for tune_<form>.json")
    ap.add_argument("--work16-only", action="store_true", help="delta: only the 16-bit work path's rows")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # delta: one JSON {"shape", "cfg"} (tune_delta_isolated)
    args = ap.parse_args(argv)
    if DEV != "cuda" and not args.one:  # (--one runs in the interpreter too: how its plumbing is tested)
        print("tune.py times tile configurations: it needs a GPU", file=sys.stderr)
        return 2
    if args.form == "delta":
        if args.one:  # one (shape, candidate), in a process of its own (tune_delta_isolated)
            one = json.loads(args.one)
            print(json.dumps(delta_stages(tuple(one["shape"]), one["cfg"])), flush=True)
            return 0
        rows = [] if args.work16_only else tune_delta([((4, 4096, 16, 128), DELTA), ((8, 1024, 16, 64), DELTA)])
        for shape in DELTA16_SHAPES:
            for cand in DELTA16:
                rows.append(tune_delta_isolated(shape, cand))
                print(json.dumps(rows[-1]), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "tune_delta.json").write_text(json.dumps(rows, indent=1))
        return 0
    default = "4,4096,16,128" if args.form == "attention" else "256,16,128,128"
    shape = tuple(int(s) for s in (args.shape or default).split(","))
    rows = tune_attention(shape) if args.form == "attention" else tune_recurrent(shape)
    for kind in ATTN if args.form == "attention" else ("step",):
        ok = sorted((r for r in rows if r["kind"] == kind and r["ms"] is not None and r["check"] < 1e-2),
                    key=lambda r: r["ms"])
        base = next((r for r in rows if r["kind"] == kind and r["table"]), None)
        print(f"{kind}: table {base and base['cfg']} {base and base['ms']} ms; best "
              + ", ".join(f"{r['cfg']} {r['ms']:.3f}" for r in ok[:4]), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"tune_{args.form}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
