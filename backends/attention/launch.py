"""Launch code of the attention form (pasted into generated modules: torch and triton only).

The kernels themselves are generated per mixer (score and mask compiled in) and handed in as a
spec dict: ``fwd``, ``dkdv``, ``dq`` (the jitted kernels), ``classify`` (the mask's interval test over
tiles, see ``_attn_tables``), ``npl`` (learnable per-head parameters among the score's scalars).
"""

import torch
import triton
import triton.language as tl  # noqa: F401  (the generated kernels use tl)

try:
    from ..custom_op import _op_empty, _op_or_none, _op_pair
    from ..hostint import _cdiv, _pow2
except ImportError:  # pasted into a generated module, after custom_op.py and hostint.py
    pass


def _attn_floor(x):
    return torch.floor(x)


def _attn_min(a, b):
    return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))


def _attn_max(a, b):
    return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))


def _attn_min4(*xs):
    return torch.stack(torch.broadcast_tensors(*[torch.as_tensor(x) for x in xs])).amin(0)


def _attn_max4(*xs):
    return torch.stack(torch.broadcast_tensors(*[torch.as_tensor(x) for x in xs])).amax(0)


def _attn_ranges(full, empty):
    """Per row of a [rows, cols] tile classification: (lo, flo, fhi, hi) int32 with [lo, hi) covering every
    non-empty tile and [flo, fhi) a run of full tiles inside it (empty when the full tiles are not one run)."""
    rows, cols = full.shape
    idx = torch.arange(cols).view(1, cols)
    nonempty = ~empty
    lo = torch.where(nonempty, idx, cols).amin(1)
    hi = torch.maximum(torch.where(nonempty, idx + 1, 0).amax(1), lo)
    lo = torch.minimum(lo, hi)
    flo = torch.where(full, idx, cols).amin(1)
    fhi = torch.where(full, idx + 1, 0).amax(1)
    run = (full.sum(1) == fhi - flo) & (fhi > flo)
    flo = torch.where(run, flo, hi)
    fhi = torch.where(run, fhi, hi)
    return torch.stack([lo, flo, fhi, hi], 1).to(torch.int32)


_ATTN_TABLES = {}


def _attn_tables(classify, T, TK, off, BM, BN):
    """Tile ranges of one sequence (T queries at positions off.., TK keys at 0..): ([cdiv(T, BM), 4] key-tile
    ranges of each query tile, [cdiv(TK, BN), 4] query-tile ranges of each key tile), on the CPU, from
    ``classify(t_lo, t_hi, u_lo, u_hi) -> (all visible, none visible)`` over tile bounds; a tile cut by T or TK
    is never full."""
    key = (classify, T, TK, off, BM, BN)
    hit = _ATTN_TABLES.get(key)
    if hit is not None:
        return hit
    nm, nn = _cdiv(T, BM), _cdiv(TK, BN)
    if nm == 0 or nn == 0:
        return torch.zeros(nm, 4, dtype=torch.int32), torch.zeros(nn, 4, dtype=torch.int32)
    i_m = torch.arange(nm, dtype=torch.float64).view(nm, 1)
    i_n = torch.arange(nn, dtype=torch.float64).view(1, nn)
    t_lo = off + i_m * BM
    t_hi = off + torch.clamp((i_m + 1) * BM, max=T) - 1
    u_lo = i_n * BN
    u_hi = torch.clamp((i_n + 1) * BN, max=TK) - 1
    full, empty = classify(t_lo, t_hi, u_lo, u_hi)
    full = torch.as_tensor(full).expand(nm, nn) & ((i_m + 1) * BM <= T) & ((i_n + 1) * BN <= TK)
    empty = torch.as_tensor(empty).expand(nm, nn)
    out = (_attn_ranges(full, empty), _attn_ranges(full.t(), empty.t()))
    if len(_ATTN_TABLES) > 1024:
        _ATTN_TABLES.clear()
    _ATTN_TABLES[key] = out
    return out


_ATTN_WORK = {}


def _attn_work(classify, seqs, off, BM, BN, side, device):
    """[programs, 10] int32 work rows (q_start, q_len, k_start, k_len, off, tile, lo, flo, fhi, hi): one per query
    tile (side "q") or key tile (side "k") of each sequence (q_start, q_len, k_start, k_len) in ``seqs``."""
    key = (classify, seqs, off, BM, BN, side, str(device))
    hit = _ATTN_WORK.get(key)
    if hit is not None:
        return hit
    rows = []
    for qs, ql, ks, kl in seqs:
        tab = _attn_tables(classify, ql, kl, off, BM, BN)[0 if side == "q" else 1]
        n = tab.shape[0]
        if n:
            head = torch.tensor([qs, ql, ks, kl, off], dtype=torch.int32).expand(n, 5)
            rows.append(torch.cat([head, torch.arange(n, dtype=torch.int32).view(n, 1), tab], 1))
    out = torch.cat(rows) if rows else torch.zeros(0, 10, dtype=torch.int32)
    # longest first: the programs that visit the most tiles (the last query tiles of a causal mask) start first,
    # so the launch does not end on a tail of long programs (the row order is free: each row names its tile)
    out = out[torch.argsort(out[:, 6] - out[:, 9], stable=True)].to(device)
    if len(_ATTN_WORK) > 256:
        _ATTN_WORK.clear()
    _ATTN_WORK[key] = out
    return out


def _attn_config(kind, dk, dv, device, T=None, esize=2):
    """Launch table: (BM, BN, num_warps, num_stages) for kernel ``kind`` (fwd, dkdv, dq) at widths dk, dv,
    T queries and ``esize``-byte inputs. The interpreter (CPU) gets small tiles; a GPU gets the flash-2 shapes
    (Hopper: 128-query tiles), and a decode-sized call (T <= 16) 16-query tiles (tl.dot's smallest). fp32 inputs
    (exact products: no tensor-core path) wider than 32 get half-size tiles outside decode: at 128 the 16-bit
    shapes need ~230 KB of shared memory (the limit is 232448 bytes) and spill 12 KB a thread."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if kind == "fwd" and T is not None and T <= 16:
        return 16, 64, 4, 3
    if esize >= 4 and max(dk, dv) > 32:
        return (32, 64, 4, 2) if kind == "dkdv" else (64, 32, 4, 2)
    wide = max(dk, dv) > 64
    if max(dk, dv) > 128:  # 256-wide tiles: the 128-wide shapes need 256 KB of shared memory (limit 232448 B)
        return {"fwd": (128, 64, 8, 2), "dkdv": (32, 64, 8, 2)}.get(kind, (128, 32, 8, 3))
    if kind == "fwd":
        return (128, 64, 8, 3) if wide else (128, 64, 4, 3)
    if kind == "dkdv":  # BM queries per step, BN keys per program
        return (32, 128, 8, 3) if wide else (32, 128, 4, 3)
    # dq: BM queries per program, BN keys per step. (The H200 sweep at D128 bf16 put 128x64 3% ahead, within its
    # noise; with the generated kernels it spills for some scores (ptxas_attention.py), 128x32 nowhere.)
    return (128, 32, 8, 3) if wide else (128, 32, 4, 3)


_ATTN_NOPARS = {}


def _attn_nopars(H, device):
    """The PARAMS operand of a score that reads no per-head scalar: [H, 1] zeros, made once per (H, device)."""
    key = (H, str(device))
    hit = _ATTN_NOPARS.get(key)
    if hit is None:
        hit = _ATTN_NOPARS[key] = torch.zeros(H, 1, dtype=torch.float32, device=device)
    return hit


def _attn_dot(dtype):
    """tl.dot's input precision: exact products for fp32 (and fp64) inputs, as the reference computes; 16-bit
    inputs multiply exactly anyway (the default, tf32, applies to fp32 operands only)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _attn_width(d):
    return max(16, _pow2(d))


_ATTN_SMS = {}  # device index -> multiprocessors


def _attn_splits(T, nn, BH, device, BM):
    """Key splits of a decode-sized call (T <= BM queries, many key tiles): enough programs to fill the GPU."""
    if T > BM or nn < 4:
        return 1
    if device.type == "cuda":
        sms = _ATTN_SMS.get(device.index)
        if sms is None:
            sms = _ATTN_SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(nn // 2, _cdiv(2 * sms, BH), 64))
    return 2


def _attn_forward(spec, q, k, v, pars, off, dims, allow_split, seqs=None):
    """o [B, T, H, DV] (q's dtype) and the base-2 logsumexp [B, H, T] fp32 of softmax attention of q (positions
    off..off+T-1) over keys k, v (positions 0..TK-1); with ``seqs`` ((q_start, q_len, k_start, k_len), ...) the
    packed sequences of a varlen call (B = 1), each on its own. pars [H, NP] fp32; dims the sizes the score
    reads."""
    B, T, H, DK = q.shape
    TK, DV = k.shape[1], v.shape[3]
    BM, BN, warps, stages = _attn_config("fwd", DK, DV, q.device, T if seqs is None else None, q.element_size())
    work = _attn_work(spec["classify"], seqs or ((0, T, 0, TK),), off, BM, BN, "q", q.device)
    nn = _cdiv(TK, BN)
    ns = _attn_splits(T, nn, B * H, q.device, BM) if allow_split and seqs is None else 1
    if ns == 1:
        o = torch.empty(1, B, T, H, DV, dtype=q.dtype, device=q.device)
    else:
        o = torch.empty(ns, B, T, H, DV, dtype=torch.float32, device=q.device)
    lse = torch.empty(ns, B, H, T, dtype=torch.float32, device=q.device)
    grid = (work.shape[0], B * H, ns)
    spec["fwd"][grid](
        q, k, v, o, lse, work, pars,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), o.stride(0), o.stride(1), o.stride(2), o.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
        H, pars.shape[1], *dims,
        DK=DK, DV=DV, BM=BM, BN=BN, BK=_attn_width(DK), BV=_attn_width(DV), NS=ns, DOT=_attn_dot(q.dtype),
        EVEN=DK == _attn_width(DK) and DV == _attn_width(DV),
        num_warps=warps, num_stages=stages,
    )
    if ns == 1:
        return o[0], lse[0]
    # merge the splits: lse = log2 sum_s 2^lse_s, o = sum_s 2^(lse_s - lse) o_s
    m = lse.amax(0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp2(lse - m)  # [NS, B, H, T]
    den = w.sum(0)
    w = w / torch.where(den == 0, torch.ones_like(den), den)
    out = (o * w.permute(0, 1, 3, 2).unsqueeze(-1)).sum(0)
    return out.to(q.dtype), m + torch.log2(den)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # out and its gradient [B, T, H, DV] (unit stride along the width)
    DELTA,  # [B, H, T] fp32: delta_t = sum_j do_tj o_tj
    soB, soT, soH, sdB, sdT, sdH,  # strides of O and DO
    T, H,  # tokens, heads
    DV: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,  # value width, token and width tiles (BV >= DV)
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # (64-bit batch offsets)
    o_m = i_m * BM + tl.arange(0, BM)
    o_v = tl.arange(0, BV)
    mask = (o_m < T)[:, None] & (o_v < DV)[None, :]
    b_o = tl.load(O + i_b * soB + i_h * soH + o_m[:, None] * soT + o_v[None, :], mask=mask, other=0.0)
    b_do = tl.load(DO + i_b * sdB + i_h * sdH + o_m[:, None] * sdT + o_v[None, :], mask=mask, other=0.0)
    delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [BM], fp32 products
    tl.store(DELTA + i_bh.to(tl.int64) * T + o_m, delta, mask=o_m < T)


def _attn_backward(spec, q, k, v, o, lse, do, pars, off, dims, seqs=None):
    """(dq, dk, dv, dpars [H, NP]) of softmax attention, flash-2 style: delta = rowsum(do * o) (a small kernel,
    fp32 [B, H, T]), then one kernel over key tiles (dk, dv, parameter gradients) and one over query tiles (dq).
    lse [B, H, T] fp32 contiguous (the forward's)."""
    B, T, H, DK = q.shape
    TK, DV = k.shape[1], v.shape[3]
    BK, BV = _attn_width(DK), _attn_width(DV)
    even = DK == BK and DV == BV
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    BMp = 16 if q.device.type != "cuda" else max(16, min(128, 8192 // BV))
    _attn_bwd_preprocess_kernel[(_cdiv(T, BMp), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), T, H,
        DV=DV, BM=BMp, BV=BV, num_warps=4,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    npl = spec["npl"]
    BM, BN, warps, stages = _attn_config("dkdv", DK, DV, q.device, None, q.element_size())
    seqs = seqs or ((0, T, 0, TK),)
    work = _attn_work(spec["classify"], seqs, off, BM, BN, "k", q.device)
    nn = work.shape[0]
    # every program stores its partial sums (no zeroing); with no learnable parameter the kernel never reads it
    dpar = torch.empty(npl, B * H, nn, dtype=torch.float32, device=q.device) if npl else pars
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
               v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1))
    spec["dkdv"][(nn, B * H)](
        q, k, v, do, lse, delta, dk, dv, dpar, work, pars, *strides, H, pars.shape[1], *dims,
        DK=DK, DV=DV, BM=BM, BN=BN, BK=BK, BV=BV, NPL=npl, DOT=_attn_dot(q.dtype), EVEN=even,
        num_warps=warps, num_stages=stages,
    )
    BM, BN, warps, stages = _attn_config("dq", DK, DV, q.device, None, q.element_size())
    work = _attn_work(spec["classify"], seqs, off, BM, BN, "q", q.device)
    spec["dq"][(work.shape[0], B * H)](
        q, k, v, do, lse, delta, dq, work, pars, *strides, H, pars.shape[1], *dims,
        DK=DK, DV=DV, BM=BM, BN=BN, BK=BK, BV=BV, DOT=_attn_dot(q.dtype), EVEN=even,
        num_warps=warps, num_stages=stages,
    )
    if not npl:
        return dq, dk, dv, None
    dpars = torch.zeros_like(pars)
    dpars[:, :npl] = dpar.view(npl, B, H, nn).sum((1, 3)).t()
    return dq, dk, dv, dpars


class _AttnFunction(torch.autograd.Function):
    """Softmax attention with the generated kernels; gradients to q, k, v and the score's parameters."""

    @staticmethod
    def forward(ctx, q, k, v, pars, spec, off, dims, seqs):
        q, k, v = (x if x.is_contiguous() else x.contiguous() for x in (q, k, v))
        o, lse = _attn_forward(spec, q, k, v, pars, off, dims, False, seqs)
        ctx.save_for_backward(q, k, v, o, lse, pars)
        ctx.spec, ctx.off, ctx.dims, ctx.seqs = spec, off, dims, seqs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, pars = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()  # the kernels take any strides but the width's
        dq, dk, dv, dpars = _attn_backward(ctx.spec, q, k, v, o, lse, do, pars, ctx.off, ctx.dims, ctx.seqs)
        return dq, dk, dv, dpars, None, None, None, None


def _attn_seqs(cu_seqlens):
    """((q_start, q_len, k_start, k_len), ...) of the packed sequences (read on the host), or None."""
    if cu_seqlens is None:
        return None
    cu = [int(c) for c in cu_seqlens.tolist()]
    return tuple((a, b - a, a, b - a) for a, b in zip(cu, cu[1:]))


def _attn_define_ops(spec):
    """A generated module's attention (its kernels: ``spec``) as a forward and a backward torch operator
    (``mixc::attn_{fwd,bwd}_<tag>``): under torch.compile a call is one opaque node, and the tile list of packed
    sequences is built inside it, from the boundaries read when it runs, not while tracing."""
    from typing import Optional  # not X | None: older torch.library schemas read only typing.Optional

    fns = [spec[n] for n in ("fwd", "dkdv", "dq", "classify")] + [_attn_forward, _attn_backward, _attn_work,
                                                                   _attn_tables, _attn_config, _attn_seqs]
    fwd_name, bwd_name, defined = _op_pair("attn", fns, sorted((n, repr(x)) for n, x in spec.items()
                                                                if not callable(x)))
    if defined is not None:
        return defined
    Tensor = torch.Tensor

    @torch.library.custom_op(f"mixc::{fwd_name}", mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, pars: Tensor, cu_seqlens: Optional[Tensor], off: int,  # noqa: UP045
            dims: list[float], save: bool) -> tuple[Tensor, Tensor]:
        q, k, v = (x if x.is_contiguous() else x.contiguous() for x in (q, k, v))
        o, lse = _attn_forward(spec, q, k, v, pars, off, dims, not save, _attn_seqs(cu_seqlens))
        return o, lse.contiguous()

    @fwd.register_fake
    def _(q, k, v, pars, cu_seqlens, off, dims, save):
        B, T, H, _ = q.shape
        return q.new_empty(B, T, H, v.shape[3]), q.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.custom_op(f"mixc::{bwd_name}", mutates_args=())
    def bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, pars: Tensor,
            cu_seqlens: Optional[Tensor], off: int, dims: list[float]  # noqa: UP045
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, k, v = (x if x.is_contiguous() else x.contiguous() for x in (q, k, v))
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv, dpars = _attn_backward(spec, q, k, v, o, lse, do, pars, off, dims, _attn_seqs(cu_seqlens))
        return dq, dk, dv, (dpars if dpars is not None else _op_empty(q))

    @bwd.register_fake
    def _(do, q, k, v, o, lse, pars, cu_seqlens, off, dims):
        dpars = torch.empty_like(pars) if spec["npl"] else _op_empty(q)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpars

    def setup_context(ctx, inputs, output):
        q, k, v, pars, cu_seqlens, off, dims, save = inputs
        ctx.save_for_backward(q, k, v, pars, cu_seqlens, *output)
        ctx.off, ctx.dims = off, dims

    def backward(ctx, do, _):
        q, k, v, pars, cu, o, lse = ctx.saved_tensors
        dq, dk, dv, dpars = bwd(do, q, k, v, o, lse, pars, cu, ctx.off, ctx.dims)
        return dq, dk, dv, _op_or_none(dpars), None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


def _attn_apply(spec, q, k, v, pars, off, dims, cu_seqlens=None):
    """o [B, T, H, DV] for q [B, T, H, DK] at positions off.. against k [B, TK, H, DK], v [B, TK, H, DV]; with
    ``cu_seqlens`` (sequence boundaries, a tensor) the packed sequences of q, k, v (B = 1, no cache) each attend
    within themselves. Differentiable when any operand requires grad, else (inference, decode) it may split the
    keys. Under torch.compile: the module's operator (``spec["op"]``)."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, pars))
    if torch.compiler.is_compiling():
        return spec["op"](q, k, v, pars, cu_seqlens, int(off), [float(d) for d in dims], grad)[0]
    seqs = _attn_seqs(cu_seqlens)
    if grad:
        return _AttnFunction.apply(q, k, v, pars, spec, off, dims, seqs)
    q, k, v = (x if x.is_contiguous() else x.contiguous() for x in (q, k, v))
    return _attn_forward(spec, q, k, v, pars, off, dims, True, seqs)[0]


def _attn_per_sequence(form, inputs, params, states, sizes, output_final_state, cu):
    """A packed call with a cache or a final cache, one sequence at a time (each sequence has its own cache
    length): (o [1, T, H, ...], the final caches stacked [N, H, Tc, ...] when their lengths agree)."""
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        st = {n: x[i : i + 1] for n, x in states.items()}
        if a == b:
            finals.append(st)
            continue
        o_i, f_i = form({n: x[:, a:b] for n, x in inputs.items()}, params, st, sizes, True)
        outs.append(o_i)
        finals.append(f_i)
    o = torch.cat(outs, 1)
    if not output_final_state:
        return o, None
    full = [f for f in finals if f]
    for f in finals:
        if not f:  # an empty sequence with no cache: an empty cache
            f.update({n: x[:, :, :0] for n, x in full[0].items()})
    shapes = {n: sorted({tuple(f[n].shape[1:]) for f in finals}) for n in full[0]}
    for n, sh in shapes.items():
        if len(sh) > 1:
            raise MixerCallError(  # noqa: F821 (runtime.py, pasted before this module)
                f"final state '{n}' (a key/value cache) has a different length in each packed sequence ({sh}), so it "
                "cannot be stacked [N, H, ...]: pass output_final_state=False, or run the sequences separately")
    return o, {n: torch.cat([f[n] for f in finals], 0) for n in full[0]}



@triton.jit
def _attn_decode_merge_kernel(
    OP, LP,  # partial outputs [NS, B * H, BV] fp32 and their base-2 logsumexp [NS, B * H] fp32
    O,  # out [B, H, DV] (any float dtype, unit stride along the width)
    sob, soh,  # strides of O
    H,  # heads
    DV: tl.constexpr, BV: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr,  # width, its tile, splits (BS >= NS)
):
    """lse = log2 sum_s 2^lse_s,  o = sum_s 2^(lse_s - lse) o_s  (a split with no visible key has lse_s = -inf)."""
    i_bh = tl.program_id(0)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    o_s = tl.arange(0, BS)
    o_v = tl.arange(0, BV)
    lse = tl.load(LP + o_s * tl.num_programs(0) + i_bh, mask=o_s < NS, other=float("-inf"))  # [BS]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # [BS]
    den = tl.sum(w, 0)
    w = w / tl.where(den == 0.0, 1.0, den)
    part = tl.load(OP + (o_s[:, None] * tl.num_programs(0) + i_bh) * BV + o_v[None, :], mask=(o_s < NS)[:, None],
                   other=0.0)  # [BS, BV]
    out = tl.sum(w[:, None] * part, 0)
    tl.store(O + i_b * sob + i_h * soh + o_v, out.to(O.dtype.element_ty), mask=o_v < DV)


def _attn_decode_plan(cap, BH, device):
    """(BN, NS, num_warps) of the decode kernel for a cache of ``cap`` slots and BH (batch, head) pairs: enough
    key splits to give every multiprocessor ~8 programs (the kernel streams the cache once: memory-bound)."""
    if device.type != "cuda":
        return 16, (2 if cap > 32 else 1), 4
    BN = 64
    sms = _ATTN_SMS.get(device.index)
    if sms is None:
        sms = _ATTN_SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    nn = _cdiv(cap, BN)
    return BN, max(1, min(nn, _cdiv(8 * sms, BH), 128)), 4


def _attn_decode(spec, q, kc, vc, pos, pars, dims, out, op, lp, ring):
    """One decode step's attention: q [B, H, DK] at position ``pos`` ([1] int32 on the device) against the caches
    kc [B, H, CAP, DK], vc [B, H, CAP, DV] (slot u, or u % CAP with ``ring``), into out [B, H, DV]. op [NS, B * H,
    BV] and lp [NS, B * H] fp32 are preallocated scratch (NS from _attn_decode_plan). Allocates nothing."""
    B, H, CAP, DK = kc.shape
    DV = vc.shape[3]
    BN, ns, warps = _attn_decode_plan(CAP, B * H, q.device)
    BK, BV = _attn_width(DK), _attn_width(DV)
    spec["decode"][(B * H, ns)](
        q, kc, vc, op, lp, pos, pars, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), H, pars.shape[1], *dims,
        DK=DK, DV=DV, BN=BN, BK=BK, BV=BV, NS=ns, CAP=CAP, RING=ring, num_warps=warps,
    )
    _attn_decode_merge_kernel[(B * H,)](
        op, lp, out, out.stride(0), out.stride(1), H, DV=DV, BV=BV, NS=ns, BS=max(2, _pow2(ns)),
        num_warps=4,
    )
    return out
