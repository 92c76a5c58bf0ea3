"""The chunked delta rule: Triton kernels for the (gated) delta-rule recurrence, forward, and its backward.

After the PyTorch prologue of the emitted form, every file whose transition the analysis calls
``delta`` or ``gated_delta`` is, per (sequence, head),

    S_t = exp(g_t) (I - a_t b_t^T) S_{t-1} + a_t v_t^T,      o_t = scale * q_t^T S_t

(deltanet: a = k, b = beta k, v = beta v; g = 0 without a gate). With the pseudo-values
u_t = v_t - exp(g_t) b_t^T S_{t-1} the update is S_t = exp(g_t) S_{t-1} + a_t u_t^T, and within a
chunk of BT tokens that starts from S_0, with G_t the chunk's cumulative log gate,

    (I + L) U = V - diag(e^G) B S_0,        L[t, s] = e^(G_t - G_s) b_t . a_s   (s < t, else 0)

(Yang et al. 2024, the UT transform). With T = (I + L)^-1 (forward substitution, fp32; exact for a
unit lower-triangular system), W = T diag(e^G) B and U0 = T V, the chunk is

    U   = U0 - W S_0
    O   = scale * ((Q e^G) S_0 + (Q A^T * e^(G_t - G_s) [s <= t]) U)
    S_C = e^(G_C) S_0 + (A e^(G_C - G))^T U

Gates enter only as e^(G_t - G_s) with s <= t (<= 1 for g <= 0), never as e^ of a positive sum.

    forward   _dl_prep_kernel      per chunk, in parallel: G, L, T (forward substitution), W and U0
                                   (and T itself when a backward will follow)
              _dl_walk_kernel      per head and value block, sequential over chunks: U and every chunk's S_0
              _dl_out_kernel       per chunk and value block, in parallel: O
    backward  _dl_bwd_walk_kernel  the adjoint walk, sequential over chunks in reverse: dU and every
                                   chunk's dS_C (dS_0 = scale (Q e^G)^T dO + e^(G_C) dS_C - W^T dU)
              _dl_bwd_chunk_kernel per chunk, in parallel: dq, da, db, dv and the log gate's dg through
                                   dT and dL = -T^T dT T^T (the derivative of the inverse)

:func:`mixc.backends.delta.chunked_torch.dl_chunked_torch` is the same algorithm in PyTorch (differentiable;
not pasted into generated modules): the tests check the kernels, forward and backward, against it and against
the reference.

This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import torch
import triton
import triton.language as tl

DL_CHUNK = 64  # tokens per chunk
DL_BV = 32  # largest value block (the walks keep a [K, BV] fp32 state in registers)


@triton.jit
def _dl_prep_kernel(
    a,  # [B, T, H, K] the key a_t (the rank-one correction's left factor and the input's key)
    b,  # [B, T, H, K] b_t: the correction is a_t b_t^T
    v,  # [B, T, H, V] the values
    g,  # [B, T, H] fp32 log gate (unused without HAS_G)
    bs,  # [B, T, H] fp32 per-token scale of b (deltanet's beta; unused without HAS_BS)
    vs,  # [B, T, H] fp32 per-token scale of v (unused without HAS_VS)
    W,  # [B, H, NT * BT, BK] fp32 out: W = T diag(e^G) B
    U,  # [B, H, NT * BT, BV * NV] fp32 out: U0 = T V
    Gc,  # [B, H, NT * BT] fp32 out: G, the in-chunk cumulative log gate
    Tm,  # [B, H, NT * BT, BT] fp32 out: T = (I + L)^-1 (for the backward; unused without SAVE)
    T,  # tokens per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_BS: tl.constexpr, HAS_VS: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NTP = tl.num_programs(0) * BT  # padded tokens per (batch, head)
    o_t = i_t * BT + tl.arange(0, BT)
    o_r = tl.arange(0, BT)
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    rows = (i_b * T + o_t) * H + i_h  # token rows in [B * T * H]
    m_tk = m_t[:, None] & m_k[None, :]
    b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_b = tl.load(b + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    if HAS_BS:
        b_b *= tl.load(bs + rows, mask=m_t, other=0.)[:, None]
    if HAS_VS:
        b_vs = tl.load(vs + rows, mask=m_t, other=0.)
    if HAS_G:
        b_g = tl.load(g + rows, mask=m_t, other=0.).to(tl.float32)
        b_G = tl.cumsum(b_g, 0)  # padded rows add 0: they keep the last row's G
    else:
        b_G = tl.zeros([BT], dtype=tl.float32)
    # L[t, s] = e^(G_t - G_s) b_t . a_s for s < t: the exponent is <= 0 there, 0 elsewhere
    lower = o_r[:, None] > o_r[None, :]
    b_L = tl.dot(b_b, tl.trans(b_a), input_precision=PREC)
    b_L = tl.where(lower, b_L * tl.exp(tl.where(lower, b_G[:, None] - b_G[None, :], 0.)), 0.)
    # T = (I + L)^-1 = I + N by forward substitution: N[i, :] = -L[i, :] - sum_j L[i, j] N[j, :]
    b_N = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(1, BT):
        sel = o_r[:, None] == i
        row = -tl.sum(tl.where(sel, b_L, 0.), 0)  # -L[i, :] (nonzero for columns j < i only)
        row = row + tl.sum(row[:, None] * b_N, 0)  # rows j < i of N are final
        b_N = tl.where(sel, row[None, :], b_N)
    b_T = b_N + tl.where(o_r[:, None] == o_r[None, :], 1., 0.)
    b_W = tl.dot(b_T, b_b * tl.exp(b_G)[:, None], input_precision=PREC)
    base = i_bh * NTP + o_t  # rows of the padded [B, H, NT * BT] buffers
    tl.store(W + base[:, None] * BK + o_k[None, :], b_W)
    tl.store(Gc + base, b_G)
    if SAVE:
        tl.store(Tm + base[:, None] * BT + o_r[None, :], b_T)
    for i_v in range(NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_v = b_v.to(tl.float32)
        if HAS_VS:
            b_v *= b_vs[:, None]
        b_u = tl.dot(b_T, b_v, input_precision=PREC)
        tl.store(U + base[:, None] * (BV * NV) + o_v[None, :], b_u)


@triton.jit
def _dl_walk_kernel(
    a,  # [B, T, H, K] keys a_t
    W,  # [B, H, NT * BT, BK] fp32 from _dl_prep_kernel
    U,  # [B, H, NT * BT, BV * NV] fp32 U0 from _dl_prep_kernel, overwritten by the pseudo-values U
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    hs,  # [B, H, NT, BK, BV * NV] fp32 out: the state S_0 at every chunk start
    h0,  # [B, H, K, V] fp32 initial state (unused without HAS_H0)
    ht,  # [B, H, K, V] fp32 out: final state (unused without STORE_HT)
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):
    """The state walk, per head and value block, sequential over chunks:
    U = U0 - W S_0,  S_C = e^(G_C) S_0 + (A e^(G_C - G))^T U."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
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
    for i_t in range(NT):
        o_t = i_t * BT + o_r
        m_t = o_t < T
        rows = (i_b * T + o_t) * H + i_h
        base = i_bh * NT * BT + o_t
        b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_W = tl.load(W + base[:, None] * BK + o_k[None, :])
        b_U = tl.load(U + base[:, None] * (BV * NV) + o_v[None, :])
        b_G = tl.load(Gc + base)
        b_GL = tl.sum(tl.where(o_r == BT - 1, b_G, 0.), 0)  # G at the chunk's end (padding adds 0)
        tl.store(hs + ((i_bh * NT + i_t) * BK + o_k[:, None]) * (BV * NV) + o_v[None, :], b_S)
        # U = U0 - W S_0 (rows past T are 0: their W and U0 rows are)
        b_u = b_U - tl.dot(b_W, b_S, input_precision=PREC)
        tl.store(U + base[:, None] * (BV * NV) + o_v[None, :], b_u)
        b_ad = b_a.to(tl.float32) * tl.exp(b_GL - b_G)[:, None]
        b_S = b_S * tl.exp(b_GL) + tl.dot(tl.trans(b_ad), b_u, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + p_s, b_S, mask=m_kv)


@triton.jit
def _dl_out_kernel(
    q,  # [B, T, H, K] queries (the readout's q', without the number factor `scale`)
    a,  # [B, T, H, K] keys a_t
    U,  # [B, H, NT * BT, BV * NV] fp32 the pseudo-values
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    hs,  # [B, H, NT, BK, BV * NV] fp32 the state at every chunk start
    o,  # [B, T, H, V] out: the output
    scale,  # the readout's number factor
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    PREC: tl.constexpr,
):
    """The output, per chunk and value block in parallel: O = scale ((Q e^G) S_0 + (Q A^T * Gamma) U),
    Gamma[t, s] = e^(G_t - G_s) for s <= t, else 0."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BT)
    o_t = i_t * BT + o_r
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    rows = (i_b * T + o_t) * H + i_h
    base = i_bh * NT * BT + o_t
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_G = tl.load(Gc + base)
    b_S = tl.load(hs + ((i_bh * NT + i_t) * BK + o_k[:, None]) * (BV * NV) + o_v[None, :])
    b_u = tl.load(U + base[:, None] * (BV * NV) + o_v[None, :])
    incl = o_r[:, None] >= o_r[None, :]
    b_A = tl.dot(b_q, tl.trans(b_a), input_precision=PREC)
    b_A = tl.where(incl, b_A * tl.exp(tl.where(incl, b_G[:, None] - b_G[None, :], 0.)), 0.)
    b_o = tl.dot(b_q * tl.exp(b_G)[:, None], b_S, input_precision=PREC)
    b_o = (b_o + tl.dot(b_A, b_u, input_precision=PREC)) * scale
    tl.store(o + rows[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _dl_bwd_walk_kernel(
    q,  # [B, T, H, K] queries
    a,  # [B, T, H, K] keys a_t
    W,  # [B, H, NT * BT, BK] fp32 W of the forward
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    do,  # [B, T, H, V] the output's cotangent
    dht,  # [B, H, K, V] fp32 the final state's cotangent (unused without HAS_DHT)
    dh0,  # [B, H, K, V] fp32 out: the initial state's cotangent (unused without STORE_DH0)
    dU,  # [B, H, NT * BT, BV * NV] fp32 out: the pseudo-values' cotangent dU
    dhs,  # [B, H, NT, BK, BV * NV] fp32 out: dS_C, the cotangent of every chunk's end state
    scale,  # the readout's number factor
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):
    """The adjoint walk, over chunks in reverse, with dS the cotangent of the chunk's end state S_C:
    dU = scale M^T dO + (A e^(G_C - G)) dS,   dS_0 = scale (Q e^G)^T dO + e^(G_C) dS - W^T dU."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    if HAS_DHT:
        b_dS = tl.load(dht + p_s, mask=m_kv, other=0.).to(tl.float32)
    else:
        b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    incl = o_r[:, None] >= o_r[None, :]
    for j in range(NT):
        i_t = NT - 1 - j
        o_t = i_t * BT + o_r
        m_t = o_t < T
        rows = (i_b * T + o_t) * H + i_h
        base = i_bh * NT * BT + o_t
        m_tk = m_t[:, None] & m_k[None, :]
        tl.store(dhs + ((i_bh * NT + i_t) * BK + o_k[:, None]) * (BV * NV) + o_v[None, :], b_dS)
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_W = tl.load(W + base[:, None] * BK + o_k[None, :])
        b_G = tl.load(Gc + base)
        b_GL = tl.sum(tl.where(o_r == BT - 1, b_G, 0.), 0)
        b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_do = b_do.to(tl.float32)
        b_M = tl.dot(b_q, tl.trans(b_a), input_precision=PREC)
        b_M = tl.where(incl, b_M * tl.exp(tl.where(incl, b_G[:, None] - b_G[None, :], 0.)), 0.)
        b_ad = b_a * tl.exp(b_GL - b_G)[:, None]
        b_du = tl.dot(tl.trans(b_M), b_do, input_precision=PREC) * scale
        b_du += tl.dot(b_ad, b_dS, input_precision=PREC)
        tl.store(dU + base[:, None] * (BV * NV) + o_v[None, :], b_du)
        b_dS = b_dS * tl.exp(b_GL) + tl.dot(tl.trans(b_q * tl.exp(b_G)[:, None]), b_do, input_precision=PREC) * scale
        b_dS -= tl.dot(tl.trans(b_W), b_du, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + p_s, b_dS, mask=m_kv)


@triton.jit
def _dl_bwd_chunk_kernel(
    q,  # [B, T, H, K] queries
    a,  # [B, T, H, K] keys a_t
    b,  # [B, T, H, K] b_t
    v,  # [B, T, H, V] values
    bs,  # [B, T, H] fp32 per-token scale of b (unused without HAS_BS)
    vs,  # [B, T, H] fp32 per-token scale of v (unused without HAS_VS)
    Tm,  # [B, H, NT * BT, BT] fp32 T = (I + L)^-1 of the forward
    hs,  # [B, H, NT, BK, BV * NV] fp32 the state at every chunk start
    U,  # [B, H, NT * BT, BV * NV] fp32 the pseudo-values
    dU,  # [B, H, NT * BT, BV * NV] fp32 their cotangent (from _dl_bwd_walk_kernel)
    dhs,  # [B, H, NT, BK, BV * NV] fp32 dS_C of every chunk
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    do,  # [B, T, H, V] the output's cotangent
    dq, da, db,  # [B, T, H, K] out: cotangents of q, a, b (their dtype)
    dv,  # [B, T, H, V] out: cotangent of v
    dg,  # [B, T, H] fp32 out: cotangent of the log gate (unused without HAS_G)
    dbs,  # [B, T, H] fp32 out: cotangent of bs (unused without HAS_BS)
    dvs,  # [B, T, H] fp32 out: cotangent of vs (unused without HAS_VS)
    scale,  # the readout's number factor
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_BS: tl.constexpr, HAS_VS: tl.constexpr, PREC: tl.constexpr,
):
    """Everything else, per chunk in parallel (P = dX * X elementwise, for the gate):
    dW = -dU S_0^T, dV = T^T dU, dM = scale dO U^T (t >= s), dQ = scale e^G (dO S_0^T) + (dM * Gamma) A,
    dA = (dM * Gamma)^T Q + e^(G_C - G) (U dS_C^T) + (dL * Gamma)^T B, dB = e^G (T^T dW) + (dL * Gamma) A,
    dT = dW (B e^G)^T + dU V^T, dL = -(T^T dT T^T) (s < t); dG_t from every e^(+-G) it enters,
    dg the suffix sums of dG within the chunk. With scales, B and V here are bs b and vs v."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BT)
    o_t = i_t * BT + o_r
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    rows = (i_b * T + o_t) * H + i_h
    base = i_bh * NT * BT + o_t
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_braw = tl.load(b + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    if HAS_BS:
        b_bs = tl.load(bs + rows, mask=m_t, other=0.)
        b_b = b_braw * b_bs[:, None]
    else:
        b_b = b_braw
    if HAS_VS:
        b_vs = tl.load(vs + rows, mask=m_t, other=0.)
        b_dvs = tl.zeros([BT], dtype=tl.float32)
    b_T = tl.load(Tm + base[:, None] * BT + o_r[None, :])
    b_G = tl.load(Gc + base)
    b_GL = tl.sum(tl.where(o_r == BT - 1, b_G, 0.), 0)
    b_gam = tl.exp(b_G)
    b_del = tl.exp(b_GL - b_G)
    b_dW = tl.zeros([BT, BK], dtype=tl.float32)
    b_dQ1 = tl.zeros([BT, BK], dtype=tl.float32)  # dO S_0^T
    b_dAd = tl.zeros([BT, BK], dtype=tl.float32)  # U dS_C^T
    b_dM = tl.zeros([BT, BT], dtype=tl.float32)  # dO U^T
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)  # dU V^T
    b_dGC = tl.zeros([BK], dtype=tl.float32)  # sum_v dS_C * S_0
    for i_v in range(NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_s = ((i_bh * NT + i_t) * BK + o_k[:, None]) * (BV * NV) + o_v[None, :]
        b_S = tl.load(hs + p_s)
        b_dS = tl.load(dhs + p_s)
        b_u = tl.load(U + base[:, None] * (BV * NV) + o_v[None, :])
        b_du = tl.load(dU + base[:, None] * (BV * NV) + o_v[None, :])
        b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_dv = tl.dot(tl.trans(b_T), b_du, input_precision=PREC)  # the cotangent of vs v
        if HAS_VS:
            b_dvs += tl.sum(b_dv * b_v, 1)
            b_dv *= b_vs[:, None]
            b_v *= b_vs[:, None]
        tl.store(dv + rows[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        b_dW -= tl.dot(b_du, tl.trans(b_S), input_precision=PREC)
        b_dQ1 += tl.dot(b_do, tl.trans(b_S), input_precision=PREC)
        b_dAd += tl.dot(b_u, tl.trans(b_dS), input_precision=PREC)
        b_dM += tl.dot(b_do, tl.trans(b_u), input_precision=PREC)
        b_dT += tl.dot(b_du, tl.trans(b_v), input_precision=PREC)
        b_dGC += tl.sum(b_dS * b_S, 1)
    incl = o_r[:, None] >= o_r[None, :]
    lower = o_r[:, None] > o_r[None, :]
    b_Gam = tl.exp(tl.where(incl, b_G[:, None] - b_G[None, :], 0.))  # e^(G_t - G_s), s <= t (1 elsewhere)
    # the readout's in-chunk scores M = (Q A^T) * Gamma (s <= t)
    b_dM = tl.where(incl, b_dM * scale * b_Gam, 0.)  # dM * Gamma
    b_PM = b_dM * tl.dot(b_q, tl.trans(b_a), input_precision=PREC)  # dM * M
    b_dq = b_dQ1 * (b_gam * scale)[:, None] + tl.dot(b_dM, b_a, input_precision=PREC)
    b_da = tl.dot(tl.trans(b_dM), b_q, input_precision=PREC) + b_dAd * b_del[:, None]
    # W = T (B e^G), U0 = T V, T = (I + L)^-1
    b_bg = b_b * b_gam[:, None]
    b_dbg = tl.dot(tl.trans(b_T), b_dW, input_precision=PREC)
    b_dT += tl.dot(b_dW, tl.trans(b_bg), input_precision=PREC)
    b_dL = tl.dot(tl.trans(b_T), tl.dot(b_dT, tl.trans(b_T), input_precision=PREC), input_precision=PREC)
    b_dL = tl.where(lower, -b_dL * b_Gam, 0.)  # dL * Gamma (s < t)
    b_PL = b_dL * tl.dot(b_b, tl.trans(b_a), input_precision=PREC)  # dL * L
    b_db = b_dbg * b_gam[:, None] + tl.dot(b_dL, b_a, input_precision=PREC)
    b_da += tl.dot(tl.trans(b_dL), b_b, input_precision=PREC)
    p_k = rows[:, None] * K + o_k[None, :]
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(da + p_k, b_da.to(da.dtype.element_ty), mask=m_tk)
    if HAS_BS:  # b_db is the cotangent of bs b
        tl.store(dbs + rows, tl.sum(b_db * b_braw, 1), mask=m_t)
        b_db *= b_bs[:, None]
    if HAS_VS:
        tl.store(dvs + rows, b_dvs, mask=m_t)
    tl.store(db + p_k, b_db.to(db.dtype.element_ty), mask=m_tk)
    if HAS_G:
        # dG_t: rows of P_L, P_M (e^(+G_t)) less their columns (e^(-G_s)), e^G in B e^G and Q e^G, and
        # e^(G_C - G_t) in the end state (less at t, more at the chunk's end, with e^(G_C) S_0)
        b_pad = tl.sum(b_dAd * b_a * b_del[:, None], 1)
        b_dG = tl.sum(b_PL, 1) - tl.sum(b_PL, 0) + tl.sum(b_PM, 1) - tl.sum(b_PM, 0)
        b_dG += tl.sum(b_dbg * b_bg, 1) + tl.sum(b_dQ1 * b_q, 1) * b_gam * scale - b_pad
        b_dG += tl.where(o_r == BT - 1, tl.sum(b_pad, 0) + tl.exp(b_GL) * tl.sum(b_dGC, 0), 0.)
        # G_t = sum_(s <= t) g_s: dg_s = sum_(t >= s) dG_t
        b_dg = tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG
        tl.store(dg + rows, b_dg, mask=m_t)


def _dl_pow2(n):
    return max(16, triton.next_power_of_2(n))


# (warps, pipeline stages) of each kernel, from Triton 3.6's sm_90 build at K = V = 128, bf16
# (benchmarks/ptxas_delta.py): one stage everywhere, since pipelined loads put the walk at 297-313 KB of shared
# memory (the H100 allows 227 KB). Registers / spill bytes / shared KB: prep 186/0/48, walk (8 warps) 152/0/64,
# out 190/0/56, adjoint walk (8 warps) 255/200/104, backward chunk kernel 255/3624/220 (more at 8 warps)
_DL_LAUNCH = {"_dl_prep_kernel": (4, 1), "_dl_walk_kernel": (8, 1), "_dl_out_kernel": (4, 1),
              "_dl_bwd_walk_kernel": (8, 1), "_dl_bwd_chunk_kernel": (4, 1)}


def _dl_cfg(name):
    """Launch options of a kernel: ``num_warps`` and ``num_stages``."""
    warps, stages = _DL_LAUNCH[name]
    return {"num_warps": warps, "num_stages": stages}


def _dl_geometry(q, v):
    """(B, T, H, K, V, BT, NT, BK, BV, NV, PREC): one key block of all K keys, value blocks of up to 64;
    fp32 products stay fp32 (ieee), bf16/fp16 inputs take tf32 products."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > 256:
        raise ValueError(f"delta_chunk: the key width K = {K} of q, a, b is above 256 (one key block per program)")
    BT = DL_CHUNK
    BV = min(_dl_pow2(V), DL_BV)
    prec = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    return B, T, H, K, V, BT, triton.cdiv(T, BT), _dl_pow2(K), BV, triton.cdiv(V, BV), prec


def dl_chunk_fwd(q, a, b, v, g=None, h0=None, scale=1.0, output_final_state=False, out_dtype=None, save=False,
                 bs=None, vs=None):
    """Triton forward. q, a, b: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log gates or None; h0:
    [B, H, K, V] or None; bs, vs: [B, T, H] per-token scales of b and v or None. Returns (o [B, T, H, V] in
    ``out_dtype`` (default q's), final state [B, H, K, V] fp32 or None, and with ``save`` what the backward
    reads: (W, U, G, T, hs), else None)."""
    B, T, H, K, V, BT, NT, BK, BV, NV, prec = _dl_geometry(q, v)
    q, a, b, v = (x.contiguous() for x in (q, a, b, v))
    dev = q.device
    f32 = torch.float32
    W = torch.empty(B, H, NT * BT, BK, device=dev, dtype=f32)
    U = torch.empty(B, H, NT * BT, BV * NV, device=dev, dtype=f32)
    Gc = torch.empty(B, H, NT * BT, device=dev, dtype=f32)
    Tm = torch.empty(B, H, NT * BT, BT, device=dev, dtype=f32) if save else Gc
    hs = torch.empty(B, H, NT, BK, BV * NV, device=dev, dtype=f32)
    gg, bsf, vsf = (x.to(f32).contiguous() if x is not None else Gc for x in (g, bs, vs))
    _dl_prep_kernel[(NT, B * H)](a, b, v, gg, bsf, vsf, W, U, Gc, Tm, T, H, K, V, BT, BK, BV, NV, g is not None,
                                 bs is not None, vs is not None, save, prec, **_dl_cfg("_dl_prep_kernel"))
    ht = torch.empty(B, H, K, V, device=dev, dtype=f32) if output_final_state else None
    s0 = h0.to(f32).contiguous() if h0 is not None else None
    _dl_walk_kernel[(NV, B * H)](a, W, U, Gc, hs, s0 if s0 is not None else Gc, ht if ht is not None else Gc,
                                 T, NT, H, K, V, BT, BK, BV, NV, h0 is not None, ht is not None, prec,
                                 **_dl_cfg("_dl_walk_kernel"))
    o = torch.empty(B, T, H, V, device=dev, dtype=out_dtype or q.dtype)
    _dl_out_kernel[(NT, NV, B * H)](q, a, U, Gc, hs, o, float(scale), T, NT, H, K, V, BT, BK, BV, NV, prec,
                                    **_dl_cfg("_dl_out_kernel"))
    return o, ht, ((W, U, Gc, Tm, hs) if save else None)


def dl_chunk_bwd(do, dht, q, a, b, v, g, h0, saved, scale=1.0, bs=None, vs=None):
    """Triton backward of :func:`dl_chunk_fwd` (``saved`` from its ``save=True`` call): the adjoint walk, then
    every chunk in parallel. ``do`` [B, T, H, V], ``dht`` [B, H, K, V] or None. Returns (dq, da, db, dv in
    their inputs' dtypes, dg, dbs, dvs in fp32 or None, dh0 fp32 or None)."""
    B, T, H, K, V, BT, NT, BK, BV, NV, prec = _dl_geometry(q, v)
    W, U, Gc, Tm, hs = saved
    q, a, b, v, do = (x.contiguous() for x in (q, a, b, v, do))
    f32 = torch.float32
    dU = torch.empty_like(U)
    dhs = torch.empty_like(hs)
    dh0 = torch.empty(B, H, K, V, device=q.device, dtype=f32) if h0 is not None else None
    dht = dht.to(f32).contiguous() if dht is not None else None
    _dl_bwd_walk_kernel[(NV, B * H)](q, a, W, Gc, do, dht if dht is not None else Gc, dh0 if dh0 is not None else Gc,
                                     dU, dhs, float(scale), T, NT, H, K, V, BT, BK, BV, NV, dht is not None,
                                     dh0 is not None, prec, **_dl_cfg("_dl_bwd_walk_kernel"))
    dq, da, db, dv = (torch.empty_like(x) for x in (q, a, b, v))
    dg, dbs, dvs = (torch.empty(B, T, H, device=q.device, dtype=f32) if x is not None else None for x in (g, bs, vs))
    bsf, vsf = (x.to(f32).contiguous() if x is not None else Gc for x in (bs, vs))
    _dl_bwd_chunk_kernel[(NT, B * H)](q, a, b, v, bsf, vsf, Tm, hs, U, dU, dhs, Gc, do, dq, da, db, dv,
                                      *(x if x is not None else Gc for x in (dg, dbs, dvs)), float(scale), T, NT,
                                      H, K, V, BT, BK, BV, NV, g is not None, bs is not None, vs is not None, prec,
                                      **_dl_cfg("_dl_bwd_chunk_kernel"))
    return dq, da, db, dv, dg, dbs, dvs, dh0


# ---- as a torch operator ----------------------------------------------------------------------------
# A custom operator (torch.library) is opaque to torch.compile: a compiled model calls it without a graph
# break. Its name carries a hash of this file's kernels, so modules compiled by different mixc versions
# never share an operator that is not theirs.


def _dl_tag():
    import hashlib
    import inspect

    fns = (_dl_prep_kernel, _dl_walk_kernel, _dl_out_kernel, _dl_bwd_walk_kernel, _dl_bwd_chunk_kernel, _dl_geometry,
           dl_chunk_fwd, dl_chunk_bwd)
    src = "".join(inspect.getsource(getattr(f, "fn", f)) for f in fns)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _dl_empty(x):
    return x.new_empty(0, dtype=torch.float32)


def _dl_or_none(x):
    return None if x is None or x.numel() == 0 else x


def _dl_define_ops():
    from typing import Optional  # not X | None: older torch.library schemas read only typing.Optional

    tag = _dl_tag()
    fwd_name, bwd_name = f"delta_fwd_{tag}", f"delta_bwd_{tag}"
    try:  # already defined by another module pasting the same source
        return getattr(torch.ops.mixc, fwd_name)
    except (AttributeError, RuntimeError):
        pass
    Tensor = torch.Tensor

    @torch.library.custom_op(f"mixc::{fwd_name}", mutates_args=())
    def fwd(q: Tensor, a: Tensor, b: Tensor, v: Tensor, g: Optional[Tensor], bs: Optional[Tensor],  # noqa: UP045
            vs: Optional[Tensor], h0: Optional[Tensor], scale: float, output_final_state: bool,  # noqa: UP045
            out_dtype: Optional[torch.dtype], save: bool  # noqa: UP045
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        o, ht, saved = dl_chunk_fwd(q, a, b, v, g, h0, scale, output_final_state, out_dtype, save, bs, vs)
        saved = saved if saved is not None else tuple(_dl_empty(q) for _ in range(5))  # (distinct tensors)
        return (o, ht if ht is not None else _dl_empty(q), *saved)

    @fwd.register_fake
    def _(q, a, b, v, g, bs, vs, h0, scale, output_final_state, out_dtype, save):
        B, T, H, K, V, BT, NT, BK, BV, NV, _ = _dl_geometry(q, v)
        f32 = torch.float32
        ht = q.new_empty(B, H, K, V, dtype=f32) if output_final_state else _dl_empty(q)
        saved = ((q.new_empty(B, H, NT * BT, BK, dtype=f32), q.new_empty(B, H, NT * BT, BV * NV, dtype=f32),
                  q.new_empty(B, H, NT * BT, dtype=f32), q.new_empty(B, H, NT * BT, BT, dtype=f32),
                  q.new_empty(B, H, NT, BK, BV * NV, dtype=f32)) if save else tuple(_dl_empty(q) for _ in range(5)))
        return (q.new_empty(B, T, H, V, dtype=out_dtype or q.dtype), ht, *saved)

    @torch.library.custom_op(f"mixc::{bwd_name}", mutates_args=())
    def bwd(do: Tensor, dht: Optional[Tensor], q: Tensor, a: Tensor, b: Tensor, v: Tensor,  # noqa: UP045
            g: Optional[Tensor], bs: Optional[Tensor], vs: Optional[Tensor], h0: Optional[Tensor],  # noqa: UP045
            W: Tensor, U: Tensor, G: Tensor, Tm: Tensor, hs: Tensor, scale: float
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = dl_chunk_bwd(do, dht, q, a, b, v, g, h0, (W, U, G, Tm, hs), scale, bs, vs)
        return tuple(x if x is not None else _dl_empty(q) for x in grads)

    @bwd.register_fake
    def _(do, dht, q, a, b, v, g, bs, vs, h0, W, U, G, Tm, hs, scale):
        f32 = torch.float32
        return (torch.empty_like(q), torch.empty_like(a), torch.empty_like(b), torch.empty_like(v),
                *(q.new_empty(x.shape, dtype=f32) if x is not None else _dl_empty(q) for x in (g, bs, vs, h0)))

    def setup_context(ctx, inputs, output):
        q, a, b, v, g, bs, vs, h0, scale, output_final_state, out_dtype, save = inputs
        ctx.save_for_backward(q, a, b, v, g, bs, vs, h0, *output[2:])
        ctx.scale = scale
        ctx.final = output_final_state

    def backward(ctx, do, dht, *_):
        q, a, b, v, g, bs, vs, h0, W, U, G, Tm, hs = ctx.saved_tensors
        if W.numel() == 0:
            raise RuntimeError("delta_chunk: the forward ran without save=True, so it has no backward")
        if do is None:
            do = q.new_zeros(*q.shape[:3], v.shape[-1])
        dq, da, db, dv, *rest = bwd(do, dht if ctx.final else None, q, a, b, v, g, bs, vs, h0, W, U, G, Tm, hs,
                                    ctx.scale)
        dg, dbs, dvs, dh0 = (_dl_or_none(d).to(x.dtype) if x is not None else None
                             for d, x in zip(rest, (g, bs, vs, h0)))
        return dq, da, db, dv, dg, dbs, dvs, dh0, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


_DL_OP = _dl_define_ops()  # defined as the module loads (not inside a torch.compile trace)


def delta_chunk(q, a, b, v, g=None, h0=None, scale=1.0, output_final_state=False, out_dtype=None, bs=None, vs=None):
    """The chunked (gated) delta rule, differentiable (a torch operator). q, a, b: [B, T, H, K]; v: [B, T, H, V];
    g: [B, T, H] fp32 log gates or None; h0: [B, H, K, V] fp32 or None; bs, vs: [B, T, H] per-token scales of b
    and v (deltanet's beta: applied as the kernels load b and v, so the scaled tensors are never written) or
    None. Returns (o [B, T, H, V] in ``out_dtype``
    (default q's), final state [B, H, K, V] fp32 or None). The forward saves what the backward reads only
    when a gradient will be asked for."""
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, a, b, v, g, bs, vs, h0))
    o, ht, *_ = _DL_OP(q, a, b, v, g, bs, vs, h0, float(scale), bool(output_final_state), out_dtype, save)
    return o, (ht if output_final_state else None)
