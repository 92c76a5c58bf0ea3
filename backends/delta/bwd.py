"""The chunked delta rule's backward kernels (Triton): the adjoint walk and the per-chunk gradients.

The maths and the notation are in :mod:`mixc.backends.delta.kernels` (its header). The forward's work tensors
W, U and hs arrive in the work dtype (fp32; 16-bit for 16-bit inputs with DL_WORK16); dU and dhs are stored in
it too (as fla stores its dv and dh); sums are fp32.
This file needs triton and the chunked form's launcher (`_Launch`, pasted before it); `mixc compile` pastes it
into the generated module.
"""

import triton
import triton.language as tl

try:
    from ..chunked.launcher import _Launch
    from .fwd import _dl_rows, _dl_walk_chunks
except ImportError:  # pasted into a generated module, after the launcher
    pass


@_Launch
@triton.jit
def _dl_bwd_local_kernel(
    q,  # [B, T, H, K] queries
    a,  # [B, T, H, K] keys a_t
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    do,  # [B, T, H, V] the output's cotangent
    dU,  # [B, H, NT * BT, BU * NU] work dtype out: the in-chunk part of dU, scale M^T dO
    scale,  # the readout's number factor
    ctab,  # [NT, 2] int32 with VARLEN: each chunk's first token and its sequence's end (else unused)
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BU: tl.constexpr, NU: tl.constexpr,
    PREC: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """Per chunk and value block BV (a divisor of BU * NU), in parallel: the part of dU that does not wait for
    the adjoint walk, scale M^T dO with M = (Q A^T) * Gamma (s <= t)."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    DT = q.dtype.element_ty
    o_r = tl.arange(0, BT)
    m_t, rows = _dl_rows(ctab, i_t, i_b, i_h, T, H, BT, VARLEN)
    o_k = tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    o_v = i_v * BV + tl.arange(0, BV)
    base = (i_bh * NT + i_t) * BT + o_r
    b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :], other=0.)
    b_G = tl.load(Gc + base)
    # M^T[s, t] = e^(G_t - G_s) a_s . q_t for t >= s
    incl = o_r[:, None] <= o_r[None, :]
    b_Mt = tl.dot(b_a, tl.trans(b_q), input_precision=PREC)
    b_Mt = tl.where(incl, b_Mt * tl.exp(tl.where(incl, b_G[None, :] - b_G[:, None], 0.)), 0.)
    b_du = tl.dot(b_Mt.to(DT), b_do.to(DT), input_precision=PREC) * scale
    tl.store(dU + base[:, None] * (BU * NU) + o_v[None, :], b_du.to(dU.dtype.element_ty))


@_Launch
@triton.jit
def _dl_bwd_walk_kernel(
    q,  # [B, T, H, K] queries
    a,  # [B, T, H, K] keys a_t
    W,  # [B, H, NT * BT, BK] work dtype: W of the forward
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    do,  # [B, T, H, V] the output's cotangent
    dht,  # [B, H, K, V] fp32 the final state's cotangent (unused without HAS_DHT)
    dh0,  # [B, H, K, V] fp32 out: the initial state's cotangent (unused without STORE_DH0)
    dU,  # [B, H, NT * BT, BV * NV] work dtype in: scale M^T dO (_dl_bwd_local_kernel); out: dU
    dhs,  # [B, H, NT, BK, BV * NV] work dtype out: dS_C, the cotangent of every chunk's end state
    scale,  # the readout's number factor
    ctab,  # [NT, 2] int32 with VARLEN: each chunk's first token and its sequence's end (else unused)
    coff,  # [N + 1] int32 with VARLEN: each sequence's first chunk (else unused)
    T,  # tokens per sequence
    NT,  # chunks per sequence (with VARLEN: in all)
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """The adjoint walk, over chunks in reverse, with dS the cotangent of the chunk's end state S_C (fp32 in
    registers; its products take it in the work dtype):
    dU = scale M^T dO + (A e^(G_C - G)) dS,   dS_0 = scale (Q e^G)^T dO + e^(G_C) dS - W^T dU."""
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
    if HAS_DHT:
        b_dS = tl.load(dht + p_s, mask=m_kv, other=0.).to(tl.float32)
    else:
        b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    c0, c1, bh = _dl_walk_chunks(coff, i_b, i_h, i_bh, NT, VARLEN)
    for j in range(c1 - c0):
        i_t = c1 - 1 - j
        m_t, rows = _dl_rows(ctab, i_t, i_b, i_h, T, H, BT, VARLEN)
        base = (bh * NT + i_t) * BT + o_r
        m_tk = m_t[:, None] & m_k[None, :]
        b_dSd = b_dS.to(DT)
        tl.store(dhs + ((bh * NT + i_t) * BK + o_k[:, None]) * (BV * NV) + o_v[None, :], b_dSd)
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_W = tl.load(W + base[:, None] * BK + o_k[None, :])
        b_G = tl.load(Gc + base)
        b_GL = tl.sum(tl.where(o_r == BT - 1, b_G, 0.), 0)
        b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        p_u = dU + base[:, None] * (BV * NV) + o_v[None, :]
        b_ad = (b_a.to(tl.float32) * tl.exp(b_GL - b_G)[:, None]).to(DT)
        b_du = (tl.load(p_u).to(tl.float32) + tl.dot(b_ad, b_dSd, input_precision=PREC)).to(DT)
        tl.store(p_u, b_du)
        b_qg = (b_q.to(tl.float32) * (tl.exp(b_G) * scale)[:, None]).to(DT)
        b_dS = b_dS * tl.exp(b_GL) + tl.dot(tl.trans(b_qg), b_do.to(DT), input_precision=PREC)
        b_dS -= tl.dot(tl.trans(b_W), b_du, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + p_s, b_dS, mask=m_kv)


@_Launch
@triton.jit
def _dl_bwd_vloop_kernel(
    q,  # [B, T, H, K] queries
    a,  # [B, T, H, K] keys a_t
    v,  # [B, T, H, V] values
    vs,  # [B, T, H] fp32 per-token scale of v (unused without HAS_VS)
    Tm,  # [B, H, NT * BT, BT] fp32 T = (I + L)^-1 of the forward
    hs,  # [B, H, NT, BK, BV * NV] work dtype: the state at every chunk start
    U,  # [B, H, NT * BT, BV * NV] work dtype: the pseudo-values
    dU,  # [B, H, NT * BT, BV * NV] work dtype: their cotangent (from _dl_bwd_walk_kernel)
    dhs,  # [B, H, NT, BK, BV * NV] work dtype: dS_C of every chunk
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    do,  # [B, T, H, V] the output's cotangent
    dq,  # [B, T, H, K] out: cotangent of q (its dtype)
    dv,  # [B, T, H, V] out: cotangent of v (its dtype)
    dvs,  # [B, T, H] fp32 out: cotangent of vs (unused without HAS_VS)
    dW,  # [B, H, NT * BT, BK] work dtype out: dW = -dU S_0^T
    dT,  # [B, H, NT * BT, BT] fp32 out: the part dU V^T of dT
    dA1,  # [B, H, NT * BT, BK] work dtype out: the part (dM * Gamma)^T Q + e^(G_C - G) (U dS_C^T) of dA
    dG1,  # [B, H, NT * BT] fp32 out: the log gate's dG but for what W and L give (unused without HAS_G)
    scale,  # the readout's number factor
    ctab,  # [NT, 2] int32 with VARLEN: each chunk's first token and its sequence's end (else unused)
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_VS: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """Per chunk in parallel, what sums over the value axis (products in the work dtype, fp32 sums):
    dW = -dU S_0^T, dV = T^T dU, dM = scale dO U^T (t >= s), dQ = scale e^G (dO S_0^T) + (dM * Gamma) A,
    dA1 = (dM * Gamma)^T Q + e^(G_C - G) (U dS_C^T), dT1 = dU V^T; dG1_t from e^(+-G) in M, Q e^G and the
    end state (with V here vs v). _dl_bwd_wy_kernel finishes dA, dB and dG through W = T (B e^G) and T."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = q.dtype.element_ty
    o_r = tl.arange(0, BT)
    m_t, rows = _dl_rows(ctab, i_t, i_b, i_h, T, H, BT, VARLEN)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    base = (i_bh * NT + i_t) * BT + o_r
    m_tk = m_t[:, None] & m_k[None, :]
    if HAS_VS:
        b_vs = tl.load(vs + rows, mask=m_t, other=0.)
        b_dvs = tl.zeros([BT], dtype=tl.float32)
    b_T = tl.load(Tm + base[:, None] * BT + o_r[None, :]).to(DT)
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
        b_S = tl.load(hs + p_s).to(DT)
        b_dS = tl.load(dhs + p_s).to(DT)
        b_u = tl.load(U + base[:, None] * (BV * NV) + o_v[None, :]).to(DT)
        b_dud = tl.load(dU + base[:, None] * (BV * NV) + o_v[None, :]).to(DT)
        b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(DT)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_dv = tl.dot(tl.trans(b_T), b_dud, input_precision=PREC)  # the cotangent of vs v
        if HAS_VS:
            b_dvs += tl.sum(b_dv * b_v.to(tl.float32), 1)
            b_dv *= b_vs[:, None]
            b_v = b_v.to(tl.float32) * b_vs[:, None]
        tl.store(dv + rows[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        b_dW -= tl.dot(b_dud, tl.trans(b_S), input_precision=PREC)
        b_dQ1 += tl.dot(b_do, tl.trans(b_S), input_precision=PREC)
        b_dAd += tl.dot(b_u, tl.trans(b_dS), input_precision=PREC)
        b_dM += tl.dot(b_do, tl.trans(b_u), input_precision=PREC)
        b_dT += tl.dot(b_dud, tl.trans(b_v.to(DT)), input_precision=PREC)
        if HAS_G:
            b_dGC += tl.sum(b_dS.to(tl.float32) * b_S.to(tl.float32), 1)
    p_k = rows[:, None] * K + o_k[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.)
    b_a = tl.load(a + p_k, mask=m_tk, other=0.)
    incl = o_r[:, None] >= o_r[None, :]
    b_Gam = tl.exp(tl.where(incl, b_G[:, None] - b_G[None, :], 0.))  # e^(G_t - G_s), s <= t (1 elsewhere)
    # the readout's in-chunk scores M = (Q A^T) * Gamma (s <= t)
    b_dM = tl.where(incl, b_dM * scale * b_Gam, 0.)  # dM * Gamma
    b_dMd = b_dM.to(DT)
    b_dq = b_dQ1 * (b_gam * scale)[:, None] + tl.dot(b_dMd, b_a, input_precision=PREC)
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    b_da = tl.dot(tl.trans(b_dMd), b_q, input_precision=PREC) + b_dAd * b_del[:, None]
    p_w = base[:, None] * BK + o_k[None, :]
    tl.store(dA1 + p_w, b_da.to(dA1.dtype.element_ty))
    tl.store(dW + p_w, b_dW.to(dW.dtype.element_ty))
    tl.store(dT + base[:, None] * BT + o_r[None, :], b_dT)
    if HAS_VS:
        tl.store(dvs + rows, b_dvs, mask=m_t)
    if HAS_G:
        # dG_t: rows of P_M = dM * M (e^(+G_t)) less its columns (e^(-G_s)), e^G in Q e^G, and e^(G_C - G_t) in
        # the end state (less at t, more at the chunk's end, with e^(G_C) S_0)
        b_PM = b_dM * tl.dot(b_q, tl.trans(b_a), input_precision=PREC)
        b_pad = tl.sum(b_dAd * b_a.to(tl.float32) * b_del[:, None], 1)
        b_dG = tl.sum(b_PM, 1) - tl.sum(b_PM, 0) + tl.sum(b_dQ1 * b_q.to(tl.float32), 1) * b_gam * scale - b_pad
        b_dG += tl.where(o_r == BT - 1, tl.sum(b_pad, 0) + tl.exp(b_GL) * tl.sum(b_dGC, 0), 0.)
        tl.store(dG1 + base, b_dG)


@_Launch
@triton.jit
def _dl_bwd_wy_kernel(
    a,  # [B, T, H, K] keys a_t
    b,  # [B, T, H, K] b_t
    bs,  # [B, T, H] fp32 per-token scale of b (unused without HAS_BS)
    Tm,  # [B, H, NT * BT, BT] fp32 T = (I + L)^-1 of the forward
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    dW,  # [B, H, NT * BT, BK] work dtype: dW (from _dl_bwd_vloop_kernel)
    dT,  # [B, H, NT * BT, BT] fp32 the part dU V^T of dT
    dA1,  # [B, H, NT * BT, BK] work dtype: dA but for what L gives
    dG1,  # [B, H, NT * BT] fp32 dG but for what W and L give (unused without HAS_G)
    da, db,  # [B, T, H, K] out: cotangents of a, b (their dtype); with SAME_AB da gets their sum, db is unused
    dg,  # [B, T, H] fp32 out: cotangent of the log gate (unused without HAS_G)
    dbs,  # [B, T, H] fp32 out: cotangent of bs (unused without HAS_BS)
    ctab,  # [NT, 2] int32 with VARLEN: each chunk's first token and its sequence's end (else unused)
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
    HAS_G: tl.constexpr, HAS_BS: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr = False,
    SAME_AB: tl.constexpr = False,
):
    """Per chunk in parallel, through W = T (B e^G), U0 = T V and T = (I + L)^-1 (products with T in fp32 and
    PREC, those with A and B in their dtype):
    dT = dW (B e^G)^T + dT1, dL = -(T^T dT T^T) (s < t), dB = e^G (T^T dW) + (dL * Gamma) A,
    dA = dA1 + (dL * Gamma)^T B; dG_t adds the rows of P_L = dL * L less its columns and e^G in B e^G;
    dg the suffix sums of dG within the chunk. With a scale, B here is bs b."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BT)
    m_t, rows = _dl_rows(ctab, i_t, i_b, i_h, T, H, BT, VARLEN)
    o_k = tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    base = (i_bh * NT + i_t) * BT + o_r
    p_k = rows[:, None] * K + o_k[None, :]
    p_w = base[:, None] * BK + o_k[None, :]
    DT = a.dtype.element_ty
    b_a = tl.load(a + p_k, mask=m_tk, other=0.).to(DT)
    b_braw = tl.load(b + p_k, mask=m_tk, other=0.).to(DT)
    if HAS_BS:
        b_bs = tl.load(bs + rows, mask=m_t, other=0.)
    else:
        b_bs = tl.full([BT], 1., dtype=tl.float32)
    b_T = tl.load(Tm + base[:, None] * BT + o_r[None, :])
    b_G = tl.load(Gc + base)
    b_bgs = b_bs * tl.exp(b_G)  # B e^G = braw * bs e^G (per row)
    lower = o_r[:, None] > o_r[None, :]
    b_dW = tl.load(dW + p_w).to(tl.float32)
    b_dbg = tl.dot(tl.trans(b_T), b_dW, input_precision=PREC)  # the cotangent of B e^G
    b_dT = tl.dot(b_dW.to(DT), tl.trans(b_braw), input_precision=PREC) * b_bgs[None, :]
    b_dT += tl.load(dT + base[:, None] * BT + o_r[None, :])
    b_dL = tl.dot(tl.trans(b_T), tl.dot(b_dT, tl.trans(b_T), input_precision=PREC), input_precision=PREC)
    b_Gam = tl.exp(tl.where(lower, b_G[:, None] - b_G[None, :], 0.))  # e^(G_t - G_s), s < t (1 elsewhere)
    b_dL = tl.where(lower, -b_dL * b_Gam, 0.)  # dL * Gamma (s < t)
    if HAS_G:
        b_PL = b_dL * tl.dot(b_braw, tl.trans(b_a), input_precision=PREC) * b_bs[:, None]  # dL * L
        b_dG = tl.load(dG1 + base) + tl.sum(b_PL, 1) - tl.sum(b_PL, 0)
        b_dG += tl.sum(b_dbg * b_braw.to(tl.float32), 1) * b_bgs
        # G_t = sum_(s <= t) g_s: dg_s = sum_(t >= s) dG_t
        b_dg = tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG
        tl.store(dg + rows, b_dg, mask=m_t)
    # the cotangent of bs b: e^G (T^T dW) + (dL * Gamma) A
    b_db = b_dbg * tl.exp(b_G)[:, None] + tl.dot(b_dL.to(DT), b_a, input_precision=PREC)
    if HAS_BS:
        tl.store(dbs + rows, tl.sum(b_db * b_braw.to(tl.float32), 1), mask=m_t)
        b_db *= b_bs[:, None]
    if not SAME_AB:
        tl.store(db + p_k, b_db.to(db.dtype.element_ty), mask=m_tk)
    # dA = dA1 + (dL * Gamma)^T (bs braw) (and, when a and b are one tensor, its cotangent is dA + dB)
    b_da = tl.dot(tl.trans((b_dL * b_bs[:, None]).to(DT)), b_braw, input_precision=PREC)
    b_da += tl.load(dA1 + p_w).to(tl.float32)
    if SAME_AB:
        b_da += b_db
    tl.store(da + p_k, b_da.to(da.dtype.element_ty), mask=m_tk)
