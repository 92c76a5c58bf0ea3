"""Recurrent-form Triton kernels: a whole-sequence scan (forward, backward) and one token.

Every recurrence the emitter hands over is, per (sequence, head), after a PyTorch prologue::

    a_t[k, v] = exp(at_t[k, v] * ap[k, v])     (EXP_DECAY)     or   at_t[k, v] * ap[k, v]
    S_t       = a_t * S_{t-1} + k_t v_t^T                      (S: K x V, fp32, in registers)
    S_t       = a_t * (S_{t-1} - u_t (w_t^T S_{t-1})) + k_t v_t^T    (DELTA: the delta rule, u = beta k, w = k)
    o_t       = scale * q_t^T S_t                              ([V])

``at`` (a token factor) and ``ap`` (a per-head factor) each vary along the key axis, the value axis,
both or neither (strides 0 where they do not); absent, they are 1 (so an absent decay is the identity
transition). ``q`` or ``k`` absent is 1 (a one-axis state is K = 1). One program owns one
(batch, head, value tile) and walks the tokens; the forward stores the state every CHUNK tokens. With VARLEN
the inputs hold N sequences packed along T in one batch row, and program row i_b walks sequence i_b
(:func:`_rec_seq`: its tokens, and where its checkpoints go).
The backward walks the chunks in reverse: it recomputes the chunk's states from its checkpoint into
a per-program scratch (L2 resident), then runs the adjoint G_t = scale q_t do_t^T + a_{t+1} G_{t+1}:
    dq_t = scale S_t do_t,  dk_t = G_t v_t,  dv_t = G_t^T k_t,  da_t = G_t * S_{t-1},  dS_0 = a_1 G_1
With DELTA, X = S_{t-1} - u p^T (p = S_{t-1}^T w) stands for S_{t-1} in da_t, and with dX = a_t G_t, r = dX^T u:
    du_t = -dX p,  dw_t = -S_{t-1} r,  dS_{t-1} = dX - w r^T
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import triton
import triton.language as tl


@triton.jit
def _rec_decay(AT, AP, p_at, ap, m2, HAS_AT: tl.constexpr, HAS_AP: tl.constexpr, EXP_DECAY: tl.constexpr):
    """(a_t, at_t): the decay of one token over the [BK, BV] tile, and its token factor as loaded."""
    at = ap * 0.0
    x = ap  # at * ap, or whichever of them is present (ap is 1 when absent)
    if HAS_AT:
        at = tl.load(AT + p_at, mask=m2, other=0.0).to(tl.float32)
        if HAS_AP:
            x = at * ap
        else:
            x = at
    a = x
    if EXP_DECAY:  # a = exp(at * ap)
        a = tl.exp(x)
    return a, at


@triton.jit
def _rec_factor(X, base, o_k, o_v, m_k, m_v, s_k, s_v, ALONG_K: tl.constexpr, ALONG_V: tl.constexpr):
    """A decay factor over the [BK, BV] tile at ``X + base`` in the smallest shape that broadcasts to it:
    [BK, BV], [BK, 1], [1, BV] or a number (fp32; 0 where masked)."""
    if ALONG_K and ALONG_V:
        x = tl.load(X + base + o_k[:, None] * s_k + o_v[None, :] * s_v, mask=m_k[:, None] & m_v[None, :], other=0.0)
    elif ALONG_K:
        x = tl.load(X + base + o_k * s_k, mask=m_k, other=0.0)[:, None]
    elif ALONG_V:
        x = tl.load(X + base + o_v * s_v, mask=m_v, other=0.0)[None, :]
    else:
        x = tl.load(X + base)
    return x.to(tl.float32)


@triton.jit
def _rec_delta(S, U, W, i_b, t, i_h, o_k, m_k, su_b, su_t, su_h, su_k, sw_b, sw_t, sw_h, sw_k):
    """S - u_t (w_t^T S): the delta rule's rank-one correction of a [BK, BV] state tile."""
    u = tl.load(U + i_b * su_b + t * su_t + i_h * su_h + o_k * su_k, mask=m_k, other=0.0).to(tl.float32)
    w = tl.load(W + i_b * sw_b + t * sw_t + i_h * sw_h + o_k * sw_k, mask=m_k, other=0.0).to(tl.float32)
    return S - u[:, None] * tl.sum(w[:, None] * S, axis=0)[None, :]


@triton.jit
def _rec_seq(CU, COFF, i_b, i_h, T, H, NCK, VARLEN: tl.constexpr):
    """Where program row i_b's tokens are: (the batch row to address, its first token there, its token count,
    its first checkpoint row in [.., NCK, K, V]). Row i_b is batch row i_b (tokens 0 .. T), or with VARLEN the
    packed sequence i_b of the one batch row (CU: cumulative lengths; COFF: each sequence's first checkpoint
    chunk, NCK chunks a head in all)."""
    if VARLEN:
        bo = 0
        tb = tl.load(CU + i_b)
        tn = tl.load(CU + i_b + 1) - tb
        c0 = i_h * NCK + tl.load(COFF + i_b)
    else:
        bo = i_b
        tb = 0
        tn = T
        c0 = (i_b * H + i_h) * NCK
    return bo, tb, tn, c0


@triton.jit
def _rec_fwd(
    Q, K_, V_,  # q' [B, T, H, K], k' [B, T, H, K], v' [B, T, H, V] (any float dtype, any strides)
    AT, AP,  # decay factors: per token [B, T, H, K|1, V|1], per head [H, K|1, V|1] (strides 0 on broadcast axes)
    H0, HT, CK, O,  # initial state [B, H, K, V] fp32 (may alias HT), final state, checkpoints [B, H, NCK, K, V], o
    CU, COFF,  # with VARLEN: cumulative sequence lengths [N + 1] and checkpoint offsets [N + 1] (int32)
    T, H, KD, VD, scale, NCK,  # tokens, heads, key and value widths, the output's number factor, checkpoint rows
    sq_b, sq_t, sq_h, sq_k, sk_b, sk_t, sk_h, sk_k, sv_b, sv_t, sv_h, sv_v,  # strides of q', k', v'
    sa_b, sa_t, sa_h, sa_k, sa_v, sp_h, sp_k, sp_v,  # strides of at, ap
    so_b, so_t, so_h,  # strides of o [B, T, H, V] (last stride 1; fp32, or the decoder's dtype in a step)
    U, W, su_b, su_t, su_h, su_k, sw_b, sw_t, sw_h, sw_k,  # delta rule: u', w' [B, T, H, K] and their strides
    DELTA: tl.constexpr, HAS_Q: tl.constexpr, HAS_K: tl.constexpr, HAS_AT: tl.constexpr, HAS_AP: tl.constexpr,
    AT_K: tl.constexpr, AT_V: tl.constexpr, AP_K: tl.constexpr, AP_V: tl.constexpr,  # the factors' axes
    EXP_DECAY: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_CK: tl.constexpr,
    CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr = False,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H  # (with VARLEN, i_b is the packed sequence)
    bo, tb, TN, c0 = _rec_seq(CU, COFF, i_b, i_h, T, H, NCK, VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < KD, o_v < VD
    m2 = m_k[:, None] & m_v[None, :]
    s_bh = (i_b * H + i_h) * KD * VD  # the (batch, head) state in [B, H, K, V]
    if HAS_H0:
        S = tl.load(H0 + s_bh + o_k[:, None] * VD + o_v[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_AP:  # (in the smallest shape that broadcasts: a per-key factor is [BK, 1])
        ap = _rec_factor(AP, i_h * sp_h, o_k, o_v, m_k, m_v, sp_k, sp_v, AP_K, AP_V)
    for j in range(TN):
        t = tb + j  # (the token's row in the tensors)
        if STORE_CK:
            if j % CHUNK == 0:  # the state before token j, for the backward
                tl.store(CK + (c0 + j // CHUNK) * KD * VD + o_k[:, None] * VD + o_v[None, :], S, mask=m2)
        if DELTA:  # S <- S - u (w^T S)
            S = _rec_delta(S, U, W, bo, t, i_h, o_k, m_k, su_b, su_t, su_h, su_k, sw_b, sw_t, sw_h, sw_k)
        v = tl.load(V_ + bo * sv_b + t * sv_t + i_h * sv_h + o_v * sv_v, mask=m_v, other=0.0).to(tl.float32)
        k = m_k.to(tl.float32)  # (absent: 1 on the key rows that exist)
        if HAS_K:
            k = tl.load(K_ + bo * sk_b + t * sk_t + i_h * sk_h + o_k * sk_k, mask=m_k, other=0.0).to(tl.float32)
        if HAS_AT or HAS_AP:  # a_t = exp(at_t * ap) or at_t * ap, formed in its own (broadcast) shape
            if HAS_AT:
                x = _rec_factor(AT, bo * sa_b + t * sa_t + i_h * sa_h, o_k, o_v, m_k, m_v, sa_k, sa_v, AT_K, AT_V)
                if HAS_AP:
                    x = x * ap
            else:
                x = ap
            if EXP_DECAY:
                x = tl.exp(x)
            S = x * S + k[:, None] * v[None, :]  # S_t = a_t * S_{t-1} + k_t v_t^T
        else:
            S = S + k[:, None] * v[None, :]
        q = m_k.to(tl.float32)
        if HAS_Q:
            q = tl.load(Q + bo * sq_b + t * sq_t + i_h * sq_h + o_k * sq_k, mask=m_k, other=0.0).to(tl.float32)
        o = tl.sum(q[:, None] * S, axis=0) * scale  # o_t = scale q_t^T S_t
        tl.store(O + bo * so_b + t * so_t + i_h * so_h + o_v, o, mask=m_v)
    if STORE_HT:
        tl.store(HT + s_bh + o_k[:, None] * VD + o_v[None, :], S, mask=m2)


@triton.jit
def _rec_bwd(
    Q, K_, V_, AT, AP,  # as in _rec_fwd
    CK, DO, DHT, SCR,  # checkpoints [B, H, NCK, K, V], do [B, T, H, V] fp32 contiguous, dS_T [B, H, K, V], scratch
    DQ, DK, DV, DAT, DAP, DH0,  # dq, dk [NV, B, T, H, K] fp32 (per value tile); dv [B, T, H, V]; see below
    CU, COFF,  # as in _rec_fwd
    T, H, KD, VD, scale, NV, NCK,
    sq_b, sq_t, sq_h, sq_k, sk_b, sk_t, sk_h, sk_k, sv_b, sv_t, sv_h, sv_v,
    sa_b, sa_t, sa_h, sa_k, sa_v, sp_h, sp_k, sp_v,
    sda_p, sda_b, sda_t, sda_h, sda_k, sda_v,  # d at: [NV|1, B, T, H, K|1, V|1] (per value tile if at lacks V)
    sdp_p, sdp_b, sdp_h, sdp_k, sdp_v,  # d ap: [B, NV|1, H, K|1, V|1] (summed over B, tiles by the caller)
    U, W, su_b, su_t, su_h, su_k, sw_b, sw_t, sw_h, sw_k, DU, DW,  # delta rule: u', w' and du, dw (as dq)
    DELTA: tl.constexpr, HAS_Q: tl.constexpr, HAS_K: tl.constexpr, HAS_AT: tl.constexpr, HAS_AP: tl.constexpr,
    AT_K: tl.constexpr, AT_V: tl.constexpr, AP_K: tl.constexpr, AP_V: tl.constexpr,
    EXP_DECAY: tl.constexpr, HAS_DHT: tl.constexpr,
    CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr = False,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H  # (with VARLEN, i_b is the packed sequence; states and dap have a row each)
    bo, tb, TN, c0 = _rec_seq(CU, COFF, i_b, i_h, T, H, NCK, VARLEN)
    if VARLEN:
        NB = 1  # (batch rows of the tensors)
    else:
        NB = tl.num_programs(1) // H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < KD, o_v < VD
    m2 = m_k[:, None] & m_v[None, :]
    p_s = (i_b * H + i_h) * KD * VD + o_k[:, None] * VD + o_v[None, :]
    p_scr = (i_bh * NV + i_v) * (CHUNK + 1) * BK * BV + tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]
    if HAS_DHT:
        G = tl.load(DHT + p_s, mask=m2, other=0.0).to(tl.float32)
    else:
        G = tl.zeros([BK, BV], dtype=tl.float32)
    ap = tl.full([BK, BV], 1.0, tl.float32)
    if HAS_AP:
        ap = tl.load(AP + i_h * sp_h + o_k[:, None] * sp_k + o_v[None, :] * sp_v, mask=m2, other=0.0).to(tl.float32)
    dap = tl.zeros([BK, BV], dtype=tl.float32)
    p_at = bo * sa_b + i_h * sa_h + o_k[:, None] * sa_k + o_v[None, :] * sa_v
    NC = tl.cdiv(TN, CHUNK)
    for ic in range(NC):
        c = NC - 1 - ic
        t0 = tb + c * CHUNK  # (rows in the tensors)
        L = tl.minimum(CHUNK, TN - c * CHUNK)
        # recompute the chunk's states S_{t0-1} .. S_{t0+L-1} into the scratch
        S = tl.load(CK + (c0 + c) * KD * VD + o_k[:, None] * VD + o_v[None, :], mask=m2, other=0.0)
        tl.store(SCR + p_scr, S)
        for j in range(L):
            t = t0 + j
            a, _ = _rec_decay(AT, AP, p_at + t * sa_t, ap, m2, HAS_AT, HAS_AP, EXP_DECAY)
            if DELTA:
                S = _rec_delta(S, U, W, bo, t, i_h, o_k, m_k, su_b, su_t, su_h, su_k, sw_b, sw_t, sw_h, sw_k)
            v = tl.load(V_ + bo * sv_b + t * sv_t + i_h * sv_h + o_v * sv_v, mask=m_v, other=0.0).to(tl.float32)
            k = m_k.to(tl.float32)
            if HAS_K:
                k = tl.load(K_ + bo * sk_b + t * sk_t + i_h * sk_h + o_k * sk_k, mask=m_k, other=0.0).to(tl.float32)
            S = a * S + k[:, None] * v[None, :]
            tl.store(SCR + p_scr + (j + 1) * BK * BV, S)
        tl.debug_barrier()
        for jj in range(L):
            j = L - 1 - jj
            t = t0 + j
            do = tl.load(DO + ((bo * T + t) * H + i_h) * VD + o_v, mask=m_v, other=0.0)
            S_t = tl.load(SCR + p_scr + (j + 1) * BK * BV)
            S_p = tl.load(SCR + p_scr + j * BK * BV)
            p_qk = ((i_v * NB + bo) * T + t) * H + i_h  # row [i_v, b, t, h] of dq, dk
            q = m_k.to(tl.float32)
            if HAS_Q:
                q = tl.load(Q + bo * sq_b + t * sq_t + i_h * sq_h + o_k * sq_k, mask=m_k, other=0.0).to(tl.float32)
                dq = tl.sum(S_t * do[None, :], axis=1) * scale
                tl.store(DQ + p_qk * KD + o_k, dq, mask=m_k)
            G += (scale * q)[:, None] * do[None, :]  # G_t = scale q_t do_t^T + a_{t+1} G_{t+1}
            v = tl.load(V_ + bo * sv_b + t * sv_t + i_h * sv_h + o_v * sv_v, mask=m_v, other=0.0).to(tl.float32)
            k = m_k.to(tl.float32)
            if HAS_K:
                k = tl.load(K_ + bo * sk_b + t * sk_t + i_h * sk_h + o_k * sk_k, mask=m_k, other=0.0).to(tl.float32)
                dk = tl.sum(G * v[None, :], axis=1)
                tl.store(DK + p_qk * KD + o_k, dk, mask=m_k)
            dv = tl.sum(G * k[:, None], axis=0)
            tl.store(DV + ((bo * T + t) * H + i_h) * VD + o_v, dv, mask=m_v)
            a, at = _rec_decay(AT, AP, p_at + t * sa_t, ap, m2, HAS_AT, HAS_AP, EXP_DECAY)
            if DELTA:  # X = S_p - u p^T, p = S_p^T w
                u = tl.load(U + bo * su_b + t * su_t + i_h * su_h + o_k * su_k, mask=m_k, other=0.0).to(tl.float32)
                w = tl.load(W + bo * sw_b + t * sw_t + i_h * sw_h + o_k * sw_k, mask=m_k, other=0.0).to(tl.float32)
                p = tl.sum(w[:, None] * S_p, axis=0)
                X = S_p - u[:, None] * p[None, :]
            else:
                X = S_p
            ga = tl.where(m2, G * X, 0.0)  # dL/da_t
            if EXP_DECAY:
                ga = ga * a  # dL/d(at * ap)
            if HAS_AT:
                gat = ga
                if HAS_AP:
                    gat = ga * ap
                p_d = DAT + i_v * sda_p + bo * sda_b + t * sda_t + i_h * sda_h
                if AT_K and AT_V:
                    tl.store(p_d + o_k[:, None] * sda_k + o_v[None, :] * sda_v, gat, mask=m2)
                elif AT_V:
                    tl.store(p_d + o_v * sda_v, tl.sum(gat, axis=0), mask=m_v)
                elif AT_K:
                    tl.store(p_d + o_k * sda_k, tl.sum(gat, axis=1), mask=m_k)
                else:
                    tl.store(p_d, tl.sum(tl.sum(gat, axis=1), axis=0))
            if HAS_AP:
                if HAS_AT:
                    dap += ga * at
                else:
                    dap += ga
            G = a * G  # dX
            if DELTA:  # du = -dX p, dw = -S_p r, dS_p = dX - w r^T with r = dX^T u
                r = tl.sum(u[:, None] * G, axis=0)
                tl.store(DU + p_qk * KD + o_k, -tl.sum(G * p[None, :], axis=1), mask=m_k)
                tl.store(DW + p_qk * KD + o_k, -tl.sum(S_p * r[None, :], axis=1), mask=m_k)
                G = G - w[:, None] * r[None, :]
    tl.store(DH0 + p_s, G, mask=m2)
    if HAS_AP:
        p_d = DAP + i_b * sdp_b + i_v * sdp_p + i_h * sdp_h
        if AP_K and AP_V:
            tl.store(p_d + o_k[:, None] * sdp_k + o_v[None, :] * sdp_v, dap, mask=m2)
        elif AP_V:
            tl.store(p_d + o_v * sdp_v, tl.sum(dap, axis=0), mask=m_v)
        elif AP_K:
            tl.store(p_d + o_k * sdp_k, tl.sum(dap, axis=1), mask=m_k)
        else:
            tl.store(p_d, tl.sum(tl.sum(dap, axis=1), axis=0))
