"""The chunk-parallel form's forward kernels: the chunk-local cumulative sum of a per-key decay and
its spans (:func:`_local_cumsum_kernel`), the state walk (:func:`_state_walk_kernel`, also the
backward's adjoint walk), a per-key decay's in-chunk scores (:func:`_intra_key_kernel`,
:func:`_intra_diag_kernel`) and the output kernel (:func:`_out_kernel`, :func:`_exact_scores`).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import triton
import triton.language as tl

try:
    from .kernels_common import (
        _chunk_cumsum,
        _chunk_of,
        _dot,
        _fdot,
        _first_state,
        _mid_row,
        _row,
        _seq_bounds,
        _span_of,
        _state_rows,
        _state_tile,
        _tile_row,
    )
    from .launcher import _Launch
except ImportError:  # pasted into a generated module, after the modules named here
    pass


@_Launch
@triton.jit
def _local_cumsum_kernel(g, G, span, cu, cinfo, hoff, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_G: tl.constexpr = True,
                         GH: tl.constexpr = -1, DOT: tl.constexpr = 3):
    """G = the inclusive cumulative sum of g within each chunk, in fp32 (one program per key block, chunk
    and head); span[chunk, h, key block] = max |G_t - G_R| over the chunk's rows and the block's keys, R
    its middle row (_mid_row): whether the chunk's in-chunk factors e^(G_t - G_s) may be formed as
    e^(G_t - G_R) e^(G_R - G_s) on tensor cores (_span_of). Without STORE_G only the spans: the kernels
    after it sum g themselves (RAW_G). GH >= 0: g is half precision (_chunk_cumsum's GH), summed by a product
    on tensor cores rather than a scan."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, c, _ = _chunk_of(i_c, cu, cinfo, hoff, T, BT, IS_VARLEN)
    o_c = c * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (o_c < L)[:, None] & (o_k < K)[None, :]
    p = ((bos + o_c)[:, None] * H + i_h) * K + o_k[None, :]
    b_G = tl.load(g + p, mask=m, other=0.0).to(tl.float32)
    if GH >= 0:
        b_G = _chunk_cumsum(b_G, DOT, GH)
    else:
        b_G = tl.cumsum(b_G, axis=0)
    if STORE_G:
        tl.store(G + p, b_G, mask=m)
    b_R = _tile_row(b_G, o_c, _mid_row(c * BT, L, BT))
    # a NaN in the decay counts as an infinite span: the chunk takes the exact path, where a NaN reaches only
    # the rows at and after its token (factored around the middle row, it would reach every row)
    b_d = b_G - b_R[None, :]
    b_d = tl.where(b_d != b_d, float("inf"), tl.abs(b_d))
    tl.store(span + (i_c * H + i_h) * tl.cdiv(K, BK) + i_k, tl.max(tl.max(tl.where(m, b_d, 0.0), axis=1), axis=0))


@_Launch
@triton.jit
def _state_walk_kernel(
    x, g, y,  # [B*T, H, K], log decay, [B*T, H, V]: k, v forward; q, do in reverse
    s0,  # [N, H, K, V] fp32: the initial state forward, the final state's gradient in reverse (USE_S0)
    hs,  # [sum_n (chunks_n + 1), H, K, V]: the (adjoint) state at each chunk's start (end, in reverse)
    sN,  # [N, H, K, V] fp32: the final state forward, the initial state's gradient in reverse (STORE_SN)
    yz, yden,  # NORM, reverse: [B*T, H] fp32, the normaliser's cotangent dden and the denominators (y / den)
    z0, zs, zN,  # NORM: the normaliser z [K] as s0, hs, sN (fp32)
    ks,  # KS, forward: [B*T, H] (any float dtype), a per-token scale of k (the keys are ks_t k_t)
    cu, hoff, T, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, GT: tl.constexpr, REVERSE: tl.constexpr, USE_S0: tl.constexpr, STORE_SN: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT: tl.constexpr, NORM: tl.constexpr, KS: tl.constexpr,
    RAW_G: tl.constexpr = False, GH: tl.constexpr = 0,
):
    """The only sequential part. Forward: S <- e^G_L S + (k e^(G_L - G))^T v per chunk, storing S at
    every chunk start and at the end (RAW_G: g is a per-key log decay, summed here; else its cumulative G).
    Reverse (the adjoint): dS <- e^G_L dS + scale (q e^G)^T do
    from the last chunk, storing dS at every chunk end. NORM: the normaliser z <- e^G_L z + sum k e^(G_L - G)
    (reverse: dz <- e^G_L dz + scale sum (q e^G) dden) walks along, in the programs of value block 0."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(i_n, cu, T, IS_VARLEN)
    L = eos - bos
    hb = _first_state(i_n, hoff, T, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_hv = (o_k[:, None] * V + o_v[None, :])
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_S0:
        b_s += tl.load(s0 + i_nh.to(tl.int64) * K * V + p_hv, mask=m_kv, other=0.0).to(tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    m_z = (o_k < K) & ((o_k * 0 + i_v) == 0)  # (i_v == 0) broadcast: a tensor mask for the interpreter
    if NORM and USE_S0:
        b_z += tl.load(z0 + i_nh.to(tl.int64) * K + o_k, mask=m_z, other=0.0)
    NT = tl.cdiv(L, BT)
    for i in range(0, NT):
        if REVERSE:
            ic = NT - 1 - i
        else:
            ic = i
        c0 = ic * BT
        tl.store(hs + ((hb + ic) * H + i_h) * K * V + p_hv, b_s.to(hs.dtype.element_ty), mask=m_kv)
        if NORM:
            tl.store(zs + ((hb + ic) * H + i_h) * K + o_k, b_z, mask=m_z)
        m_t = (c0 + o_t) < L
        i_t = bos + c0 + o_t
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_x = tl.load(x + (i_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_y = tl.load(y + (i_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :],
                      other=0.0).to(tl.float32)
        if REVERSE and NORM:  # the numerator's cotangent do / den
            b_y = b_y / tl.load(yden + i_t * H + i_h, mask=m_t, other=1.0)[:, None]
        if REVERSE:
            b_x = b_x * scale
        elif KS:
            b_x = b_x * tl.load(ks + i_t * H + i_h, mask=m_t, other=0.0).to(tl.float32)[:, None]
        last = tl.minimum(L - c0, BT) - 1  # the chunk's last row
        if GATE == 1:
            b_G = tl.cumsum(tl.load(g + i_t * GT + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
            b_GL = tl.sum(tl.where(o_t == last, b_G, 0.0), axis=0)
            if REVERSE:
                b_x = b_x * tl.exp(b_G)[:, None]
            else:
                b_x = b_x * tl.exp(b_GL - b_G)[:, None]
            b_s = b_s * tl.exp(b_GL)
            b_z = b_z * tl.exp(b_GL)
        if GATE == 2:
            b_G = tl.load(g + (i_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
            if RAW_G:  # g is the log decay itself: G its in-chunk sum (_chunk_cumsum)
                b_G = _chunk_cumsum(b_G, DOT, GH)
            b_GL = _tile_row(b_G, o_t, last)
            if REVERSE:
                b_x = b_x * tl.exp(b_G)
            else:
                b_x = b_x * tl.exp(b_GL[None, :] - b_G)
            b_s = b_s * tl.exp(b_GL)[:, None]
            b_z = b_z * tl.exp(b_GL)
        b_s += _dot(tl.trans(b_x), b_y, DOT)
        if NORM:
            if REVERSE:
                b_z += tl.sum(b_x * tl.load(yz + i_t * H + i_h, mask=m_t, other=0.0)[:, None], axis=0)
            else:
                b_z += tl.sum(b_x, axis=0)
    if not REVERSE:
        tl.store(hs + ((hb + NT) * H + i_h) * K * V + p_hv, b_s.to(hs.dtype.element_ty), mask=m_kv)
        if NORM:
            tl.store(zs + ((hb + NT) * H + i_h) * K + o_k, b_z, mask=m_z)
    if STORE_SN:
        tl.store(sN + i_nh.to(tl.int64) * K * V + p_hv, b_s, mask=m_kv)
        if NORM:
            tl.store(zN + i_nh.to(tl.int64) * K + o_k, b_z, mask=m_z)


@_Launch
@triton.jit
def _intra_key_kernel(
    q, k, g,  # [B*T, H, K]; g: the chunk-local cumulative log decay G (fp32)
    A,  # [B*T, H, BT] out (_score_dtype): A[t, s] = sum_i q_ti k_si e^(G_ti - G_si) for s <= t in the chunk, else 0
    span,  # [chunks, H, key blocks] fp32 from _local_cumsum_kernel
    cu, cinfo, hoff, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT: tl.constexpr, BOUND: tl.constexpr, RAW_G: tl.constexpr = False,
    GH: tl.constexpr = 0,
):
    """One chunk's in-chunk scores under a per-key decay (RAW_G: g is the log decay, summed here). The
    chunk is cut into row blocks of BS
    tokens; block b against earlier blocks goes through tensor cores around the reference row R_b
    (the row before the block): (q e^(G - R_b)) (k e^(R_b - G))^T, both factors <= 1. Each block
    against itself is left to _intra_diag_kernel (exact). Only for a chunk too sharp to factor (_span_of):
    the output kernel forms the others' scores itself."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    NSB: tl.constexpr = BT // BS
    bos, L, c, _ = _chunk_of(i_c, cu, cinfo, hoff, T, BT, IS_VARLEN)
    c0 = c * BT
    o_i = tl.arange(0, BT)
    o_c = c0 + o_i
    m_c = o_c < L
    blk = o_i // BS  # each row's block
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    p_a = ((bos + o_c)[:, None] * H + i_h) * BT + o_i[None, :]
    if _span_of(span, i_c, i_h, H, K, BK) > BOUND:
        for k0 in range(0, K, BK):  # earlier blocks: tensor cores
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            m = m_c[:, None] & m_k[None, :]
            p = ((bos + o_c)[:, None] * H + i_h) * K + o_k[None, :]
            b_q = tl.load(q + p, mask=m, other=0.0).to(tl.float32)
            b_k = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
            b_G = tl.load(g + p, mask=m, other=0.0).to(tl.float32)
            if RAW_G:
                b_G = _chunk_cumsum(b_G, DOT, GH)
            # every row's reference: G at the row before its block (0 before the chunk)
            b_R = tl.zeros_like(b_G)
            for b in tl.static_range(1, NSB):
                b_R = tl.where((blk == b)[:, None], _tile_row(b_G, o_i, b * BS - 1)[None, :], b_R)
            b_qr = b_q * tl.exp(tl.where(m, b_G - b_R, float("-inf")))
            for b in tl.static_range(1, NSB):  # block b against blocks 0 .. b-1
                b_Rb = _tile_row(b_G, o_i, b * BS - 1)
                b_kb = b_k * tl.exp(tl.where((o_i < b * BS)[:, None] & m, b_Rb[None, :] - b_G, float("-inf")))
                b_a += tl.where((blk == b)[:, None], _dot(b_qr, tl.trans(b_kb), DOT), 0.0)
        tl.store(A + p_a, b_a, mask=m_c[:, None] & (blk[:, None] != blk[None, :]))  # own blocks: _intra_diag_kernel


@_Launch
@triton.jit
def _intra_diag_kernel(
    q, k, g, A, span, cu, cinfo, hoff, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOUND: tl.constexpr, RAW_G: tl.constexpr = False,
):
    """The scores of one BS-row block against itself, exactly: A[t, s] = sum_i q_ti k_si e^(G_ti - G_si)
    for s <= t, one key column s at a time (rows of BS tokens on CUDA cores); not for a factored chunk
    (_intra_key_kernel has written its whole A). RAW_G: g is the log decay; only differences of G within
    the block enter, so the block's own sums stand for G (the rows' running sum for G_s)."""
    i_cs, i_h = tl.program_id(0), tl.program_id(1)
    NSB: tl.constexpr = BT // BS
    bos, L, c, _ = _chunk_of(i_cs // NSB, cu, cinfo, hoff, T, BT, IS_VARLEN)
    c0 = c * BT
    s0 = c0 + (i_cs % NSB) * BS
    if (s0 < L) & (_span_of(span, i_cs // NSB, i_h, H, K, BK) > BOUND):
        o_j = tl.arange(0, BS)
        o_r = s0 + o_j
        m_r = o_r < L
        b_d = tl.zeros([BS, BS], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            p_r = ((bos + o_r)[:, None] * H + i_h) * K + o_k[None, :]
            b_q = tl.load(q + p_r, mask=m_r[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_G = tl.load(g + p_r, mask=m_r[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            if RAW_G:
                b_G = tl.cumsum(b_G, axis=0)
            b_Gj = tl.zeros([BK], dtype=tl.float32)
            for j in range(0, BS):
                b_kj = _row(k, bos, s0 + j, 0, L, i_h, o_k, m_k, H, K)
                if RAW_G:
                    b_Gj += _row(g, bos, s0 + j, 0, L, i_h, o_k, m_k, H, K)
                else:
                    b_Gj = _row(g, bos, s0 + j, 0, L, i_h, o_k, m_k, H, K)
                e = tl.exp(tl.where(((o_j >= j) & m_r)[:, None] & m_k[None, :], b_G - b_Gj[None, :], float("-inf")))
                b_d += tl.where((o_j == j)[None, :], tl.sum(b_q * b_kj[None, :] * e, axis=1)[:, None], 0.0)
        tl.store(A + ((bos + o_r)[:, None] * H + i_h) * BT + (s0 - c0 + o_j)[None, :], b_d, mask=m_r[:, None])


@_Launch
@triton.jit
def _out_kernel(
    q, k, v, g,  # [B*T, H, K], [B*T, H, K], [B*T, H, V], log decay
    hs,  # chunk-start states from _state_walk_kernel
    o,  # [B*T, H, V] output
    A,  # GATE 2: [B*T, H, BT], the in-chunk scores (a sharp chunk's from _intra_key_kernel; STORE_A: out)
    zs, den,  # NORM: the normaliser at chunk starts [NS, H, K]; the denominators [B*T, H] (fp32) out
    skip,  # SKIP: [H] fp32, o += skip[h] v
    ks,  # KS: [B*T, H] (any float dtype), the keys are ks_t k_t (GATE 0 and 1)
    span,  # GATE 2: [chunks, H, key blocks] fp32 from _local_cumsum_kernel
    cu, cinfo, hoff, T, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, GT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr, NORM: tl.constexpr, SKIP: tl.constexpr, KS: tl.constexpr, BOUND: tl.constexpr = 0.0,
    STORE_A: tl.constexpr = False, SBK: tl.constexpr = 64, RAW_G: tl.constexpr = False, GH: tl.constexpr = 0,
    SELF_SPAN: tl.constexpr = False, BS: tl.constexpr = 16,
):
    """One chunk: o = scale ((q e^G) h + A v), A[t, s] = sum_i q_ti k_si e^(G_ti - G_si) (s <= t; computed
    here without a decay or with a scalar one). With a per-key one, a chunk that can be factored
    (_span_of) has its scores formed here around its middle row R, as one tensor-core product of
    q e^(G - G_R) and k e^(G_R - G), and stored for the backward (STORE_A); a sharper chunk's are loaded
    (_intra_key_kernel and _intra_diag_kernel wrote them). Every factor lies within e^(+-BOUND), and a
    kept score (s <= t) is a product of factors whose exponents sum to G_t - G_s <= 0; only a masked one
    (t <= R < s) multiplies two factors > 1, which may overflow to inf in that entry alone, and the
    causal select drops it. (Two products with masked operands, rows up to R against keys up to R and
    later rows against every key, never form those, but computed wrong outputs at 4 warps on the H100
    with Triton 3.6 whenever the key loop ran once: BENCHMARKS.md, sessions 7 and 8.)
    NORM: o is divided by den = scale ((q e^G) z + sum_s A[t, s]), the same readout of the normaliser.
    SELF_SPAN (RAW_G, no backward to follow): the kernel measures the chunk's span itself as it sums the
    decay, and forms a sharp chunk's scores itself (_exact_scores): no span, no G and no A in memory."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, L, c, ih = _chunk_of(i_c, cu, cinfo, hoff, T, BT, IS_VARLEN)
    c0 = c * BT
    o_c = c0 + tl.arange(0, BT)
    m_c = o_c < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    if GATE == 2 and SELF_SPAN:
        b_span = tl.zeros([BT], dtype=tl.float32)  # each row's largest |G - G_R|
    if GATE == 2 and not SELF_SPAN:
        factored = _span_of(span, i_c, i_h, H, K, SBK) <= BOUND  # (span's key blocks are SBK wide)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        p_hs = _state_rows(ih, i_h, o_k, H, K, V)
        p_c = ((bos + o_c)[:, None] * H + i_h) * K + o_k[None, :]
        m_ck = m_c[:, None] & m_k[None, :]
        b_q = tl.load(q + p_c, mask=m_ck, other=0.0).to(tl.float32)
        b_h = _state_tile(hs, p_hs, m_k, o_v, V)
        if GATE == 2:
            b_G = tl.load(g + p_c, mask=m_ck, other=0.0).to(tl.float32)
            if RAW_G:  # g is the log decay itself: G its in-chunk sum, and G - G_R by a second product
                b_d = _chunk_cumsum(b_G, DOT, GH, _mid_row(c0, L, BT) - c0)
                b_G = _chunk_cumsum(b_G, DOT, GH)
            else:
                b_d = b_G - _row(g, bos, _mid_row(c0, L, BT), 0, L, i_h, o_k, m_k, H, K)[None, :]
            if SELF_SPAN:  # each row's largest |G - G_R| (across the keys: within a warp)
                b_span = tl.maximum(b_span, tl.max(tl.where(m_ck, tl.where(b_d != b_d, float("inf"), tl.abs(b_d)),
                                                            0.0), axis=1))  # (NaN: infinite, as in the spans)
            # the factors, clipped at e^BOUND (a chunk beyond it does not use them)
            b_qr = b_q * tl.exp(tl.minimum(b_d, BOUND))
            b_kr = tl.load(k + p_c, mask=m_ck, other=0.0).to(tl.float32) * tl.exp(tl.minimum(-b_d, BOUND))
            if not RAW_G:  # zero where masked (as q and k are already): without these products the kernel
                #            computed wrong outputs at K 16, V 16 on the H100 with Triton 3.6 (0.94 relative
                #            error; BENCHMARKS.md, session 10)
                f = tl.where(m_ck, 1.0, 0.0)
                b_qr = b_qr * f
                b_kr = b_kr * f
            b_a += _fdot(b_qr, tl.trans(b_kr), DOT)
            b_q = b_q * tl.exp(b_G)
        else:
            b_kc = tl.load(k + p_c, mask=m_ck, other=0.0).to(tl.float32)
            b_a += _dot(b_q, tl.trans(b_kc), DOT)
        b_o += _dot(b_q, b_h, DOT)
    if NORM:  # q z in a key loop of its own that Triton does not pipeline: read in the pipelined loop above,
        #      the normaliser gave denominators that differed from run to run on the H100 with Triton 3.6, wrong
        #      by up to 2e-2 at K 160 and 192 (benchmarks/diag_width.py; BENCHMARKS.md, session 11)
        b_qz = tl.zeros([BT, BK], dtype=tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=1):
            o_k = k0 + tl.arange(0, BK)
            m_ck = m_c[:, None] & (o_k < K)[None, :]
            b_q = tl.load(q + ((bos + o_c)[:, None] * H + i_h) * K + o_k[None, :], mask=m_ck, other=0.0)
            b_z = tl.load(zs + (ih * H + i_h) * K + o_k, mask=o_k < K, other=0.0)
            b_qz += b_q.to(tl.float32) * b_z[None, :]
        b_den = tl.sum(b_qz, axis=1)
    m_ts = o_c[:, None] >= o_c[None, :]
    if GATE == 2 and SELF_SPAN:
        if tl.max(b_span, axis=0) > BOUND:
            b_a = _exact_scores(q, k, g, bos, c0, L, i_h, H, K, BT, BS, BK, DOT, GH)
        b_a = tl.where(m_ts, b_a, 0.0)
    elif GATE == 2:
        # a sharp chunk's scores are loaded and a factored one's stored, under masks (no branch)
        p_a = A + ((bos + o_c)[:, None] * H + i_h) * BT + (o_c - c0)[None, :]
        fac = (tl.zeros([BT], dtype=tl.int32) + factored.to(tl.int32)) == 1  # the scalar, per row
        b_a = tl.where(fac[:, None] & m_ts, b_a,
                       tl.load(p_a, mask=m_c[:, None] & m_ts & ~fac[:, None], other=0.0).to(tl.float32))
        if STORE_A:
            tl.store(p_a, b_a.to(A.dtype.element_ty),
                     mask=m_c[:, None] & fac[:, None] & ((o_c * 0 + i_v) == 0)[None, :])
    else:
        if GATE == 1:
            b_Gc = tl.cumsum(tl.load(g + (bos + o_c) * GT + i_h, mask=m_c, other=0.0).to(tl.float32), axis=0)
            b_o = b_o * tl.exp(b_Gc)[:, None]
            if NORM:
                b_den = b_den * tl.exp(b_Gc)
            b_a = b_a * tl.exp(tl.where(m_ts, b_Gc[:, None] - b_Gc[None, :], float("-inf")))
        if KS:  # A[t, s] = q_t . k'_s with k'_s = ks_s k_s: a column scale
            b_a = b_a * tl.load(ks + (bos + o_c) * H + i_h, mask=m_c, other=0.0).to(tl.float32)[None, :]
        b_a = tl.where(m_ts, b_a, 0.0)
    b_vc = tl.load(v + ((bos + o_c)[:, None] * H + i_h) * V + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                   other=0.0).to(tl.float32)
    b_o += _dot(b_a, b_vc, DOT)
    if NORM:
        b_den = tl.where(m_c, (b_den + tl.sum(b_a, axis=1)) * scale, 1.0)
        b_o = b_o * scale / b_den[:, None]  # (scale cancels: the backward differentiates this)
        tl.store(den + (bos + o_c) * H + i_h, b_den, mask=m_c & ((o_c * 0 + i_v) == 0))
    else:
        b_o = b_o * scale
    if SKIP:  # the state-free term, on the value rows already loaded
        b_o += tl.load(skip + i_h) * b_vc
    tl.store(o + ((bos + o_c)[:, None] * H + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_c[:, None] & m_v[None, :])


@triton.jit
def _exact_scores(q, k, g, bos, c0, L, i_h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                  BK: tl.constexpr, DOT: tl.constexpr, GH: tl.constexpr):
    """A sharp chunk's in-chunk scores A[t, s] = sum_i q_ti k_si e^(G_ti - G_si) (s <= t, else 0), from q, k
    and the half-precision decay g itself (rows c0 .. of the sequence at bos), every exponential of a
    difference <= 0: what _intra_key_kernel and _intra_diag_kernel compute, in one program. Per key block:
    block b of BS rows against the earlier blocks is one product around G at the row before it, R_b; each
    block against itself is summed one key column j at a time for all blocks at once, row t's key row
    blk(t) BS + j gathered from k and its G as R_blk(t) plus the decay's rows since (re-read; L1 holds them)."""
    NSB: tl.constexpr = BT // BS
    o_i = tl.arange(0, BT)
    m_c = (c0 + o_i) < L
    blk = o_i // BS
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m = m_c[:, None] & m_k[None, :]
        p = ((bos + c0 + o_i)[:, None] * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p, mask=m, other=0.0).to(tl.float32)
        b_k = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
        b_G = _chunk_cumsum(tl.load(g + p, mask=m, other=0.0).to(tl.float32), DOT, GH)
        b_R = tl.zeros_like(b_G)  # each row's R_blk(t) (0 for block 0: the chunk starts at G = 0)
        for b in tl.static_range(1, NSB):
            b_R = tl.where((blk == b)[:, None], _tile_row(b_G, o_i, b * BS - 1)[None, :], b_R)
        b_qr = b_q * tl.exp(tl.where(m, b_G - b_R, float("-inf")))
        for b in tl.static_range(1, NSB):  # block b against blocks 0 .. b-1: tensor cores
            b_Rb = _tile_row(b_G, o_i, b * BS - 1)
            b_kb = b_k * tl.exp(tl.where((o_i < b * BS)[:, None] & m, b_Rb[None, :] - b_G, float("-inf")))
            b_a += tl.where((blk == b)[:, None], _dot(b_qr, tl.trans(b_kb), DOT), 0.0)
        b_Gs = b_R
        for j in range(0, BS):  # each block against itself, exactly
            o_s = blk * BS + j
            p_s = ((bos + c0 + o_s)[:, None] * H + i_h) * K + o_k[None, :]
            m_s = ((c0 + o_s) < L)[:, None] & m_k[None, :]
            b_Gs += tl.load(g + p_s, mask=m_s, other=0.0).to(tl.float32)
            b_ks = tl.load(k + p_s, mask=m_s, other=0.0).to(tl.float32)
            e = tl.exp(tl.where(m & (o_i >= o_s)[:, None], b_G - b_Gs, float("-inf")))
            b_a += tl.where(o_i[None, :] == o_s[:, None], tl.sum(b_q * b_ks * e, axis=1)[:, None], 0.0)
    return b_a
