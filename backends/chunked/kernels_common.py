"""The Triton helpers every chunk-parallel kernel calls: products in a chosen precision (:func:`_dot`,
:func:`_fdot`), sequence and chunk bookkeeping, state tiles, the in-chunk cumulative gate
(:func:`_chunk_cumsum`) and a factored chunk's span (:func:`_span_of`).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a @ b with fp32 accumulation; DOT picks the operand precision (see the kernel)."""
    if DOT == 3:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT == 2:  # fp16 inputs: tf32 has fp16's significand and fp32's range (scores and states stay finite)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    elif DOT == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _fdot(a, b, DOT: tl.constexpr):
    """a @ b for a factored chunk's in-chunk products: tf32 operands at least. Its near-diagonal terms
    dominate and the exact path forms them in fp32; bf16 operands (8 significant bits) measured a bf16
    gla's dg at 1.1e-2 relative error on the H100, tf32 keeps 11."""
    if DOT == 3:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


# ---- the chunk-parallel form (decays: none, scalar, per key entry) ------------------------------
#
# As in flash-linear-attention's chunk algorithm:
#   _state_walk_kernel  walks each sequence chunk by chunk and stores the state at every chunk start
#                       (and the final state): the only sequential part, a k^T v product per chunk;
#                       run in reverse it is the adjoint walk, storing dh at every chunk end;
#   _out_kernel         one program per (value block, chunk, head): o = (q e^G) h + A v, in parallel;
#                       with a per-key decay it forms a factored chunk's scores A and keeps them for the
#                       backward (_intra_key_kernel and _intra_diag_kernel: a sharper chunk's);
#   _dv_kernel, _dqk_kernel (_dqk_key_off_kernel, _dqk_key_diag_kernel and _dg_key_kernel for
#                       per-key decays): per-chunk gradients, in parallel, with the log-gate gradient.
# Within a chunk, G is the inclusive cumulative log gate from the chunk's first token (<= 0 and
# decreasing). With a per-key decay, a factored chunk (_span_of) forms e^{G_t - G_s} as
# e^{G_t - G_R} e^{G_R - G_s} around its middle row R, each factor within e^(+-50); otherwise only as
# products of two factors <= 1 around a reference point: the chunk is cut into row blocks of BS
# tokens; a block against other blocks uses a row at the block's edge as reference (tensor cores);
# within a block the scores are exact, one column at a time (CUDA cores).
# GATE: 0 no decay, 1 scalar decay g [B*T, H] (the kernels sum it within each chunk), 2 per-key decay,
# passed as its chunk-local inclusive cumulative sum G [B*T, H, K] (_local_cumsum_kernel).


@triton.jit
def _seq_bounds(i_n, cu, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _first_state(i_n, hoff, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index of sequence i_n's first stored state (each sequence stores chunks + 1 states)."""
    if IS_VARLEN:
        hb = tl.load(hoff + i_n).to(tl.int64)
    else:
        hb = i_n.to(tl.int64) * (tl.cdiv(T, BT) + 1)
    return hb


@triton.jit
def _chunk_of(i_c, cu, cinfo, hoff, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token of the sequence, its length, chunk number in it, index of its stored state)."""
    if IS_VARLEN:
        i_n = tl.load(cinfo + 2 * i_c)
        c = tl.load(cinfo + 2 * i_c + 1)
    else:
        i_n = i_c // tl.cdiv(T, BT)
        c = i_c % tl.cdiv(T, BT)
    bos, eos = _seq_bounds(i_n, cu, T, IS_VARLEN)
    return bos, eos - bos, c, _first_state(i_n, hoff, T, BT, IS_VARLEN) + c


@triton.jit
def _state_rows(i_s, i_h, o_k, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Offsets of the rows o_k of stored state number i_s of head i_h in a [NS, H, K, V] tensor
    (state i_s + 1 starts H * K * V further)."""
    return (i_s * H + i_h) * K * V + o_k[:, None] * V


@triton.jit
def _state_tile(s, p_s, m_k, o_v, V: tl.constexpr):
    """The [keys, values] tile at row offsets p_s (from _state_rows) over the values o_v, in fp32."""
    return tl.load(s + p_s + o_v[None, :], mask=m_k[:, None] & (o_v < V)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _chunk_cumsum(b_g, DOT: tl.constexpr, GH: tl.constexpr, r=-1):
    """The inclusive cumulative sum of b_g [BT, BK] down its rows, in fp32, as a product with the
    lower-triangular matrix of ones on tensor cores: no scan on the walk's serial path (tl.cumsum there ran
    it 0.2 ms slower, BENCHMARKS.md session 7). b_g holds values of a half-precision decay (GH: 0 bf16,
    1 fp16), so every product, a value times 0 or +-1, is exact in that precision and summed in fp32 (exact
    fp32 products with DOT 3). With a row r >= 0: G_t - G_r, by the matrix [s <= t] - [s <= r] (the sum of
    the rows between r and t, signed), with no row of the sum to pick out (a reduction across warps)."""
    BT: tl.constexpr = b_g.shape[0]
    o_t = tl.arange(0, BT)
    b_L = tl.where(o_t[:, None] >= o_t[None, :], 1.0, 0.0) - tl.where(o_t[None, :] <= r, 1.0, 0.0)
    # a NaN of g must reach only the sums that hold it (a scan's rows from its own on), not every row through
    # 0 * NaN: the NaNs are counted by the same product and the sums with a nonzero count made NaN
    b_n = tl.where(b_g != b_g, 1.0, 0.0)
    b_g = tl.where(b_g != b_g, 0.0, b_g)
    if DOT == 3:
        b_G = _dot(b_L, b_g, 3)
        b_N = _dot(b_L, b_n, 3)
    else:  # (GH is _dot's code for the decay's precision)
        b_G = _dot(b_L, b_g, GH)
        b_N = _dot(b_L, b_n, GH)
    return tl.where(b_N != 0.0, float("nan"), b_G)


@triton.jit
def _tile_row(b_x, o_t, r):
    """Row r of the tile b_x (rows o_t), a reduction over its rows."""
    return tl.sum(tl.where((o_t == r)[:, None], b_x, 0.0), axis=0)


@triton.jit
def _suffix_sum(x):
    """sum_{r >= t} x_r along axis 0."""
    return tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x


@triton.jit
def _mid_row(c0, L, BT: tl.constexpr):
    """The reference row of a chunk's factored in-chunk products: its middle row (or last, if shorter)."""
    return tl.minimum(c0 + BT // 2 - 1, L - 1)


@triton.jit
def _span_of(span, i_c, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Chunk i_c's span (_local_cumsum_kernel), the largest over its key blocks. At most BOUND (a
    constexpr, _factor_bound), every e^(G_t - G_R) and e^(G_R - G_s) lies within e^(+-BOUND): then
    e^(G_t - G_s) = e^(G_t - G_R) e^(G_R - G_s) neither overflows nor underflows the dot's operands, and
    the whole chunk goes through tensor cores; sharper gates take the exact 16-row path."""
    NK: tl.constexpr = (K + BK - 1) // BK
    p = span + (i_c * H + i_h) * NK
    s = tl.load(p)
    for i in tl.static_range(1, NK):
        s = tl.maximum(s, tl.load(p + i))
    return s


@triton.jit
def _row(x, bos, r, lo, hi, i_h, o_k, m_k, H: tl.constexpr, K: tl.constexpr):
    """Row r of x [B*T, H, K] over the entries o_k, in fp32 (0 unless lo <= r < hi)."""
    rr = tl.zeros_like(o_k) + r
    return tl.load(x + ((bos + r) * H + i_h) * K + o_k, mask=m_k & (rr >= lo) & (rr < hi), other=0.0).to(tl.float32)
