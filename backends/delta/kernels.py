"""The chunked delta rule: Triton kernels for the (gated) delta-rule recurrence, forward, and its backward.

After the PyTorch prologue of the emitted form, every file whose transition the analysis calls
``delta`` or ``gated_delta`` is, per (sequence, head),

    S_t = exp(g_t) (I - a_t b_t^T) S_{t-1} + a_t v_t^T,      o_t = scale * q_t^T S_t

(deltanet: a = k, b = beta k, v = beta v; g = 0 without a gate). With the pseudo-values
u_t = v_t - exp(g_t) b_t^T S_{t-1} the update is S_t = exp(g_t) S_{t-1} + a_t u_t^T, and within a
chunk of BT tokens that starts from S_0, with G_t the chunk's cumulative log gate,

    (I + L) U = V - diag(e^G) B S_0,        L[t, s] = e^(G_t - G_s) b_t . a_s   (s < t, else 0)

(Yang et al. 2024, the UT transform). With T = (I + L)^-1 (by recursive doubling of diagonal blocks, 2 x 2 to
64 x 64, two products a level; fp32), W = T diag(e^G) B and U0 = T V, the chunk is

    U   = U0 - W S_0
    O   = scale * ((Q e^G) S_0 + (Q A^T * e^(G_t - G_s) [s <= t]) U)
    S_C = e^(G_C) S_0 + (A e^(G_C - G))^T U

Gates enter only as e^(G_t - G_s) with s <= t (<= 1 for g <= 0), never as e^ of a positive sum.

Packed sequences (cu_seqlens: one batch row of N sequences) keep this layout with B = 1: a chunk table
(:func:`_dl_layout`) gives each chunk's first token and its sequence's end, so a chunk never crosses a boundary,
and each walk runs one sequence's chunks from its own initial state (VARLEN in every kernel).

    forward   _dl_prep_kernel      per chunk, in parallel: G, L, T (blockwise inverse), W and U0
                                   (and T itself when a backward will follow)
              _dl_walk_kernel      per head and value block, sequential over chunks: U and every chunk's S_0
              _dl_out_kernel       per chunk and value block, in parallel: O
    backward  _dl_bwd_local_kernel per chunk and value block, in parallel: dU's in-chunk part scale M^T dO
              _dl_bwd_walk_kernel  the adjoint walk, sequential over chunks in reverse: dU and every
                                   chunk's dS_C (dS_0 = scale (Q e^G)^T dO + e^(G_C) dS_C - W^T dU)
              _dl_bwd_vloop_kernel per chunk, in parallel, what sums over values: dq, dv, dW, dU V^T, part of
                                   da and of the log gate's dG
              _dl_bwd_wy_kernel    per chunk, in parallel, through W and T: dT, dL = -T^T dT T^T (the
                                   derivative of the inverse), da, db, dg

:func:`mixc.backends.delta.chunked_torch.dl_chunked_torch` is the same algorithm in PyTorch (differentiable;
not pasted into generated modules): the tests check the kernels, forward and backward, against it and against
the reference. The kernels are in fwd.py and bwd.py; W, U and hs are stored in the work dtype (the inputs' for
16-bit inputs, whose products then take 16-bit operands with fp32 accumulation; fp32 and ieee products for fp32).

This file needs only torch (and the kernels of fwd.py and bwd.py); `mixc compile` pastes it into the generated module.
"""

import torch

try:
    from ..custom_op import _op_defined, _op_empty, _op_or_none, _op_tag
    from ..hostint import _cdiv, _pow2
    from .bwd import _dl_bwd_local_kernel, _dl_bwd_vloop_kernel, _dl_bwd_walk_kernel, _dl_bwd_wy_kernel
    from .fwd import _dl_out_kernel, _dl_prep_kernel, _dl_rows, _dl_walk_chunks, _dl_walk_kernel
except ImportError:  # pasted into a generated module, after the kernels
    pass


DL_CHUNK = 64  # tokens per chunk
# largest value block of the walks (they keep a [K, BV] fp32 state in registers): 64 for 16-bit inputs with keys
# up to 128 (H200, benchmarks/tune.py delta, 2026-12-04: at B4 T4096 H16 D128 bf16 fwd 1.40 -> 1.27 ms and, with
# the adjoint walk in one stage, fwd+bwd 3.91 -> 3.25 ms; at B8 T1024 H16 D64 fwd+bwd 0.93 -> 0.85 ms); 32 for fp32
# inputs (their walks spill at 64: 20 KB of stack at K = V = 128 on sm_90, against 2.4 KB at 32) and for keys above
# 128 (not timed; at K = V = 256 bf16 the walk spills 744 B at 64 against 88 B at 32, the vloop 1352 B against 824)
DL_BV = 64
DL_BV_SMALL = 32
DL_BVO = 64  # largest value block of the output kernel (it recomputes Q A^T per value block)
# the backward's value loop (_dl_bwd_vloop_kernel) steps through the values in blocks of at most this (0: the walks'
# value block). Its five fp32 accumulators do not depend on the block; a smaller one loads smaller tiles: at
# K = V = 128 bf16 on sm_90 (8 warps) 32 spills 184 B (fp32 work tensors) and 32 B (16-bit), 64 spills 704 and 168
# (benchmarks/ptxas_delta.py --bv). On the H200 (tune.py delta, 2026-12-04, 16-bit work) 32 was no faster: D128
# fwd+bwd 1.943 against 1.935 ms.
DL_BVL = 0
# the in-chunk inverse's products for 16-bit inputs (fp32 inputs: ieee). tf32, as the prep kernel's other products:
# against a float64 inverse of 64-token chunks (D128, bf16 keys) its error in T and in T V is 9e-5 with random keys
# and 1.1e-3 at worst with keys all near one direction and beta in (0.9, 1), against 4e-3 for a bf16 rounding;
# tf32x3 (1e-7) takes three tensor-core passes a product and splits every operand: on the H200 (2026-12-04,
# benchmarks/tune.py delta, fp32 work) it made the deltanet forward 1.036 ms against 0.957 at B4 T4096 H16 D128 bf16,
# 0.260 against 0.225 at B8 T1024 H16 D64.
DL_INV_PREC = "tf32"
# 16-bit work tensors (W, U, hs and the backward's scratch in the inputs' dtype, 16-bit tl.dot operands) for 16-bit
# inputs, as fla stores them: half the traffic of fp32 work tensors. On the H200 (Triton 3.6, 2026-12-04,
# benchmarks/tune.py delta) deltanet B4 T4096 H16 D128 bf16 fwd 0.957 -> 0.651 ms, fwd+bwd 2.930 -> 1.935 ms; B8 T1024
# H16 D64 fwd+bwd 0.692 -> 0.550 ms; every work tensor and gradient within 5e-3 of the fp32 path at key widths 16, 64
# and 128 (session 15's failure at 16 came with tf32x3 and 16-bit products in one kernel: the prep kernel now takes
# fp32 operands only). The price is fla's: in the corner where each step nearly erases the last (keys along one
# direction, beta near 1) rounding u, the in-chunk scores and the gated keys to bf16 costs as much as rounding the
# inputs does (gated_deltanet B1 T150 D64 bf16: 2.52e-2 against the float64 reference, fla 2.51e-2, fp32 work
# 1.60e-2, the inputs rounded alone 1.57e-2: benchmarks/suites/delta.py "aligned keys"). Set it False on a loaded
# mixer's generated module (``m.generated.DL_WORK16 = False``, read at each call) for fp32 work tensors.
DL_WORK16 = True
DL_WORK16_MIN_K = 64  # with DL_WORK16, 16-bit work tensors from this key width (below: fp32; a floor from session 15)


# (warps, pipeline stages) of each kernel, from Triton 3.6's sm_90 build at K = V = 128, bf16
# (benchmarks/ptxas_delta.py --bv 64; BV 64 for the walks, the output and local kernels). Registers / spill bytes /
# shared KB: prep 255/0/64, walk 253/0/81 (2 stages), out 155/0/56, bwd local 94/0/40, adjoint walk (8 warps,
# 1 stage) 241/0/64 (2 stages: 255/0/121, slower on the H200), bwd vloop (8 warps) 255/416/64, bwd wy (8 warps)
# 254/0/128. At BV 32 (session 13): walk 182/0/73, adjoint walk 192/0/101, vloop 255/80/64.
_DL_LAUNCH = {"_dl_prep_kernel": (4, 1), "_dl_walk_kernel": (4, 2), "_dl_out_kernel": (4, 1),
              "_dl_bwd_local_kernel": (4, 1), "_dl_bwd_walk_kernel": (8, 1),
              "_dl_bwd_vloop_kernel": (8, 1), "_dl_bwd_wy_kernel": (8, 1)}


def _dl_cfg(name, q=None, BK=0):
    """Launch options of a kernel: ``num_warps`` and ``num_stages``; one stage for fp32 inputs with keys above
    128 (two would not fit: the adjoint walk's 2 stages take 279 KB of shared memory at K = V = 256, fp32)."""
    warps, stages = _DL_LAUNCH[name]
    if q is not None and q.dtype == torch.float32 and BK > 128:
        stages = 1
    return {"num_warps": warps, "num_stages": stages}


def _dl_geometry(q, v):
    """(B, T, H, K, V, BT, NT, BK, BV, NV, PREC): one key block of all K keys, value blocks of up to DL_BV (16-bit
    inputs, K <= 128) or DL_BV_SMALL;
    fp32 products stay fp32 (ieee), bf16/fp16 inputs take 16-bit operands (PREC applies to fp32 operands only)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"delta_chunk: q's dtype {q.dtype} is not float32, float16 or bfloat16")
    if K > 256:
        raise ValueError(f"delta_chunk: the key width K = {K} of q, a, b is above 256 (one key block per program)")
    BT = DL_CHUNK
    BV = min(max(16, _pow2(V)), DL_BV if q.dtype != torch.float32 and K <= 128 else DL_BV_SMALL)
    prec = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    return B, T, H, K, V, BT, _cdiv(T, BT), max(16, _pow2(K)), BV, _cdiv(V, BV), prec


def _dl_work_dtype(q, work16):
    """The dtype of W, U and hs (and of the walks' and the output's tl.dot operands): q's when 16-bit, ``work16``
    (the calling module's DL_WORK16, passed with each call) and the key width at least DL_WORK16_MIN_K; else
    fp32."""
    half = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] >= DL_WORK16_MIN_K
    return q.dtype if work16 and half else torch.float32


def _dl_out_block(BV, NV):
    """The output kernel's value block: up to DL_BVO, a divisor of the walk's padded width BV * NV."""
    bvo = BV
    while bvo * 2 <= DL_BVO and NV % (bvo * 2 // BV) == 0:
        bvo *= 2
    return bvo


def _dl_layout(cu_seqlens, T):
    """Packed sequences (``cu_seqlens`` [N + 1], boundaries in the one batch row of T tokens) as chunks, on the
    device and with no host sync: (ctab [NC, 2] int32, each chunk's first token and its sequence's end; coff
    [N + 1] int32, each sequence's first chunk; NC; N). NC = T // DL_CHUNK + N bounds the chunks of any split
    (the shapes do not depend on the boundaries' values); chunks past the last are empty ([T, T])."""
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    nch = (cu[1:] - cu[:-1] + DL_CHUNK - 1) // DL_CHUNK
    coff = torch.cat([cu.new_zeros(1), torch.cumsum(nch, 0)])
    NC = T // DL_CHUNK + N
    c = torch.arange(NC, device=cu.device)
    n = torch.searchsorted(coff[1:].contiguous(), c, right=True).clamp_max(N - 1)  # chunk c's sequence
    pad = c >= coff[-1]
    t0 = torch.where(pad, T, cu[n] + (c - coff[n]) * DL_CHUNK)
    t1 = torch.where(pad, T, cu[n + 1])
    return torch.stack([t0, t1], 1).to(torch.int32).contiguous(), coff.to(torch.int32), NC, N


def dl_chunk_fwd(q, a, b, v, g=None, h0=None, scale=1.0, output_final_state=False, out_dtype=None, save=False,
                 bs=None, vs=None, work16=False, layout=None):
    """Triton forward. q, a, b: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log gates or None; h0:
    [B, H, K, V] or None; bs, vs: [B, T, H] per-token scales of b and v or None. Returns (o [B, T, H, V] in
    ``out_dtype`` (default q's), final state [B, H, K, V] fp32 or None, and with ``save`` what the backward
    reads: (W, U, G, T, hs), else None). ``work16``: W, U and hs in q's dtype when it is 16-bit. ``layout``
    (:func:`_dl_layout`): B = 1 row of N packed sequences, whose states h0 and the final one are [N, H, K, V]."""
    B, T, H, K, V, BT, NT, BK, BV, NV, prec = _dl_geometry(q, v)
    NS = B
    if layout is not None:
        ctab, coff, NT, NS = layout
    q, a, b, v = (x.contiguous() for x in (q, a, b, v))
    dev = q.device
    f32, wdt = torch.float32, _dl_work_dtype(q, work16)
    W = torch.empty(B, H, NT * BT, BK, device=dev, dtype=wdt)
    U = torch.empty(B, H, NT * BT, BV * NV, device=dev, dtype=wdt)
    Gc = torch.empty(B, H, NT * BT, device=dev, dtype=f32)
    Tm = torch.empty(B, H, NT * BT, BT, device=dev, dtype=f32) if save else Gc
    hs = torch.empty(B, H, NT, BK, BV * NV, device=dev, dtype=wdt)
    if layout is not None:  # the chunks past the last (no walk visits them) lie in the last N: their states are 0
        hs[:, :, NT - NS:].zero_()
    gg, bsf, vsf = (x.to(f32).contiguous() if x is not None else Gc for x in (g, bs, vs))
    if layout is None:
        ctab = coff = Gc  # (stand-ins: read only with VARLEN)
    vl = layout is not None
    _dl_prep_kernel[(NT, B * H)](a, b, v, gg, bsf, vsf, W, U, Gc, Tm, ctab, T, VARLEN=vl, H=H, K=K, V=V, BT=BT,
                                 BK=BK, BV=BV, NV=NV, HAS_G=g is not None, HAS_BS=bs is not None,
                                 HAS_VS=vs is not None, SAVE=save, PREC=prec,
                                 PREC_T="ieee" if prec == "ieee" else DL_INV_PREC,
                                 **_dl_cfg("_dl_prep_kernel"))
    ht = torch.empty(NS, H, K, V, device=dev, dtype=f32) if output_final_state else None
    s0 = h0.to(f32).contiguous() if h0 is not None else None
    _dl_walk_kernel[(NV, NS * H)](a, W, U, Gc, hs, s0 if s0 is not None else Gc, ht if ht is not None else Gc,
                                  ctab, coff, T, NT, VARLEN=vl, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, NV=NV,
                                  HAS_H0=h0 is not None, STORE_HT=ht is not None, PREC=prec,
                                  **_dl_cfg("_dl_walk_kernel", q, BK))
    o = torch.empty(B, T, H, V, device=dev, dtype=out_dtype or q.dtype)
    BVO = _dl_out_block(BV, NV)
    _dl_out_kernel[(NT, _cdiv(V, BVO), B * H)](q, a, U, Gc, hs, o, float(scale), ctab, T, NT, VARLEN=vl, H=H,
                                                  K=K, V=V, BT=BT, BK=BK, BV=BVO, BU=BV, NU=NV, PREC=prec,
                                                  **_dl_cfg("_dl_out_kernel"))
    return o, ht, ((W, U, Gc, Tm, hs) if save else None)


def dl_chunk_bwd(do, dht, q, a, b, v, g, h0, saved, scale=1.0, bs=None, vs=None, layout=None, same_ab=False):
    """Triton backward of :func:`dl_chunk_fwd` (``saved`` from its ``save=True`` call, ``layout`` its own): the
    adjoint walk, then every chunk in parallel. ``do`` [B, T, H, V], ``dht`` [B, H, K, V] or None. Returns (dq,
    da, db, dv in their inputs' dtypes, dg, dbs, dvs in fp32 or None, dh0 fp32 or None). ``same_ab``: a and b
    are one tensor; da is then its whole cotangent and db is None."""
    B, T, H, K, V, BT, NT, BK, BV, NV, prec = _dl_geometry(q, v)
    W, U, Gc, Tm, hs = saved
    NS, vl = B, layout is not None
    ctab = coff = Gc  # (stand-ins: read only with VARLEN)
    if vl:
        ctab, coff, NT, NS = layout
    q, a, b, v, do = (x.contiguous() for x in (q, a, b, v, do))
    f32 = torch.float32
    dU, dhs = torch.empty_like(U), torch.empty_like(hs)  # in the work dtype
    if vl:  # (as hs in the forward: the chunks past the last get no walk)
        dhs[:, :, NT - NS:].zero_()
    dh0 = torch.empty(NS, H, K, V, device=q.device, dtype=f32) if h0 is not None else None
    dht = dht.to(f32).contiguous() if dht is not None else None
    BVO = _dl_out_block(BV, NV)
    _dl_bwd_local_kernel[(NT, _cdiv(V, BVO), B * H)](q, a, Gc, do, dU, float(scale), ctab, T, NT, VARLEN=vl,
                                                        H=H, K=K, V=V, BT=BT, BK=BK, BV=BVO, BU=BV, NU=NV, PREC=prec,
                                                        **_dl_cfg("_dl_bwd_local_kernel"))
    _dl_bwd_walk_kernel[(NV, NS * H)](q, a, W, Gc, do, dht if dht is not None else Gc,
                                      dh0 if dh0 is not None else Gc, dU, dhs, float(scale), ctab, coff, T, NT,
                                      VARLEN=vl, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, NV=NV, HAS_DHT=dht is not None,
                                      STORE_DH0=dh0 is not None, PREC=prec, **_dl_cfg("_dl_bwd_walk_kernel", q, BK))
    dq, da, dv = (torch.empty_like(x) for x in (q, a, v))
    db = None if same_ab else torch.empty_like(b)
    dg, dbs, dvs = (torch.empty(B, T, H, device=q.device, dtype=f32) if x is not None else None for x in (g, bs, vs))
    bsf, vsf = (x.to(f32).contiguous() if x is not None else Gc for x in (bs, vs))
    dW, dA1 = (torch.empty(B, H, NT * BT, BK, device=q.device, dtype=W.dtype) for _ in range(2))  # work dtype
    dT = torch.empty(B, H, NT * BT, BT, device=q.device, dtype=f32)
    BVL = min(DL_BVL, BV) if DL_BVL else BV  # the value loop's block: a divisor of the walks' padded width BV * NV
    dG1 = torch.empty(B, H, NT * BT, device=q.device, dtype=f32) if g is not None else Gc
    _dl_bwd_vloop_kernel[(NT, B * H)](q, a, v, vsf, Tm, hs, U, dU, dhs, Gc, do, dq, dv, dvs if dvs is not None else Gc,
                                      dW, dT, dA1, dG1, float(scale), ctab, T, NT, VARLEN=vl, H=H, K=K, V=V, BT=BT,
                                      BK=BK, BV=BVL, NV=BV * NV // BVL, HAS_G=g is not None, HAS_VS=vs is not None,
                                      PREC=prec, **_dl_cfg("_dl_bwd_vloop_kernel"))
    _dl_bwd_wy_kernel[(NT, B * H)](a, b, bsf, Tm, Gc, dW, dT, dA1, dG1, da, da if same_ab else db,
                                   dg if dg is not None else Gc, dbs if dbs is not None else Gc, ctab, T, NT,
                                   VARLEN=vl, H=H, K=K, BT=BT, BK=BK, HAS_G=g is not None, HAS_BS=bs is not None,
                                   PREC=prec, SAME_AB=same_ab, **_dl_cfg("_dl_bwd_wy_kernel"))
    return dq, da, db, dv, dg, dbs, dvs, dh0


# ---- as a torch operator ----------------------------------------------------------------------------
# A custom operator (torch.library) is opaque to torch.compile: a compiled model calls it without a graph
# break. Its name carries a hash of this file's kernels, so modules compiled by different mixc versions
# never share an operator that is not theirs.


def _dl_tag():
    return _op_tag((_dl_prep_kernel, _dl_walk_kernel, _dl_out_kernel, _dl_bwd_local_kernel, _dl_bwd_walk_kernel,
                    _dl_bwd_vloop_kernel, _dl_bwd_wy_kernel, _dl_rows, _dl_walk_chunks, _dl_geometry, _dl_work_dtype,
                    _dl_out_block, _dl_layout, dl_chunk_fwd, dl_chunk_bwd))


def _dl_define_ops():
    from typing import Optional  # not X | None: older torch.library schemas read only typing.Optional

    tag = _dl_tag()
    fwd_name, bwd_name = f"delta_fwd_{tag}", f"delta_bwd_{tag}"
    defined = _op_defined(fwd_name)
    if defined is not None:
        return defined
    Tensor = torch.Tensor

    @torch.library.custom_op(f"mixc::{fwd_name}", mutates_args=())
    def fwd(q: Tensor, a: Tensor, b: Tensor, v: Tensor, g: Optional[Tensor], bs: Optional[Tensor],  # noqa: UP045
            vs: Optional[Tensor], h0: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,  # noqa: UP045
            output_final_state: bool, out_dtype: Optional[torch.dtype], save: bool, work16: bool  # noqa: UP045
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        layout = _dl_layout(cu_seqlens, q.shape[1]) if cu_seqlens is not None else None
        o, ht, saved = dl_chunk_fwd(q, a, b, v, g, h0, scale, output_final_state, out_dtype, save, bs, vs, work16,
                                    layout)
        saved = saved if saved is not None else tuple(_op_empty(q) for _ in range(5))  # (distinct tensors)
        return (o, ht if ht is not None else _op_empty(q), *saved)

    @fwd.register_fake
    def _(q, a, b, v, g, bs, vs, h0, cu_seqlens, scale, output_final_state, out_dtype, save, work16):
        B, T, H, K, V, BT, NT, BK, BV, NV, _ = _dl_geometry(q, v)
        NS = B
        if cu_seqlens is not None:  # (the layout's chunk count: static, T // BT + N)
            NS = cu_seqlens.shape[0] - 1
            NT = T // BT + NS
        f32, wdt = torch.float32, _dl_work_dtype(q, work16)
        ht = q.new_empty(NS, H, K, V, dtype=f32) if output_final_state else _op_empty(q)
        saved = ((q.new_empty(B, H, NT * BT, BK, dtype=wdt), q.new_empty(B, H, NT * BT, BV * NV, dtype=wdt),
                  q.new_empty(B, H, NT * BT, dtype=f32), q.new_empty(B, H, NT * BT, BT, dtype=f32),
                  q.new_empty(B, H, NT, BK, BV * NV, dtype=wdt)) if save else tuple(_op_empty(q) for _ in range(5)))
        return (q.new_empty(B, T, H, V, dtype=out_dtype or q.dtype), ht, *saved)

    @torch.library.custom_op(f"mixc::{bwd_name}", mutates_args=())
    def bwd(do: Tensor, dht: Optional[Tensor], q: Tensor, a: Tensor, b: Tensor, v: Tensor,  # noqa: UP045
            g: Optional[Tensor], bs: Optional[Tensor], vs: Optional[Tensor], h0: Optional[Tensor],  # noqa: UP045
            cu_seqlens: Optional[Tensor], W: Tensor, U: Tensor, G: Tensor, Tm: Tensor, hs: Tensor,  # noqa: UP045
            scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        layout = _dl_layout(cu_seqlens, q.shape[1]) if cu_seqlens is not None else None
        grads = dl_chunk_bwd(do, dht, q, a, b, v, g, h0, (W, U, G, Tm, hs), scale, bs, vs, layout)
        return tuple(x if x is not None else _op_empty(q) for x in grads)

    @bwd.register_fake
    def _(do, dht, q, a, b, v, g, bs, vs, h0, cu_seqlens, W, U, G, Tm, hs, scale):
        f32 = torch.float32
        return (torch.empty_like(q), torch.empty_like(a), torch.empty_like(b), torch.empty_like(v),
                *(q.new_empty(x.shape, dtype=f32) if x is not None else _op_empty(q) for x in (g, bs, vs, h0)))

    def setup_context(ctx, inputs, output):
        q, a, b, v, g, bs, vs, h0, cu_seqlens, scale, output_final_state, out_dtype, save, work16 = inputs
        ctx.save_for_backward(q, a, b, v, g, bs, vs, h0, cu_seqlens, *output[2:])
        ctx.scale = scale
        ctx.final = output_final_state
        ctx.set_materialize_grads(False)  # the saved outputs' cotangents stay None: no zero-filled W, U, T, hs

    def backward(ctx, do, dht, *_):
        return (*_dl_backward(ctx, do, dht, bwd), None, None, None, None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


def _dl_backward(ctx, do, dht, bwd_fn):
    """The eight input cotangents (dq, da, db, dv, dg, dbs, dvs, dh0) from the saved context; ``bwd_fn``: the
    backward operator (under torch.compile) or :func:`dl_chunk_bwd` with the operator's signature."""
    q, a, b, v, g, bs, vs, h0, cu, W, U, G, Tm, hs = ctx.saved_tensors
    if W.numel() == 0:
        raise RuntimeError("delta_chunk: the forward ran without save=True, so it has no backward")
    if do is None:  # only the final state reached the loss
        do = q.new_zeros(*q.shape[:3], v.shape[-1])
    dq, da, db, dv, *rest = bwd_fn(do, dht if ctx.final else None, q, a, b, v, g, bs, vs, h0, cu, W, U, G, Tm, hs,
                                   ctx.scale)
    dg, dbs, dvs, dh0 = (None if x is None else (d if d.dtype == x.dtype else d.to(x.dtype))
                         for d, x in zip(map(_op_or_none, rest), (g, bs, vs, h0)))
    return dq, da, db, dv, dg, dbs, dvs, dh0


class _DLChunk(torch.autograd.Function):
    """The same forward and backward as the operator for eager execution: an autograd.Function costs less host
    time per call than a custom operator's dispatch (the chunked form's finding; here the operator's backward
    also took the most host time of a call, with the kernels stubbed out)."""

    @staticmethod
    def forward(ctx, q, a, b, v, g, bs, vs, h0, cu_seqlens, scale, output_final_state, out_dtype, work16):
        ctx.same_ab = b is None  # (delta_chunk passes b = None when b is a: one cotangent, summed by the kernel)
        b = a if b is None else b
        save = any(ctx.needs_input_grad[:8])
        ctx.layout = _dl_layout(cu_seqlens, q.shape[1]) if cu_seqlens is not None else None  # (once, both passes)
        o, ht, saved = dl_chunk_fwd(q, a, b, v, g, h0, scale, output_final_state, out_dtype, save, bs, vs, work16,
                                    ctx.layout)
        empty = _op_empty(q)
        ctx.save_for_backward(q, a, b, v, g, bs, vs, h0, cu_seqlens,
                              *(saved if saved is not None else (empty,) * 5))
        ctx.scale, ctx.final = scale, output_final_state
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        def bwd(do, dht, q, a, b, v, g, bs, vs, h0, cu, W, U, G, Tm, hs, scale):
            return dl_chunk_bwd(do, dht, q, a, b, v, g, h0, (W, U, G, Tm, hs), scale, bs, vs, ctx.layout, ctx.same_ab)

        return (*_dl_backward(ctx, do, dht, bwd), None, None, None, None, None)


_DL_OP = _dl_define_ops()  # defined as the module loads (not inside a torch.compile trace)


def delta_chunk(q, a, b, v, g=None, h0=None, scale=1.0, output_final_state=False, out_dtype=None, bs=None, vs=None,
                cu_seqlens=None):
    """The chunked (gated) delta rule, differentiable (an autograd.Function; the torch operator under
    torch.compile). q, a, b: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] fp32 log gates or None; h0: [B, H, K, V]
    fp32 or None; bs, vs: [B, T, H] per-token scales of b and v (deltanet's beta: applied as the kernels load b
    and v, so the scaled tensors are never written) or None. Returns (o [B, T, H, V] in ``out_dtype`` (default
    q's), final state [B, H, K, V] fp32 or None). The forward saves what the backward reads only when a gradient
    will be asked for. ``cu_seqlens`` [N + 1]: B = 1 row of N packed sequences, run in one launch a kernel
    (h0 and the final state [N, H, K, V])."""
    if not torch.compiler.is_compiling():  # eager: the autograd.Function (less host time a call)
        o, ht = _DLChunk.apply(q, a, None if b is a else b, v, g, bs, vs, h0, cu_seqlens, float(scale),
                               bool(output_final_state), out_dtype, bool(DL_WORK16))
        return o, ht
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, a, b, v, g, bs, vs, h0))
    o, ht, *_ = _DL_OP(q, a, b, v, g, bs, vs, h0, cu_seqlens, float(scale), bool(output_final_state), out_dtype,
                       save, bool(DL_WORK16))  # this module's setting, read at each call (the operator may be shared)
    return o, (ht if output_final_state else None)
