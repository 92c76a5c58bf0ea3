"""The tiled attention kernels, as a template with named holes that the emitter fills from the plan.

Holes (replaced by the emitter): ``{CTX}`` the per-head scalars the score reads (``, f_h, p_cap, dim_K``),
``{CTX_LOADS}`` the lines loading them, ``{DIM_ARGS}`` the size arguments, ``{DPAR}`` the learnable per-head
parameters' gradient accumulators threaded through the backward loop (``, dpar_0``), ``{DPAR_ACC}`` /
``{DPAR_ACC_MASKED}`` / ``{DPAR_INIT}`` / ``{DPAR_STORE}`` their updates, initial values and stores, ``{SCALED}``
whether the score is qk times a positive per-head slope and nothing else (the forward then takes the row maximum
on qk and forms qk * qk_scale - m as one FMA). The helpers
``_attn_score2`` (the score in log2 units), ``_attn_qk_scale``, ``_attn_dqk``, ``_attn_dscale`` and
``_attn_visible`` are emitted before this text.

Maths (one (batch, head), base-2 online softmax, Dao 2023):
    s2 = score(q_t . k_u, t, u, head) * log2(e)   (score linear in qk with a per-head slope a:
         s2 = qk * (a log2(e)) + b(t, u) log2(e), the product a log2(e) computed once per program)
    m = max_u s2,  l = sum_u 2^(s2 - m),  o = sum_u 2^(s2 - m) v_u / l,  lse2 = m + log2(l)
backward, with delta_t = sum_j do_tj o_tj (_attn_bwd_preprocess_kernel):
    p = 2^(s2 - lse2),  dv = p^T do,  dp = do v^T,  ds = p (dp - delta),
    dq = (ds * ds/dqk) k,  dk = (ds * ds/dqk)^T q,  dparam = sum ds * ds/dparam
    (ds/dqk = a constant per head: the sums take ds and are scaled by a once at the end, _attn_dscale)
Each program reads its work row from TABLE: (q_start, q_len, k_start, k_len, off, tile, lo, flo, fhi, hi), its
sequence's first query and key in the packed tensors (cu_seqlens) and their counts, the position of the first
query (the cache length), its tile, and the tiles of the other side it visits: [flo, fhi) full (no mask
arithmetic; with EVEN widths no load masks either), [lo, flo) and [fhi, hi) partial (masked, each its own loop),
the rest empty (never visited).
Decoding (_attn_decode_kernel): one query per (batch, head) against a preallocated cache whose length is read
from the device (CUDA-graph capturable), the key tiles split over NS programs, merged by _attn_decode_merge_kernel.
"""

TEMPLATE = '''
@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, m_kd, m_vd, skt, svt, f_t, start, end, TK, qk_scale{CTX},
                    BN: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr, BARE: tl.constexpr):
    """Online softmax over key tiles [start, end) of one query tile (acc [BM, BV], m_i, l_i [BM]). MASKED: partial
    tiles (mask and bounds element by element); BARE: full tiles of unpadded widths, loaded without masks."""
    SCALED: tl.constexpr = {SCALED}  # the score is qk times a positive per-head slope (emitted from the plan)
    for i_n in range(start, end):
        o_n = i_n * BN + tl.arange(0, BN)
        if BARE:
            b_k = tl.load(k_ptrs + i_n * BN * skt)  # [BK, BN]
            b_v = tl.load(v_ptrs + i_n * BN * svt)  # [BN, BV]
        else:
            m_n = o_n < TK
            b_k = tl.load(k_ptrs + i_n * BN * skt, mask=m_n[None, :] & m_kd, other=0.0)  # [BK, BN]
            b_v = tl.load(v_ptrs + i_n * BN * svt, mask=m_n[:, None] & m_vd, other=0.0)  # [BN, BV]
        qk = tl.dot(q, b_k, input_precision=DOT)  # q_t . k_u, fp32 [BM, BN]
        f_u = o_n.to(tl.float32)[None, :]
        if SCALED:  # s2 = qk * qk_scale, qk_scale > 0: the maximum taken on qk, then one FMA per element
            s = qk
        else:
            s = _attn_score2(qk, f_t, f_u, qk_scale{CTX})  # score * log2(e)
        if MASKED:
            s = tl.where((o_n < TK)[None, :] & _attn_visible(f_t, f_u), s, float("-inf"))
        if SCALED:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        else:  # every element visible: the new maximum is finite
            m_use = m_new
        if SCALED:
            p = tl.exp2(s * qk_scale - m_use[:, None])
        else:
            p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=DOT)  # accumulates in place
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
    Q += q0 * sqt + i_b * sqb + i_h * sqh  # the sequence's first query and key, this (batch, head)
    K += k0 * skt + i_b * skb + i_h * skh
    V += k0 * svt + i_b * svb + i_h * svh
    O += q0 * sot + i_s * sos + i_b * sob + i_h * soh
    LSE += q0 + i_s * sls + i_b * slb + i_h * slh
    o_m = i_t * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    q = tl.load(Q + o_m[:, None] * sqt + o_k[None, :], mask=m_m[:, None] & (o_k[None, :] < DK), other=0.0)  # [BM, BK]
    k_ptrs = K + tl.arange(0, BN)[None, :] * skt + o_k[:, None]  # [BK, BN] k^T
    v_ptrs = V + tl.arange(0, BN)[:, None] * svt + o_v[None, :]  # [BN, BV]
    m_kd = o_k[:, None] < DK  # padded widths (BK > DK) load zeros
    m_vd = o_v[None, :] < DV
    f_t = (OFF + o_m).to(tl.float32)[:, None]
    f_h = i_h.to(tl.float32)
{CTX_LOADS}
    qk_scale = _attn_qk_scale(f_h{CTX_NOH})  # once per program: the score's slope times log2(e)
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
    # partial tiles before the full run, the full run (no mask arithmetic), partial tiles after it (the diagonal)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, m_kd, m_vd, skt, svt, f_t, s_lo,
                                    tl.minimum(flo, s_hi), TK, qk_scale{CTX}, BN, True, DOT, False)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, m_kd, m_vd, skt, svt, f_t, tl.maximum(flo, s_lo),
                                    tl.minimum(fhi, s_hi), TK, qk_scale{CTX}, BN, False, DOT, EVEN)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, m_kd, m_vd, skt, svt, f_t, tl.maximum(fhi, s_lo),
                                    s_hi, TK, qk_scale{CTX}, BN, True, DOT, False)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(O + o_m[:, None] * sot + o_v[None, :], out.to(O.dtype.element_ty), mask=m_m[:, None] & (o_v[None, :] < DV))
    tl.store(LSE + o_m, lse, mask=m_m)


@triton.jit
def _attn_dkdv_inner(dk, dv{DPAR}, b_k, b_v, q_ptrs, do_ptrs, LSE, DELTA, sqt, sdt, m_n, m_kd, m_vd, f_u, T, OFF,
                     start, end, qk_scale{CTX},
                     BM: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr, BARE: tl.constexpr):
    """dk [BN, BK], dv [BN, BV] (and the parameters' per-key gradients) of one key tile over query tiles
    [start, end). MASKED: partial tiles; BARE: full tiles of unpadded widths, loaded without masks."""
    for i_m in range(start, end):
        o_m = i_m * BM + tl.arange(0, BM)
        if BARE:
            q_t = tl.load(q_ptrs + i_m * BM * sqt)  # [BK, BM] q^T
            b_do = tl.load(do_ptrs + i_m * BM * sdt)  # [BM, BV]
            lse = tl.load(LSE + o_m)
            delta = tl.load(DELTA + o_m)
        else:
            m_m = o_m < T
            q_t = tl.load(q_ptrs + i_m * BM * sqt, mask=m_m[None, :] & m_kd, other=0.0)  # [BK, BM] q^T
            b_do = tl.load(do_ptrs + i_m * BM * sdt, mask=m_m[:, None] & m_vd, other=0.0)  # [BM, BV]
            lse = tl.load(LSE + o_m, mask=m_m, other=float("inf"))
            delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)
        qk = tl.dot(b_k, q_t, input_precision=DOT)  # [BN, BM]: s^T
        f_t = (OFF + o_m).to(tl.float32)[None, :]
        s = _attn_score2(qk, f_t, f_u, qk_scale{CTX})
        p = tl.exp2(s - lse[None, :])
        dp = tl.dot(b_v, tl.trans(b_do), input_precision=DOT)  # [BN, BM]: (do v^T)^T
        ds = p * (dp - delta[None, :])
        dqk = _attn_dqk(ds, qk, f_t, f_u{CTX})
        if MASKED:  # mask element by element (after any inf * 0)
            vis = m_n[:, None] & (o_m < T)[None, :] & _attn_visible(f_t, f_u)
            p = tl.where(vis, p, 0.0)
            dqk = tl.where(vis, dqk, 0.0)
{DPAR_ACC_MASKED}
        else:
{DPAR_ACC}
        dv = tl.dot(p.to(b_do.dtype), b_do, dv, input_precision=DOT)  # dv += p^T do
        dk = tl.dot(dqk.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT)  # dk += ds^T q
    return dk, dv{DPAR}


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
    EVEN: tl.constexpr,  # DK == BK and DV == BV: full tiles load without masks
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # (64-bit batch offsets)
    w = TABLE + i_n * 10  # this program's work row
    q0, T, k0, TK = tl.load(w).to(tl.int64), tl.load(w + 1), tl.load(w + 2).to(tl.int64), tl.load(w + 3)
    OFF, i_t = tl.load(w + 4), tl.load(w + 5)  # first query position, this program's tile in its sequence
    lo, flo, fhi, hi = tl.load(w + 6), tl.load(w + 7), tl.load(w + 8), tl.load(w + 9)
    Q += q0 * sqt + i_b * sqb + i_h * sqh  # the sequence's first query and key, this (batch, head)
    DO += q0 * sdt + i_b * sdb + i_h * sdh
    LSE += q0 + i_b * slb + i_h * slh
    DELTA += q0 + i_b * slb + i_h * slh
    K += k0 * skt + i_b * skb + i_h * skh
    V += k0 * svt + i_b * svb + i_h * svh
    DK_OUT += k0 * skt + i_b * skb + i_h * skh
    DV_OUT += k0 * svt + i_b * svb + i_h * svh
    o_n = i_t * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_n = o_n < TK
    b_k = tl.load(K + o_n[:, None] * skt + o_k[None, :], mask=m_n[:, None] & (o_k[None, :] < DK), other=0.0)  # [BN, BK]
    b_v = tl.load(V + o_n[:, None] * svt + o_v[None, :], mask=m_n[:, None] & (o_v[None, :] < DV), other=0.0)  # [BN, BV]
    q_ptrs = Q + tl.arange(0, BM)[None, :] * sqt + o_k[:, None]  # [BK, BM] q^T
    do_ptrs = DO + tl.arange(0, BM)[:, None] * sdt + o_v[None, :]  # [BM, BV]
    m_kd = o_k[:, None] < DK
    m_vd = o_v[None, :] < DV
    f_u = o_n.to(tl.float32)[:, None]
    f_h = i_h.to(tl.float32)
{CTX_LOADS}
    qk_scale = _attn_qk_scale(f_h{CTX_NOH})  # once per program
    dk = tl.zeros([BN, BK], tl.float32)
    dv = tl.zeros([BN, BV], tl.float32)
{DPAR_INIT}
    dk, dv{DPAR} = _attn_dkdv_inner(dk, dv{DPAR}, b_k, b_v, q_ptrs, do_ptrs, LSE, DELTA, sqt, sdt, m_n, m_kd, m_vd,
                                   f_u, T, OFF, lo, flo, qk_scale{CTX}, BM, True, DOT, False)
    dk, dv{DPAR} = _attn_dkdv_inner(dk, dv{DPAR}, b_k, b_v, q_ptrs, do_ptrs, LSE, DELTA, sqt, sdt, m_n, m_kd, m_vd,
                                   f_u, T, OFF, flo, fhi, qk_scale{CTX}, BM, False, DOT, EVEN)
    dk, dv{DPAR} = _attn_dkdv_inner(dk, dv{DPAR}, b_k, b_v, q_ptrs, do_ptrs, LSE, DELTA, sqt, sdt, m_n, m_kd, m_vd,
                                   f_u, T, OFF, fhi, hi, qk_scale{CTX}, BM, True, DOT, False)
    dk = dk * _attn_dscale(f_h{CTX_NOH})  # ds/dqk when it is one number per head, else 1
    tl.store(DK_OUT + o_n[:, None] * skt + o_k[None, :], dk.to(DK_OUT.dtype.element_ty),
             mask=m_n[:, None] & (o_k[None, :] < DK))
    tl.store(DV_OUT + o_n[:, None] * svt + o_v[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=m_n[:, None] & (o_v[None, :] < DV))
{DPAR_STORE}


@triton.jit
def _attn_dq_inner(dq, b_q, b_do, lse, delta, k_ptrs, v_ptrs, skt, svt, m_m, m_kd, m_vd, f_t, TK, start, end,
                   qk_scale{CTX}, BN: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr, BARE: tl.constexpr):
    """dq [BM, BK] of one query tile over key tiles [start, end) (before the per-head ds/dqk scale)."""
    for i_n in range(start, end):
        o_n = i_n * BN + tl.arange(0, BN)
        if BARE:
            k_t = tl.load(k_ptrs + i_n * BN * skt)  # [BK, BN] k^T
            v_t = tl.load(v_ptrs + i_n * BN * svt)  # [BV, BN] v^T
        else:
            m_n = o_n < TK
            k_t = tl.load(k_ptrs + i_n * BN * skt, mask=m_n[None, :] & m_kd, other=0.0)  # [BK, BN] k^T
            v_t = tl.load(v_ptrs + i_n * BN * svt, mask=m_n[None, :] & m_vd, other=0.0)  # [BV, BN] v^T
        qk = tl.dot(b_q, k_t, input_precision=DOT)  # [BM, BN]
        f_u = o_n.to(tl.float32)[None, :]
        s = _attn_score2(qk, f_t, f_u, qk_scale{CTX})
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(b_do, v_t, input_precision=DOT)
        ds = p * (dp - delta[:, None])
        dqk = _attn_dqk(ds, qk, f_t, f_u{CTX})
        if MASKED:  # mask element by element (after any inf * 0)
            dqk = tl.where(m_m[:, None] & (o_n < TK)[None, :] & _attn_visible(f_t, f_u), dqk, 0.0)
        dq = tl.dot(dqk.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT)  # dq += ds k
    return dq


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
    EVEN: tl.constexpr,  # DK == BK and DV == BV: full tiles load without masks
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # (64-bit batch offsets)
    w = TABLE + i_m * 10  # this program's work row
    q0, T, k0, TK = tl.load(w).to(tl.int64), tl.load(w + 1), tl.load(w + 2).to(tl.int64), tl.load(w + 3)
    OFF, i_t = tl.load(w + 4), tl.load(w + 5)  # first query position, this program's tile in its sequence
    lo, flo, fhi, hi = tl.load(w + 6), tl.load(w + 7), tl.load(w + 8), tl.load(w + 9)
    Q += q0 * sqt + i_b * sqb + i_h * sqh  # the sequence's first query and key, this (batch, head)
    DQ += q0 * sqt + i_b * sqb + i_h * sqh
    DO += q0 * sdt + i_b * sdb + i_h * sdh
    LSE += q0 + i_b * slb + i_h * slh
    DELTA += q0 + i_b * slb + i_h * slh
    K += k0 * skt + i_b * skb + i_h * skh
    V += k0 * svt + i_b * svb + i_h * svh
    o_m = i_t * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    b_q = tl.load(Q + o_m[:, None] * sqt + o_k[None, :], mask=m_m[:, None] & (o_k[None, :] < DK), other=0.0)  # [BM, BK]
    b_do = tl.load(DO + o_m[:, None] * sdt + o_v[None, :], mask=m_m[:, None] & (o_v[None, :] < DV),
                   other=0.0)  # [BM, BV]
    lse = tl.load(LSE + o_m, mask=m_m, other=float("inf"))
    delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)
    k_ptrs = K + tl.arange(0, BN)[None, :] * skt + o_k[:, None]  # [BK, BN] k^T
    v_ptrs = V + tl.arange(0, BN)[None, :] * svt + o_v[:, None]  # [BV, BN] v^T
    m_kd = o_k[:, None] < DK
    m_vd = o_v[:, None] < DV
    f_t = (OFF + o_m).to(tl.float32)[:, None]
    f_h = i_h.to(tl.float32)
{CTX_LOADS}
    qk_scale = _attn_qk_scale(f_h{CTX_NOH})  # once per program
    dq = tl.zeros([BM, BK], tl.float32)
    dq = _attn_dq_inner(dq, b_q, b_do, lse, delta, k_ptrs, v_ptrs, skt, svt, m_m, m_kd, m_vd, f_t, TK, lo, flo,
                        qk_scale{CTX}, BN, True, DOT, False)
    dq = _attn_dq_inner(dq, b_q, b_do, lse, delta, k_ptrs, v_ptrs, skt, svt, m_m, m_kd, m_vd, f_t, TK, flo, fhi,
                        qk_scale{CTX}, BN, False, DOT, EVEN)
    dq = _attn_dq_inner(dq, b_q, b_do, lse, delta, k_ptrs, v_ptrs, skt, svt, m_m, m_kd, m_vd, f_t, TK, fhi, hi,
                        qk_scale{CTX}, BN, True, DOT, False)
    dq = dq * _attn_dscale(f_h{CTX_NOH})  # ds/dqk when it is one number per head, else 1
    tl.store(DQ + o_m[:, None] * sqt + o_k[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_m[:, None] & (o_k[None, :] < DK))


@triton.jit
def _attn_decode_kernel(
    Q,  # [B, H, DK]: one query token per (batch, head), at position POS
    KC, VC,  # key / value caches [B, H, CAP, DK], [B, H, CAP, DV] (unit stride along the width)
    OP, LP,  # partial outputs [NS, B * H, BV] fp32 (normalised) and their base-2 logsumexp [NS, B * H] fp32
    POS,  # [1] int32 on the device: the query's position; the cache holds positions max(0, POS + 1 - CAP)..POS
    PARAMS,  # [H, NP] fp32 per-head scalars the score reads
    sqb, sqh, skb, skh, skt, svb, svh, svt,  # strides of Q, KC, VC
    H, NP,{DIM_ARGS}  # heads, per-head scalars, sizes
    DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NS: tl.constexpr,  # key splits: program i_s takes its share of the cache's tiles
    CAP: tl.constexpr,  # cache slots
    RING: tl.constexpr,  # the cache is a ring buffer (position u in slot u % CAP), else position u in slot u
):
    """s2_u = score(q . k_u, POS, u) log2(e) over the filled slots, visible ones only; this split's
    softmax-weighted sum of v (elementwise products in fp32: one query row is too small for tl.dot)."""
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # (64-bit batch offsets)
    pos = tl.load(POS)
    n = tl.minimum(pos + 1, CAP)  # filled slots
    per = tl.cdiv(tl.cdiv(n, BN), NS)
    lo = i_s * per
    hi = tl.minimum(tl.cdiv(n, BN), lo + per)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    q = tl.load(Q + i_b * sqb + i_h * sqh + o_k, mask=o_k < DK, other=0.0).to(tl.float32)  # [BK]
    KC += i_b * skb + i_h * skh
    VC += i_b * svb + i_h * svh
    f_t = pos.to(tl.float32)
    f_h = i_h.to(tl.float32)
{CTX_LOADS}
    qk_scale = _attn_qk_scale(f_h{CTX_NOH})  # once per program
    l_i = tl.sum(tl.zeros([BN], tl.float32), 0)  # (fp32 scalars carried through the loop)
    m_i = l_i - float("inf")
    acc = tl.zeros([BV], tl.float32)
    for i_n in range(lo, hi):
        o_n = i_n * BN + tl.arange(0, BN)  # slots
        m_n = o_n < n
        b_k = tl.load(KC + o_n[:, None] * skt + o_k[None, :], mask=m_n[:, None] & (o_k[None, :] < DK),
                      other=0.0).to(tl.float32)  # [BN, BK]
        b_v = tl.load(VC + o_n[:, None] * svt + o_v[None, :], mask=m_n[:, None] & (o_v[None, :] < DV),
                      other=0.0).to(tl.float32)  # [BN, BV] (issued with the keys: both loads in flight)
        qk = tl.sum(b_k * q[None, :], 1)  # [BN]
        if RING:  # the position a slot holds: pos - ((pos - slot) mod CAP)
            f_u = (pos - (pos - o_n) % CAP).to(tl.float32)
        else:
            f_u = o_n.to(tl.float32)
        s = _attn_score2(qk, f_t, f_u, qk_scale{CTX})
        s = tl.where(m_n & _attn_visible(f_t, f_u), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use)  # [BN]
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * b_v, 0)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(OP + (i_s * tl.num_programs(0) + i_bh) * BV + o_v, acc / l_safe)
    tl.store(LP + i_s * tl.num_programs(0) + i_bh, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)))
'''
