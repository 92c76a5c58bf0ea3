"""The chunked form: generic Triton kernels for gated linear recurrences, forward and backward.

Every mixer the analysis puts in a chunkable class reduces, after a PyTorch prologue that forms
``q'``, ``k'``, ``v'`` and the log decays from the ``.mix`` expressions, to

    S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) * exp(gs_t) + k_t v_t^T,     o_t = q_t^T S_t

per (sequence, head), with any subset of the decays ``gk`` (per key entry), ``gv`` (per value
entry) and ``gs`` (scalar). Decays enter only as differences of in-chunk cumulative log gates
taken in the direction that is <= 0, so nothing overflows.

Without a per-value decay (identity, scalar and per-key transitions: linear attention, based,
RetNet, Mamba-2, GLA) the call is the chunk-parallel form (:func:`chunk_fwd`, :func:`chunk_bwd`; a
custom operator under torch.compile, so compiled models do not break their graph there):
    forward   _state_walk_kernel the state at every 64-token chunk start (sequential over chunks)
              _out_kernel        per chunk in parallel: o = (q e^G) h + A v (tensor cores), forming
                                 the in-chunk scores A of a per-key decay itself (_intra_key_kernel
                                 for a chunk too sharp to factor)
    backward  _state_walk_kernel the adjoint state at every chunk end (sequential, in reverse)
              _dv_kernel         dv = (k e^(G_L - G)) dh + A^T do
              _dqk_kernel        dq, dk and the log-gate gradient, per chunk (_dqk_key_off_kernel,
                                 _dqk_key_diag_kernel and _dg_key_kernel with a per-key decay)
The log-gate gradient uses dG_t = q_t dq_t - k_t dk_t, summed within the chunk from its end, plus
sum (h dh) at the chunk's end; each token's own term q_t . k_t v_t cancels there and is added to dq,
dk in fp32 only after dG is formed, so no bf16 rounding of it survives. With a per-key decay a chunk
whose cumulative gates stay within e^(+-50) of its middle row (its span, from _local_cumsum_kernel)
is factored: its in-chunk products are whole-chunk tensor-core products around that row. A sharper
chunk is cut into 16-row blocks: blocks against other blocks on tensor cores around a reference row at
their edge, each block against itself exactly (_intra_diag_kernel, _dqk_key_diag_kernel). A bf16 or
fp16 per-key decay of 64+ keys is read as it is (_raw_gate): the walk and the output kernel sum it within
the chunk by one exact tensor-core product (_chunk_cumsum, RAW_G), fp32 G is written only for the
backward, and a forward that no backward follows is the walk and the output kernel alone (SELF_SPAN:
it measures the spans and forms a sharp chunk's scores itself, _exact_scores).
A normaliser (o = q^T S / q^T z, z the same recurrence with v = 1) walks beside the state and
the output kernel divides (NORM); in the backward _dden_kernel forms the denominator's cotangent and
the others divide do by it as they load do. A skip term c_h v_t is added by the output kernel (SKIP),
and a per-token key scale (k'_t = ks_t k_t, mamba2's dt B) is applied as the kernels load k (KS).
:func:`power_features` (based's feature map) has kernels of its own.

With a per-value decay the call is :class:`ChunkRecurrence`: one kernel (:func:`_chunk_fwd_kernel`)
walks each sequence with the state in registers, and the backward is the same kernel three more
times (the adjoint recurrence run in reverse, read three ways).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# MIXC_FAST_LAUNCH=0 sends every launch through Triton's own dispatch (see _Launch)
FAST_LAUNCH = not INTERPRET and os.environ.get("MIXC_FAST_LAUNCH", "1") != "0"


def _arg_key(a):
    """What Triton specialises a runtime argument on: a tensor's dtype and whether its address is a
    multiple of 16; an int's being 1, a multiple of 16, and its width (32 or 64 bits); else its type."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if type(a) is int:
        return a == 1, a % 16 == 0, -0x80000000 <= a < 0x80000000
    return type(a)


class _Launch:
    """A Triton kernel launched through its compiled handle: ``kernel[grid](*args, **constexprs)`` as
    usual. The first launch of each specialisation (the current device, :func:`_arg_key` of every
    positional argument, the keyword arguments) goes through Triton, which compiles the kernel and
    returns its compiled handle; later ones launch that handle directly with every parameter in order,
    skipping Triton's per-call binding and cache key, most of a launch's host time (BENCHMARKS.md,
    session 5). Keyword arguments must be constexprs or launch options (num_warps), positional ones the
    runtime arguments. In the interpreter, with MIXC_FAST_LAUNCH=0, or when a Triton version returns no
    compiled handle, every launch goes through Triton."""

    def __init__(self, fn):
        self.fn = fn
        self.handles = {}  # specialisation -> (compiled kernel, the parameters after the positional ones)

    def __getitem__(self, grid):
        if not FAST_LAUNCH:
            return self.fn[grid]
        return lambda *args, **kwargs: self._run(grid, args, kwargs)

    def _run(self, grid, args, kwargs):
        key = (torch.cuda.current_device(), tuple(map(_arg_key, args)), tuple(kwargs.items()))
        hit = self.handles.get(key)
        if hit is not None:  # the handle reads all three grid sizes
            hit[0][grid if len(grid) == 3 else (*grid, 1, 1)[:3]](*args, *hit[1])
            return
        compiled = self.fn[grid](*args, **kwargs)
        params = getattr(self.fn, "params", None)
        if params is None or not hasattr(compiled, "__getitem__"):  # not a Triton with compiled handles
            return
        params = params[len(args):]
        if all(p.is_constexpr for p in params):
            rest = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)
            self.handles[key] = (compiled, rest)

    @property
    def __name__(self):
        return self.fn.__name__


@_Launch
@triton.jit
def _chunk_fwd_kernel(
    q,  # [B*T, H, K] queries (any float dtype)
    k,  # [B*T, H, K] keys
    v,  # [B*T, H, V] values
    gk,  # [B*T, H, K] log decay per key entry (HAS_GK), any float dtype, used in fp32
    gv,  # [B*T, H, V] log decay per value entry (HAS_GV)
    gs,  # [B*T, H] scalar log decay (HAS_GS)
    h0,  # [N, H, K, V] fp32 initial state (USE_H0)
    o,  # [NK, B*T, H, V] fp32 partial outputs, one slab per key block
    ht,  # [N, H, K, V] fp32 final state (STORE_HT)
    cu,  # [N + 1] int32 sequence boundaries (IS_VARLEN)
    T,  # tokens per sequence when not varlen
    NT,  # total tokens B*T (the stride of one key-block slab of o)
    scale,  # o is multiplied by this number
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,  # chunk length
    BK: tl.constexpr,  # key block (a power of two, >= 16)
    BV: tl.constexpr,  # value block (a power of two, >= 16)
    HAS_GK: tl.constexpr,
    HAS_GV: tl.constexpr,
    HAS_GS: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    REVERSE: tl.constexpr,  # walk each sequence from its last token to its first
    SHIFT_G: tl.constexpr,  # the decay at token t is the gate of token t + 1 (0 past the end)
    DOT: tl.constexpr,  # operand precision of the products: 0 bf16, 1 fp16, 2 tf32, 3 ieee fp32
):
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(i_n, cu, T, IS_VARLEN)
    L = eos - bos
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    o_t = tl.arange(0, BT)
    # token t's own term is kept out of the low-precision products and added in fp32 (below)
    m_causal = o_t[:, None] > o_t[None, :]
    # the state block S[BK, BV], fp32, carried across chunks
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0 = h0 + (i_nh * K + o_k[:, None]) * V + o_v[None, :]
        b_s += tl.load(p_h0, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    for p0 in range(0, L, BT):
        p = p0 + o_t  # logical positions of the chunk's rows
        m_t = p < L
        if REVERSE:
            i_t = eos - 1 - p
        else:
            i_t = bos + p
        i_t = tl.where(m_t, i_t, bos)
        if SHIFT_G:
            i_g = i_t + 1
            m_g = m_t & (i_g < eos)
        else:
            i_g = i_t
            m_g = m_t
        last = tl.minimum(L - p0, BT) - 1  # row of the chunk's last token
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + (i_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + (i_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (i_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        # decays: in-chunk inclusive cumulative log gates (rows past the end add nothing)
        b_qd = b_q
        b_kd = b_k
        b_vd = b_v
        if HAS_GS:
            b_gs = tl.load(gs + i_g * H + i_h, mask=m_g, other=0.0).to(tl.float32)
            b_Gs = tl.cumsum(b_gs, axis=0)
            b_Gs_last = tl.sum(tl.where(o_t == last, b_Gs, 0.0), axis=0)
        if HAS_GK:
            m_gk = m_g[:, None] & m_k[None, :]
            b_gk = tl.load(gk + (i_g[:, None] * H + i_h) * K + o_k[None, :], mask=m_gk, other=0.0).to(tl.float32)
            b_Gk = tl.cumsum(b_gk, axis=0)
            b_Gk_last = _tile_row(b_Gk, o_t, last)
            b_qd = b_q * tl.exp(b_Gk)
            b_kd = b_k * tl.exp(b_Gk_last[None, :] - b_Gk)
        if HAS_GV:
            m_gv = m_g[:, None] & m_v[None, :]
            b_gv = tl.load(gv + (i_g[:, None] * H + i_h) * V + o_v[None, :], mask=m_gv, other=0.0).to(tl.float32)
            b_Gv = tl.cumsum(b_gv, axis=0)
            b_Gv_last = _tile_row(b_Gv, o_t, last)
            b_vd = b_v * tl.exp(b_Gv_last[None, :] - b_Gv)
        # the past: o = (q * exp(Gk)) S (* exp(Gv)) (* exp(Gs))
        b_o = _dot(b_qd, b_s, DOT)
        if HAS_GV:
            b_o = b_o * tl.exp(b_Gv)
        if HAS_GS:
            b_o = b_o * tl.exp(b_Gs)[:, None]
        # within the chunk: A[t, s] = sum_i q[t, i] k[s, i] exp(Gk[t, i] - Gk[s, i]), s <= t, exactly,
        # 16 key entries at a time (a [BT, BT, 16] block stays in registers)
        if HAS_GK:
            b_a = tl.zeros([BT, BT], dtype=tl.float32)
            for ks in tl.static_range(0, BK, 16):
                o_ks = i_k * BK + ks + tl.arange(0, 16)
                m_ks = m_t[:, None] & (o_ks < K)[None, :]
                m_gs = m_g[:, None] & (o_ks < K)[None, :]
                q_s = tl.load(q + (i_t[:, None] * H + i_h) * K + o_ks[None, :], mask=m_ks, other=0.0).to(tl.float32)
                k_s = tl.load(k + (i_t[:, None] * H + i_h) * K + o_ks[None, :], mask=m_ks, other=0.0).to(tl.float32)
                g_s = tl.load(gk + (i_g[:, None] * H + i_h) * K + o_ks[None, :], mask=m_gs, other=0.0).to(tl.float32)
                G_s = tl.cumsum(g_s, axis=0)
                d_s = tl.exp(tl.where(m_causal[:, :, None], G_s[:, None, :] - G_s[None, :, :], -float("inf")))
                b_a += tl.sum(q_s[:, None, :] * k_s[None, :, :] * d_s, axis=2)
        else:
            b_a = _dot(b_q, tl.trans(b_k), DOT)
        if HAS_GS:
            b_a = b_a * tl.exp(tl.where(m_causal, b_Gs[:, None] - b_Gs[None, :], -float("inf")))
        b_a = tl.where(m_causal, b_a, 0.0)
        if HAS_GV:
            b_dv = tl.exp(tl.where(m_causal[:, :, None], b_Gv[:, None, :] - b_Gv[None, :, :], -float("inf")))
            b_o += tl.sum(b_a[:, :, None] * b_v[None, :, :] * b_dv, axis=1)
        else:
            b_o += _dot(b_a, b_v, DOT)
        # token t's own term q_t . k_t v_t (every decay is exp(0) there), exactly in fp32
        b_o += tl.sum(b_q * b_k, axis=1)[:, None] * b_v
        p_o = o + (i_k.to(tl.int64) * NT + i_t[:, None]) * H * V + i_h * V + o_v[None, :]
        tl.store(p_o, b_o * scale, mask=m_tv)
        # carry the state to the end of the chunk
        if HAS_GK:
            b_s = b_s * tl.exp(b_Gk_last)[:, None]
        if HAS_GV:
            b_s = b_s * tl.exp(b_Gv_last)[None, :]
        if HAS_GS:
            b_s = b_s * tl.exp(b_Gs_last)
            b_kd = b_kd * tl.exp(b_Gs_last - b_Gs)[:, None]
        b_s += _dot(tl.trans(b_kd), b_vd, DOT)
    if STORE_HT:
        p_ht = ht + (i_nh * K + o_k[:, None]) * V + o_v[None, :]
        tl.store(p_ht, b_s, mask=m_k[:, None] & m_v[None, :])


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


# ---- launching -------------------------------------------------------------------------------


def _cdiv(a, b):
    """ceil(a / b) for host ints (triton.cdiv is a jit function in newer Triton: microseconds a call)."""
    return -(-a // b)


def _pow2(n):
    return 1 << max(0, int(n - 1).bit_length())


def _flat_gate(g):
    """A log decay as the kernels take it: a scalar decay that is one value per head at every token (a
    [B, T, H] view broadcast from [H] values, as a time-invariant decay such as RetNet's is formed) as it
    is, its address that of those H values, read with token stride 0 (_gate_stride); any other decay as
    :func:`_flat` has it."""
    if g is not None and _per_head(g):
        return g
    return _flat(g)


def _per_head(g):
    """Whether a [B, T, H] decay holds one value per head at every token, the H values in order at its
    address (strides 0 over B and T, 1 over H; a dimension of size 1 may have any stride)."""
    if g.dim() != 3:
        return False
    (B, T, H), (sb, st, sh) = g.shape, g.stride()
    return (sb == 0 or B == 1) and (st == 0 or T == 1) and (sh == 1 or H == 1)


def _gate_stride(gf, H):
    """The token stride of a scalar decay as _flat_gate gave it: 0 for one value per head, else H."""
    return 0 if gf is not None and _per_head(gf) else H


def _flat(x):
    """x's memory as the kernels read it, [B*T, H, ...] in order: contiguous. A contiguous [B, T, H, ...]
    tensor is passed as it is (a kernel takes only its address; no view made per call)."""
    return None if x is None else x.contiguous()


def _dot_mode(dtype):
    """Products in the operands' own precision: exact fp32 for fp32/fp64 (and in the interpreter,
    which has no bf16), tensor cores for bf16, and tf32 tensor cores for fp16: the same 11 significant
    bits, but fp32's range, so in-chunk scores and states of large fp16 inputs (1e3: k v^T summed over a
    chunk is 6e7) do not overflow fp16 (65504) where the reference is finite. (Mode 1, fp16 operands, is
    kept for the decay's exact sums, _chunk_cumsum's GH.)"""
    if INTERPRET or dtype in (torch.float32, torch.float64):
        return 3
    return 2 if dtype == torch.float16 else 0


def chunk_run(q, k, v, gk=None, gv=None, gs=None, h0=None, output_final_state=False, cu_seqlens=None,
              reverse=False, shift_g=False, scale=1.0, dot_dtype=None):
    """o_t = q_t^T S_t with S_t = Dk_t S_{t-1} Dv_t exp(gs_t) + k_t v_t^T (Dk = Diag(exp(gk_t)), ...).

    q, k: [B, T, H, K]; v: [B, T, H, V]; gk: [B, T, H, K], gv: [B, T, H, V], gs: [B, T, H] (log
    decays, <= 0, or None); h0: [N, H, K, V] fp32 or None (N = B, or the number of sequences of
    ``cu_seqlens`` with B = 1). ``reverse`` runs each sequence from its end; ``shift_g`` takes each
    token's decay from the next token; o is multiplied by ``scale``; products take their operands in
    ``dot_dtype`` (default: q's dtype; fp32 means exact fp32 products), but each token's own term
    q_t . k_t v_t is always formed in fp32. Returns
    (o [B, T, H, V] fp32, final state [N, H, K, V] fp32 or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    diag = gk is not None or gv is not None  # per-entry decays: exact 16 x 16 blocks
    BT = 16 if diag else 64
    BK = max(16, min(_pow2(K), 64 if gk is not None else 128))
    BV = max(16, min(_pow2(V), 16 if gv is not None else 64 if gk is not None else 32))
    NK, NV = _cdiv(K, BK), _cdiv(V, BV)
    o = torch.empty(NK, B * T, H, V, dtype=torch.float32, device=q.device)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    dummy = o
    _chunk_fwd_kernel[(NV, NK, N * H)](
        _flat(q), _flat(k), _flat(v),
        _flat(gk) if gk is not None else dummy, _flat(gv) if gv is not None else dummy,
        _flat(gs) if gs is not None else dummy,
        h0.contiguous() if h0 is not None else dummy, o, ht if ht is not None else dummy,
        cu_seqlens.to(torch.int32) if cu_seqlens is not None else dummy,
        T, B * T, float(scale), H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        HAS_GK=gk is not None, HAS_GV=gv is not None, HAS_GS=gs is not None, USE_H0=h0 is not None,
        STORE_HT=output_final_state, IS_VARLEN=cu_seqlens is not None, REVERSE=reverse, SHIFT_G=shift_g,
        DOT=_dot_mode(dot_dtype or q.dtype), num_warps=4,
    )
    o = o.sum(0) if NK > 1 else o[0]
    return o.view(B, T, H, V), ht


def _rev_cumsum(x, cu_seqlens):
    """sum_{r >= t} x_r within each sequence (along dim 1)."""
    if cu_seqlens is None:  # scan along the innermost axis (an outer-axis scan is many times slower)
        y = x.movedim(1, -1).flip(-1).contiguous()
        return y.cumsum(-1).flip(-1).movedim(-1, 1)
    out = torch.empty_like(x)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        out[:, a:b] = x[:, a:b].flip(1).cumsum(1).flip(1)
    return out


def _first_decay(g, cu_seqlens):
    """exp(g) at the first token of each sequence, [N, H, ...] (1 for an empty sequence)."""
    if cu_seqlens is None:
        return torch.exp(g[:, 0])
    cu = cu_seqlens.long()
    first = torch.exp(g[0, cu[:-1].clamp(max=g.shape[1] - 1)])
    empty = (cu[1:] == cu[:-1]).view(-1, *([1] * (first.dim() - 1)))
    return torch.where(empty, torch.ones_like(first), first)


def _add_at_last(dG, term, cu_seqlens):
    """dG[last token of each sequence] += term[sequence] (empty sequences add nothing)."""
    if cu_seqlens is None:
        dG[:, -1] += term
        return dG
    cu = cu_seqlens.long()
    keep = cu[1:] > cu[:-1]
    dG[0].index_add_(0, (cu[1:] - 1)[keep], term[keep])
    return dG


class ChunkRecurrence(torch.autograd.Function):
    """Autograd for :func:`chunk_run` (gradients for q, k, v, every decay and the initial state)."""

    @staticmethod
    def forward(ctx, q, k, v, gk, gv, gs, h0, cu_seqlens, output_final_state, scale):
        o, ht = chunk_run(q, k, v, gk, gv, gs, h0, True, cu_seqlens, scale=scale)
        ctx.save_for_backward(q, k, v, gk, gv, gs, h0, cu_seqlens, o, ht)
        ctx.dot_dtype = q.dtype
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gk, gv, gs, h0, cu, o, ht = ctx.saved_tensors
        dd = ctx.dot_dtype  # products in the forward's precision
        do = do.contiguous()
        c = ctx.scale
        dht = torch.zeros_like(ht) if dht is None else dht.float()
        dtypes = [None if g is None else g.dtype for g in (gk, gv, gs)]
        # the adjoint state dS_t = Dk_{t+1} dS_{t+1} Dv_{t+1} + c q_t do_t^T (+ dht), read three ways;
        # dht enters unscaled, so it is divided by c and every result scaled by c
        dhs = dht / c
        dv, r0 = chunk_run(k, q, do, gk, gv, gs, dhs, True, cu, reverse=True, shift_g=True, scale=c, dot_dtype=dd)
        dk, _ = chunk_run(v, do, q, gv, gk, gs, dhs.transpose(-1, -2), False, cu, reverse=True, shift_g=True,
                          scale=c, dot_dtype=dd)
        h0t = h0.transpose(-1, -2) if h0 is not None else None
        dq, _ = chunk_run(do, v, k, gv, gk, gs, h0t, False, cu, scale=c, dot_dtype=dd)
        r0 = r0 * c
        # log-gate gradients: dG_t = q dq - k dk (key side), o do - v dv (value side), plus the final
        # state's term, summed from each sequence's end (own terms cancel to fp32 precision)
        dgk = dgv = dgs = None
        fin = ht * dht  # [N, H, K, V]
        if gk is not None:
            dgk = _rev_cumsum(_add_at_last(q * dq - k * dk, fin.sum(-1), cu), cu)
        if gv is not None:
            dgv = _rev_cumsum(_add_at_last(o * do - v * dv, fin.sum(-2), cu), cu)
        if gs is not None:
            dgs = _rev_cumsum(_add_at_last((q * dq - k * dk).sum(-1), fin.sum((-1, -2)), cu), cu)
        dh0 = None
        if h0 is not None:  # dh0 = D_0^T dS_0
            dh0 = r0
            if gk is not None:
                dh0 = dh0 * _first_decay(gk.float(), cu)[..., :, None]
            if gv is not None:
                dh0 = dh0 * _first_decay(gv.float(), cu)[..., None, :]
            if gs is not None:
                dh0 = dh0 * _first_decay(gs.float(), cu)[..., None, None]
        dgk, dgv, dgs = (None if d is None else d.to(t) for d, t in zip((dgk, dgv, dgs), dtypes))
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgk, dgv, dgs, dh0, None, None, None)


def _layout(B, T, cu_seqlens, BT, device):
    """Chunk bookkeeping: (number of chunks, stored states, per-chunk (sequence, chunk) pairs and
    each sequence's first stored state, both int32 and None without cu_seqlens)."""
    if cu_seqlens is None:
        NT = _cdiv(T, BT)
        return B * NT, B * (NT + 1), None, None
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    nch = (lens + BT - 1) // BT
    counts = nch.tolist()  # the grid size needs them on the host
    NC = sum(counts)
    hoff = torch.cumsum(nch + 1, 0) - (nch + 1)
    seq = torch.repeat_interleave(torch.arange(len(counts), device=device), nch)
    first = torch.repeat_interleave(torch.cumsum(nch, 0) - nch, nch)
    cinfo = torch.stack([seq, torch.arange(NC, device=device) - first], 1).to(torch.int32).contiguous()
    return NC, NC + len(counts), cinfo, hoff.to(torch.int32)


def _blocks(K, V, gate):
    """(chunk, row block, key block); value blocks are per kernel (LAUNCH)."""
    BT = 64
    BS = 16 if gate == 2 else BT
    BK = max(16, min(_pow2(K), 64))
    return BT, BS, BK


WARPS = 8  # timed on the H100 (LAUNCH); at 4 warps the per-key dq/dk kernel spills, and so does the scores
#            kernel at 3 stages (not at 2: SCORES_LAUNCH); the others do not (benchmarks/ptxas_check.py with
#            the device's Triton 3.6, BENCHMARKS.md sessions 6 and 7)
WARPS_KEY = 4  # the per-key-decay kernels over 16-row blocks (faster than 8 on the H100, BENCHMARKS.md)
# the per-key in-chunk scores: 4 warps and loads buffered 2 deep (86 KB of shared memory, so two programs
# share an SM) ran the forward 0.068 ms faster than 8 warps and Triton's 3 (benchmarks/sweep_stages.py)
SCORES_LAUNCH = dict(num_warps=4, num_stages=2)

# Each kernel's launch: (value block, warps[, pipeline stages]); the value block is clipped to [16, V's next
# power of two]; without stages Triton's default (3 on the H100). One table to read and to tune
# (benchmarks/tune_launch.py and benchmarks/sweep_stages.py time alternatives on the device).
LAUNCH = {  # chosen from benchmarks/tune_launch.py on the H100 (BENCHMARKS.md, session 4)
    "walk": (64, 4),  # the state walk; the grid has one program per key block, value block and head
    # the walk summing a half-precision decay itself (RAW_G; (value block, warps, stages or None, key block)
    # may also set its key block): 128 values ran the inference forward 0.010 ms faster than 64; a key block
    # of 128 (64 programs, 8 warps) 0.15 slower (benchmarks/tune_infer.py, BENCHMARKS.md session 10)
    "walk_raw": (128, 4),
    "walk_rev": (64, 4),  # the adjoint walk
    "out": (128, WARPS),  # one q k^T per value block: one block of 128 values forms it once
    # with a per-key decay the output kernel also forms the in-chunk scores: 4 warps, loads 3 deep and a key
    # block of 32 (OUT_KEY_BK; 235 registers, no spills, 74 KB shared: two programs per SM) ran the gla
    # kernels' forward in 0.495 ms, against 0.61 with the separate scores kernel (2 deep 0.525, 8 warps 0.57,
    # key block 64 0.51; outputs checked on the H100 at K 16-128: BENCHMARKS.md, session 8)
    "out_key": (128, 4, 3),
    # the same without a backward to follow (SELF_SPAN: it measures the spans itself); 4 stages ran 0.002-0.003
    # ms faster than 3 (benchmarks/tune_infer.py, BENCHMARKS.md session 10)
    "out_infer": (128, 4, 4),
    "dv": (128, WARPS),
    "dqk": (64, 4),  # loops over the value blocks; 4 warps spill but ran 0.19 ms faster than 8
    "dqk_key_off": (64, WARPS),
    "dqk_key_diag": (64, WARPS_KEY),
    "dg_key": (64, 4),
}


OUT_KEY_BK = 32  # the output kernel's key block under a per-key decay ("out_key")


def _launch(name, V):
    """(value block, warps) of kernel ``name`` for V values."""
    bv, warps = LAUNCH[name][:2]
    return max(16, min(_pow2(V), bv)), warps


def _stages(name):
    """Launch options beyond the warps: the pipeline depth, where LAUNCH gives one (not None)."""
    return {"num_stages": LAUNCH[name][2]} if len(LAUNCH[name]) > 2 and LAUNCH[name][2] else {}


def _key_block(name, K, BK):
    """The key block of kernel ``name``: LAUNCH's fourth entry where it gives one (clipped to [16, K's next
    power of two]), else BK."""
    return max(16, min(_pow2(K), LAUNCH[name][3])) if len(LAUNCH[name]) > 3 else BK


def _factor_bound(dot):
    """The largest |G_t - G_R| of a factored chunk (_span_of). Its products take tf32 or fp32 operands
    (_fdot), with fp32's exponent range, so e^(+-50) times any sane q or k (or dA) stays finite and
    normal. A product of two factors > 1 (a row before the middle row against a key after it, e^100 at
    most) may overflow, but only in a score that the causal mask drops (_out_kernel)."""
    return 50.0


def _score_dtype(dtype):
    """The stored in-chunk scores' dtype: bf16 for bf16 products (the output and dv kernels cast A to it for
    their tensor-core products anyway), else fp32 (fp16's range is too small for the scores of large inputs)."""
    return dtype if dtype == torch.bfloat16 and _dot_mode(dtype) != 3 else torch.float32  # (fp16: its range)


def _key_cumsum(gf, NC, cu, cinfo, hoff, T, varlen, store_g=True):
    """A per-key log decay gf ([B*T, H, K] memory) as the kernels take it: (its chunk-local cumulative sum
    G in fp32, each chunk's span [NC, H, key blocks]), from _local_cumsum_kernel; without ``store_g`` G is
    not written (None): the kernels after it sum gf themselves (RAW_G)."""
    H, K = gf.shape[-2:]
    BT, _, BK = _blocks(K, K, 2)
    span = torch.empty(NC, H, _cdiv(K, BK), dtype=torch.float32, device=gf.device)
    G = torch.empty(gf.numel() // (H * K), H, K, dtype=torch.float32, device=gf.device) if store_g else span
    _local_cumsum_kernel[(_cdiv(K, BK), NC, H)](gf, G, span, cu, cinfo, hoff, T, H=H, K=K, BT=BT, BK=BK,
                                                IS_VARLEN=varlen, STORE_G=store_g, num_warps=4,
                                                **({"GH": _gate_half(gf), "DOT": _dot_mode(gf.dtype)}
                                                   if gf.dtype in _HALF else {}))
    return (G if store_g else None), span


def _raw_gate(g):
    """Whether the forward's kernels read a per-key decay g itself and sum it within each chunk (RAW_G,
    _chunk_cumsum) rather than its cumulative sum G: for a bf16 or fp16 g of at least RAW_G_MIN_K keys,
    half G's bytes. G is then written only when a backward will read it, and an inference forward runs
    just the walk and the output kernel (SELF_SPAN). gla at B4 T4096 H16 D128, bf16 decay, kernels alone:
    inference forward 0.509 -> 0.356 ms, training forward 0.518 -> 0.435, forward and backward 1.80 -> 1.71
    (BENCHMARKS.md, session 9); with G - G_R by a second product and the launches of session 10, the
    inference forward 0.325 ms. An fp32 g is read as fast as G, and its exact sum would take three bf16
    products (measured 0.52 ms against 0.49)."""
    return g is not None and g.dim() == 4 and g.dtype in _HALF and g.shape[-1] >= RAW_G_MIN_K


_HALF = (torch.bfloat16, torch.float16)  # the decays a product with 0/1 sums exactly (_chunk_cumsum)


# Keys narrower than this read G, not the decay itself: with bf16 or fp16 decays, K 16 and 32 at V 16 gave
# wrong outputs on the H100 with Triton 3.6 (relative error 0.95; K 64 and 128 right at V 16-128:
# BENCHMARKS.md, session 9), and narrow keys move few of the bytes it saves.
RAW_G_MIN_K = 64


def _gate_half(g):
    """_chunk_cumsum's GH for a half-precision decay: 1 for fp16, 0 for bf16."""
    return int(g.dtype == torch.float16)


def key_spans(g, cu_seqlens=None):
    """Each 64-token chunk's span under a per-key log decay g [B, T, H, K]: max |G_t - G_R| over its rows
    and keys (G the in-chunk cumulative gate, R the middle row), [chunks, H, key blocks]. A chunk within
    the bound (_factor_bound) has its in-chunk products formed on tensor cores, a sharper one exactly."""
    B, T, H, K = g.shape
    NC, _, cu, cinfo, hoff = _geometry(B, T, cu_seqlens, _blocks(K, K, 2)[0], g.device, None, g)
    return _key_cumsum(_flat(g), NC, cu, cinfo, hoff, T, cu_seqlens is not None)[1]


def _gate_of(g):
    return 0 if g is None else (1 if g.dim() == 3 else 2)


def chunk_fwd(q, k, v, g=None, h0=None, cu_seqlens=None, scale=1.0, out_dtype=None, z0=None, norm=False,
              skip=None, layout=None, kscale=None, backward=True):
    """Forward of the chunk-parallel form. g: None, [B, T, H] (scalar) or [B, T, H, K] (per key) log
    decay. Returns (o [B, T, H, V] in ``out_dtype`` (default q's), final state [N, H, K, V] fp32, the
    stored chunk states, the decay as the kernels take it, the in-chunk scores for a per-key decay, and
    with ``norm``: the final normaliser [N, H, K], the normaliser at chunk starts, the denominators
    [B*T, H] (all fp32; else None); for a per-key decay each chunk's span [chunks, H, key blocks]).
    ``norm`` divides o by the normaliser's readout, the same
    recurrence with v = 1 (initial value ``z0``). ``skip`` [H]: adds skip[h] v_t to the output.
    ``layout``: :func:`_layout`'s result when the caller has it (with cu_seqlens it costs a host sync).
    ``kscale`` [B, T, H]: the keys are kscale_t k_t (applied as the kernels load k; no decay or a scalar one).
    ``backward=False`` (no :func:`chunk_bwd` will follow): a per-key decay's factored in-chunk scores are
    not written out; the returned scores are then not the backward's."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    gate = _gate_of(g)
    if norm and gate == 2:  # the per-key dq/dk kernels have no normaliser column
        raise ValueError("chunk_fwd(norm=True) takes no decay or a scalar one; chunk_normalised carries the "
                         "normaliser of a per-key decay as a value column")
    if norm and skip is not None:  # the skip would be divided by the denominator, and so would its gradient
        raise ValueError("chunk_fwd takes a normaliser or a skip, not both")
    if kscale is not None and gate == 2:  # the per-key score kernels do not scale k
        raise ValueError("chunk_fwd(kscale=...) takes no decay or a scalar one; chunk_recurrence scales k "
                         "before the kernels for a per-key decay")
    BT, BS, BK = _blocks(K, V, gate)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    NC, NS, cu, cinfo, hoff = _geometry(B, T, cu_seqlens, BT, q.device, layout, ht)
    sdt = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32  # (fp16 states would overflow at 65504)
    hs = torch.empty(NS, H, K, V, dtype=sdt, device=q.device)
    zs = torch.empty(NS, H, K, dtype=torch.float32, device=q.device) if norm else None
    zt = torch.empty(N, H, K, dtype=torch.float32, device=q.device) if norm else None
    den = torch.empty(B * T, H, dtype=torch.float32, device=q.device) if norm else None
    qf, kf, vf, gf = _flat(q), _flat(k), _flat(v), _flat_gate(g)
    dummy = ht
    ksf = _or(_flat(kscale), dummy)
    dot = _dot_mode(q.dtype)
    span = None
    raw = _raw_gate(g)
    gin = gf  # the decay as the forward's kernels read it
    rawk = dict(RAW_G=True, GH=_gate_half(gf)) if raw else {}
    self_span = raw and not backward  # the output kernel measures the spans and forms sharp chunks' scores
    if self_span:  # (raw: a per-key decay)
        gf = None
    elif gate == 2:  # the chunk-local cumulative sum G for the backward (and the kernels, unless raw), the spans
        gf, span = _key_cumsum(gf, NC, cu, cinfo, hoff, T, cu_seqlens is not None, store_g=backward or not raw)
        gin = gin if raw else gf
    common = dict(H=H, K=K, V=V, BT=BT, BK=BK, GATE=gate, GT=_gate_stride(gf, H), IS_VARLEN=cu_seqlens is not None,
                  DOT=dot, NORM=norm, num_warps=WARPS)
    if norm and (h0 is None) != (z0 is None):  # both initial values, or neither
        h0 = h0 if h0 is not None else torch.zeros(N, H, K, V, dtype=torch.float32, device=q.device)
        z0 = z0 if z0 is not None else torch.zeros(N, H, K, dtype=torch.float32, device=q.device)
    walk = "walk_raw" if raw else "walk"
    BVW, warps = _launch(walk, V)
    BKW = _key_block(walk, K, BK)
    _state_walk_kernel[(_cdiv(K, BKW), _cdiv(V, BVW), N * H)](
        kf, _or(gin, dummy), vf, h0.contiguous() if h0 is not None else dummy, hs, ht, dummy, dummy,
        z0.float().contiguous() if z0 is not None else dummy, _or(zs, dummy), _or(zt, dummy), ksf, cu, hoff, T,
        1.0, REVERSE=False, USE_S0=h0 is not None, STORE_SN=True, BV=BVW, KS=kscale is not None,
        **{**common, "BK": BKW, "num_warps": warps, **_stages(walk), **rawk})
    o = torch.empty(B, T, H, V, dtype=out_dtype or q.dtype, device=q.device)
    A = None
    bound = _factor_bound(dot)
    if gate == 2 and not self_span:  # a sharp chunk's in-chunk scores (the output kernel forms the others')
        A = torch.empty(B * T, H, BT, dtype=_score_dtype(q.dtype), device=q.device)
        _intra_key_kernel[(NC, H)](qf, kf, gin, A, span, cu, cinfo, hoff, T, H=H, K=K, BT=BT, BS=BS, BK=BK,
                                   IS_VARLEN=cu_seqlens is not None, DOT=dot, BOUND=bound, **SCORES_LAUNCH, **rawk)
        _intra_diag_kernel[(NC * (BT // BS), H)](qf, kf, gin, A, span, cu, cinfo, hoff, T, H=H, K=K, BT=BT, BS=BS,
                                                 BK=BK, IS_VARLEN=cu_seqlens is not None, BOUND=bound,
                                                 num_warps=WARPS_KEY, **({"RAW_G": True} if raw else {}))
    out = "out_infer" if self_span else "out_key" if gate == 2 else "out"
    BVO, warps = _launch(out, V)
    _out_kernel[(_cdiv(V, BVO), NC, H)](
        qf, kf, vf, _or(gin, dummy), hs, o, _or(A, dummy), _or(zs, dummy), _or(den, dummy),
        skip.float().contiguous() if skip is not None else dummy, ksf, _or(span, dummy), cu, cinfo, hoff, T,
        float(scale), BV=BVO, SKIP=skip is not None, KS=kscale is not None, BOUND=bound,
        STORE_A=backward and gate == 2,  # (only a per-key decay reads it: one compiled kernel for the others)
        **{**common, "num_warps": warps, **_stages(out), **rawk, **({"SELF_SPAN": True} if self_span else {}),
           **({"BK": min(BK, OUT_KEY_BK), "SBK": BK} if gate == 2 else {})})
    return o, ht, hs, gf, A, zt, zs, den, span


def _or(x, dummy):
    return dummy if x is None else x


def _geometry(B, T, cu_seqlens, BT, device, layout, dummy):
    """(chunks, stored states, cu_seqlens as int32, per-chunk info, first stored states) for a launch;
    tensors a call does not use are ``dummy``."""
    NC, NS, cinfo, hoff = layout or _layout(B, T, cu_seqlens, BT, device)
    cu = cu_seqlens.to(torch.int32) if cu_seqlens is not None else None
    return NC, NS, _or(cu, dummy), _or(cinfo, dummy), _or(hoff, dummy)


def chunk_bwd(do, dht, q, k, v, gate, gf, h0, cu_seqlens, hs, A, scale, norm=None, skip=None, layout=None,
              kscale=None, span=None):
    """Backward of :func:`chunk_fwd` from its saved tensors (``gate``: 0, 1 or 2; ``gf``: the decay as
    the kernels take it, flattened). Returns (dq, dk, dv, the log decay's gradient in fp32 or None, the
    initial state's gradient or None, the initial normaliser's gradient or None, the skip's gradient
    [H] fp32 or None, the key scale's gradient [B, T, H] fp32 or None). ``layout`` and ``kscale`` as in
    :func:`chunk_fwd`; ``span``: its span (per-key decays). ``norm``: for a
    normalised forward (decays 0 and 1), (o, den, zs, z0, dzt): its output, denominators, stored
    normalisers, initial normaliser (or None) and the final normaliser's cotangent (or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT, BS, BK = _blocks(K, V, gate)
    NC, NS, cu, cinfo, hoff = _geometry(B, T, cu_seqlens, BT, q.device, layout, hs)
    dzs = dz0 = dden = zs = dzt = den = None
    has_s0 = h0 is not None  # an initial state (S, or with a normaliser S or z): its gradient is wanted
    do = do.contiguous()
    if norm is not None:  # o = num / den: num's cotangent do / den (the kernels divide as they load do)
        o, den, zs, z0, dzt = norm
        dden = torch.empty(B * T, H, dtype=torch.float32, device=q.device)  # den's: -(do . o) / den
        _dden_kernel[(_cdiv(B * T, 64), H)](_flat(do), _flat(o.contiguous()), den, dden, B * T, H=H, V=V, BR=64,
                                            BV=min(_pow2(V), 64), num_warps=4)
        dzs = torch.empty_like(zs)
        has_s0 = h0 is not None or z0 is not None  # the forward started both S and z from them (or zeros)
        if has_s0:
            dz0 = torch.empty(N, H, K, dtype=torch.float32, device=q.device)
        if dht is not None or dzt is not None:
            dht = dht if dht is not None else torch.zeros(N, H, K, V, dtype=torch.float32, device=q.device)
            dzt = dzt.float().contiguous() if dzt is not None else torch.zeros(N, H, K, device=q.device)
    dhs = torch.empty_like(hs)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if has_s0 else None
    dummy = hs
    qf, kf, vf, gf, dof = _flat(q), _flat(k), _flat(v), _or(gf, dummy), _flat(do)
    common = dict(H=H, K=K, V=V, BT=BT, BK=BK, GATE=gate, GT=_gate_stride(gf, H), IS_VARLEN=cu_seqlens is not None,
                  DOT=_dot_mode(q.dtype), num_warps=WARPS)
    nm = norm is not None
    BVW, warps = _launch("walk_rev", V)
    _state_walk_kernel[(_cdiv(K, BK), _cdiv(V, BVW), N * H)](
        qf, gf, dof, dht.contiguous() if dht is not None else dummy, dhs, _or(dh0, dummy),
        _or(dden, dummy), _or(den, dummy), _or(dzt, dummy), _or(dzs, dummy), _or(dz0, dummy),
        dummy, cu, hoff, T, float(scale), REVERSE=True, USE_S0=dht is not None, STORE_SN=has_s0, BV=BVW,
        NORM=nm, KS=False, **{**common, "num_warps": warps})
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    NK = _cdiv(K, BK)
    dg = None
    if gate == 2:
        dg = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    elif gate == 1:  # one key block writes dg itself (no sum, no view)
        dg = torch.empty((NK, B, T, H) if NK > 1 else (B, T, H), dtype=torch.float32, device=q.device)
    BVD, warps = _launch("dv", V)
    dskip = torch.empty(_cdiv(V, BVD), NC, H, dtype=torch.float32, device=q.device) if skip is not None else None
    ks = kscale is not None
    ksf = _flat(kscale) if ks else dummy
    dks = torch.empty((NK, B, T, H) if NK > 1 else (B, T, H), dtype=torch.float32, device=q.device) if ks else None
    _dv_kernel[(_cdiv(V, BVD), NC, H)](
        qf, kf, vf, gf, dof, _or(A, dummy), dhs, dv,
        skip.float().contiguous() if skip is not None else dummy, _or(dskip, dummy), ksf, _or(den, dummy), cu, cinfo,
        hoff, T, float(scale), NC, BV=BVD, SKIP=skip is not None, KS=ks, NORM=nm, **{**common, "num_warps": warps})
    if gate == 2:  # other blocks per chunk (tensor cores), then each block against itself, then dg
        dqa = torch.empty(B * T, H, K, dtype=torch.float32, device=q.device)
        dka = torch.empty_like(dqa)
        key = dict(H=H, K=K, V=V, BT=BT, BS=BS, BK=BK, IS_VARLEN=cu_seqlens is not None, DOT=common["DOT"],
                   BOUND=_factor_bound(common["DOT"]))
        (bv_off, w_off), (bv_diag, w_diag) = _launch("dqk_key_off", V), _launch("dqk_key_diag", V)
        _dqk_key_off_kernel[(NK, NC, H)](qf, kf, vf, gf, dof, hs, dhs, dqa, dka, dq, dk, dg, span, cu, cinfo, hoff,
                                         T, float(scale), BV=bv_off, **key, num_warps=w_off)
        _dqk_key_diag_kernel[(NK, NC * (BT // BS), H)](qf, kf, vf, gf, dof, dqa, dka, dq, dk, dg, span, cu, cinfo,
                                                       hoff, T, float(scale), BV=bv_diag, **key, num_warps=w_diag)
        bv_dg, w_dg = _launch("dg_key", V)
        _dg_key_kernel[(NK, NC, H)](dg, hs, dhs, cu, cinfo, hoff, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=bv_dg,
                                    IS_VARLEN=cu_seqlens is not None, num_warps=w_dg)
    else:
        bv_dqk, w_dqk = _launch("dqk", V)
        if K < 64:  # Triton 3.6 on the H100 computed wrong dq and dk at K 16 and 32 whenever the value loop
            # ran once over a block wider than 16 (V 48 and 64 at 4 warps; with the normaliser V 24 and 48 at 8):
            # 8 warps and at least two value blocks (benchmarks/check_grid.sh, BENCHMARKS.md session 8)
            bv_dqk, w_dqk = max(16, min(bv_dqk, _pow2(V) // 2)), 8
        _dqk_kernel[(NK, NC, H)](
            qf, kf, vf, gf, dof, hs, dhs, dq, dk, _or(dg, dummy),
            _or(dden, dummy), _or(zs, dummy), _or(dzs, dummy), _or(den, dummy), ksf, _or(dks, dummy), cu, cinfo,
            hoff, T, float(scale), B * T, BV=bv_dqk, NORM=nm, KS=ks, **{**common, "num_warps": w_dqk})
    if gate == 1 and NK > 1:
        dg = dg.sum(0)
    if ks and NK > 1:
        dks = dks.sum(0)
    return dq, dk, dv, dg, dh0, dz0, (dskip.sum((0, 1)) if dskip is not None else None), dks


# ---- the chunk-parallel form as a torch operator ----------------------------------------------
# A custom operator (torch.library) is opaque to torch.compile: a compiled model calls it without a
# graph break. Its name carries a hash of the kernels' source, so modules compiled by different
# mixc versions, each pasting this file, never share an operator that is not theirs.


def _ops_tag():
    import hashlib
    import inspect

    kernels = (_state_walk_kernel, _intra_key_kernel, _intra_diag_kernel, _out_kernel, _dv_kernel, _dqk_kernel,
               _dqk_key_off_kernel, _dqk_key_diag_kernel, _dg_key_kernel, _local_cumsum_kernel, _dden_kernel,
               # and the helpers they call:
               _dot, _seq_bounds, _first_state, _chunk_of, _state_rows, _state_tile, _suffix_sum, _row, _mid_row,
               _span_of, _dqk_key_off_blocks, _fdot, _chunk_cumsum, _tile_row, _exact_scores)
    fns = (f.fn if isinstance(f, _Launch) else f for f in kernels)
    src = "".join(inspect.getsource(getattr(f, "fn", f)) for f in fns)  # jit or interpreted function
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _empty(x):
    return x.new_empty(0, dtype=torch.float32)


def _none_if_empty(x):
    return None if x is None or x.numel() == 0 else x


def _define_ops():
    from typing import Optional  # not X | None: older torch.library schemas read only typing.Optional

    tag = _ops_tag()
    fwd_name, bwd_name = f"chunk_fwd_{tag}", f"chunk_bwd_{tag}"
    try:  # already defined by another module pasting the same source
        return getattr(torch.ops.mixc, fwd_name)
    except (AttributeError, RuntimeError):
        pass
    Tensor = torch.Tensor

    @torch.library.custom_op(f"mixc::{fwd_name}", mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], h0: Optional[Tensor],  # noqa: UP045
            cu_seqlens: Optional[Tensor], scale: float, out_dtype: Optional[torch.dtype],  # noqa: UP045
            z0: Optional[Tensor], norm: bool, skip: Optional[Tensor], kscale: Optional[Tensor]  # noqa: UP045
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        o, ht, hs, gf, A, zt, zs, den, span = chunk_fwd(q, k, v, g, h0, cu_seqlens, scale, out_dtype, z0, norm, skip,
                                                        kscale=kscale)
        # outputs may not alias inputs: the flattened scalar decay is not returned (backward re-reads g)
        return (o, ht, hs, gf if _gate_of(g) == 2 else _empty(q), _or(A, _empty(q)), _or(zt, _empty(q)),
                _or(zs, _empty(q)), _or(den, _empty(q)), _or(span, _empty(q)))

    @fwd.register_fake
    def _(q, k, v, g, h0, cu_seqlens, scale, out_dtype, z0, norm, skip, kscale):
        B, T, H, K = q.shape
        V = v.shape[-1]
        gate = _gate_of(g)
        BT = _blocks(K, V, gate)[0]
        if cu_seqlens is None:
            N, NC, NS = B, B * _cdiv(T, BT), B * (_cdiv(T, BT) + 1)
        else:
            ctx = torch.library.get_ctx()  # a size made here must be some output's: NC only with a span
            N, NS = cu_seqlens.shape[0] - 1, ctx.new_dynamic_size()
            NC = ctx.new_dynamic_size() if gate == 2 else 0
        sdt = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
        f32 = torch.float32
        return (q.new_empty(B, T, H, V, dtype=out_dtype or q.dtype), q.new_empty(N, H, K, V, dtype=f32),
                q.new_empty(NS, H, K, V, dtype=sdt),
                q.new_empty(B * T, H, K, dtype=f32) if gate == 2 else _empty(q),
                q.new_empty(B * T, H, BT, dtype=_score_dtype(q.dtype)) if gate == 2 else _empty(q),
                q.new_empty(N, H, K, dtype=f32) if norm else _empty(q),
                q.new_empty(NS, H, K, dtype=f32) if norm else _empty(q),
                q.new_empty(B * T, H, dtype=f32) if norm else _empty(q),
                q.new_empty(NC, H, _cdiv(K, _blocks(K, V, gate)[2]), dtype=f32) if gate == 2 else _empty(q))

    @torch.library.custom_op(f"mixc::{bwd_name}", mutates_args=())
    def bwd(do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor],  # noqa: UP045
            G: Tensor, A: Tensor, h0: Optional[Tensor], cu_seqlens: Optional[Tensor], hs: Tensor,  # noqa: UP045
            scale: float, o: Tensor, den: Tensor, zs: Tensor, z0: Optional[Tensor],  # noqa: UP045
            dzt: Optional[Tensor], skip: Optional[Tensor], kscale: Optional[Tensor], span: Tensor  # noqa: UP045
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        gate = _gate_of(g)
        gf = G if gate == 2 else (_flat_gate(g) if gate == 1 else None)
        norm = (o, den, zs, z0, dzt) if den.numel() else None
        dq, dk, dv, dg, dh0, dz0, dskip, dks = chunk_bwd(do, dht, q, k, v, gate, gf, h0, cu_seqlens, hs,
                                                         A if gate == 2 else None, scale, norm, skip, kscale=kscale,
                                                         span=span if gate == 2 else None)
        return (dq, dk, dv, _or(dg, _empty(q)), _or(dh0, _empty(q)), _or(dz0, _empty(q)),
                _or(dskip, _empty(q)), _or(dks, _empty(q)))

    @bwd.register_fake
    def _(do, dht, q, k, v, g, G, A, h0, cu_seqlens, hs, scale, o, den, zs, z0, dzt, skip, kscale, span):
        B, T, H, K = q.shape
        f32 = torch.float32
        norm = den.numel() > 0
        state0 = h0 is not None or (norm and z0 is not None)
        N = (h0 if h0 is not None else z0).shape[0] if state0 else 0
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                g.new_empty(g.shape, dtype=f32) if g is not None else _empty(q),
                q.new_empty(N, H, K, v.shape[-1], dtype=f32) if state0 else _empty(q),
                q.new_empty(N, H, K, dtype=f32) if state0 and norm else _empty(q),
                skip.new_empty(skip.shape, dtype=f32) if skip is not None else _empty(q),
                q.new_empty(q.shape[:3], dtype=f32) if kscale is not None else _empty(q))

    def setup_context(ctx, inputs, output):
        q, k, v, g, h0, cu_seqlens, scale, out_dtype, z0, norm, skip, kscale = inputs
        o, ht, hs, G, A, zt, zs, den, span = output
        ctx.save_for_backward(q, k, v, g, G, A, h0, cu_seqlens, hs, o, den, zs, z0, skip, kscale, span)
        ctx.scale = scale

    def backward(ctx, do, dht, _dhs, _dG, _dA, dzt, _dzs, _dden, _dspan):
        q, k, v, g, G, A, h0, cu_seqlens, hs, o, den, zs, z0, skip, kscale, span = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        dq, dk, dv, dg, dh0, dz0, dskip, dks = bwd(do, dht, q, k, v, g, G, A, h0, cu_seqlens, hs, ctx.scale, o, den,
                                                   zs, z0, dzt, skip, kscale, span)
        return (dq, dk, dv, dg.to(g.dtype) if g is not None else None, dh0 if h0 is not None else None,
                None, None, None, dz0 if z0 is not None else None, None,
                dskip.to(skip.dtype) if skip is not None else None,
                dks.to(kscale.dtype) if kscale is not None else None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


# torch.library.custom_op exists from torch 2.4; before that, compiled models break their graph here
_CHUNK_FWD_OP = _define_ops() if hasattr(torch.library, "custom_op") else None


class ChunkParallel(torch.autograd.Function):
    """The same forward and backward for eager execution: an autograd.Function costs less host time
    per call than a custom operator's dispatch (about 100 us less per forward+backward, measured with
    benchmarks/host_overhead.py), which matters for short sequences."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, cu_seqlens, scale, out_dtype, z0, norm, skip, kscale):
        # the chunk layout once for both passes (with cu_seqlens: one host sync instead of two)
        ctx.layout = _layout(q.shape[0], q.shape[1], cu_seqlens, _blocks(q.shape[-1], v.shape[-1], _gate_of(g))[0],
                             q.device)
        o, ht, hs, gf, A, zt, zs, den, span = chunk_fwd(q, k, v, g, h0, cu_seqlens, scale, out_dtype, z0, norm,
                                                        skip, ctx.layout, kscale)
        ctx.save_for_backward(q, k, v, gf, h0, cu_seqlens, hs, A, o if norm else None, den, zs, z0, skip, kscale,
                              span)
        ctx.scale, ctx.gate, ctx.g_dtype = scale, _gate_of(g), None if g is None else g.dtype
        ctx.set_materialize_grads(False)  # an unused final state's cotangent stays None: no zeros to fill and read
        return o, ht, zt

    @staticmethod
    def backward(ctx, do, dht, dzt):
        q, k, v, gf, h0, cu_seqlens, hs, A, o, den, zs, z0, skip, kscale, span = ctx.saved_tensors
        if do is None:  # only the final state (or normaliser) reached the loss
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        norm = (o, den, zs, z0, dzt) if den is not None else None
        dq, dk, dv, dg, dh0, dz0, dskip, dks = chunk_bwd(do, dht, q, k, v, ctx.gate, gf, h0, cu_seqlens, hs, A,
                                                         ctx.scale, norm, skip, ctx.layout, kscale, span)
        return (dq, dk, dv, None if dg is None else _as(dg, ctx.g_dtype), dh0 if h0 is not None else None, None,
                None, None, dz0 if z0 is not None else None, None,
                _as(dskip, skip.dtype) if skip is not None else None,
                _as(dks, kscale.dtype) if kscale is not None else None)


def _as(x, dtype):
    """x.to(dtype) without the (dispatched, host-costly) call when x has it already."""
    return x if x.dtype == dtype else x.to(dtype)


def tensor_product(*xs):
    """Flattened outer product over the last axis: [..., K1], [..., K2] -> [..., K1 * K2]."""
    out = xs[0]
    for x in xs[1:]:
        out = (out[..., :, None] * x[..., None, :]).flatten(-2)
    return out


def symmetric_power(x, e):
    """The symmetric e-th tensor power over the last axis: features x_i1 ... x_ie for i1 <= ... <= ie,
    each times sqrt(e! / prod(multiplicities!)), so that symmetric_power(a, e) . symmetric_power(b, e)
    = (a . b)^e with C(K + e - 1, e) features instead of K^e. Each factor x_ir is picked by a product
    with a one-hot [K, features] matrix (exact), so the backward is matrix products too: no scatter,
    deterministic, and no K^e-wide intermediate."""
    first, rest = _on_device(("symmetric", x.shape[-1], e), x, lambda: _symmetric_index(x.shape[-1], e))
    out = x @ first
    for pick in rest:
        out = out * (x @ pick)
    return out


def power_features(x, e, coeffs, pad=1):
    """Features of a polynomial in a dot product: the symmetric e-th power of [x, 1], each feature of
    degree d (d entries of x, e - d ones) times coeffs[d] / sqrt(C(e, d)), so that
    power_features(a, e, c) . power_features(b, e, c') = sum_d c_d c'_d (a . b)^d. based's
    1 + s + s^2 / 2 is one such map of width C(K + 2, 2) (153 at K = 16).

    On a GPU (or under TRITON_INTERPRET) one kernel reads x and writes the features, and one kernel
    forms the gradient (:class:`PowerFeatures`); while torch.compile traces, and on a CPU without the
    interpreter, the same map is two one-hot matrix products and a multiplication per extra factor.
    ``pad``: the width rounded up to a multiple of it with features that are 0 (weight 0), which change no
    dot product. A row of 153 bf16 features starts at an odd address, so every kernel that reads or writes
    them moves 2 bytes at a time; 160 wide, 16 (ptxas_check.py: scalar b16 loads and stores become v4)."""
    coeffs = tuple(float(c) for c in coeffs)
    if (x.is_cuda or INTERPRET) and not torch.compiler.is_compiling():
        return PowerFeatures.apply(x, e, coeffs, pad)
    return _power_features_torch(x, e, coeffs, pad)


def _power_features_torch(x, e, coeffs, pad=1):
    """:func:`power_features` as PyTorch operations."""
    K = x.shape[-1]
    first, rest = _on_device(("power", K, e, coeffs, pad), x, lambda: _power_weights(K, e, coeffs, pad))
    x1 = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    out = x1 @ first
    for pick in rest:
        out = out * (x1 @ pick)
    return out


@_Launch
@triton.jit
def _power_features_kernel(x, idx, w, out, NR, K: tl.constexpr, F: tl.constexpr, E: tl.constexpr,
                           BR: tl.constexpr, BF: tl.constexpr):
    """out[r, f] = w[f] prod_j x1[r, idx[j, f]], x1 = [x, 1] (index K is the 1)."""
    i_r, i_f = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BR + tl.arange(0, BR)
    o_f = i_f * BF + tl.arange(0, BF)
    m_r, m_f = o_r < NR, o_f < F
    b = tl.zeros([BR, BF], dtype=tl.float32) + tl.load(w + o_f, mask=m_f, other=0.0)[None, :]
    for j in tl.static_range(E):
        ix = tl.load(idx + j * F + o_f, mask=m_f, other=K)
        b *= tl.load(x + o_r[:, None].to(tl.int64) * K + ix[None, :], mask=m_r[:, None] & (ix < K)[None, :],
                     other=1.0).to(tl.float32)
    tl.store(out + o_r[:, None].to(tl.int64) * F + o_f[None, :], b.to(out.dtype.element_ty),
             mask=m_r[:, None] & m_f[None, :])


@_Launch
@triton.jit
def _power_features_bwd_kernel(x, idx, w, dout, dx, NR, K: tl.constexpr, F: tl.constexpr, E: tl.constexpr,
                               BR: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr):
    """dx[r, i] = sum_f dout[r, f] w[f] sum_j [idx[j, f] = i] prod_{j' != j} x1[r, idx[j', f]]: each
    factor's share gathered per feature, then summed into the columns of x by a product with a one-hot
    [features, K] tile (exact: fp32 operands)."""
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < NR
    o_k = tl.arange(0, BK)
    b_dx = tl.zeros([BR, BK], dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        b_g = tl.load(dout + o_r[:, None].to(tl.int64) * F + o_f[None, :], mask=m_r[:, None] & m_f[None, :],
                      other=0.0).to(tl.float32) * tl.load(w + o_f, mask=m_f, other=0.0)[None, :]
        for j in tl.static_range(E):
            b_c = b_g
            for j2 in tl.static_range(E):
                if j2 != j:
                    ix2 = tl.load(idx + j2 * F + o_f, mask=m_f, other=K)
                    b_c *= tl.load(x + o_r[:, None].to(tl.int64) * K + ix2[None, :],
                                   mask=m_r[:, None] & (ix2 < K)[None, :], other=1.0).to(tl.float32)
            ix = tl.load(idx + j * F + o_f, mask=m_f, other=K)
            b_dx += tl.dot(b_c, (ix[:, None] == o_k[None, :]).to(tl.float32), input_precision="ieee")
    tl.store(dx + o_r[:, None].to(tl.int64) * K + o_k[None, :], b_dx.to(dx.dtype.element_ty),
             mask=m_r[:, None] & (o_k < K)[None, :])


class PowerFeatures(torch.autograd.Function):
    """:func:`power_features` in two kernels: forward x [..., K] -> [..., F]; backward the gradient of x."""

    @staticmethod
    def forward(ctx, x, e, coeffs, pad=1):
        K = x.shape[-1]
        idx, w = _power_index(K, e, coeffs, x.device, pad)
        F = idx.shape[1]
        xf = x.contiguous()
        out = x.new_empty(*x.shape[:-1], F)
        NR = xf.numel() // K
        _power_features_kernel[(_cdiv(NR, 64), _cdiv(F, 64))](xf, idx, w, out, NR, K=K, F=F, E=e, BR=64, BF=64,
                                                               num_warps=4)
        ctx.save_for_backward(xf)
        ctx.e, ctx.coeffs, ctx.pad = e, coeffs, pad
        return out

    @staticmethod
    def backward(ctx, dout):
        (xf,) = ctx.saved_tensors
        K, e = xf.shape[-1], ctx.e
        idx, w = _power_index(K, e, ctx.coeffs, xf.device, ctx.pad)
        F = idx.shape[1]
        dx = torch.empty_like(xf)
        NR = xf.numel() // K
        _power_features_bwd_kernel[(_cdiv(NR, 64),)](xf, idx, w, dout.contiguous(), dx, NR, K=K, F=F, E=e, BR=64,
                                                     BF=32, BK=max(16, _pow2(K)), num_warps=4)
        return dx, None, None, None


def _power_index(K, e, coeffs, device, pad=1):
    """(idx [e, F] int32: the entry of [x, 1] each factor of each feature takes (K: the 1), weights [F]
    fp32) of :func:`power_features`, made once per device."""
    key = ("index", K, e, coeffs, device, pad)
    if key not in _PICKS:
        picks, w = _power_weights(K, e, coeffs, pad)
        _PICKS[key] = (picks.argmax(1).to(device, torch.int32).contiguous(), w.to(device, torch.float32))
    return _PICKS[key]


_PICKS = {}


def _on_device(key, x, make):
    """(the first pick times the weights, the other picks) of ``make()`` = (picks, weights), in x's dtype
    and on x's device, made once per key, device and dtype."""
    full = (*key, x.device, x.dtype)
    if full not in _PICKS:
        picks, w = make()
        _PICKS[full] = ((picks[0] * w).to(x.device, x.dtype), [p.to(x.device, x.dtype) for p in picks[1:]])
    return _PICKS[full]


def _power_weights(K, e, coeffs, pad=1):
    """(picks of the symmetric power of [x, 1], the feature weights of :func:`power_features`), with
    features of weight 0 (every factor the 1) up to a multiple of ``pad``."""
    import math

    picks, w = _symmetric_index(K + 1, e)
    degree = e - picks[:, K, :].sum(0).long()  # entries of x among each feature's e factors
    scale = torch.tensor([coeffs[d] / math.sqrt(math.comb(e, d)) for d in range(e + 1)], dtype=torch.float64)
    w = w * scale[degree]
    extra = -w.numel() % pad
    if extra:
        ones = torch.zeros(e, K + 1, extra, dtype=picks.dtype)
        ones[:, K, :] = 1.0
        picks, w = torch.cat([picks, ones], -1), torch.cat([w, w.new_zeros(extra)])
    return picks, w


_SYMMETRIC = {}


def _symmetric_index(K, e):
    """(e one-hot [K, features] matrices, the r-th picking each feature's r-th index; weights)."""
    if (K, e) not in _SYMMETRIC:
        import itertools
        import math

        idx = list(itertools.combinations_with_replacement(range(K), e))
        picks = torch.zeros(e, K, len(idx), dtype=torch.float64)
        w = []
        for f, ix in enumerate(idx):
            for r, i in enumerate(ix):
                picks[r, i, f] = 1.0
            counts = [ix.count(i) for i in set(ix)]
            w.append(math.sqrt(math.factorial(e) / math.prod(math.factorial(c) for c in counts)))
        _SYMMETRIC[K, e] = (picks, torch.tensor(w, dtype=torch.float64))
    return _SYMMETRIC[K, e]


# Log decays are floored here before the kernels see them: a decay exactly 0 (log -inf) would make the
# in-chunk differences G_t - G_s of cumulative log decays -inf - (-inf) = NaN, and a very sharp gate (g = -1e4)
# makes the cumulative sums so large that their fp32 differences lose every digit (ulp(3e5) = 0.03). Any path
# through a floored token is weighted by at most e^-60 (9e-27), as good as the exact 0 in fp32 beside the
# token's own term of weight 1, and a floored gate's gradient is 0, as exp(g)'s is at -inf. NaN stays NaN.
LOG_DECAY_MIN = -60.0


def _floor_log_decay(g):
    """max(g, LOG_DECAY_MIN) (None for None); a decay that is one value per head keeps its stride-0 layout."""
    if g is None:
        return None
    if g.dim() == 3 and _per_head(g):
        return g[:1, :1].clamp(min=LOG_DECAY_MIN).expand(g.shape)
    return g.clamp(min=LOG_DECAY_MIN)


def _merge_decays(gk, gs):
    return gk if gs is None else gs if gk is None else gk.float() + gs.float()[..., None]


def _scale_keys(k, kscale):
    """kscale_t k_t formed in PyTorch, for the forms whose kernels take no key scale (per-key and
    per-value decays)."""
    return (k.float() * kscale.float()[..., None]).to(k.dtype)


def _chunk_parallel(q, k, v, g, h0, cu_seqlens, scale, out_dtype, z0=None, norm=False, skip=None, kscale=None):
    """(o, final state, final normaliser or None) through the custom operator while torch.compile
    traces (an opaque operator: no graph break), else through :class:`ChunkParallel`, or straight through
    :func:`chunk_fwd` when no gradient is wanted (inference: no autograd bookkeeping on the host). A key
    scale with a per-key decay is applied here (the per-key kernels do not take one)."""
    if kscale is not None and g is not None and g.dim() == 4:
        k, kscale = _scale_keys(k, kscale), None
    g = _floor_log_decay(g)
    if _CHUNK_FWD_OP is not None and torch.compiler.is_compiling():
        o, ht, _, _, _, zt = _CHUNK_FWD_OP(q, k, v, g, h0, cu_seqlens, float(scale), out_dtype, z0, norm, skip,
                                           kscale)[:6]
        return o, ht, (zt if norm else None)
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                            for x in (q, k, v, g, h0, z0, skip, kscale))):
        o, ht, _, _, _, zt = chunk_fwd(q, k, v, g, h0, cu_seqlens, float(scale), out_dtype, z0, norm, skip,
                                       kscale=kscale, backward=False)[:6]
        return o, ht, zt
    return ChunkParallel.apply(q, k, v, g, h0, cu_seqlens, float(scale), out_dtype, z0, norm, skip, kscale)


def chunk_recurrence(q, k, v, gk=None, gv=None, gs=None, h0=None, cu_seqlens=None, output_final_state=False,
                     scale=1.0, out_dtype=None, skip=None, kscale=None):
    """Differentiable S_t = Dk S_{t-1} Dv e^gs + k_t v_t^T, o_t = scale q_t^T S_t (+ skip[h] v_t, skip [H]):
    returns (o [B, T, H, V] in ``out_dtype`` (default q's dtype), final state [N, H, K, V] fp32 (not scaled)
    or None). ``kscale`` [B, T, H]: the keys are kscale_t k_t (such as mamba2's dt_t B_t); the kernels
    apply it as they load k, so the scaled keys are never written out.

    Without a per-value decay this is the chunk-parallel form (:func:`chunk_fwd` and :func:`chunk_bwd`,
    through :class:`ChunkParallel` in eager mode and a custom operator under torch.compile; a scalar
    and a per-key decay are merged into one per-key decay); with one, the sequential walk
    (:class:`ChunkRecurrence`)."""
    if gv is None:
        o, ht, _ = _chunk_parallel(q, k, v, _merge_decays(gk, gs), h0, cu_seqlens, scale, out_dtype, skip=skip,
                                   kscale=kscale)
    else:
        if kscale is not None:
            k = _scale_keys(k, kscale)
        gk, gv, gs = _floor_log_decay(gk), _floor_log_decay(gv), _floor_log_decay(gs)
        o, ht = ChunkRecurrence.apply(q, k, v, gk, gv, gs, h0, cu_seqlens, output_final_state, float(scale))
        if skip is not None:
            o = o + skip.float()[:, None] * v.float()
        o = o.to(out_dtype or q.dtype)
    return o, (ht if output_final_state else None)


def chunk_normalised(q, k, v, gk=None, gv=None, gs=None, h0=None, z0=None, cu_seqlens=None,
                     output_final_state=False, scale=1.0, out_dtype=None, kscale=None, den_fn=None):
    """The recurrence of :func:`chunk_recurrence` together with its normaliser z_t = Dk z_{t-1} e^gs + k_t
    (the same decays, v = 1), divided: o_t = (q_t^T S_t) / (q_t^T z_t) (``scale`` cancels; it only
    matters for rounding). Returns (o, final S or None, final z [N, H, K] or None).

    With no decay or a scalar one the kernels carry z themselves and divide in the output kernel; with
    a per-key or per-value decay z is one more value column and the division a PyTorch op. ``kscale`` as in
    :func:`chunk_recurrence` (it scales z's input too). ``den_fn``: o_t = (q_t^T S_t) / den_fn(q_t^T z_t), an
    elementwise function of the denominator ([B, T, H, 1] fp32; ``scale`` included), applied in PyTorch with z
    as a value column."""
    g = _merge_decays(gk, gs)
    if gv is None and (g is None or g.dim() == 3) and den_fn is None:
        o, ht, zt = _chunk_parallel(q, k, v, g, h0, cu_seqlens, scale, out_dtype, z0, True, kscale=kscale)
        return o, (ht if output_final_state else None), (zt if output_final_state else None)
    V = v.shape[-1]
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    gv1 = None if gv is None else torch.cat([gv, torch.zeros_like(gv[..., :1])], dim=-1)
    if h0 is not None or z0 is not None:
        ref = h0 if h0 is not None else z0
        N, H, K = ref.shape[:3]
        h0 = torch.zeros(N, H, K, V, device=ref.device) if h0 is None else h0.float()
        z0 = torch.zeros(N, H, K, device=ref.device) if z0 is None else z0.float()
        h0 = torch.cat([h0, z0[..., None]], dim=-1)
    o, ht = chunk_recurrence(q, k, v1, gk, gv1, gs, h0, cu_seqlens, output_final_state, scale, torch.float32,
                             kscale=kscale)
    o = (o[..., :V] / (o[..., V:] if den_fn is None else den_fn(o[..., V:]))).to(out_dtype or q.dtype)
    return o, (ht[..., :V] if output_final_state else None), (ht[..., V] if output_final_state else None)
