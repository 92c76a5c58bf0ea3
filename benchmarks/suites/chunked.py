"""The chunked form of the five separable catalogue mixers against flash-linear-attention 0.6.0.

Shapes (bf16): B4 T4096 H16 D128 ("train") and B8 T1024 H16 D64 ("small"); forward, and forward+backward.
Ours: the whole call ``m(**x, form="chunked")`` (checks, prologue, kernels). fla: ``chunk_gla``,
``chunk_retention``, ``chunk_simple_gla`` (mamba2's SSD form), ``chunk_linear_attn(normalize=True)`` on
``elu + 1`` features, ``parallel_based``. Check: our bf16 forward against the fp32 reference on the same
bf16 inputs (relative RMS).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import mixc

from .common import DEV, rel, row, time_ms, wanted

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("gla", "retnet", "mamba2", "linear_attention", "based")


def _fla_ops() -> dict:
    ops = {}
    try:
        from fla.ops.based import parallel_based
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.retention import chunk_retention
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # reported in the rows' notes
        print("fla not importable:", repr(e)[:200])
        return ops
    ops["gla"] = lambda x, m: chunk_gla(x["q"], x["k"], x["v"], x["g"])[0]
    ops["retnet"] = lambda x, m: chunk_retention(x["q"], x["k"], x["v"])[0]
    ops["linear_attention"] = lambda x, m: chunk_linear_attn(F.elu(x["q"]) + 1, F.elu(x["k"]) + 1, x["v"],
                                                             normalize=True)[0]
    ops["based"] = lambda x, m: parallel_based(x["q"], x["k"], x["v"])

    def mamba2(x, m):
        A = m.parameters_init(x["x"].shape[2], device=x["x"].device)["A"]
        return chunk_simple_gla(x["C"], x["B"] * x["dt"][..., None], x["x"], g=x["dt"].float() * A, scale=1.0)[0]

    ops["mamba2"] = mamba2
    return ops


def _inputs(m, name: str, B: int, T: int, H: int, D: int, dtype) -> dict:
    sizes = {"K": 16 if name == "based" else D, "V": D, "N": D, "P": D}
    sizes = {k: v for k, v in sizes.items() if k in m.meta["sizes"]}
    raw = m.random_inputs(B, T, H, dtype=torch.float32, seed=1, **sizes)
    return {k: v.to(DEV, dtype) for k, v in raw.items()}


def _fb(fn, x: dict, do: torch.Tensor):
    xg = {k: v.detach().requires_grad_() for k, v in x.items()}

    def go():
        for v in xg.values():
            v.grad = None
        fn(xg).backward(do)

    return go


def run(smoke: bool) -> list[dict]:
    shapes = [("smoke", 1, 24, 2, 16)] if smoke else [("train", 4, 4096, 16, 128), ("small", 8, 1024, 16, 64)]
    dtype = torch.float32 if smoke else torch.bfloat16
    ops = {} if smoke else _fla_ops()
    rows = []
    for label, B, T, H, D in shapes:
        for name in NAMES:
            if not wanted(f"{name} B{B} T{T} H{H} D{D}"):
                continue
            m = mixc.load(ROOT / "examples" / f"{name}.mix")
            x = _inputs(m, name, B, T, H, D, dtype)
            ours = lambda xx, m=m: m(**xx, form="chunked")  # noqa: E731
            o = ours(x)
            with torch.no_grad():
                check = rel(o, m.reference(**{k: v.float() for k, v in x.items()}))
            case = f"{name} B{B} T{T} H{H} D{D}"
            fla = ops.get(name)
            fla_ms = fla_fb_ms = None
            note = "" if fla or smoke else "fla missing"
            if fla is not None:
                try:
                    fla_ms = time_ms(lambda: fla(x, m))
                except Exception as e:
                    note = f"fla fwd: {e!r}"[:120]
            rows.append(row("chunked", f"{case} fwd", time_ms(lambda: ours(x)), f"fla {name}", fla_ms, check, note))
            do = torch.randn_like(o)
            if fla is not None:
                try:
                    fla_fb_ms = time_ms(_fb(lambda xx: fla(xx, m), x, do))
                except Exception as e:
                    note = f"fla fwd+bwd: {e!r}"[:120]
            rows.append(row("chunked", f"{case} fwd+bwd", time_ms(_fb(ours, x, do)), f"fla {name}", fla_fb_ms,
                            None, note))
            print(rows[-2], rows[-1], flush=True)
    return rows
