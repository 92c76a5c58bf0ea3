"""Recurrent-form kernels for complex diagonal states (S4D, H3), lowered to real/imaginary pairs.

Per (sequence, head), with real token factors and complex per-head coefficients::

    S_t = a * S_{t-1} + b * (k_t v_t^T)            (a, b: [K|1, V|1] complex per head; S complex [K, V])
    o_t = scale * sum_k q_t[k] Re(c * S_t)[k, :]   (c: [K|1, V|1] complex per head)

each complex number held as a (real, imaginary) pair of fp32 tiles in registers. The backward runs the
adjoint (G_r, G_i) = (dL/dRe S_t, dL/dIm S_t), from checkpoints every RECC_CHUNK tokens as kernels.py:
    G   += scale q do^T * (Re c, -Im c)
    dq   = scale sum_v Re(c S_t) do,   dk = sum_v (G . b) v,   dv = sum_k (G . b) k   ((G . b) = Gr br + Gi bi)
    da  += (Gr Sr' + Gi Si', Gi Sr' - Gr Si') with S' = S_{t-1};  db += G k v^T;  dc += scale q do^T (Sr, -Si)
    G_{t-1} = (ar Gr + ai Gi, ar Gi - ai Gr)
Complex tensors travel as torch.view_as_real ([..., 2] fp32). This file needs only torch and triton;
`mixc compile` pastes it into the generated module.
"""

import torch
import triton
import triton.language as tl

try:
    from ..hostint import _cdiv
    from .launch import _rec_kernel, _rec_tiles
except ImportError:  # pasted into a generated module, after launch.py
    pass

RECC_CHUNK = 32  # tokens between two checkpoints of the state


@triton.jit
def _recc_pair(P, p, m2, re0, HAS: tl.constexpr):
    """A complex per-head tile as (real, imaginary); (re0, 0) when absent."""
    re = re0
    im = re0 * 0.0
    if HAS:
        re = tl.load(P + p, mask=m2, other=0.0)
        im = tl.load(P + p + 1, mask=m2, other=0.0)
    return re, im


@triton.jit
def _recc_fwd(
    Q, K_, V_, AC, BC, CC,  # q', k' [B, T, H, K] real (None: 1); v' [B, T, H, V]; a, b, c [H, K|1, V|1, 2]
    H0, HT, CK, O,  # states [B, H, K, V, 2] fp32 (H0 may alias HT); checkpoints [B, H, NC, K, V, 2]; o [B, T, H, V]
    T, H, KD, VD, scale,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,  # strides (the last axis of q', k', v' has stride 1)
    sc_h, sc_k, sc_v,  # strides of a, b, c (in fp32 elements; 0 on broadcast axes)
    HAS_Q: tl.constexpr, HAS_K: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_CK: tl.constexpr, CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < KD, o_v < VD
    m2 = m_k[:, None] & m_v[None, :]
    p_s = ((i_b * H + i_h) * KD * VD + o_k[:, None] * VD + o_v[None, :]) * 2
    if HAS_H0:
        Sr = tl.load(H0 + p_s, mask=m2, other=0.0)
        Si = tl.load(H0 + p_s + 1, mask=m2, other=0.0)
    else:
        Sr = tl.zeros([BK, BV], dtype=tl.float32)
        Si = tl.zeros([BK, BV], dtype=tl.float32)
    p_c = i_h * sc_h + o_k[:, None] * sc_k + o_v[None, :] * sc_v
    one = tl.where(m2, 1.0, 0.0)  # 1 on the entries that exist
    ar, ai = _recc_pair(AC, p_c, m2, one, True)
    br, bi = _recc_pair(BC, p_c, m2, one, HAS_B)
    cr, ci = _recc_pair(CC, p_c, m2, one, HAS_C)
    NC = tl.cdiv(T, CHUNK)
    for t in range(T):
        if STORE_CK:
            if t % CHUNK == 0:
                p_ck = (((i_b * H + i_h) * NC + t // CHUNK) * KD * VD + o_k[:, None] * VD + o_v[None, :]) * 2
                tl.store(CK + p_ck, Sr, mask=m2)
                tl.store(CK + p_ck + 1, Si, mask=m2)
        x = tl.load(V_ + i_b * sv_b + t * sv_t + i_h * sv_h + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :] * one
        if HAS_K:
            x = x * tl.load(K_ + i_b * sk_b + t * sk_t + i_h * sk_h + o_k, mask=m_k, other=0.0).to(tl.float32)[:, None]
        Sr, Si = ar * Sr - ai * Si + br * x, ar * Si + ai * Sr + bi * x  # S_t = a S_{t-1} + b k v^T
        y = cr * Sr - ci * Si  # Re(c S_t)
        if HAS_Q:
            y = y * tl.load(Q + i_b * sq_b + t * sq_t + i_h * sq_h + o_k, mask=m_k, other=0.0).to(tl.float32)[:, None]
        tl.store(O + ((i_b * T + t) * H + i_h) * VD + o_v, tl.sum(y, axis=0) * scale, mask=m_v)
    tl.store(HT + p_s, Sr, mask=m2)
    tl.store(HT + p_s + 1, Si, mask=m2)


@triton.jit
def _recc_bwd(
    Q, K_, V_, AC, BC, CC, CK, DO, DHT, SCR,  # as _recc_fwd; do [B, T, H, V] fp32; dS_T [B, H, K, V, 2]; scratch
    DQ, DK, DV, DA, DB, DC, DH0,  # dq, dk [NV, B, T, H, K]; dv [B, T, H, V]; da, db, dc [B, NV, H, K, V, 2]
    T, H, KD, VD, scale, NV,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_h, sc_k, sc_v,
    HAS_Q: tl.constexpr, HAS_K: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_DHT: tl.constexpr,
    CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    B = tl.num_programs(1) // H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < KD, o_v < VD
    m2 = m_k[:, None] & m_v[None, :]
    p_s = ((i_b * H + i_h) * KD * VD + o_k[:, None] * VD + o_v[None, :]) * 2
    p_scr = (i_bh * NV + i_v) * (CHUNK + 1) * 2 * BK * BV + tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]
    if HAS_DHT:
        Gr = tl.load(DHT + p_s, mask=m2, other=0.0)
        Gi = tl.load(DHT + p_s + 1, mask=m2, other=0.0)
    else:
        Gr = tl.zeros([BK, BV], dtype=tl.float32)
        Gi = tl.zeros([BK, BV], dtype=tl.float32)
    p_c = i_h * sc_h + o_k[:, None] * sc_k + o_v[None, :] * sc_v
    one = tl.where(m2, 1.0, 0.0)  # 1 on the entries that exist
    ar, ai = _recc_pair(AC, p_c, m2, one, True)
    br, bi = _recc_pair(BC, p_c, m2, one, HAS_B)
    cr, ci = _recc_pair(CC, p_c, m2, one, HAS_C)
    dar = tl.zeros([BK, BV], dtype=tl.float32)
    dai = tl.zeros([BK, BV], dtype=tl.float32)
    dbr = tl.zeros([BK, BV], dtype=tl.float32)
    dbi = tl.zeros([BK, BV], dtype=tl.float32)
    dcr = tl.zeros([BK, BV], dtype=tl.float32)
    dci = tl.zeros([BK, BV], dtype=tl.float32)
    NC = tl.cdiv(T, CHUNK)
    for ic in range(NC):
        c = NC - 1 - ic
        t0 = c * CHUNK
        L = tl.minimum(CHUNK, T - t0)
        p_ck = (((i_b * H + i_h) * NC + c) * KD * VD + o_k[:, None] * VD + o_v[None, :]) * 2
        Sr = tl.load(CK + p_ck, mask=m2, other=0.0)
        Si = tl.load(CK + p_ck + 1, mask=m2, other=0.0)
        tl.store(SCR + p_scr, Sr)
        tl.store(SCR + p_scr + BK * BV, Si)
        for j in range(L):
            t = t0 + j
            x = tl.load(V_ + i_b * sv_b + t * sv_t + i_h * sv_h + o_v, mask=m_v, other=0.0).to(tl.float32)
            x = x[None, :] * one
            if HAS_K:
                x = x * tl.load(K_ + i_b * sk_b + t * sk_t + i_h * sk_h + o_k, mask=m_k,
                                other=0.0).to(tl.float32)[:, None]
            Sr, Si = ar * Sr - ai * Si + br * x, ar * Si + ai * Sr + bi * x
            tl.store(SCR + p_scr + (j + 1) * 2 * BK * BV, Sr)
            tl.store(SCR + p_scr + (j + 1) * 2 * BK * BV + BK * BV, Si)
        tl.debug_barrier()
        for jj in range(L):
            j = L - 1 - jj
            t = t0 + j
            p_qk = ((i_v * B + i_b) * T + t) * H + i_h
            do = tl.load(DO + ((i_b * T + t) * H + i_h) * VD + o_v, mask=m_v, other=0.0)
            Sr = tl.load(SCR + p_scr + (j + 1) * 2 * BK * BV)
            Si = tl.load(SCR + p_scr + (j + 1) * 2 * BK * BV + BK * BV)
            Pr = tl.load(SCR + p_scr + j * 2 * BK * BV)
            Pi = tl.load(SCR + p_scr + j * 2 * BK * BV + BK * BV)
            w = scale * do[None, :] * one  # d o / d Re(c S) per entry, times q below
            if HAS_Q:
                q = tl.load(Q + i_b * sq_b + t * sq_t + i_h * sq_h + o_k, mask=m_k, other=0.0).to(tl.float32)
                tl.store(DQ + p_qk * KD + o_k, tl.sum((cr * Sr - ci * Si) * w, axis=1), mask=m_k)
                w = w * q[:, None]
            w = tl.where(m2, w, 0.0)
            Gr += w * cr
            Gi -= w * ci
            dcr += w * Sr
            dci -= w * Si
            v = tl.load(V_ + i_b * sv_b + t * sv_t + i_h * sv_h + o_v, mask=m_v, other=0.0).to(tl.float32)
            gb = Gr * br + Gi * bi  # dL/d(k v^T)
            if HAS_K:
                k = tl.load(K_ + i_b * sk_b + t * sk_t + i_h * sk_h + o_k, mask=m_k, other=0.0).to(tl.float32)
                tl.store(DK + p_qk * KD + o_k, tl.sum(gb * v[None, :], axis=1), mask=m_k)
                x = k[:, None] * v[None, :]
                tl.store(DV + ((i_b * T + t) * H + i_h) * VD + o_v, tl.sum(gb * k[:, None], axis=0), mask=m_v)
            else:
                x = v[None, :] * one
                tl.store(DV + ((i_b * T + t) * H + i_h) * VD + o_v, tl.sum(gb, axis=0), mask=m_v)
            dbr += Gr * x
            dbi += Gi * x
            dar += Gr * Pr + Gi * Pi
            dai += Gi * Pr - Gr * Pi
            Gr, Gi = ar * Gr + ai * Gi, ar * Gi - ai * Gr
    tl.store(DH0 + p_s, Gr, mask=m2)
    tl.store(DH0 + p_s + 1, Gi, mask=m2)
    p_d = (((i_b * NV + i_v) * H + i_h) * KD * VD + o_k[:, None] * VD + o_v[None, :]) * 2
    tl.store(DA + p_d, dar, mask=m2)
    tl.store(DA + p_d + 1, dai, mask=m2)
    if HAS_B:
        tl.store(DB + p_d, dbr, mask=m2)
        tl.store(DB + p_d + 1, dbi, mask=m2)
    if HAS_C:
        tl.store(DC + p_d, dcr, mask=m2)
        tl.store(DC + p_d + 1, dci, mask=m2)


def _recc_real(x, K, V):
    """A complex per-head coefficient [H, K|1, V|1] as contiguous fp32 pairs and its strides (0 on
    broadcast axes, in fp32 elements)."""
    if x is None:
        return None, (0, 0, 0)
    r = torch.view_as_real(x.to(torch.complex64).contiguous())
    return r, tuple(s if n > 1 else 0 for n, s in zip(r.shape[:3], r.stride()[:3]))


def _recc_launch(q, k, v, a, b, c, h0, ht, o, scale, ck):
    B, T, H, V = v.shape
    K = max([1] + [x.shape[-1] for x in (q, k) if x is not None] + [x.shape[1] for x in (a, b, c) if x is not None])
    BK, BV, warps = _rec_tiles(B * H, K, V)
    NV = _cdiv(V, BV)
    (ar, sc), (br, _), (cr, _) = _recc_real(a, K, V), _recc_real(b, K, V), _recc_real(c, K, V)
    return B, T, H, K, V, BK, BV, NV, warps, ar, br, cr, sc


class _ReccScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, c, h0, scale, need_ck):
        q, k, v = (x.contiguous() if x is not None else None for x in (q, k, v))
        B, T, H, K, V, BK, BV, NV, warps, ar, br, cr, sc = _recc_launch(q, k, v, a, b, c, h0, None, None, scale, None)
        o = torch.empty(B, T, H, V, dtype=torch.float32, device=v.device)
        ht = torch.empty(B, H, K, V, 2, dtype=torch.float32, device=v.device)
        ck = torch.empty(B, H, _cdiv(T, RECC_CHUNK), K, V, 2, dtype=torch.float32, device=v.device) \
            if need_ck else ht
        h0r = torch.view_as_real(h0.to(torch.complex64)).contiguous() if h0 is not None else None
        d = v
        _rec_kernel(_recc_fwd)[(NV, B * H)](
            q if q is not None else d, k if k is not None else d, v, ar, br if br is not None else ar,
            cr if cr is not None else ar, h0r if h0r is not None else ht, ht, ck, o, T, H, K, V, float(scale),
            *(q.stride()[:3] if q is not None else (0, 0, 0)), *(k.stride()[:3] if k is not None else (0, 0, 0)),
            *v.stride()[:3], *sc, HAS_Q=q is not None, HAS_K=k is not None, HAS_B=b is not None,
            HAS_C=c is not None, HAS_H0=h0 is not None, STORE_CK=need_ck, CHUNK=RECC_CHUNK, BK=BK, BV=BV,
            num_warps=warps)
        ctx.save_for_backward(q, k, v, a, b, c, ck)
        ctx.scale, ctx.has_h0 = scale, h0 is not None
        return o, torch.view_as_complex(ht)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b, c, ck = ctx.saved_tensors
        B, T, H, K, V, BK, BV, NV, warps, ar, br, cr, sc = _recc_launch(q, k, v, a, b, c, None, None, None, 0, None)
        f32, dev = torch.float32, v.device
        do = torch.zeros(B, T, H, V, dtype=f32, device=dev) if do is None else do.to(f32).contiguous()
        dhr = torch.view_as_real(dht.to(torch.complex64)).contiguous() if dht is not None else None
        scr = torch.empty(B * H * NV * (RECC_CHUNK + 1) * 2 * BK * BV, dtype=f32, device=dev)
        dq = torch.empty(NV, B, T, H, K, dtype=f32, device=dev)
        dk = torch.empty(NV, B, T, H, K, dtype=f32, device=dev)
        dv = torch.empty(B, T, H, V, dtype=f32, device=dev)
        dpar = [torch.zeros(B, NV, H, K, V, 2, dtype=f32, device=dev) for _ in range(3)]
        dh0 = torch.empty(B, H, K, V, 2, dtype=f32, device=dev)
        d = v
        _rec_kernel(_recc_bwd)[(NV, B * H)](
            q if q is not None else d, k if k is not None else d, v, ar, br if br is not None else ar,
            cr if cr is not None else ar, ck, do, dhr if dhr is not None else do, scr, dq, dk, dv, *dpar, dh0,
            T, H, K, V, float(ctx.scale), NV,
            *(q.stride()[:3] if q is not None else (0, 0, 0)), *(k.stride()[:3] if k is not None else (0, 0, 0)),
            *v.stride()[:3], *sc, HAS_Q=q is not None, HAS_K=k is not None, HAS_B=b is not None,
            HAS_C=c is not None, HAS_DHT=dht is not None, CHUNK=RECC_CHUNK, BK=BK, BV=BV, num_warps=warps)

        def per_head(g, x):  # [B, NV, H, K, V, 2] -> the coefficient's own shape, complex
            if x is None:
                return None
            g = torch.view_as_complex(g.sum((0, 1)))
            dims = tuple(i for i, n in enumerate(x.shape) if n == 1 and g.shape[i] > 1)
            g = g.sum(dims, keepdim=True) if dims else g
            return g.to(x.dtype) if x.is_complex() else g.real.to(x.dtype)

        return (dq.sum(0).to(q.dtype) if q is not None else None, dk.sum(0).to(k.dtype) if k is not None else None,
                dv.to(v.dtype), per_head(dpar[0], a), per_head(dpar[1], b), per_head(dpar[2], c),
                torch.view_as_complex(dh0) if ctx.has_h0 else None, None, None)


def recc_scan(q, k, v, a, b, c, h0, scale=1.0):
    """(o [B, T, H, V] fp32, S_T [B, H, K, V] complex64) of the complex recurrence in this file's docstring;
    q', k' [B, T, H, K] or None, v' [B, T, H, V]; a, b, c complex [H, K|1, V|1] (b, c may be None: 1);
    h0 [B, H, K, V] complex or None. Differentiable in all of them."""
    need = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, a, b, c, h0))
    return _ReccScan.apply(q, k, v, a, b, c, h0, scale, need)


def recc_step(q, k, v, a, b, c, state, out, scale=1.0):
    """One token in place: ``state`` [B, H, K, V, 2] fp32 (the complex state as pairs, contiguous) becomes
    S_1, ``out`` [B, 1, H, V] fp32 (contiguous) receives o_1."""
    q, k, v = (x.contiguous() if x is not None else None for x in (q, k, v))
    B, T, H, K, V, BK, BV, NV, warps, ar, br, cr, sc = _recc_launch(q, k, v, a, b, c, None, None, None, scale, None)
    d = v
    _rec_kernel(_recc_fwd)[(NV, B * H)](
        q if q is not None else d, k if k is not None else d, v, ar, br if br is not None else ar,
        cr if cr is not None else ar, state, state, state, out, T, H, K, V, float(scale),
        *(q.stride()[:3] if q is not None else (0, 0, 0)), *(k.stride()[:3] if k is not None else (0, 0, 0)),
        *v.stride()[:3], *sc, HAS_Q=q is not None, HAS_K=k is not None, HAS_B=b is not None,
        HAS_C=c is not None, HAS_H0=True, STORE_CK=False, CHUNK=RECC_CHUNK, BK=BK, BV=BV, num_warps=warps)
    return out
