"""The chunked form's entry points: :func:`chunk_recurrence` and :func:`chunk_normalised` (what the
generated form function calls), through :class:`ChunkParallel` (autograd) or a torch custom operator
under torch.compile (``_CHUNK_FWD_OP``), or :class:`~.sequential.ChunkRecurrence` with a per-value
decay; log decays are floored at ``LOG_DECAY_MIN`` first.
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import torch

try:
    from ..custom_op import _op_defined, _op_empty, _op_tag
    from ..hostint import _cdiv
    from .kernels_bwd import (
        _dden_kernel,
        _dg_key_kernel,
        _dqk_kernel,
        _dqk_key_diag_kernel,
        _dqk_key_off_blocks,
        _dqk_key_off_kernel,
        _dv_kernel,
    )
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
        _suffix_sum,
        _tile_row,
    )
    from .kernels_fwd import (
        _exact_scores,
        _intra_diag_kernel,
        _intra_key_kernel,
        _local_cumsum_kernel,
        _out_kernel,
        _state_walk_kernel,
    )
    from .launch import (
        _blocks,
        _flat_gate,
        _gate_of,
        _layout,
        _or,
        _per_head,
        _score_dtype,
        chunk_bwd,
        chunk_fwd,
    )
    from .launcher import _Launch
    from .sequential import ChunkRecurrence
except ImportError:  # pasted into a generated module, after the modules named here
    pass


# ---- the chunk-parallel form as a torch operator ----------------------------------------------
# A custom operator (torch.library) is opaque to torch.compile: a compiled model calls it without a
# graph break. Its name carries a hash of the kernels' source, so modules compiled by different
# mixc versions, each pasting this file, never share an operator that is not theirs.


def _ops_tag():
    kernels = (_state_walk_kernel, _intra_key_kernel, _intra_diag_kernel, _out_kernel, _dv_kernel, _dqk_kernel,
               _dqk_key_off_kernel, _dqk_key_diag_kernel, _dg_key_kernel, _local_cumsum_kernel, _dden_kernel,
               # and the helpers they call:
               _dot, _seq_bounds, _first_state, _chunk_of, _state_rows, _state_tile, _suffix_sum, _row, _mid_row,
               _span_of, _dqk_key_off_blocks, _fdot, _chunk_cumsum, _tile_row, _exact_scores)
    return _op_tag(f.fn if isinstance(f, _Launch) else f for f in kernels)


def _define_ops():
    from typing import Optional  # not X | None: older torch.library schemas read only typing.Optional

    tag = _ops_tag()
    fwd_name, bwd_name = f"chunk_fwd_{tag}", f"chunk_bwd_{tag}"
    defined = _op_defined(fwd_name)
    if defined is not None:
        return defined
    Tensor = torch.Tensor

    @torch.library.custom_op(f"mixc::{fwd_name}", mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], h0: Optional[Tensor],  # noqa: UP045
            cu_seqlens: Optional[Tensor], scale: float, out_dtype: Optional[torch.dtype],  # noqa: UP045
            z0: Optional[Tensor], norm: bool, skip: Optional[Tensor], kscale: Optional[Tensor]  # noqa: UP045
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        o, ht, hs, gf, A, zt, zs, den, span = chunk_fwd(q, k, v, g, h0, cu_seqlens, scale, out_dtype, z0, norm, skip,
                                                        kscale=kscale)
        # outputs may not alias inputs: the flattened scalar decay is not returned (backward re-reads g)
        return (o, ht, hs, gf if _gate_of(g) == 2 else _op_empty(q), _or(A, _op_empty(q)), _or(zt, _op_empty(q)),
                _or(zs, _op_empty(q)), _or(den, _op_empty(q)), _or(span, _op_empty(q)))

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
                q.new_empty(B * T, H, K, dtype=f32) if gate == 2 else _op_empty(q),
                q.new_empty(B * T, H, BT, dtype=_score_dtype(q.dtype)) if gate == 2 else _op_empty(q),
                q.new_empty(N, H, K, dtype=f32) if norm else _op_empty(q),
                q.new_empty(NS, H, K, dtype=f32) if norm else _op_empty(q),
                q.new_empty(B * T, H, dtype=f32) if norm else _op_empty(q),
                q.new_empty(NC, H, _cdiv(K, _blocks(K, V, gate)[2]), dtype=f32) if gate == 2 else _op_empty(q))

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
        return (dq, dk, dv, _or(dg, _op_empty(q)), _or(dh0, _op_empty(q)), _or(dz0, _op_empty(q)),
                _or(dskip, _op_empty(q)), _or(dks, _op_empty(q)))

    @bwd.register_fake
    def _(do, dht, q, k, v, g, G, A, h0, cu_seqlens, hs, scale, o, den, zs, z0, dzt, skip, kscale, span):
        B, T, H, K = q.shape
        f32 = torch.float32
        norm = den.numel() > 0
        state0 = h0 is not None or (norm and z0 is not None)
        N = (h0 if h0 is not None else z0).shape[0] if state0 else 0
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                g.new_empty(g.shape, dtype=f32) if g is not None else _op_empty(q),
                q.new_empty(N, H, K, v.shape[-1], dtype=f32) if state0 else _op_empty(q),
                q.new_empty(N, H, K, dtype=f32) if state0 and norm else _op_empty(q),
                skip.new_empty(skip.shape, dtype=f32) if skip is not None else _op_empty(q),
                q.new_empty(q.shape[:3], dtype=f32) if kscale is not None else _op_empty(q))

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
    per call than a custom operator's dispatch (about 100 us less per forward+backward, measured
    with a host-overhead script since folded into git history), which matters for short sequences."""

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
