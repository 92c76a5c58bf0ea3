"""The tiled attention kernels, as a template with named holes that the emitter fills from the plan.

Holes (replaced by the emitter): ``{CTX}`` the per-head scalars the score reads (``, f_h, p_cap, dim_K``),
``{CTX_LOADS}`` the lines loading them, ``{DIM_ARGS}`` the size arguments, ``{DPAR_ACC}`` /
``{DPAR_ACC_MASKED}`` / ``{DPAR_INIT}`` / ``{DPAR_STORE}`` the gradient of each learnable per-head parameter. The
helpers
``_attn_score``, ``_attn_dscore`` and ``_attn_visible`` are emitted before this text.

Maths (one (batch, head), base-2 online softmax, Dao 2023):
    s = score(q_t . k_u, t, u, head),  s2 = s * log2(e)
    m = max_u s2,  l = sum_u 2^(s2 - m),  o = sum_u 2^(s2 - m) v_u / l,  lse2 = m + log2(l)
backward, with delta_t = sum_j do_tj o_tj:
    p = 2^(s2 - lse2),  dv = p^T do,  dp = do v^T,  ds = p (dp - delta),
    dq = (ds * ds/dqk) k,  dk = (ds * ds/dqk)^T q,  dparam = sum ds * ds/dparam
Each program reads its work row from TABLE: (q_start, q_len, k_start, k_len, off, tile, lo, flo, fhi, hi), its
sequence's first query and key in the packed tensors (cu_seqlens) and their counts, the position of the first
query (the cache length), its tile, and the tiles of the other side it visits: [flo, fhi) full (no mask
arithmetic), [lo, flo) and [fhi, hi) partial (masked), the rest empty (never visited).
"""

TEMPLATE = '''
@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, m_kd, m_vd, skt, svt, f_t, start, end, TK{CTX},
                    BN: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr, BARE: tl.constexpr):
    """Online softmax over key tiles [start, end) of one query tile (acc [BM, BV], m_i, l_i [BM]). BARE: full
    tiles (never cut by TK) of unpadded widths, loaded without masks."""
    for i_n in range(start, end):
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < TK
        if BARE:
            b_k = tl.load(k_ptrs + i_n * BN * skt)  # [BK, BN]
        else:
            b_k = tl.load(k_ptrs + i_n * BN * skt, mask=m_n[None, :] & m_kd, other=0.0)  # [BK, BN]
        qk = tl.dot(q, b_k, input_precision=DOT)  # q_t . k_u, fp32 [BM, BN]
        f_u = o_n.to(tl.float32)[None, :]
        s = _attn_score(qk, f_t, f_u{CTX}) * 1.4426950408889634  # log2 units
        if MASKED:
            vis = m_n[None, :] & _attn_visible(f_t, f_u)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if BARE:
            b_v = tl.load(v_ptrs + i_n * BN * svt)  # [BN, BV]
        else:
            b_v = tl.load(v_ptrs + i_n * BN * svt, mask=m_n[:, None] & m_vd, other=0.0)  # [BN, BV]
        acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v, input_precision=DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # [B, T, H, DK], [B, TK, H, DK], [B, TK, H, DV]; unit stride along the width
    O, LSE,  # out [NS, B, T, H, DV]; base-2 logsumexp [NS, B, H, T] fp32 (NS: key splits)
    TABLE,  # [programs, 10] int32 work rows, one per (sequence, query tile)
    PARAMS,  # [H, NP] fp32 per-head scalars the score reads
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,  # strides of Q, K, V
    sos, sob, sot, soh, sls, slb, slh,  # strides of O and LSE
    H, NP,{DIM_ARGS}  # heads, per-head scalars, sizes
    DK: tl.constexpr, DV: tl.constexpr,  # q/k and v widths
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,  # tile sizes (BK >= DK, BV >= DV)
    NS: tl.constexpr,  # key splits (split-KV decode); 1 in training
    DOT: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs (exact), else "tf32" (16-bit: unused)
    EVEN: tl.constexpr,  # DK == BK and DV == BV: full key tiles load without masks
):
    i_m, i_bh, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # (64-bit batch offsets)
    w = TABLE + i_m * 10  # this program's work row
    q0, T, k0, TK = tl.load(w).to(tl.int64), tl.load(w + 1), tl.load(w + 2).to(tl.int64), tl.load(w + 3)
    OFF, i_t = tl.load(w + 4), tl.load(w + 5)  # first query position, this program's tile in its sequence
    lo, flo, fhi, hi = tl.load(w + 6), tl.load(w + 7), tl.load(w + 8), tl.load(w + 9)
    Q += q0 * sqt  # the sequence's first query and key
    K += k0 * skt
    V += k0 * svt
    O += q0 * sot
    LSE += q0
    o_m = i_t * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    q = tl.load(Q + i_b * sqb + i_h * sqh + o_m[:, None] * sqt + o_k[None, :],
                mask=m_m[:, None] & (o_k[None, :] < DK), other=0.0)  # [BM, BK]
    k_ptrs = K + i_b * skb + i_h * skh + tl.arange(0, BN)[None, :] * skt + o_k[:, None]  # [BK, BN] k^T
    v_ptrs = V + i_b * svb + i_h * svh + tl.arange(0, BN)[:, None] * svt + o_v[None, :]  # [BN, BV]
    m_kd = o_k[:, None] < DK  # padded widths (BK > DK) load zeros
    m_vd = o_v[None, :] < DV
    f_t = (OFF + o_m).to(tl.float32)[:, None]
    f_h = i_h.to(tl.float32)
{CTX_LOADS}
    if NS > 1:  # this program's share of the key tiles
        per = tl.cdiv(hi - lo, NS)
        s_lo = lo + i_s * per
        s_hi = tl.minimum(hi, s_lo + per)
    else:
        s_lo = lo
        s_hi = hi
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BV], tl.float32)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, m_kd, m_vd, skt, svt, f_t, s_lo,
                                    tl.minimum(flo, s_hi), TK{CTX}, BN, True, DOT, False)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, m_kd, m_vd, skt, svt, f_t, tl.maximum(flo, s_lo),
                                    tl.minimum(fhi, s_hi), TK{CTX}, BN, False, DOT, EVEN)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, m_kd, m_vd, skt, svt, f_t, tl.maximum(fhi, s_lo),
                                    s_hi, TK{CTX}, BN, True, DOT, False)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(O + i_s * sos + i_b * sob + i_h * soh + o_m[:, None] * sot + o_v[None, :], out.to(O.dtype.element_ty),
             mask=m_m[:, None] & (o_v[None, :] < DV))
    tl.store(LSE + i_s * sls + i_b * slb + i_h * slh + o_m, lse, mask=m_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA,  # [B, T, H, DK], [B, TK, H, DK], [B, TK, H, DV], [B, T, H, DV], [B, H, T] x2 fp32
    DK_OUT, DV_OUT,  # gradients of K and V, laid out as K and V
    DPAR,  # [NPL, B * H, programs] fp32 partial sums of the learnable parameters' gradients
    TABLE,  # [programs, 10] int32 work rows, one per (sequence, key tile)
    PARAMS,  # [H, NP] fp32 per-head scalars the score reads
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,  # strides of Q, K (and DK_OUT), V (and DV_OUT), DO
    slb, slh,  # strides of LSE and DELTA
    H, NP,{DIM_ARGS}  # heads, per-head scalars, sizes
    DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NPL: tl.constexpr,  # learnable parameters (the first NPL columns of PARAMS)
    DOT: tl.constexpr,  # tl.dot input precision
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # (64-bit batch offsets)
    w = TABLE + i_n * 10  # this program's work row
    q0, T, k0, TK = tl.load(w).to(tl.int64), tl.load(w + 1), tl.load(w + 2).to(tl.int64), tl.load(w + 3)
    OFF, i_t = tl.load(w + 4), tl.load(w + 5)  # first query position, this program's tile in its sequence
    lo, flo, fhi, hi = tl.load(w + 6), tl.load(w + 7), tl.load(w + 8), tl.load(w + 9)
    Q += q0 * sqt  # the sequence's first query and key
    DO += q0 * sdt
    LSE += q0
    DELTA += q0
    K += k0 * skt
    V += k0 * svt
    DK_OUT += k0 * skt
    DV_OUT += k0 * svt
    o_n = i_t * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_n = o_n < TK
    b_k = tl.load(K + i_b * skb + i_h * skh + o_n[:, None] * skt + o_k[None, :],
                  mask=m_n[:, None] & (o_k[None, :] < DK), other=0.0)  # [BN, BK]
    b_v = tl.load(V + i_b * svb + i_h * svh + o_n[:, None] * svt + o_v[None, :],
                  mask=m_n[:, None] & (o_v[None, :] < DV), other=0.0)  # [BN, BV]
    f_u = o_n.to(tl.float32)[:, None]
    f_h = i_h.to(tl.float32)
{CTX_LOADS}
    dk = tl.zeros([BN, BK], tl.float32)
    dv = tl.zeros([BN, BV], tl.float32)
{DPAR_INIT}
    for i_m in range(lo, hi):
        o_m = i_m * BM + tl.arange(0, BM)
        m_m = o_m < T
        q_t = tl.load(Q + i_b * sqb + i_h * sqh + o_m[None, :] * sqt + o_k[:, None],
                      mask=m_m[None, :] & (o_k[:, None] < DK), other=0.0)  # [BK, BM] q^T
        b_do = tl.load(DO + i_b * sdb + i_h * sdh + o_m[:, None] * sdt + o_v[None, :],
                       mask=m_m[:, None] & (o_v[None, :] < DV), other=0.0)  # [BM, BV]
        lse = tl.load(LSE + i_b * slb + i_h * slh + o_m, mask=m_m, other=float("inf"))
        delta = tl.load(DELTA + i_b * slb + i_h * slh + o_m, mask=m_m, other=0.0)
        qk = tl.dot(b_k, q_t, input_precision=DOT)  # [BN, BM]: s^T
        f_t = (OFF + o_m).to(tl.float32)[None, :]
        s = _attn_score(qk, f_t, f_u{CTX}) * 1.4426950408889634
        p = tl.exp2(s - lse[None, :])
        dp = tl.dot(b_v, tl.trans(b_do), input_precision=DOT)  # [BN, BM]: (do v^T)^T
        ds = p * (dp - delta[None, :])
        dqk = ds * _attn_dscore(qk, f_t, f_u{CTX})
        if (i_m < flo) | (i_m >= fhi):  # a partial tile: mask element by element (after any inf * 0)
            vis = m_n[:, None] & m_m[None, :] & _attn_visible(f_t, f_u)
            p = tl.where(vis, p, 0.0)
            dqk = tl.where(vis, dqk, 0.0)
{DPAR_ACC_MASKED}
        else:
{DPAR_ACC}
        dv += tl.dot(p.to(b_do.dtype), b_do, input_precision=DOT)
        dk += tl.dot(dqk.to(q_t.dtype), tl.trans(q_t), input_precision=DOT)
    tl.store(DK_OUT + i_b * skb + i_h * skh + o_n[:, None] * skt + o_k[None, :], dk.to(DK_OUT.dtype.element_ty),
             mask=m_n[:, None] & (o_k[None, :] < DK))
    tl.store(DV_OUT + i_b * svb + i_h * svh + o_n[:, None] * svt + o_v[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=m_n[:, None] & (o_v[None, :] < DV))
{DPAR_STORE}


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA,  # as in _attn_bwd_dkdv_kernel
    DQ,  # gradient of Q, laid out as Q
    TABLE,  # [programs, 10] int32 work rows, one per (sequence, query tile)
    PARAMS,  # [H, NP] fp32 per-head scalars the score reads
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,  # strides of Q (and DQ), K, V, DO
    slb, slh,  # strides of LSE and DELTA
    H, NP,{DIM_ARGS}  # heads, per-head scalars, sizes
    DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr,  # tl.dot input precision
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # (64-bit batch offsets)
    w = TABLE + i_m * 10  # this program's work row
    q0, T, k0, TK = tl.load(w).to(tl.int64), tl.load(w + 1), tl.load(w + 2).to(tl.int64), tl.load(w + 3)
    OFF, i_t = tl.load(w + 4), tl.load(w + 5)  # first query position, this program's tile in its sequence
    lo, flo, fhi, hi = tl.load(w + 6), tl.load(w + 7), tl.load(w + 8), tl.load(w + 9)
    Q += q0 * sqt  # the sequence's first query and key
    DQ += q0 * sqt
    DO += q0 * sdt
    LSE += q0
    DELTA += q0
    K += k0 * skt
    V += k0 * svt
    o_m = i_t * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    b_q = tl.load(Q + i_b * sqb + i_h * sqh + o_m[:, None] * sqt + o_k[None, :],
                  mask=m_m[:, None] & (o_k[None, :] < DK), other=0.0)  # [BM, BK]
    b_do = tl.load(DO + i_b * sdb + i_h * sdh + o_m[:, None] * sdt + o_v[None, :],
                   mask=m_m[:, None] & (o_v[None, :] < DV), other=0.0)  # [BM, BV]
    lse = tl.load(LSE + i_b * slb + i_h * slh + o_m, mask=m_m, other=float("inf"))
    delta = tl.load(DELTA + i_b * slb + i_h * slh + o_m, mask=m_m, other=0.0)
    f_t = (OFF + o_m).to(tl.float32)[:, None]
    f_h = i_h.to(tl.float32)
{CTX_LOADS}
    dq = tl.zeros([BM, BK], tl.float32)
    for i_n in range(lo, hi):
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < TK
        k_t = tl.load(K + i_b * skb + i_h * skh + o_n[None, :] * skt + o_k[:, None],
                      mask=m_n[None, :] & (o_k[:, None] < DK), other=0.0)  # [BK, BN] k^T
        v_t = tl.load(V + i_b * svb + i_h * svh + o_n[None, :] * svt + o_v[:, None],
                      mask=m_n[None, :] & (o_v[:, None] < DV), other=0.0)  # [BV, BN] v^T
        qk = tl.dot(b_q, k_t, input_precision=DOT)  # [BM, BN]
        f_u = o_n.to(tl.float32)[None, :]
        s = _attn_score(qk, f_t, f_u{CTX}) * 1.4426950408889634
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(b_do, v_t, input_precision=DOT)
        ds = p * (dp - delta[:, None])
        dqk = ds * _attn_dscore(qk, f_t, f_u{CTX})
        if (i_n < flo) | (i_n >= fhi):  # a partial tile: mask element by element (after any inf * 0)
            dqk = tl.where(m_m[:, None] & m_n[None, :] & _attn_visible(f_t, f_u), dqk, 0.0)
        dq += tl.dot(dqk.to(k_t.dtype), tl.trans(k_t), input_precision=DOT)
    tl.store(DQ + i_b * sqb + i_h * sqh + o_m[:, None] * sqt + o_k[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_m[:, None] & (o_k[None, :] < DK))
'''
