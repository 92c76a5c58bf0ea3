"""The chunked delta rule: Triton kernels for the (gated) delta-rule recurrence, forward, and its backward.

After the PyTorch prologue of the emitted form, every file whose transition the analysis calls
``delta`` or ``gated_delta`` is, per (sequence, head),

    S_t = exp(g_t) (I - a_t b_t^T) S_{t-1} + a_t v_t^T,      o_t = scale * q_t^T S_t

(deltanet: a = k, b = beta k, v = beta v; g = 0 without a gate). With the pseudo-values
u_t = v_t - exp(g_t) b_t^T S_{t-1} the update is S_t = exp(g_t) S_{t-1} + a_t u_t^T, and within a
chunk of BT tokens that starts from S_0, with G_t the chunk's cumulative log gate,

    (I + L) U = V - diag(e^G) B S_0,        L[t, s] = e^(G_t - G_s) b_t . a_s   (s < t, else 0)

(Yang et al. 2024, the UT transform). With T = (I + L)^-1 (forward substitution, fp32; exact for a
unit lower-triangular system), W = T diag(e^G) B and U0 = T V, the chunk is

    U   = U0 - W S_0
    O   = scale * ((Q e^G) S_0 + (Q A^T * e^(G_t - G_s) [s <= t]) U)
    S_C = e^(G_C) S_0 + (A e^(G_C - G))^T U

Gates enter only as e^(G_t - G_s) with s <= t (<= 1 for g <= 0), never as e^ of a positive sum.

    forward   _dl_prep_kernel  per chunk, in parallel: G, L, T (forward substitution), W and U0
              _dl_walk_kernel  per head and value block, sequential over chunks: U, O and the state
    backward  the same chunked algorithm in PyTorch (:func:`dl_chunked_torch`), recomputed and
              differentiated by autograd (batched matrix products per chunk, a loop over chunks)

This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import torch
import triton
import triton.language as tl

DL_CHUNK = 64  # tokens per chunk


@triton.jit
def _dl_prep_kernel(
    a,  # [B, T, H, K] the key a_t (the rank-one correction's left factor and the input's key)
    b,  # [B, T, H, K] b_t: the correction is a_t b_t^T
    v,  # [B, T, H, V] the values
    g,  # [B, T, H] fp32 log gate (unused without HAS_G)
    W,  # [B, H, NT * BT, BK] fp32 out: W = T diag(e^G) B
    U,  # [B, H, NT * BT, BV * NV] fp32 out: U0 = T V
    Gc,  # [B, H, NT * BT] fp32 out: G, the in-chunk cumulative log gate
    T,  # tokens per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_G: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NTP = tl.num_programs(0) * BT  # padded tokens per (batch, head)
    o_t = i_t * BT + tl.arange(0, BT)
    o_r = tl.arange(0, BT)
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    rows = (i_b * T + o_t) * H + i_h  # token rows in [B * T * H]
    m_tk = m_t[:, None] & m_k[None, :]
    b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_b = tl.load(b + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    if HAS_G:
        b_g = tl.load(g + rows, mask=m_t, other=0.).to(tl.float32)
        b_G = tl.cumsum(b_g, 0)  # padded rows add 0: they keep the last row's G
    else:
        b_G = tl.zeros([BT], dtype=tl.float32)
    # L[t, s] = e^(G_t - G_s) b_t . a_s for s < t: the exponent is <= 0 there, 0 elsewhere
    lower = o_r[:, None] > o_r[None, :]
    b_L = tl.dot(b_b, tl.trans(b_a), input_precision="ieee")
    b_L = tl.where(lower, b_L * tl.exp(tl.where(lower, b_G[:, None] - b_G[None, :], 0.)), 0.)
    # T = (I + L)^-1 = I + N by forward substitution: N[i, :] = -L[i, :] - sum_j L[i, j] N[j, :]
    b_N = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(1, BT):
        sel = o_r[:, None] == i
        row = -tl.sum(tl.where(sel, b_L, 0.), 0)  # -L[i, :] (nonzero for columns j < i only)
        row = row + tl.sum(row[:, None] * b_N, 0)  # rows j < i of N are final
        b_N = tl.where(sel, row[None, :], b_N)
    b_T = b_N + tl.where(o_r[:, None] == o_r[None, :], 1., 0.)
    b_W = tl.dot(b_T, b_b * tl.exp(b_G)[:, None], input_precision="ieee")
    base = i_bh * NTP + o_t  # rows of the padded [B, H, NT * BT] buffers
    tl.store(W + base[:, None] * BK + o_k[None, :], b_W)
    tl.store(Gc + base, b_G)
    for i_v in range(NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_u = tl.dot(b_T, b_v.to(tl.float32), input_precision="ieee")
        tl.store(U + base[:, None] * (BV * NV) + o_v[None, :], b_u)


@triton.jit
def _dl_walk_kernel(
    q,  # [B, T, H, K] queries (the readout's q', without the number factor `scale`)
    a,  # [B, T, H, K] keys a_t
    W,  # [B, H, NT * BT, BK] fp32 from _dl_prep_kernel
    U,  # [B, H, NT * BT, BV * NV] fp32 U0 from _dl_prep_kernel
    Gc,  # [B, H, NT * BT] fp32 in-chunk cumulative log gate
    h0,  # [B, H, K, V] fp32 initial state (unused without HAS_H0)
    ht,  # [B, H, K, V] fp32 out: final state (unused without STORE_HT)
    o,  # [B, T, H, V] out: the output
    scale,  # the readout's number factor
    T,  # tokens per sequence
    NT,  # chunks per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    if HAS_H0:
        b_S = tl.load(h0 + p_s, mask=m_kv, other=0.).to(tl.float32)
    else:
        b_S = tl.zeros([BK, BV], dtype=tl.float32)
    incl = o_r[:, None] >= o_r[None, :]
    for i_t in range(NT):
        o_t = i_t * BT + o_r
        m_t = o_t < T
        rows = (i_b * T + o_t) * H + i_h
        base = i_bh * NT * BT + o_t
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_a = tl.load(a + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_W = tl.load(W + base[:, None] * BK + o_k[None, :])
        b_U = tl.load(U + base[:, None] * (BV * NV) + o_v[None, :])
        b_G = tl.load(Gc + base)
        b_GL = tl.sum(tl.where(o_r == BT - 1, b_G, 0.), 0)  # G at the chunk's end (padding adds 0)
        # U = U0 - W S_0 (rows past T are 0: their W and U0 rows are)
        b_u = b_U - tl.dot(b_W, b_S, input_precision="ieee")
        # O = scale ((Q e^G) S_0 + (Q A^T * e^(G_t - G_s) [s <= t]) U)
        b_A = tl.dot(b_q, tl.trans(b_a), input_precision="ieee")
        b_A = tl.where(incl, b_A * tl.exp(tl.where(incl, b_G[:, None] - b_G[None, :], 0.)), 0.)
        b_o = tl.dot(b_q * tl.exp(b_G)[:, None], b_S, input_precision="ieee")
        b_o = (b_o + tl.dot(b_A, b_u, input_precision="ieee")) * scale
        tl.store(o + rows[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        # S_C = e^(G_C) S_0 + (A e^(G_C - G))^T U
        b_ad = b_a * tl.exp(b_GL - b_G)[:, None]
        b_S = b_S * tl.exp(b_GL) + tl.dot(tl.trans(b_ad), b_u, input_precision="ieee")
    if STORE_HT:
        tl.store(ht + p_s, b_S, mask=m_kv)


def _dl_pow2(n):
    return max(16, triton.next_power_of_2(n))


def dl_chunk_fwd(q, a, b, v, g=None, h0=None, scale=1.0, output_final_state=False, out_dtype=None):
    """Triton forward. q, a, b: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log gates or None; h0:
    [B, H, K, V] or None. Returns (o [B, T, H, V] in ``out_dtype`` (default q's), final state
    [B, H, K, V] fp32 or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = DL_CHUNK
    NT = triton.cdiv(T, BT)
    BK = _dl_pow2(K)
    BV = min(_dl_pow2(V), 64)
    NV = triton.cdiv(V, BV)
    q, a, b, v = (x.contiguous() for x in (q, a, b, v))
    dev = q.device
    f32 = torch.float32
    W = torch.empty(B, H, NT * BT, BK, device=dev, dtype=f32)
    U = torch.empty(B, H, NT * BT, BV * NV, device=dev, dtype=f32)
    Gc = torch.empty(B, H, NT * BT, device=dev, dtype=f32)
    gg = g.to(f32).contiguous() if g is not None else Gc
    _dl_prep_kernel[(NT, B * H)](a, b, v, gg, W, U, Gc, T, H, K, V, BT, BK, BV, NV, g is not None)
    o = torch.empty(B, T, H, V, device=dev, dtype=out_dtype or q.dtype)
    ht = torch.empty(B, H, K, V, device=dev, dtype=f32) if output_final_state else None
    s0 = h0.to(f32).contiguous() if h0 is not None else None
    _dl_walk_kernel[(NV, B * H)](q, a, W, U, Gc, s0 if s0 is not None else Gc, ht if ht is not None else Gc, o,
                                 float(scale), T, NT, H, K, V, BT, BK, BV, NV, h0 is not None, ht is not None)
    return o, ht


def dl_chunked_torch(q, a, b, v, g=None, h0=None, scale=1.0, BT=DL_CHUNK):
    """The same chunked algorithm in PyTorch (differentiable; the backward differentiates it). Shapes
    as :func:`dl_chunk_fwd`; computes in the inputs' dtype (fp32 or fp64). Returns (o, final state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = -(-T // BT)
    pad = NT * BT - T

    def chunks(x):  # [B, T, H, D] -> [B, H, NT, BT, D]
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.reshape(B, NT, BT, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, ac, bc, vc = chunks(q), chunks(a), chunks(b), chunks(v)
    if g is not None:
        G = chunks(g[..., None])[..., 0].cumsum(-1)  # [B, H, NT, BT]
    else:
        G = q.new_zeros(B, H, NT, BT)
    lower = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril(-1)
    incl = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    dG = G[..., :, None] - G[..., None, :]
    L = (bc @ ac.transpose(-1, -2)) * torch.exp(dG.masked_fill(~lower, 0)) * lower
    eye = torch.eye(BT, dtype=q.dtype, device=q.device)
    Tm = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    Wc = Tm @ (bc * torch.exp(G)[..., None])
    Uc = Tm @ vc
    Aq = (qc @ ac.transpose(-1, -2)) * torch.exp(dG.masked_fill(~incl, 0)) * incl
    qg = qc * torch.exp(G)[..., None]
    GL = G[..., -1]
    ad = ac * torch.exp(GL[..., None] - G)[..., None]
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for c in range(NT):
        u = Uc[:, :, c] - Wc[:, :, c] @ S
        outs.append(qg[:, :, c] @ S + Aq[:, :, c] @ u)
        S = S * torch.exp(GL[:, :, c])[..., None, None] + ad[:, :, c].transpose(-1, -2) @ u
    o = torch.stack(outs, 2).reshape(B, H, NT * BT, V)[:, :, :T].permute(0, 2, 1, 3) * scale
    return o, S


def dl_chunk_bwd(do, dht, q, a, b, v, g=None, h0=None, scale=1.0):
    """Gradients (dq, da, db, dv, dg or None, dh0 or None) of :func:`dl_chunk_fwd`'s outputs against the
    cotangents ``do`` [B, T, H, V] and ``dht`` [B, H, K, V] (or None), by recomputing
    :func:`dl_chunked_torch` in fp32 (fp64 for fp64 inputs) and differentiating it; each in its input's dtype."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    xs = [None if x is None else x.detach().to(wide).requires_grad_() for x in (q, a, b, v, g, h0)]
    with torch.enable_grad():
        o, ht = dl_chunked_torch(*xs, scale=scale)
        outs, cot = [o], [do.to(wide)]
        if dht is not None:
            outs.append(ht)
            cot.append(dht.to(wide))
        want = [x for x in xs if x is not None]
        got = iter(torch.autograd.grad(outs, want, cot, allow_unused=True))
    res = []
    for x, orig in zip(xs, (q, a, b, v, g, h0)):
        if x is None:
            res.append(None)
            continue
        d = next(got)
        res.append(torch.zeros_like(orig) if d is None else d.to(orig.dtype))
    return tuple(res)


# ---- as a torch operator ----------------------------------------------------------------------------
# A custom operator (torch.library) is opaque to torch.compile: a compiled model calls it without a graph
# break. Its name carries a hash of this file's kernels and algorithm, so modules compiled by different
# mixc versions never share an operator that is not theirs.


def _dl_tag():
    import hashlib
    import inspect

    fns = (_dl_prep_kernel, _dl_walk_kernel, dl_chunk_fwd, dl_chunked_torch, dl_chunk_bwd)
    src = "".join(inspect.getsource(getattr(f, "fn", f)) for f in fns)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _dl_empty(x):
    return x.new_empty(0, dtype=torch.float32)


def _dl_define_ops():
    from typing import Optional  # not X | None: older torch.library schemas read only typing.Optional

    tag = _dl_tag()
    fwd_name = f"delta_fwd_{tag}"
    try:  # already defined by another module pasting the same source
        return getattr(torch.ops.mixc, fwd_name)
    except (AttributeError, RuntimeError):
        pass
    Tensor = torch.Tensor

    @torch.library.custom_op(f"mixc::{fwd_name}", mutates_args=())
    def fwd(q: Tensor, a: Tensor, b: Tensor, v: Tensor, g: Optional[Tensor], h0: Optional[Tensor],  # noqa: UP045
            scale: float, output_final_state: bool, out_dtype: Optional[torch.dtype]  # noqa: UP045
            ) -> tuple[Tensor, Tensor]:
        o, ht = dl_chunk_fwd(q, a, b, v, g, h0, scale, output_final_state, out_dtype)
        return o, (ht if ht is not None else _dl_empty(q))

    @fwd.register_fake
    def _(q, a, b, v, g, h0, scale, output_final_state, out_dtype):
        B, T, H, K = q.shape
        V = v.shape[-1]
        ht = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else _dl_empty(q)
        return q.new_empty(B, T, H, V, dtype=out_dtype or q.dtype), ht

    def setup_context(ctx, inputs, output):
        q, a, b, v, g, h0, scale, output_final_state, out_dtype = inputs
        ctx.save_for_backward(q, a, b, v, g, h0)
        ctx.scale = scale
        ctx.final = output_final_state

    def backward(ctx, do, dht):
        q, a, b, v, g, h0 = ctx.saved_tensors
        if do is None:
            do = q.new_zeros(*q.shape[:3], v.shape[-1])
        # autograd through the PyTorch chunked algorithm (an operator's body runs below autograd, so the
        # backward is not an operator of its own)
        dq, da, db, dv, dg, dh0 = dl_chunk_bwd(do, dht if ctx.final else None, q, a, b, v, g, h0, ctx.scale)
        return dq, da, db, dv, dg, dh0, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


_DL_OP = []  # the forward operator, defined on first use


def delta_chunk(q, a, b, v, g=None, h0=None, scale=1.0, output_final_state=False, out_dtype=None):
    """The chunked (gated) delta rule, differentiable (a torch operator). q, a, b: [B, T, H, K]; v: [B, T, H, V];
    g: [B, T, H] fp32 log gates or None; h0: [B, H, K, V] fp32 or None. Returns (o [B, T, H, V] in ``out_dtype``
    (default q's), final state [B, H, K, V] fp32 or None)."""
    if not _DL_OP:
        _DL_OP.append(_dl_define_ops())
    o, ht = _DL_OP[0](q, a, b, v, g, h0, float(scale), bool(output_final_state), out_dtype)
    return o, (ht if output_final_state else None)
