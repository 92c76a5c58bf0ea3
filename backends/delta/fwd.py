"""The chunked delta rule's forward kernels (Triton): the UT transform per chunk, the state walk, the output.

The maths and the notation are in :mod:`mixc.backends.delta.kernels` (its header). Work tensors (W, U and the
per-chunk states hs) are stored in the *work dtype*: fp32 (products in tf32 for 16-bit inputs, ieee for fp32
ones), or, with ``DL_WORK16`` (kernels.py; on), the inputs' dtype for 16-bit inputs (the walks' and the output's
tl.dot then take 16-bit operands and accumulate in fp32, as fla's do).
The prep kernel computes in fp32 whatever the work dtype (tf32 products for 16-bit inputs) and rounds only what it
stores: a kernel with both tf32x3 and 16-bit products was wrong on the H200
at key width 16 (sessions 13 and 15).
Kernels read the work dtype off the pointer of W (``W.dtype.element_ty``).
This file needs triton and the chunked form's launcher (`_Launch`, pasted before it); `mixc compile` pastes it
into the generated module.
"""

import triton
import triton.language as tl

try:
    from ..chunked.launcher import _Launch
except ImportError:  # pasted into a generated module, after the launcher
    pass


@triton.jit
def _dl_rows(ctab, i_t, i_b, i_h, T, H: tl.constexpr, BT: tl.constexpr, VARLEN: tl.constexpr):
    """The mask of chunk i_t's tokens and their rows in [B * T * H] (of sequence i_b; with VARLEN, of the
    packed sequences of the one batch row: the chunk's first token and its sequence's end read from ctab)."""
    o_r = tl.arange(0, BT)
    if VARLEN:
        t0 = tl.load(ctab + 2 * i_t)
        t1 = tl.load(ctab + 2 * i_t + 1)
        o_t = t0 + o_r
        m_t = o_t < t1
        rows = o_t * H + i_h
    else:
        o_t = i_t * BT + o_r
        m_t = o_t < T
        rows = (i_b * T + o_t) * H + i_h
    return m_t, rows


@triton.jit
def _dl_walk_chunks(coff, i_b, i_h, i_bh, NT, VARLEN: tl.constexpr):
    """(c0, c1, bh): the chunks [c0, c1) a walk program visits and the (batch, head) row of the buffers it reads:
    with VARLEN, program (i_b, i_h) walks sequence i_b's chunks of the one batch row (coff: each sequence's first
    chunk); else all NT chunks of its own row."""
    if VARLEN:
        c0 = tl.load(coff + i_b)
        c1 = tl.load(coff + i_b + 1)
        bh = i_h
    else:
        c0 = 0
        c1 = NT
        bh = i_bh
    return c0, c1, bh


@_Launch
@triton.jit
def _dl_prep_kernel(
    a,  # [B, T, H, K] the key a_t (the rank-one correction's left factor and the input's key)
    b,  # [B, T, H, K] b_t: the correction is a_t b_t^T
    v,  # [B, T, H, V] the values
    g,  # [B, T, H] fp32 log gate (unused without HAS_G)
    bs,  # [B, T, H] fp32 per-token scale of b (deltanet's beta; unused without HAS_BS)
    vs,  # [B, T, H] fp32 per-token scale of v (unused without HAS_VS)
    W,  # [B, H, NT * BT, BK] work dtype out: W = T diag(e^G) B
    U,  # [B, H, NT * BT, BV * NV] work dtype out: U0 = T V
    Gc,  # [B, H, NT * BT] fp32 out: G, the in-chunk cumulative log gate
    Tm,  # [B, H, NT * BT, BT] fp32 out: T = (I + L)^-1 (for the backward; unused without SAVE)
    ctab,  # [NT, 2] int32 with VARLEN: each chunk's first token and its sequence's end (else unused)
    T,  # tokens per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_BS: tl.constexpr, HAS_VS: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
    PREC_T: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """Per chunk, in parallel: G, L, T = (I + L)^-1 by recursive doubling, W and U0.

    The inverse: recursive doubling on [BT, BT] tiles in PREC_T (ieee for fp32 inputs, else DL_INV_PREC), fp32
    throughout. Each level's T_b holds the exact inverses of the b x b diagonal blocks (no powers of L, whose
    entries grow with aligned keys, as a series would form). On the H200 (benchmarks/tune.py delta, 2026-12-04)
    doubling in tf32x3 took the deltanet forward at B4 T4096 H16 D128 bf16 from 1.256 to 1.165 ms against forward
    substitution in 16 x 16 blocks; tf32 and fp32 operands in every product then took it to 0.957 ms (tf32x3:
    1.036). Levels up to 16 x 16 on the diagonal blocks alone, as a batch of small ieee products, were no faster
    (0.953 ms; at D64 0.225 against 0.206 ms) and were dropped."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = W.dtype.element_ty  # the work dtype: of the stores only (every product here takes fp32 operands)
    NTP = tl.num_programs(0) * BT  # padded tokens per (batch, head)
    o_r = tl.arange(0, BT)
    m_t, rows = _dl_rows(ctab, i_t, i_b, i_h, T, H, BT, VARLEN)  # rows: token rows in [B * T * H]
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_b = tl.load(b + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    if HAS_BS:
        b_bs = tl.load(bs + rows, mask=m_t, other=0.)
    else:
        b_bs = tl.full([BT], 1., dtype=tl.float32)
    if HAS_VS:
        b_vs = tl.load(vs + rows, mask=m_t, other=0.)
    if HAS_G:
        b_g = tl.load(g + rows, mask=m_t, other=0.).to(tl.float32)
        b_G = tl.cumsum(b_g, 0)  # padded rows add 0: they keep the last row's G
    else:
        b_G = tl.zeros([BT], dtype=tl.float32)
    # L[t, s] = bs_t e^(G_t - G_s) b_t . a_s for s < t: the exponent is <= 0 there, 0 elsewhere
    lower = o_r[:, None] > o_r[None, :]
    b_L = tl.dot(b_b, tl.trans(b_a), input_precision=PREC) * b_bs[:, None]
    b_L = tl.where(lower, b_L * tl.exp(tl.where(lower, b_G[:, None] - b_G[None, :], 0.)), 0.)
    # T = (I + L)^-1 by recursive doubling: with T_b the inverse of I + L's diagonal b x b blocks and E_b the part of
    # L between the halves of each 2b x 2b diagonal block, (D + E)^-1 = D^-1 - D^-1 E D^-1 there ((D^-1 E)^2 = 0):
    # T_2b = T_b - T_b (E_b T_b), two products a level on [BT, BT] tiles in PREC_T, from T_2 (pairs [1 0; -L 1])
    eye = o_r[:, None] == o_r[None, :]
    pair = (o_r // 2)[:, None] == (o_r // 2)[None, :]
    b_T = tl.where(eye, 1., 0.) - tl.where(pair, b_L, 0.)
    for lv in tl.static_range(1, 16):
        if (2 << lv) <= BT:
            blk2 = (o_r >> (lv + 1))[:, None] == (o_r >> (lv + 1))[None, :]
            blk = (o_r >> lv)[:, None] == (o_r >> lv)[None, :]
            b_ET = tl.dot(tl.where(blk2 & (blk == 0), b_L, 0.), b_T, input_precision=PREC_T)
            b_T = b_T - tl.dot(b_T, b_ET, input_precision=PREC_T)
    b_bg = b_b * (b_bs * tl.exp(b_G))[:, None]
    b_W = tl.dot(b_T, b_bg, input_precision=PREC)
    base = i_bh * NTP + i_t * BT + o_r  # rows of the padded [B, H, NT * BT] buffers
    tl.store(W + base[:, None] * BK + o_k[None, :], b_W.to(DT))
    tl.store(Gc + base, b_G)
    if SAVE:
        tl.store(Tm + base[:, None] * BT + o_r[None, :], b_T)
    for i_v in range(NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        if HAS_VS:
            b_v = b_v.to(tl.float32) * b_vs[:, None]
        b_u = tl.dot(b_T, b_v.to(tl.float32), input_precision=PREC)
        tl.store(U + base[:, None] * (BV * NV) + o_v[None, :], b_u.to(DT))


@_Launch
@triton.jit
def _dl_walk_kernel(
    a,  # [B, T, H, K] keys a_t
    W,  # [B, H, NT * BT, BK] work dtype, from _dl_prep_kernel
    U,  # [B, H, NT * BT, BV * NV] work dtype: U0 from _dl_prep_kernel, overwritten by the pseudo-values U
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    hs,  # [B, H, NT, BK, BV * NV] work dtype out: the state S_0 at every chunk start
    h0,  # [B, H, K, V] fp32 initial state (unused without HAS_H0)
    ht,  # [B, H, K, V] fp32 out: final state (unused without STORE_HT)
    ctab,  # [NT, 2] int32 with VARLEN: each chunk's first token and its sequence's end (else unused)
    coff,  # [N + 1] int32 with VARLEN: each sequence's first chunk (else unused)
    T,  # tokens per sequence
    NT,  # chunks per sequence (with VARLEN: in all)
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """The state walk, per head and value block, sequential over chunks (the state S [BK, BV] stays fp32 in
    registers; its products take it in the work dtype): U = U0 - W S_0,  S_C = e^(G_C) S_0 + (A e^(G_C - G))^T U."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = W.dtype.element_ty
    o_r = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    if HAS_H0:
        b_S = tl.load(h0 + p_s, mask=m_kv, other=0.).to(tl.float32)
    else:
        b_S = tl.zeros([BK, BV], dtype=tl.float32)
    c0, c1, bh = _dl_walk_chunks(coff, i_b, i_h, i_bh, NT, VARLEN)
    for i_t in range(c0, c1):
        m_t, rows = _dl_rows(ctab, i_t, i_b, i_h, T, H, BT, VARLEN)
        base = (bh * NT + i_t) * BT + o_r
        b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_W = tl.load(W + base[:, None] * BK + o_k[None, :])
        b_U = tl.load(U + base[:, None] * (BV * NV) + o_v[None, :])
        b_G = tl.load(Gc + base)
        b_GL = tl.sum(tl.where(o_r == BT - 1, b_G, 0.), 0)  # G at the chunk's end (padding adds 0)
        b_Sd = b_S.to(DT)
        tl.store(hs + ((bh * NT + i_t) * BK + o_k[:, None]) * (BV * NV) + o_v[None, :], b_Sd)
        # U = U0 - W S_0 (rows past T are 0: their W and U0 rows are)
        b_u = (b_U.to(tl.float32) - tl.dot(b_W, b_Sd, input_precision=PREC)).to(DT)
        tl.store(U + base[:, None] * (BV * NV) + o_v[None, :], b_u)
        b_ad = (b_a.to(tl.float32) * tl.exp(b_GL - b_G)[:, None]).to(DT)
        b_S = b_S * tl.exp(b_GL) + tl.dot(tl.trans(b_ad), b_u, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + p_s, b_S, mask=m_kv)


@_Launch
@triton.jit
def _dl_out_kernel(
    q,  # [B, T, H, K] queries (the readout's q', without the number factor `scale`)
    a,  # [B, T, H, K] keys a_t
    U,  # [B, H, NT * BT, BU * NU] work dtype: the pseudo-values
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    hs,  # [B, H, NT, BK, BU * NU] work dtype: the state at every chunk start
    o,  # [B, T, H, V] out: the output
    scale,  # the readout's number factor
    ctab,  # [NT, 2] int32 with VARLEN: each chunk's first token and its sequence's end (else unused)
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BU: tl.constexpr, NU: tl.constexpr,
    PREC: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """The output, per chunk and value block BV (a divisor of the walk's padded width BU * NU) in parallel:
    O = scale ((Q e^G) S_0 + (Q A^T * Gamma) U), Gamma[t, s] = e^(G_t - G_s) for s <= t, else 0."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    DT = U.dtype.element_ty
    o_r = tl.arange(0, BT)
    m_t, rows = _dl_rows(ctab, i_t, i_b, i_h, T, H, BT, VARLEN)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    base = (i_bh * NT + i_t) * BT + o_r
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(DT)
    b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(DT)
    b_G = tl.load(Gc + base)
    b_S = tl.load(hs + ((i_bh * NT + i_t) * BK + o_k[:, None]) * (BU * NU) + o_v[None, :])
    b_u = tl.load(U + base[:, None] * (BU * NU) + o_v[None, :])
    incl = o_r[:, None] >= o_r[None, :]
    b_A = tl.dot(b_q, tl.trans(b_a), input_precision=PREC)
    b_A = tl.where(incl, b_A * tl.exp(tl.where(incl, b_G[:, None] - b_G[None, :], 0.)), 0.)
    b_qg = (b_q.to(tl.float32) * tl.exp(b_G)[:, None]).to(DT)
    b_o = tl.dot(b_qg, b_S, input_precision=PREC)
    b_o = (b_o + tl.dot(b_A.to(DT), b_u, input_precision=PREC)) * scale
    tl.store(o + rows[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
