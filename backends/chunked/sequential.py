"""The per-value-decay form: one kernel (:func:`_chunk_fwd_kernel`) walks each sequence with the state
in registers (:func:`chunk_run`); :class:`ChunkRecurrence` is its autograd, the backward the same
kernel three more times (the adjoint recurrence run in reverse, read three ways).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import torch
import triton
import triton.language as tl

try:
    from ..hostint import _cdiv, _pow2
    from .kernels_common import _dot, _seq_bounds, _tile_row
    from .launch import _dot_mode, _flat
    from .launcher import _Launch
except ImportError:  # pasted into a generated module, after the modules named here
    pass


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
