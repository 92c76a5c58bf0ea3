"""Recurrent-form kernels for a one-axis (element-wise, key width 1) state: a [BV] vector per (sequence,
head), no dead key row, no dot. Per value channel v, after the emitter's PyTorch prologue::

    a_t[v] = exp(at_t[v] * ap[v])   (EXP_DECAY)   or   at_t[v] * ap[v]      (at, ap: 1 when absent)
    s_t[v] = a_t[v] s_{t-1}[v] + v'_t[v]
    o_t[v] = scale s_t[v]          (a one-axis state's readout has no key to sum: any factor is a gate)

The recurrence is affine in s, so a chunk of BT tokens is one associative scan over the token axis of the
maps s -> a s + b (composition (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)): a program loads a whole
[BT, BV] block of every input at once (many loads in flight, not one token's latency per step), scans it in
registers and carries the state from chunk to chunk. The forward stores the state before each chunk
(checkpoints) for the backward, which walks the chunks in reverse:
    G_t = scale do_t + a_{t+1} G_{t+1}   (G_T = dS_T; a reverse scan of the same maps)
    dv'_t = G_t,  da_t = G_t s_{t-1},  dS_0 = a_0 G_0
with s_{t-1} recomputed from the chunk's checkpoint by a scan of the token-shifted block. With VARLEN the inputs
hold N sequences packed along T in one batch row and program row i_b walks sequence i_b (kernels.py's _rec_seq).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import functools

import torch
import triton
import triton.language as tl

try:
    from ..custom_op import _op_empty, _op_or_none, _op_pair
    from ..hostint import _cdiv, _pow2
    from .kernels import _rec_decay, _rec_seq
    from .launch import _rec_bcast_strides, _rec_kernel, _rec_varlen
except ImportError:  # pasted into a generated module, after kernels.py and launch.py
    pass


@triton.jit
def _rec_ew_combine(a1, b1, a2, b2):
    """The affine map s -> a2 (a1 s + b1) + b2: (a1, b1) first, then (a2, b2)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _rec_ew_decay(AT, ap, p_at, m2, HAS_AT: tl.constexpr, HAS_AP: tl.constexpr, EXP_DECAY: tl.constexpr):
    """(a, at): the decay of a [BT, BV] block (1 where ``m2`` is off) and its token factor as loaded."""
    a, at = _rec_decay(AT, AT, p_at, ap, m2, HAS_AT, HAS_AP, EXP_DECAY)
    return tl.where(m2, a, 1.0), at


@triton.jit
def _rec_ew_fwd(
    V_, AT, AP,  # v' [B, T, H, V], at [B, T, H, 1, V|1], ap [H, 1, V|1] (any float dtype, any strides)
    H0, HT, CK, O,  # initial state [B, H, V] fp32, final state [B, H, V] fp32, checkpoints [B, H, NCK, V], o
    CU, COFF,  # with VARLEN: cumulative sequence lengths [N + 1] and checkpoint offsets [N + 1] (int32)
    T, H, VD, scale, NCK,  # tokens, heads, value width, the output's number factor, checkpoint rows a head
    sv_b, sv_t, sv_h, sv_v,  # strides of v'
    sa_b, sa_t, sa_h, sa_v, sp_h, sp_v,  # strides of at, ap (0 on broadcast axes)
    so_b, so_t, so_h,  # strides of o [B, T, H, V] (last stride 1, any float dtype: converted on store)
    HAS_AT: tl.constexpr, HAS_AP: tl.constexpr, EXP_DECAY: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_CK: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr,  # tokens per chunk (one scan), value channels per program
    VARLEN: tl.constexpr = False,  # program row i_b walks packed sequence i_b (kernels.py's _rec_seq)
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bo, tb, TN, c0 = _rec_seq(CU, COFF, i_b, i_h, T, H, NCK, VARLEN)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_v = o_v < VD
    p_s = (i_b * H + i_h) * VD + o_v  # a [B, H, V] row
    if HAS_H0:
        s = tl.load(H0 + p_s, mask=m_v, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BV], dtype=tl.float32)
    ap = tl.full([BT, BV], 1.0, tl.float32)
    if HAS_AP:
        ap = ap * tl.load(AP + i_h * sp_h + o_v * sp_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    NC = tl.cdiv(TN, BT)
    for c in range(NC):
        m_t = c * BT + o_t < TN
        t = tb + c * BT + o_t  # (rows in the tensors)
        m2 = m_t[:, None] & m_v[None, :]
        if STORE_CK:  # the state before the chunk, for the backward
            tl.store(CK + (c0 + c) * VD + o_v, s, mask=m_v)
        a, _ = _rec_ew_decay(AT, ap, bo * sa_b + t[:, None] * sa_t + i_h * sa_h + o_v[None, :] * sa_v, m2,
                             HAS_AT, HAS_AP, EXP_DECAY)
        b = tl.load(V_ + bo * sv_b + t[:, None] * sv_t + i_h * sv_h + o_v[None, :] * sv_v, mask=m2,
                    other=0.0).to(tl.float32)
        # prefix compositions: s_t = A_t s_(chunk start) + B_t (padding rows: a = 1, b = 0, the state kept)
        A, Bc = tl.associative_scan((a, b), 0, _rec_ew_combine)
        S = A * s[None, :] + Bc
        tl.store(O + bo * so_b + t[:, None] * so_t + i_h * so_h + o_v[None, :], S * scale, mask=m2)
        s = tl.sum(tl.where((o_t == BT - 1)[:, None], S, 0.0), axis=0)  # the last row: the state after the chunk
    if STORE_HT:
        tl.store(HT + p_s, s, mask=m_v)


@triton.jit
def _rec_ew_bwd(
    V_, AT, AP, CK,  # as in _rec_ew_fwd; CK its checkpoints
    DO, DHT,  # do [B, T, H, V] (any float dtype, strides below), dS_T [B, H, V] fp32
    DV, DAT, DAP, DH0,  # dv' [B, T, H, V] (v's dtype); d at, d ap: see below; dS_0 [B, H, V] fp32
    CU, COFF,  # as in _rec_ew_fwd
    T, H, VD, scale, NCK,
    sv_b, sv_t, sv_h, sv_v, sa_b, sa_t, sa_h, sa_v, sp_h, sp_v,
    sd_b, sd_t, sd_h,  # strides of do (last stride 1)
    sda_p, sda_b, sda_t, sda_h, sda_v,  # d at: [NV|1, B, T, H, 1, V|1] (per value tile if at lacks V)
    sdp_p, sdp_b, sdp_h, sdp_v,  # d ap: [B, NV|1, H, 1, V|1] (summed over B and tiles by the caller)
    HAS_AT: tl.constexpr, HAS_AP: tl.constexpr, AT_V: tl.constexpr, AP_V: tl.constexpr,
    EXP_DECAY: tl.constexpr, HAS_DHT: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr = False,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H  # (with VARLEN, i_b is the packed sequence; states and dap have a row each)
    bo, tb, TN, c0 = _rec_seq(CU, COFF, i_b, i_h, T, H, NCK, VARLEN)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_v = o_v < VD
    p_s = (i_b * H + i_h) * VD + o_v
    if HAS_DHT:  # G_T = dS_T
        g = tl.load(DHT + p_s, mask=m_v, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BV], dtype=tl.float32)
    ap = tl.full([BT, BV], 1.0, tl.float32)
    if HAS_AP:
        ap = ap * tl.load(AP + i_h * sp_h + o_v * sp_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    dap = tl.zeros([BT, BV], dtype=tl.float32)
    p_a = bo * sa_b + i_h * sa_h + o_v[None, :] * sa_v
    p_b = bo * sv_b + i_h * sv_h + o_v[None, :] * sv_v
    NC = tl.cdiv(TN, BT)
    for ic in range(NC):
        c = NC - 1 - ic
        j = c * BT + o_t  # (tokens of the sequence)
        t = tb + j  # (rows in the tensors)
        m_t = j < TN
        m2 = m_t[:, None] & m_v[None, :]
        # s_(t-1) over the chunk: a scan of the block shifted back by one token (row 0: the identity map)
        mp = m2 & (o_t > 0)[:, None]
        a_p, _ = _rec_ew_decay(AT, ap, p_a + (t - 1)[:, None] * sa_t, mp, HAS_AT, HAS_AP, EXP_DECAY)
        b_p = tl.load(V_ + p_b + (t - 1)[:, None] * sv_t, mask=mp, other=0.0).to(tl.float32)
        A, Bc = tl.associative_scan((a_p, b_p), 0, _rec_ew_combine)
        s0 = tl.load(CK + (c0 + c) * VD + o_v, mask=m_v, other=0.0)
        S_p = A * s0[None, :] + Bc
        a, at = _rec_ew_decay(AT, ap, p_a + t[:, None] * sa_t, m2, HAS_AT, HAS_AP, EXP_DECAY)
        do = tl.load(DO + bo * sd_b + t[:, None] * sd_t + i_h * sd_h + o_v[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        cq = do * scale  # dL/ds_t through o_t
        # G_t = c_t + a_(t+1) G_(t+1): a reverse scan (a_T = 1 carries G_T = dS_T into the last token)
        mn = m_v[None, :] & (j + 1 < TN)[:, None]
        a_n, _ = _rec_ew_decay(AT, ap, p_a + (t + 1)[:, None] * sa_t, mn, HAS_AT, HAS_AP, EXP_DECAY)
        An, Cn = tl.associative_scan((a_n, cq), 0, _rec_ew_combine, reverse=True)
        G = An * g[None, :] + Cn
        tl.store(DV + ((bo * T + t[:, None]) * H + i_h) * VD + o_v[None, :], G, mask=m2)
        ga = tl.where(m2, G * S_p, 0.0)  # dL/da_t
        if EXP_DECAY:
            ga = ga * a  # dL/d(at * ap)
        if HAS_AT:
            gat = ga
            if HAS_AP:
                gat = ga * ap
            p_d = DAT + i_v * sda_p + bo * sda_b + t * sda_t + i_h * sda_h
            if AT_V:
                tl.store(p_d[:, None] + o_v[None, :] * sda_v, gat, mask=m2)
            else:
                tl.store(p_d, tl.sum(gat, axis=1), mask=m_t)
            dap += ga * at
        else:
            dap += ga
        g = tl.sum(tl.where((o_t == 0)[:, None], G, 0.0), axis=0)  # G at the chunk's first token
    # (the sequence's first token; an empty sequence has none: its dS_0 is dS_T)
    m0 = (o_t == 0) & (o_t < TN)
    a0, _ = _rec_ew_decay(AT, ap, p_a + (tb + o_t[:, None] * 0) * sa_t, m0[:, None] & m_v[None, :], HAS_AT, HAS_AP,
                          EXP_DECAY)
    tl.store(DH0 + p_s, tl.sum(tl.where((o_t == 0)[:, None], a0, 0.0), axis=0) * g, mask=m_v)  # dS_0 = a_0 G_0
    if HAS_AP:
        d = tl.sum(dap, axis=0)
        p_d = DAP + i_b * sdp_b + i_v * sdp_p + i_h * sdp_h
        if AP_V:
            tl.store(p_d + o_v * sdp_v, d, mask=m_v)
        else:
            tl.store(p_d, tl.sum(d, axis=0))


@functools.lru_cache(maxsize=256)
def _rec_ew_tiles(T):
    """(BT, BV, num_warps): 16 value channels a program (rows of 32 or 64 bytes: many programs, each
    walking its channels' tokens) and chunks of 64 tokens (fewer for a short sequence), 4 entries a thread.
    What is in flight per SM grows with BT; registers with BT * BV / threads (sm_90, Triton 3.6: 88 in the
    forward, 146 in the backward at 64 x 16 and 8 warps; 128 x 16 spills in the backward)."""
    BT = max(16, min(64, _pow2(T)))
    return BT, 16, max(1, BT * 16 // 128)


def _rec_ew_operands(v, at, ap):
    """The kernels' pointer stand-ins (v for an absent tensor) and the strides of v', at, ap."""
    sa = _rec_bcast_strides(at, 5)
    sp = _rec_bcast_strides(ap, 3)
    st = list(v.stride()) + sa[:3] + sa[4:] + [sp[0], sp[2]]
    return [x if x is not None else v for x in (v, at, ap)], st


def _rec_ew_forward(v, at, ap, h0, ht, o, scale, exp_decay, store_ck, cu=None):
    """Launch the forward scan; returns the checkpoints [B, H, NCK, V] fp32 (or None). With ``cu`` (cumulative
    lengths of the packed sequences of v's one batch row) one program row a sequence: h0 and ht [N, H, 1, V], the
    checkpoints [1, H, NCK, V]."""
    B, T, H, V = v.shape
    BT, BV, warps = _rec_ew_tiles(T)
    cu, coff, nck = _rec_varlen(cu, T, v.device, BT)
    NS = B if cu is None else cu.shape[0] - 1
    ck = torch.empty(B if cu is None else 1, H, nck, V, dtype=torch.float32, device=v.device) if store_ck else o
    ptrs, st = _rec_ew_operands(v, at, ap)
    _rec_kernel(_rec_ew_fwd)[(_cdiv(V, BV), NS * H)](
        *ptrs, h0 if h0 is not None else o, ht if ht is not None else o, ck, o, cu if cu is not None else o,
        coff if cu is not None else o, T, H, V, float(scale), nck, *st, o.stride(0), o.stride(1), o.stride(2),
        HAS_AT=at is not None, HAS_AP=ap is not None, EXP_DECAY=bool(exp_decay), HAS_H0=h0 is not None,
        STORE_HT=ht is not None, STORE_CK=store_ck, BT=BT, BV=BV, VARLEN=cu is not None, num_warps=warps)
    return ck if store_ck else None


def _rec_ew_scan_forward(v, at, ap, h0, cu, scale, exp_decay, o_dtype, save):
    """(o, s_T, checkpoints or None) of the forward scan; ``cu``: cumulative packed lengths or None."""
    B, T, H, V = v.shape
    NS = B if cu is None else cu.shape[0] - 1
    o = torch.empty(B, T, H, V, dtype=o_dtype, device=v.device)
    ht = torch.empty(NS, H, 1, V, dtype=torch.float32, device=v.device)
    return o, ht, _rec_ew_forward(v, at, ap, h0, ht, o, scale, exp_decay, save, cu)


def _rec_ew_scan_backward(do, dht, v, at, ap, cu, ck, scale, exp_decay):
    """The cotangents (v', at, ap, s_0; None for an absent input) from the forward's checkpoints ``ck``; ``do``
    None when only the final state reached the loss."""
    B, T, H, V = v.shape
    BT, BV, warps = _rec_ew_tiles(T)
    cu, coff, nck = _rec_varlen(cu, T, v.device, BT)
    NS = B if cu is None else cu.shape[0] - 1
    NV = _cdiv(V, BV)
    f32, dev = torch.float32, v.device
    if do is None:
        do = torch.zeros(B, T, H, V, dtype=f32, device=dev)
    elif do.stride(-1) != 1:
        do = do.contiguous()
    dht = None if dht is None else dht.to(f32).contiguous()
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    dh0 = torch.empty(NS, H, 1, V, dtype=f32, device=dev)
    at_v = at is not None and at.shape[4] > 1
    ap_v = ap is not None and ap.shape[2] > 1
    if at is not None:  # per value tile when at does not vary along V (summed below)
        dat = torch.empty(1 if at_v else NV, *at.shape, dtype=at.dtype if at_v else f32, device=dev)
        sda = [dat.stride(0) if not at_v else 0] + _rec_bcast_strides(dat[0], 5)
        sda = sda[:4] + sda[5:]
    else:
        dat, sda = ck, [0] * 5
    if ap is not None:  # (a row per program row: batch rows, or packed sequences)
        dap = torch.zeros(NS, 1 if ap_v else NV, *ap.shape, dtype=f32, device=dev)
        sdp = [dap.stride(1) if not ap_v else 0, dap.stride(0)] + _rec_bcast_strides(dap[0, 0], 3)
        sdp = sdp[:3] + sdp[4:]
    else:
        dap, sdp = ck, [0] * 4
    ptrs, st = _rec_ew_operands(v, at, ap)
    _rec_kernel(_rec_ew_bwd)[(NV, NS * H)](
        *ptrs, ck, do, dht if dht is not None else ck, dv, dat, dap, dh0, cu if cu is not None else ck,
        coff if cu is not None else ck, T, H, V, float(scale), nck, *st,
        do.stride(0), do.stride(1), do.stride(2), *sda, *sdp, HAS_AT=at is not None,
        HAS_AP=ap is not None, AT_V=at_v, AP_V=ap_v, EXP_DECAY=bool(exp_decay), HAS_DHT=dht is not None,
        BT=BT, BV=BV, VARLEN=cu is not None, num_warps=warps)
    gat = (dat[0] if at_v else dat.sum(0).to(at.dtype)) if at is not None else None
    gap = dap.sum((0, 1)).to(ap.dtype) if ap is not None else None
    return dv, gat, gap, dh0


class _RecEwScan(torch.autograd.Function):
    """o, s_T = scan(v', at, ap, s_0) of a one-axis state, with the gradients of every tensor argument (eager
    calls: less host time than the operator's dispatch)."""

    @staticmethod
    def forward(ctx, v, at, ap, h0, scale, exp_decay, o_dtype, cu=None):
        o, ht, ck = _rec_ew_scan_forward(v, at, ap, h0, cu, scale, exp_decay, o_dtype, True)
        ctx.save_for_backward(v, at, ap, ck, cu)
        ctx.scale, ctx.exp_decay, ctx.has_h0 = scale, exp_decay, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        v, at, ap, ck, cu = ctx.saved_tensors
        dv, gat, gap, dh0 = _rec_ew_scan_backward(do, dht, v, at, ap, cu, ck, ctx.scale, ctx.exp_decay)
        return dv, gat, gap, (dh0 if ctx.has_h0 else None), None, None, None, None


def _rec_ew_define_ops():
    """The element-wise scan as a forward and a backward torch operator (``mixc::rec_ew_scan_{fwd,bwd}_<tag>``):
    under torch.compile a call is one opaque node, no graph break."""
    from typing import Optional  # not X | None: older torch.library schemas read only typing.Optional

    fwd_name, bwd_name, defined = _op_pair("rec_ew_scan", (_rec_ew_fwd, _rec_ew_bwd, _rec_ew_combine, _rec_ew_decay,
                                                            _rec_decay, _rec_seq, _rec_ew_tiles, _rec_ew_forward,
                                                            _rec_varlen, _rec_ew_scan_forward, _rec_ew_scan_backward))
    if defined is not None:
        return defined
    Tensor, Opt = torch.Tensor, Optional

    @torch.library.custom_op(f"mixc::{fwd_name}", mutates_args=())
    def fwd(v: Tensor, at: Opt[Tensor], ap: Opt[Tensor], h0: Opt[Tensor], cu_seqlens: Opt[Tensor], scale: float,
            exp_decay: bool, o_dtype: torch.dtype, save: bool) -> tuple[Tensor, Tensor, Tensor]:
        o, ht, ck = _rec_ew_scan_forward(v, at, ap, h0, cu_seqlens, scale, exp_decay, o_dtype, save)
        return o, ht, (ck if ck is not None else _op_empty(v))

    @fwd.register_fake
    def _(v, at, ap, h0, cu_seqlens, scale, exp_decay, o_dtype, save):
        B, T, H, V = v.shape
        BT = _rec_ew_tiles(T)[0]
        NS = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        nck = _cdiv(T, BT) if cu_seqlens is None else T // BT + NS  # (as _rec_varlen)
        f32 = torch.float32
        ck = v.new_empty(B if cu_seqlens is None else 1, H, nck, V, dtype=f32) if save else _op_empty(v)
        return v.new_empty(B, T, H, V, dtype=o_dtype), v.new_empty(NS, H, 1, V, dtype=f32), ck

    @torch.library.custom_op(f"mixc::{bwd_name}", mutates_args=())
    def bwd(do: Tensor, dht: Opt[Tensor], v: Tensor, at: Opt[Tensor], ap: Opt[Tensor], cu_seqlens: Opt[Tensor],
            ck: Tensor, scale: float, exp_decay: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        grads = _rec_ew_scan_backward(do, dht, v, at, ap, cu_seqlens, ck, scale, exp_decay)
        return tuple(x if x is not None else _op_empty(v) for x in grads)

    @bwd.register_fake
    def _(do, dht, v, at, ap, cu_seqlens, ck, scale, exp_decay):
        B, T, H, V = v.shape
        NS = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        like = [torch.empty_like(x) if x is not None else _op_empty(v) for x in (v, at, ap)]
        return (*like, v.new_empty(NS, H, 1, V, dtype=torch.float32))

    def setup_context(ctx, inputs, output):
        v, at, ap, h0, cu_seqlens, scale, exp_decay, o_dtype, save = inputs
        ctx.save_for_backward(v, at, ap, cu_seqlens, output[2])
        ctx.scale, ctx.exp_decay, ctx.has_h0 = scale, exp_decay, h0 is not None
        ctx.set_materialize_grads(False)

    def backward(ctx, do, dht, _):
        v, at, ap, cu, ck = ctx.saved_tensors
        if ck.numel() == 0:
            raise RuntimeError("rec_ew_scan: the forward ran without save=True, so it has no backward")
        if do is None:  # only the final state reached the loss
            do = v.new_zeros(v.shape, dtype=torch.float32)
        dv, gat, gap, dh0 = map(_op_or_none, bwd(do, dht, v, at, ap, cu, ck, ctx.scale, ctx.exp_decay))
        return dv, gat, gap, (dh0 if ctx.has_h0 else None), None, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


_REC_EW_OP = _rec_ew_define_ops()  # defined as the module loads (not inside a torch.compile trace)


def rec_ew_scan(v, at, ap, h0, scale=1.0, exp_decay=False, o_dtype=torch.float32, cu_seqlens=None):
    """(o [B, T, H, V] in ``o_dtype``, s_T [B, H, 1, V] fp32) of the one-axis recurrence in this file's
    docstring over a whole sequence: v' [B, T, H, V], at [B, T, H, 1, V|1] or None,
    ap [H, 1, V|1] or None, h0 [B, H, 1, V] or None; differentiable in all of them. With ``cu_seqlens``
    ([N + 1] cumulative lengths; B = 1) the N packed sequences run in one launch, each from its own row of h0
    ([N, H, 1, V]), and s_T has a row for each. Eager calls run an autograd.Function; under torch.compile the
    same kernels are a torch operator."""
    if h0 is not None:
        h0 = h0.to(torch.float32).contiguous()
    tensors = [x for x in (v, at, ap, h0) if x is not None]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    if torch.compiler.is_compiling():
        o, ht, _ = _REC_EW_OP(v, at, ap, h0, cu_seqlens, float(scale), bool(exp_decay), o_dtype, grad)
        return o, ht
    if grad:
        return _RecEwScan.apply(v, at, ap, h0, scale, exp_decay, o_dtype, cu_seqlens)
    o, ht, _ = _rec_ew_scan_forward(v, at, ap, h0, cu_seqlens, scale, exp_decay, o_dtype, False)
    return o, ht


def rec_ew_step(v, at, ap, state, out, scale=1.0, exp_decay=False):
    """One token in place: ``state`` [B, H, 1, V] fp32 (contiguous) becomes s_1, ``out`` [B, 1, H, V] (last
    stride 1, any float dtype) receives o_1. No allocation (a CUDA graph can capture it). Returns ``out``."""
    _rec_ew_forward(v, at, ap, state, state, out, scale, exp_decay, False)
    return out
