"""The chunk-parallel form's backward kernels: the normaliser's cotangent (:func:`_dden_kernel`), dv
(:func:`_dv_kernel`), dq, dk and the log-gate gradient (:func:`_dqk_kernel`; with a per-key decay
:func:`_dqk_key_off_kernel`, :func:`_dqk_key_diag_kernel` and :func:`_dg_key_kernel`).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import triton
import triton.language as tl

try:
    from .kernels_common import _chunk_of, _dot, _fdot, _mid_row, _row, _span_of, _state_rows, _state_tile, _suffix_sum
    from .launcher import _Launch
except ImportError:  # pasted into a generated module, after the modules named here
    pass


@_Launch
@triton.jit
def _dden_kernel(do, o, den, dden, NTOT, H: tl.constexpr, V: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    """The normaliser's cotangent of o = num / den: dden = -(do . o) / den, per token and head."""
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < NTOT
    b_s = tl.zeros([BR], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        p = (o_r[:, None] * H + i_h) * V + o_v[None, :]
        m = m_r[:, None] & (o_v < V)[None, :]
        b_s += tl.sum(tl.load(do + p, mask=m, other=0.0).to(tl.float32) * tl.load(o + p, mask=m, other=0.0).to(
            tl.float32), axis=1)
    b_den = tl.load(den + o_r * H + i_h, mask=m_r, other=1.0)
    tl.store(dden + o_r * H + i_h, -b_s / b_den, mask=m_r)


@_Launch
@triton.jit
def _dv_kernel(
    q, k, v, g, do,  # inputs and the output's cotangent
    A,  # the forward's in-chunk scores (GATE 2)
    dhs,  # gradient of the state at every chunk end (_state_walk_kernel in reverse)
    dv,  # [B*T, H, V]
    skip, dskip,  # SKIP: [H] fp32; [value blocks, chunks, H] fp32 partial sums of do . v
    ks,  # KS: [B*T, H] (any float dtype), the keys are ks_t k_t (GATE 0 and 1)
    den,  # NORM: [B*T, H] fp32, the forward's denominators: the numerator's cotangent is do / den
    cu, cinfo, hoff, T, scale, NCT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, GT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr, SKIP: tl.constexpr, KS: tl.constexpr, NORM: tl.constexpr,
):
    """One chunk: dv_s = (k_s e^(G_L - G_s)) dh + scale sum_{t >= s} A[t, s] do_t (+ skip do_s)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, c, ih = _chunk_of(i_c, cu, cinfo, hoff, T, BT, IS_VARLEN)
    c0 = c * BT
    o_c = c0 + tl.arange(0, BT)
    m_c = o_c < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_ts = o_c[None, :] >= o_c[:, None]  # [s, t]: t >= s
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_at = tl.zeros([BT, BT], dtype=tl.float32)  # A transposed: [s, t]
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        p_hs = _state_rows(ih, i_h, o_k, H, K, V)
        p_c = ((bos + o_c)[:, None] * H + i_h) * K + o_k[None, :]
        m_ck = m_c[:, None] & m_k[None, :]
        b_k = tl.load(k + p_c, mask=m_ck, other=0.0).to(tl.float32)
        b_dh = _state_tile(dhs, p_hs, m_k, o_v, V)
        if GATE == 2:
            b_G = tl.load(g + p_c, mask=m_ck, other=0.0).to(tl.float32)
            b_GL = _row(g, bos, tl.minimum(c0 + BT, L) - 1, 0, L, i_h, o_k, m_k, H, K)
            b_k = b_k * tl.exp(tl.where(m_c[:, None], b_GL[None, :] - b_G, float("-inf")))
        else:
            b_q = tl.load(q + p_c, mask=m_ck, other=0.0).to(tl.float32)
            b_at += _dot(b_k, tl.trans(b_q), DOT)
        b_dv += _dot(b_k, b_dh, DOT)
    if GATE == 2:
        b_at = tl.load(A + ((bos + o_c)[None, :] * H + i_h) * BT + (o_c - c0)[:, None],
                       mask=m_ts & m_c[None, :] & m_c[:, None], other=0.0).to(tl.float32)
    else:
        if GATE == 1:
            b_G = tl.cumsum(tl.load(g + (bos + o_c) * GT + i_h, mask=m_c, other=0.0).to(tl.float32), axis=0)
            b_GL = tl.sum(tl.where(o_c == tl.minimum(c0 + BT, L) - 1, b_G, 0.0), axis=0)
            b_dv = b_dv * tl.exp(b_GL - b_G)[:, None]
            b_at = b_at * tl.exp(tl.where(m_ts, b_G[None, :] - b_G[:, None], float("-inf")))
        if KS:  # both terms are linear in k'_s = ks_s k_s: a row scale
            b_ks = tl.load(ks + (bos + o_c) * H + i_h, mask=m_c, other=0.0).to(tl.float32)
            b_dv = b_dv * b_ks[:, None]
            b_at = b_at * b_ks[:, None]
        b_at = tl.where(m_ts, b_at, 0.0)
    b_doc = tl.load(do + ((bos + o_c)[:, None] * H + i_h) * V + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                    other=0.0).to(tl.float32)
    if NORM:
        b_doc = b_doc / tl.load(den + (bos + o_c) * H + i_h, mask=m_c, other=1.0)[:, None]
    b_dv += _dot(b_at * scale, b_doc, DOT)
    if SKIP:
        b_vc = tl.load(v + ((bos + o_c)[:, None] * H + i_h) * V + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                       other=0.0).to(tl.float32)
        b_dv += tl.load(skip + i_h) * b_doc
        tl.store(dskip + (i_v * NCT + i_c) * H + i_h, tl.sum(tl.sum(b_doc * b_vc, axis=1), axis=0))
    tl.store(dv + ((bos + o_c)[:, None] * H + i_h) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_c[:, None] & m_v[None, :])


@_Launch
@triton.jit
def _dqk_kernel(
    q, k, v, g, do,
    hs, dhs,  # states at chunk starts (and the final one), their gradients at chunk ends
    dq, dk,  # [B*T, H, K]
    dg,  # [NK, B*T, H] fp32: the scalar log-gate gradient, summed over this key block (GATE 1)
    dden, zs, dzs, den,  # NORM: the normaliser's cotangent [B*T, H], z at chunk starts, dz at chunk ends,
    # the denominators [B*T, H] (the numerator's cotangent is do / den)
    ks, dks,  # KS: [B*T, H] (any float dtype), the keys are ks_t k_t; [NK, B*T, H] fp32 out,
    # sum_i k_ti dk'_ti per key block
    cu, cinfo, hoff, T, scale, NTOT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, GT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr, NORM: tl.constexpr,
    KS: tl.constexpr,
):
    """One chunk and key block, no decay or a scalar one: dq, dk and the log-gate gradient
    dg_t = sum_{r >= t in the chunk} (q_r dq_r - k_r dk_r) + sum (h dh)(chunk end). NORM: the normaliser
    acts as one more value column (v = 1, do = dden, state z). KS: everything below is for k' = ks k; at
    the end dk = ks dk' and dks = k . dk'."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, c, ih = _chunk_of(i_c, cu, cinfo, hoff, T, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_hs = _state_rows(ih, i_h, o_k, H, K, V)
    o_c = c * BT + tl.arange(0, BT)
    m_c = o_c < L
    p_c = ((bos + o_c)[:, None] * H + i_h) * K + o_k[None, :]
    m_ck = m_c[:, None] & m_k[None, :]
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_da = tl.zeros([BT, BT], dtype=tl.float32)  # dA[t, s] = do_t . v_s
    b_own = tl.zeros([BT], dtype=tl.float32)  # dA[t, t], in fp32
    b_end = tl.zeros([BK], dtype=tl.float32)  # sum_v (h dh)(chunk end)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        p_v = ((bos + o_c)[:, None] * H + i_h) * V + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_c[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_c[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_h = _state_tile(hs, p_hs, m_k, o_v, V)
        b_dh = _state_tile(dhs, p_hs, m_k, o_v, V)
        b_dq += _dot(b_do, tl.trans(b_h), DOT)
        b_dk += _dot(b_v, tl.trans(b_dh), DOT)
        b_da += _dot(b_do, tl.trans(b_v), DOT)
        b_own += tl.sum(b_do * b_v, axis=1)
        if GATE == 1:
            b_hn = _state_tile(hs, p_hs + H * K * V, m_k, o_v, V)
            b_end += tl.sum(b_hn * b_dh, axis=1)
    if NORM:  # the terms above are linear in the rows of do: the numerator's cotangent do / den, per row
        b_rden = 1.0 / tl.load(den + (bos + o_c) * H + i_h, mask=m_c, other=1.0)
        b_dq = b_dq * b_rden[:, None]
        b_da = b_da * b_rden[:, None]
        b_own = b_own * b_rden
        b_dd = tl.load(dden + (bos + o_c) * H + i_h, mask=m_c, other=0.0)
        p_z = (ih * H + i_h) * K + o_k
        b_dz = tl.load(dzs + p_z, mask=m_k, other=0.0)
        b_dq += b_dd[:, None] * tl.load(zs + p_z, mask=m_k, other=0.0)[None, :]
        b_dk += b_dz[None, :]
        b_da += b_dd[:, None]
        b_own += b_dd
        if GATE == 1:
            b_end += tl.load(zs + p_z + H * K, mask=m_k, other=0.0) * b_dz
    b_q = tl.load(q + p_c, mask=m_ck, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_c, mask=m_ck, other=0.0).to(tl.float32)
    if KS:
        b_ks = tl.load(ks + (bos + o_c) * H + i_h, mask=m_c, other=0.0).to(tl.float32)
        b_k = b_k * b_ks[:, None]
    m_s = o_c[:, None] > o_c[None, :]
    b_da = b_da * scale
    if GATE == 1:
        b_G = tl.cumsum(tl.load(g + (bos + o_c) * GT + i_h, mask=m_c, other=0.0).to(tl.float32), axis=0)
        b_GL = tl.sum(tl.where(o_c == tl.minimum(c * BT + BT, L) - 1, b_G, 0.0), axis=0)
        b_da = b_da * tl.exp(tl.where(m_s, b_G[:, None] - b_G[None, :], float("-inf")))
        b_dq = b_dq * tl.exp(b_G)[:, None]
        b_dk = b_dk * tl.exp(b_GL - b_G)[:, None]
    b_da = tl.where(m_s, b_da, 0.0)
    b_dq = b_dq * scale + _dot(b_da, b_k, DOT)
    b_dk += _dot(tl.trans(b_da), b_q, DOT)
    if GATE == 1:
        b_dG = tl.sum(b_q * b_dq - b_k * b_dk, axis=1)
        b_dg = tl.sum(b_end, axis=0) + _suffix_sum(b_dG)
        tl.store(dg + i_k.to(tl.int64) * NTOT * H + (bos + o_c) * H + i_h, b_dg, mask=m_c)
    # each token's own term (it cancels in dG), in fp32
    b_dq += (b_own * scale)[:, None] * b_k
    b_dk += (b_own * scale)[:, None] * b_q
    if KS:  # dks = k . dk' with the unscaled k (reloaded: dividing k' by ks fails where ks = 0)
        b_kdk = tl.sum(tl.load(k + p_c, mask=m_ck, other=0.0).to(tl.float32) * b_dk, axis=1)
        tl.store(dks + i_k.to(tl.int64) * NTOT * H + (bos + o_c) * H + i_h, b_kdk, mask=m_c)
        b_dk = b_dk * b_ks[:, None]
    tl.store(dq + p_c, b_dq.to(dq.dtype.element_ty), mask=m_ck)
    tl.store(dk + p_c, b_dk.to(dk.dtype.element_ty), mask=m_ck)


@_Launch
@triton.jit
def _dqk_key_off_kernel(
    q, k, v, G, do,
    hs, dhs,  # states at chunk starts (and the final one), their gradients at chunk ends
    dqa, dka,  # [B*T, H, K] fp32 out: dq, dk without each row block's own part
    dq, dk, dG,  # a factored chunk: the final dq, dk and dG (as _dqk_key_diag_kernel writes them)
    span,  # [chunks, H, key blocks] fp32 from _local_cumsum_kernel
    cu, cinfo, hoff, T, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr, BOUND: tl.constexpr,
):
    """Per-key decay, one chunk and key block: the inter-chunk terms and the row blocks against the
    other blocks of the chunk (tensor cores, dA = do v^T formed once per chunk):
    dq_t = scale (e^G_t (do_t h^T) + sum_{s in earlier blocks} dA[t, s] k_s e^(G_t - G_s))
    dk_s = e^(G_L - G_s) (v_s dh^T) + scale sum_{t in later blocks} dA[t, s] q_t e^(G_t - G_s)
    around a reference row at the block's edge (the row before it for dq, its last row for dk).
    A factored chunk (_span_of) takes all its rows at once around its middle row and finishes here."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, c, ih = _chunk_of(i_c, cu, cinfo, hoff, T, BT, IS_VARLEN)
    c0 = c * BT
    o_i = tl.arange(0, BT)
    o_c = c0 + o_i
    m_c = o_c < L
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_c = ((bos + o_c)[:, None] * H + i_h) * K + o_k[None, :]
    m_ck = m_c[:, None] & m_k[None, :]
    p_hs = (ih * H + i_h) * K * V + o_k[:, None] * V
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_da = tl.zeros([BT, BT], dtype=tl.float32)  # dA[t, s] = do_t . v_s
    b_own = tl.zeros([BT], dtype=tl.float32)  # dA[t, t], in fp32
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        m_hv = m_k[:, None] & m_v[None, :]
        p_v = ((bos + o_c)[:, None] * H + i_h) * V + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_c[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_c[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_h = tl.load(hs + p_hs + o_v[None, :], mask=m_hv, other=0.0).to(tl.float32)
        b_dh = tl.load(dhs + p_hs + o_v[None, :], mask=m_hv, other=0.0).to(tl.float32)
        b_dq += _dot(b_do, tl.trans(b_h), DOT)
        b_dk += _dot(b_v, tl.trans(b_dh), DOT)
        b_da += _dot(b_do, tl.trans(b_v), DOT)
        b_own += tl.sum(b_do * b_v, axis=1)
    b_da = b_da * scale
    b_q = tl.load(q + p_c, mask=m_ck, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_c, mask=m_ck, other=0.0).to(tl.float32)
    b_G = tl.load(G + p_c, mask=m_ck, other=0.0).to(tl.float32)
    b_GL = _row(G, bos, tl.minimum(c0 + BT, L) - 1, 0, L, i_h, o_k, m_k, H, K)
    b_dq = b_dq * tl.exp(b_G) * scale
    b_dk = b_dk * tl.exp(tl.where(m_ck, b_GL[None, :] - b_G, float("-inf")))
    if _span_of(span, i_c, i_h, H, K, BK) <= BOUND:  # factored: every row around the middle row R
        b_R = _row(G, bos, _mid_row(c0, L, BT), 0, L, i_h, o_k, m_k, H, K)
        b_eq = tl.exp(tl.where(m_ck, b_G - b_R[None, :], float("-inf")))
        b_ek = tl.exp(tl.where(m_ck, b_R[None, :] - b_G, float("-inf")))
        b_das = tl.where(o_i[:, None] > o_i[None, :], b_da, 0.0)  # strictly earlier keys; own terms below
        b_dq += _fdot(b_das, b_k * b_ek, DOT) * b_eq
        b_dk += _fdot(tl.trans(b_das), b_q * b_eq, DOT) * b_ek
        tl.store(dG + p_c, b_q * b_dq - b_k * b_dk, mask=m_ck)
        b_dq += (b_own * scale)[:, None] * b_k
        b_dk += (b_own * scale)[:, None] * b_q
        tl.store(dq + p_c, b_dq.to(dq.dtype.element_ty), mask=m_ck)
        tl.store(dk + p_c, b_dk.to(dk.dtype.element_ty), mask=m_ck)
    else:
        _dqk_key_off_blocks(b_q, b_k, b_G, b_da, b_dq, b_dk, dqa, dka, p_c, m_ck, G, bos, c0, L, i_h, o_i, o_k,
                            m_k, H, K, BT, BS, DOT)


@triton.jit
def _dqk_key_off_blocks(b_q, b_k, b_G, b_da, b_dq, b_dk, dqa, dka, p_c, m_ck, G, bos, c0, L, i_h, o_i, o_k, m_k,
                        H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, DOT: tl.constexpr):
    """_dqk_key_off_kernel's unfactored chunk: each row block against the other blocks, around edge rows."""
    NSB: tl.constexpr = BT // BS
    blk = o_i // BS
    for b in tl.static_range(1, NSB):  # queries of block b against keys of earlier blocks
        b_R = _row(G, bos, c0 + b * BS - 1, 0, L, i_h, o_k, m_k, H, K)
        b_kb = b_k * tl.exp(tl.where((o_i < b * BS)[:, None] & m_ck, b_R[None, :] - b_G, float("-inf")))
        in_b = (blk == b)[:, None] & m_ck
        b_dq += tl.where(in_b, _dot(b_da, b_kb, DOT), 0.0) * tl.exp(tl.where(in_b, b_G - b_R[None, :],
                                                                              float("-inf")))
    for b in tl.static_range(0, NSB - 1):  # keys of block b against queries of later blocks
        b_E = _row(G, bos, tl.minimum(c0 + (b + 1) * BS, L) - 1, 0, L, i_h, o_k, m_k, H, K)
        b_qb = b_q * tl.exp(tl.where((o_i >= (b + 1) * BS)[:, None] & m_ck, b_G - b_E[None, :], float("-inf")))
        in_b = (blk == b)[:, None] & m_ck
        b_dk += tl.where(in_b, _dot(tl.trans(b_da), b_qb, DOT), 0.0) * tl.exp(tl.where(in_b, b_E[None, :] - b_G,
                                                                                        float("-inf")))
    tl.store(dqa + p_c, b_dq, mask=m_ck)
    tl.store(dka + p_c, b_dk, mask=m_ck)


@_Launch
@triton.jit
def _dqk_key_diag_kernel(
    q, k, v, G, do,
    dqa, dka,  # from _dqk_key_off_kernel
    dq, dk,  # [B*T, H, K] out
    dG,  # [B*T, H, K] fp32 out: q dq - k dk, each token's own term left out
    span,  # [chunks, H, key blocks] fp32 from _local_cumsum_kernel: a factored chunk is done already
    cu, cinfo, hoff, T, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, DOT: tl.constexpr, BOUND: tl.constexpr,
):
    """One BS-row block against itself, exactly (one column at a time, broadcast row loads), added to
    the other blocks' part; then dG and the own terms."""
    i_k, i_cs, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NSB: tl.constexpr = BT // BS
    bos, L, c, ih = _chunk_of(i_cs // NSB, cu, cinfo, hoff, T, BT, IS_VARLEN)
    c0 = c * BT
    s0 = c0 + (i_cs % NSB) * BS
    if (s0 < L) & (_span_of(span, i_cs // NSB, i_h, H, K, BK) > BOUND):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        o_j = tl.arange(0, BS)
        o_r = s0 + o_j
        m_r = o_r < L
        p_r = ((bos + o_r)[:, None] * H + i_h) * K + o_k[None, :]
        m_rk = m_r[:, None] & m_k[None, :]
        b_dad = tl.zeros([BS, BS], dtype=tl.float32)  # dA within the block: [t, s]
        b_own = tl.zeros([BS], dtype=tl.float32)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            p_vr = ((bos + o_r)[:, None] * H + i_h) * V + o_v[None, :]
            m_rv = m_r[:, None] & (o_v < V)[None, :]
            b_dor = tl.load(do + p_vr, mask=m_rv, other=0.0).to(tl.float32)
            b_vr = tl.load(v + p_vr, mask=m_rv, other=0.0).to(tl.float32)
            b_own += tl.sum(b_dor * b_vr, axis=1)
            b_dad += _dot(b_dor, tl.trans(b_vr), DOT)
        b_dad = b_dad * scale
        b_G = tl.load(G + p_r, mask=m_rk, other=0.0).to(tl.float32)
        b_q = tl.load(q + p_r, mask=m_rk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_r, mask=m_rk, other=0.0).to(tl.float32)
        b_dq = tl.load(dqa + p_r, mask=m_rk, other=0.0)
        b_dk = tl.load(dka + p_r, mask=m_rk, other=0.0)
        for j in range(0, BS):
            b_Gj = _row(G, bos, s0 + j, 0, L, i_h, o_k, m_k, H, K)
            b_kj = _row(k, bos, s0 + j, 0, L, i_h, o_k, m_k, H, K)
            b_qj = _row(q, bos, s0 + j, 0, L, i_h, o_k, m_k, H, K)
            b_daj = tl.sum(tl.where((o_j == j)[None, :], b_dad, 0.0), axis=1)  # dA[t, s0 + j]
            b_datj = tl.sum(tl.where((o_j == j)[:, None], b_dad, 0.0), axis=0)  # dA[s0 + j, s]
            b_dq += b_daj[:, None] * b_kj[None, :] * tl.exp(
                tl.where(((o_j > j) & m_r)[:, None] & m_k[None, :], b_G - b_Gj[None, :], float("-inf")))
            b_dk += b_datj[:, None] * b_qj[None, :] * tl.exp(
                tl.where(((o_j < j) & (s0 + j < L))[:, None] & m_k[None, :], b_Gj[None, :] - b_G, float("-inf")))
        tl.store(dG + p_r, b_q * b_dq - b_k * b_dk, mask=m_rk)
        b_dq += (b_own * scale)[:, None] * b_k
        b_dk += (b_own * scale)[:, None] * b_q
        tl.store(dq + p_r, b_dq.to(dq.dtype.element_ty), mask=m_rk)
        tl.store(dk + p_r, b_dk.to(dk.dtype.element_ty), mask=m_rk)


@_Launch
@triton.jit
def _dg_key_kernel(
    dG,  # [B*T, H, K] fp32: q dq - k dk; overwritten with dg
    hs, dhs, cu, cinfo, hoff, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dg_t = sum_{r >= t in the chunk} dG_r + sum_v (h dh)(chunk end)."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, c, ih = _chunk_of(i_c, cu, cinfo, hoff, T, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_hs = _state_rows(ih, i_h, o_k, H, K, V)
    o_c = c * BT + tl.arange(0, BT)
    m = (o_c < L)[:, None] & m_k[None, :]
    b_end = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        b_hn = _state_tile(hs, p_hs + H * K * V, m_k, o_v, V)
        b_dh = _state_tile(dhs, p_hs, m_k, o_v, V)
        b_end += tl.sum(b_hn * b_dh, axis=1)
    p = ((bos + o_c)[:, None] * H + i_h) * K + o_k[None, :]
    b_dG = tl.load(dG + p, mask=m, other=0.0)
    b_dg = b_end[None, :] + _suffix_sum(b_dG)
    tl.store(dG + p, b_dg, mask=m)
