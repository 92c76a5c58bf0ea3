"""Time mixc's chunked kernels against flash-linear-attention (fla 0.6.0) and torch SDPA on one GPU,
checking our results against the reference in the same run.

    python benchmarks/bench_chunked.py [--quick] [--out DIR]

Prints a markdown table (ratio = fla time / our time) and writes it with the raw rows as JSON.
Correctness: bf16 forward output vs an fp32 reference (relative RMS), and gradients vs the fp32
reference at a smaller shape (the reference is a token loop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import mixc

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def med(fn, warmup=25, rep=100):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def inputs_for(m, B, T, H, D, dtype, seed=0):
    sizes = {k: D for k in m.meta["sizes"]}
    x = m.random_inputs(B, T, H, dtype=torch.float32, seed=seed, **sizes)
    return {k: v.to(DEV, dtype) for k, v in x.items()}


def fla_ops():
    try:
        import fla  # noqa: F401
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.retention import chunk_retention
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # pragma: no cover - reported in the table
        print("fla not importable:", repr(e))
        return None
    ops = {"gla": chunk_gla, "retnet": chunk_retention, "linear_attention": chunk_linear_attn,
           "mamba2": chunk_simple_gla}
    try:
        from fla.ops.based import parallel_based

        ops["based"] = parallel_based
    except Exception as e:
        print("fla based not importable:", repr(e))
    return ops


def fla_call(name, op, x, m):
    """fla's op on the same inputs (its conventions: [B, T, H, D], log gates, scale)."""
    if name == "gla":
        return lambda: op(x["q"], x["k"], x["v"], x["g"])[0]
    if name == "retnet":
        return lambda: op(x["q"], x["k"], x["v"])[0]
    if name == "linear_attention":
        # same work as ours: feature map phi = elu + 1, then normalised linear attention
        def run():
            q, k = F.elu(x["q"]) + 1, F.elu(x["k"]) + 1
            return op(q, k, x["v"], normalize=True)[0]
        return run
    if name == "mamba2":
        A = m.parameters_init(x["x"].shape[2], device=DEV)["A"]

        def run():
            g = x["dt"].float() * A
            return op(x["C"], x["B"] * x["dt"][..., None], x["x"], g=g, scale=1.0)[0]
        return run
    if name == "based":
        return lambda: op(x["q"], x["k"], x["v"])
    raise KeyError(name)


def bench_one(name, B, T, H, D, ops, do_bwd, dtype=torch.bfloat16):
    m = mixc.load(ROOT / "examples" / f"{name}.mix")
    Dk = 16 if name == "based" else D
    sizes = {"K": Dk, "V": D, "N": D, "P": D}
    sizes = {k: v for k, v in sizes.items() if k in m.meta["sizes"]}
    raw = m.random_inputs(B, T, H, dtype=torch.float32, seed=1, **sizes)
    x = {k: v.to(DEV, dtype) for k, v in raw.items()}
    row = {"op": name, "B": B, "T": T, "H": H, "D": D}
    # correctness in this run: bf16 chunked vs fp32 reference (forward)
    o = m(**x, form="chunked")
    torch.cuda.synchronize()
    with torch.no_grad():  # (the reference is a token loop: at 4096 tokens a few thousand small launches)
        ref = m.reference(**{k: v.float() for k, v in x.items()})
    row["fwd_rel_err_vs_fp32_ref"] = rel(o, ref)
    del ref
    row["ours_fwd_ms"] = med(lambda: m(**x, form="chunked"))
    fla_fn = None
    if ops and name in ops:
        try:
            fla_fn = fla_call(name, ops[name], x, m)
            fla_fn()
            row["fla_fwd_ms"] = med(fla_fn)
        except Exception as e:
            row["fla_fwd_error"] = repr(e)[:200]
            fla_fn = None
    if do_bwd:
        xg = {k: v.detach().requires_grad_() for k, v in x.items()}
        do = torch.randn_like(m(**xg, form="chunked"))

        def fb():
            for v in xg.values():
                v.grad = None
            m(**xg, form="chunked").backward(do)
        row["ours_fwdbwd_ms"] = med(fb)
        if fla_fn is not None:
            xf = {k: v.detach().requires_grad_() for k, v in x.items()}
            f2 = fla_call(name, ops[name], xf, m)
            try:
                def fbf():
                    for v in xf.values():
                        v.grad = None
                    f2().backward(do)
                fbf()
                row["fla_fwdbwd_ms"] = med(fbf)
            except Exception as e:
                row["fla_fwdbwd_error"] = repr(e)[:200]
    for a, b in (("fla_fwd_ms", "ours_fwd_ms"), ("fla_fwdbwd_ms", "ours_fwdbwd_ms")):
        if a in row and b in row:
            row[a.replace("fla_", "ratio_").replace("_ms", "")] = row[a] / row[b]
    return row


def warm_one(name, B, T, H, D, ops, dtype=torch.bfloat16):
    """One forward+backward of ours and of fla: fills Triton's compile cache, times nothing."""
    m = mixc.load(ROOT / "examples" / f"{name}.mix")
    Dk = 16 if name == "based" else D
    sizes = {k: v for k, v in {"K": Dk, "V": D, "N": D, "P": D}.items() if k in m.meta["sizes"]}
    x = {k: v.to(DEV, dtype).requires_grad_() for k, v in m.random_inputs(B, T, H, seed=1, **sizes).items()}
    o = m(**x, form="chunked")
    o.backward(torch.randn_like(o))
    if ops and name in ops:
        try:
            f = fla_call(name, ops[name], x, m)
            f().float().sum().backward()
        except Exception as e:
            print("fla warm-up:", name, repr(e)[:120])
    torch.cuda.synchronize()


def grad_check(name, B, T, H, D):
    """bf16 chunked gradients vs fp32 reference gradients (relative RMS, every input)."""
    m = mixc.load(ROOT / "examples" / f"{name}.mix")
    Dk = 16 if name == "based" else D
    sizes = {k: v for k, v in {"K": Dk, "V": D, "N": D, "P": D}.items() if k in m.meta["sizes"]}
    # both sides see the same bf16-rounded inputs: the error is the kernels', not the rounding's
    raw = {k: v.to(torch.bfloat16).float() for k, v in m.random_inputs(B, T, H, seed=2, **sizes).items()}
    out = {}
    grads = []
    for dtype, form in ((torch.float32, "reference"), (torch.bfloat16, "chunked")):
        xs = {k: v.to(DEV, dtype).requires_grad_() for k, v in raw.items()}
        o = m(**xs, form=form)
        gen = torch.Generator(device=DEV).manual_seed(3)
        do = torch.randn(o.shape, generator=gen, device=DEV, dtype=torch.float32).to(o.dtype)
        o.backward(do)
        grads.append({k: v.grad for k, v in xs.items()})
        out[form] = o
    res = {"op": name, "B": B, "T": T, "H": H, "D": D, "o": rel(out["chunked"], out["reference"])}
    res.update({f"d{k}": rel(grads[1][k], grads[0][k]) for k in grads[0]})
    return res


def markdown_table(env, rows, checks, command):
    """The run as a BENCHMARKS.md section: setup line, timing table, correctness table."""
    out = [f"### {env['date']} on {env['gpu']} (torch {env['torch']}, Triton {env['triton']}, fla {env['fla']})",
           "", f"Command: `{command}`", "",
           "| op | B, T, H, D | ours fwd | fla fwd | ratio fwd | ours fwd+bwd | fla fwd+bwd | ratio fwd+bwd | "
           "bf16 err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['B']}, {r['T']}, {r['H']}, {r['D']}"
        if r["op"] == "sdpa_causal":
            out.append(f"| sdpa | {shape} | | {r['fwd_ms']:.3f} | | | | | |")
            continue

        def f(k, r=r):
            v = r.get(k)
            return f"{v:.3f}" if isinstance(v, float) else ("err" if k.replace("_ms", "_error") in r else "")
        err = r.get("fwd_rel_err_vs_fp32_ref")
        out.append(f"| {r['op']} | {shape} | {f('ours_fwd_ms')} | {f('fla_fwd_ms')} | {f('ratio_fwd')} | "
                   f"{f('ours_fwdbwd_ms')} | {f('fla_fwdbwd_ms')} | {f('ratio_fwdbwd')} | "
                   f"{'' if err is None else f'{err:.1e}'} |" + (f" {r['error']}" if "error" in r else ""))
    if checks:
        out += ["", "| op (bf16 vs fp32 reference) | relative RMS errors |", "|---|---|"]
        for c in checks:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in c.items() if isinstance(v, float))
            out.append(f"| {c['op']} | {errs or c.get('error', '')} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="")
    ap.add_argument("--long", action="store_true", help="also B1 T16384 (forward only)")
    ap.add_argument("--no-checks", action="store_true", help="skip the gradient checks")
    ap.add_argument("--shapes", default="train,small", help="train (B4 T4096 H16 D128), small (B8 T1024 H16 D64)")
    ap.add_argument("--warm", action="store_true",
                    help="only compile: run ours and fla once per shape (run one process per mixer in parallel first)")
    args = ap.parse_args()
    ops = fla_ops()
    names = ["gla", "retnet", "linear_attention", "mamba2", "based"]
    if args.only:
        names = args.only.split(",")
    env = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version()}
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        env["fla"] = None
    print(json.dumps(env))
    rows = []
    table = {"train": (4, 4096, 16, 128, True), "small": (8, 1024, 16, 64, True)}
    shapes = [table[s] for s in args.shapes.split(",")] + ([(1, 16384, 16, 128, False)] if args.long else [])
    if args.quick:
        shapes = [table["small"]]
    if args.warm:
        for B, T, H, D, _ in shapes:
            for n in names:
                warm_one(n, B, T, H, D, ops)
        return 0
    for B, T, H, D, bwd in shapes:
        for n in names:
            try:
                rows.append(bench_one(n, B, T, H, D, ops, bwd))
            except Exception as e:
                rows.append({"op": n, "B": B, "T": T, "H": H, "D": D, "error": repr(e)[:300]})
            print(f"row {time.strftime('%H:%M:%S')}", json.dumps(rows[-1]), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "bench_rows.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    checks = []
    for n in ([] if args.no_checks else names):
        try:
            checks.append(grad_check(n, 1, 512 if args.quick else 1024, 4, 64))
        except Exception as e:
            checks.append({"op": n, "error": repr(e)[:300]})
        print("check", json.dumps(checks[-1]), flush=True)
    # SDPA at the same shapes, for scale
    for B, T, H, D, bwd in shapes:
        q, k, v = (torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        r = {"op": "sdpa_causal", "B": B, "T": T, "H": H, "D": D,
             "fwd_ms": med(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
        rows.append(r)
        print("row", json.dumps(r), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_chunked.json").write_text(json.dumps({"env": env, "checks": checks, "rows": rows},
                                                                   indent=1))
    table = markdown_table(env, rows, checks, " ".join(sys.argv))
    print("\n" + table)
    (Path(args.out) / "bench_table.md").write_text(table)  # a section to paste into BENCHMARKS.md
    return 0


if __name__ == "__main__":
    sys.exit(main())
