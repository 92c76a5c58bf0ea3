"""Launch table and autograd of the recurrent form's kernels (kernels.py).

:func:`rec_scan` runs a whole sequence (forward; backward through :class:`_RecScan` when a gradient
is needed; under torch.compile a torch operator, opaque to the compiler), :func:`rec_step` one token in place
(the decoder's path: no allocation, no host sync).
Shapes: q', k' [B, T, H, K] (None: 1), v' [B, T, H, V], the decay's token factor at
[B, T, H, K|1, V|1] and per-head factor ap [H, K|1, V|1] (None: 1), states [B, H, K, V] fp32; for the
delta rule u', w' [B, T, H, K] (S <- S - u' (w'^T S) before the decay).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import functools

import torch
import triton

try:
    from ..chunked.launcher import FAST_LAUNCH, _Launch
    from ..custom_op import _op_empty, _op_or_none, _op_pair
    from ..hostint import _cdiv, _pow2
    from .kernels import _rec_bwd, _rec_decay, _rec_delta, _rec_factor, _rec_fwd, _rec_seq
except ImportError:  # pasted into a generated module, after the launcher and the kernels
    pass

REC_CHUNK = 32  # tokens between two checkpoints of the state (the backward recomputes within a chunk)


class _RecLaunch(_Launch):
    """The chunked form's launcher (:class:`_Launch`: a specialisation seen before launches Triton's compiled
    handle directly, skipping Triton's per-call binding, most of a one-token step's host time) that also
    records each launch while a decoder records a step (:func:`rec_step_record`)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        handle = None
        if FAST_LAUNCH:
            handle = self._run(grid, args, kwargs)
            if handle is not None and not hasattr(handle[0], "packed_metadata"):
                handle = None  # (a Triton whose compiled kernel the replay cannot launch by hand)
        else:
            self.fn[grid](*args, **kwargs)
        if _REC_RECORDING:
            _REC_RECORDING[-1].append((self, grid, args, kwargs, handle))


_REC_RECORDING = []  # while rec_step_record runs a step: a list receiving its launches


_REC_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton's launch hooks live here


def _rec_hooks_off():
    """Whether no Triton launch hook is set (the replay's direct launch skips them)."""
    rt = _REC_RUNTIME
    return rt is None or (rt.launch_enter_hook is None and rt.launch_exit_hook is None)


class _RecReplay:
    """One recorded decode step (a single kernel launch) launched again on new inputs of the same layout
    (shapes, strides, dtypes, alignment, device): every tensor argument of the launch is either one of the
    decoder's own buffers (state, output, parameters: kept) or a view, at offset 0, of input ``i`` (its
    pointer is replaced by the new input's). On a GPU the compiled kernel is launched directly, with the
    pointers as integers and everything else computed at record time: no torch op, no allocation."""

    def __init__(self, launch, grid, args, kwargs, handle, slots):
        self.launch, self.grid, self.kwargs = launch, grid, kwargs
        self.slots = slots  # [(position in args, input index, shape, strides)]
        self.args = list(args)
        self.run = None
        if handle is not None and FAST_LAUNCH:
            compiled, consts = handle
            self.compiled = compiled
            self.args = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args] + list(consts)
            self.run, self.function, self.meta = compiled.run, compiled.function, compiled.packed_metadata
            self.g = (*grid, 1, 1)[:3]
            self.device = torch.cuda.current_device()
            self.stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
                (lambda d: torch.cuda.current_stream(d).cuda_stream)
            self.slots = [s[:2] for s in slots]

    def __call__(self, inputs, ptrs):
        """Launch the step on ``inputs`` (the tensors, in the recorded order; ``ptrs`` their data_ptr())."""
        args = self.args
        if self.run is not None:
            for j, i in self.slots:
                args[j] = ptrs[i]
            if _rec_hooks_off():
                g = self.g
                self.run(g[0], g[1], g[2], self.stream(self.device), self.function, self.meta, None, None, None,
                         *args)
            else:  # a launch hook is set: through the compiled kernel's own runner, which calls it
                self.compiled[self.g](*args)
            return
        for j, i, shape, stride in self.slots:  # (the interpreter needs tensors)
            x = inputs[i]
            args[j] = x.as_strided(shape, stride, x.storage_offset())
        self.launch.fn[self.grid](*args, **self.kwargs)


def rec_step_record(step, inputs, fixed):
    """Run ``step()`` (one decode step) once while recording its launches. Returns a :class:`_RecReplay` of
    it, or None when the step is not one launch whose tensor arguments are all views (offset 0) of exactly
    one of ``inputs`` or share storage with one of ``fixed`` (the decoder's buffers)."""
    _REC_RECORDING.append([])
    try:
        step()
    finally:
        launches = _REC_RECORDING.pop()
    if len(launches) != 1:
        return None
    launch, grid, args, kwargs, handle = launches[0]
    kept = {f.untyped_storage().data_ptr() for f in fixed}
    ptrs = [x.data_ptr() for x in inputs]
    slots = []
    for j, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            continue
        src = [i for i, p in enumerate(ptrs) if p == a.data_ptr()]
        if len(src) == 1 and a.untyped_storage().data_ptr() == inputs[src[0]].untyped_storage().data_ptr():
            slots.append((j, src[0], tuple(a.shape), tuple(a.stride())))
        elif src or a.untyped_storage().data_ptr() not in kept:
            return None  # an aliased input, or a temporary made by the step (it would not be remade)
    return _RecReplay(launch, grid, args, kwargs, handle, slots)


_REC_LAUNCH = {}


def _rec_kernel(fn):
    """The :class:`_RecLaunch` of a kernel (made once)."""
    if fn not in _REC_LAUNCH:
        _REC_LAUNCH[fn] = _RecLaunch(fn)
    return _REC_LAUNCH[fn]


@functools.lru_cache(maxsize=256)
def _rec_tiles(n_bh, K, V, step=False):
    """(BK, BV, num_warps): the whole key axis in one tile; the value axis cut so that a tile holds at
    most 4096 fp32 entries and, where V allows (tiles of 16 at least), there are 256 programs or more.
    A one-token step (``step``: a pass over the state, bound by its bandwidth) takes tiles of at most 4096
    entries too, 32 a thread: measured on the H200 (benchmarks/tune.py recurrent, B256 H16 K = V = 128, bf16,
    2026-12-04) 128 x 32 with 4 warps moves the state at 0.92 of the copy bandwidth, against 0.79 for 128 x 16
    (0.91 at 128 x 64 with 2 warps; 8 warps or one 128 x 128 tile: 0.12 to 0.86). sm_90 / Triton 3.6: 167
    registers, no spill."""
    BK = max(2, _pow2(K))  # (a K = 1 state still takes two masked rows: no 1-wide ranges)
    if step:
        BV = min(_pow2(V), max(16, 4096 // BK))
        return BK, BV, max(1, min(4, BK * BV // 1024))
    BV = min(_pow2(V), max(16, 4096 // BK))
    while BV > 16 and n_bh * -(-V // BV) < 256:
        BV //= 2
    return BK, BV, max(1, min(4, BK * BV // 256))


def _rec_bcast_strides(x, dims):
    """Strides of ``x`` with 0 on every axis of extent 1 (a broadcast axis), or zeros when x is None."""
    if x is None:
        return [0] * dims
    return [s if n > 1 else 0 for n, s in zip(x.shape, x.stride())]


def _rec_operands(q, k, v, at, ap):
    """The kernels' pointer stand-ins (v for an absent tensor) and strides of q', k', v', at, ap."""
    st = _rec_bcast_strides(q, 4) + _rec_bcast_strides(k, 4) + list(v.stride()) + _rec_bcast_strides(at, 5) + \
        _rec_bcast_strides(ap, 3)[:3]
    ptrs = [x if x is not None else v for x in (q, k, v, at, ap)]
    return ptrs, st


def _rec_flags(q, k, at, ap, exp_decay):
    return dict(HAS_Q=q is not None, HAS_K=k is not None, HAS_AT=at is not None, HAS_AP=ap is not None,
                EXP_DECAY=bool(exp_decay))


def _rec_axes(at, ap):
    """Along which state axes the decay's factors vary: AT_K, AT_V, AP_K, AP_V."""
    at_k, at_v = (at.shape[3] > 1, at.shape[4] > 1) if at is not None else (False, False)
    ap_k, ap_v = (ap.shape[1] > 1, ap.shape[2] > 1) if ap is not None else (False, False)
    return dict(AT_K=at_k, AT_V=at_v, AP_K=ap_k, AP_V=ap_v)


def _rec_delta_operands(u, w, v):
    """The delta rule's operands (v stands in when there is none) and their strides."""
    if u is None:
        return [v, v] + [0] * 8
    return [u, w] + list(u.stride()) + list(w.stride())


def _rec_varlen(cu, T, device, chunk=REC_CHUNK):
    """(cu as int32, each sequence's first checkpoint chunk [N + 1] int32, NCK): the checkpoint rows of packed
    sequences (one every ``chunk`` tokens of each), computed on the device (no host sync); NCK = T // chunk + N
    bounds their sum whatever the split. Without cu_seqlens: (None, None, the chunks of one sequence of T
    tokens)."""
    if cu is None:
        return None, None, _cdiv(T, chunk)
    cu = cu.to(device=device, dtype=torch.int32)
    n = (cu[1:] - cu[:-1] + chunk - 1) // chunk
    coff = torch.cat([cu.new_zeros(1), n.cumsum(0).to(torch.int32)])
    return cu, coff, T // chunk + cu.shape[0] - 1


def _rec_k(q, k):
    """The state's key width: q's or k's last axis (1 when both are absent)."""
    return q.shape[-1] if q is not None else (k.shape[-1] if k is not None else 1)


def _rec_forward(q, k, v, at, ap, h0, ht, o, scale, exp_decay, store_ck, u=None, w=None, cu=None):
    """Launch the forward scan; returns the checkpoints [B, H, NCK, K, V] (or None). With ``cu`` (cumulative
    lengths of the packed sequences of v's one batch row) one program row a sequence: h0 and ht [N, H, K, V], the
    checkpoints [1, H, NCK, K, V]."""
    B, T, H, V = v.shape
    K = _rec_k(q, k)
    cu, coff, nck = _rec_varlen(cu, T, v.device)
    NS = B if cu is None else cu.shape[0] - 1
    BK, BV, warps = _rec_tiles(NS * H, K, V, T == 1)
    NV = _cdiv(V, BV)
    ck = torch.empty(B if cu is None else 1, H, nck, K, V, dtype=torch.float32, device=v.device) \
        if store_ck else o
    ptrs, st = _rec_operands(q, k, v, at, ap)
    _rec_kernel(_rec_fwd)[(NV, NS * H)](
        *ptrs, h0 if h0 is not None else o, ht if ht is not None else o, ck, o, cu if cu is not None else o,
        coff if cu is not None else o, T, H, K, V, float(scale), nck, *st, o.stride(0), o.stride(1), o.stride(2),
        *_rec_delta_operands(u, w, v), DELTA=u is not None, **_rec_flags(q, k, at, ap, exp_decay),
        **_rec_axes(at, ap), HAS_H0=h0 is not None, STORE_HT=ht is not None, STORE_CK=store_ck, CHUNK=REC_CHUNK,
        BK=BK, BV=BV, VARLEN=cu is not None, num_warps=warps)
    return ck if store_ck else None


def _rec_scan_forward(q, k, v, at, ap, h0, u, w, cu, scale, exp_decay, o_dtype, save):
    """(o, S_T, checkpoints or None) of the forward scan; ``cu``: cumulative packed lengths or None."""
    B, T, H, V = v.shape
    NS = B if cu is None else cu.shape[0] - 1
    o = torch.empty(B, T, H, V, dtype=o_dtype, device=v.device)
    ht = torch.empty(NS, H, _rec_k(q, k), V, dtype=torch.float32, device=v.device)
    return o, ht, _rec_forward(q, k, v, at, ap, h0, ht, o, scale, exp_decay, save, u, w, cu)


def _rec_scan_backward(do, dht, q, k, v, at, ap, u, w, cu, ck, scale, exp_decay):
    """The cotangents (q', k', v', at, ap, S_0, u', w'; None for an absent input) from the forward's checkpoints
    ``ck``; ``do`` None when only the final state reached the loss."""
    B, T, H, V = v.shape
    K = _rec_k(q, k)
    cu, coff, nck = _rec_varlen(cu, T, v.device)
    NS = B if cu is None else cu.shape[0] - 1
    BK, BV, warps = _rec_tiles(NS * H, K, V)
    NV = _cdiv(V, BV)
    f32, dev = torch.float32, v.device
    do = torch.zeros(B, T, H, V, dtype=f32, device=dev) if do is None else do.to(f32).contiguous()
    dht = None if dht is None else dht.to(f32).contiguous()
    scr = torch.empty(NS * H * NV * (REC_CHUNK + 1) * BK * BV, dtype=f32, device=dev)
    dq = torch.empty(NV, B, T, H, K, dtype=f32, device=dev) if q is not None else do
    dk = torch.empty(NV, B, T, H, K, dtype=f32, device=dev) if k is not None else do
    du = torch.empty(NV, B, T, H, K, dtype=f32, device=dev) if u is not None else do
    dw = torch.empty(NV, B, T, H, K, dtype=f32, device=dev) if u is not None else do
    dv = torch.empty(B, T, H, V, dtype=f32, device=dev)
    dh0 = torch.empty(NS, H, K, V, dtype=f32, device=dev)
    axes = _rec_axes(at, ap)
    at_v, ap_v = axes["AT_V"], axes["AP_V"]
    if at is not None:  # per value tile when at does not vary along V (summed below)
        dat = torch.zeros(1 if at_v else NV, *at.shape, dtype=f32, device=dev)
        sda = [dat.stride(0) if not at_v else 0] + _rec_bcast_strides(dat[0], 5)
    else:
        dat, sda = do, [0] * 6
    if ap is not None:  # (a row per program row: batch rows, or packed sequences)
        dap = torch.zeros(NS, 1 if ap_v else NV, *ap.shape, dtype=f32, device=dev)
        sdp = [dap.stride(1) if not ap_v else 0, dap.stride(0)] + _rec_bcast_strides(dap[0, 0], 3)
    else:
        dap, sdp = do, [0] * 5
    ptrs, st = _rec_operands(q, k, v, at, ap)
    _rec_kernel(_rec_bwd)[(NV, NS * H)](
        *ptrs, ck, do, dht if dht is not None else do, scr, dq, dk, dv, dat, dap, dh0,
        cu if cu is not None else do, coff if cu is not None else do,
        T, H, K, V, float(scale), NV, nck, *st, *sda, *sdp, *_rec_delta_operands(u, w, v), du, dw,
        DELTA=u is not None, **_rec_flags(q, k, at, ap, exp_decay), **axes, HAS_DHT=dht is not None,
        CHUNK=REC_CHUNK, BK=BK, BV=BV, VARLEN=cu is not None, num_warps=warps)
    gq = dq.sum(0).to(q.dtype) if q is not None else None
    gk = dk.sum(0).to(k.dtype) if k is not None else None
    gat = dat.sum(0).to(at.dtype) if at is not None else None
    gap = dap.sum((0, 1)).to(ap.dtype) if ap is not None else None
    gu = du.sum(0).to(u.dtype) if u is not None else None
    gw = dw.sum(0).to(w.dtype) if u is not None else None
    return gq, gk, dv.to(v.dtype), gat, gap, dh0, gu, gw


class _RecScan(torch.autograd.Function):
    """o, S_T = scan(q', k', v', at, ap, S_0) with the gradients of every tensor argument (eager calls: less
    host time than the operator's dispatch)."""

    @staticmethod
    def forward(ctx, q, k, v, at, ap, h0, u, w, scale, exp_decay, o_dtype=torch.float32, cu=None):
        o, ht, ck = _rec_scan_forward(q, k, v, at, ap, h0, u, w, cu, scale, exp_decay, o_dtype, True)
        ctx.save_for_backward(q, k, v, at, ap, ck, u, w, cu)
        ctx.scale, ctx.exp_decay, ctx.has_h0 = scale, exp_decay, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, at, ap, ck, u, w, cu = ctx.saved_tensors
        gq, gk, gv, gat, gap, dh0, gu, gw = _rec_scan_backward(do, dht, q, k, v, at, ap, u, w, cu, ck, ctx.scale,
                                                               ctx.exp_decay)
        return gq, gk, gv, gat, gap, (dh0 if ctx.has_h0 else None), gu, gw, None, None, None, None


def _rec_define_ops():
    """The scan as a forward and a backward torch operator (``mixc::rec_scan_{fwd,bwd}_<tag>``), the forward's
    autograd formula calling the backward: under torch.compile a call is one opaque node, no graph break."""
    from typing import Optional  # not X | None: older torch.library schemas read only typing.Optional

    fwd_name, bwd_name, defined = _op_pair("rec_scan", (_rec_fwd, _rec_bwd, _rec_seq, _rec_delta, _rec_factor,
                                                         _rec_decay, _rec_forward, _rec_varlen, _rec_tiles,
                                                         _rec_scan_forward, _rec_scan_backward), REC_CHUNK)
    if defined is not None:
        return defined
    Tensor, Opt = torch.Tensor, Optional

    @torch.library.custom_op(f"mixc::{fwd_name}", mutates_args=())
    def fwd(q: Opt[Tensor], k: Opt[Tensor], v: Tensor, at: Opt[Tensor], ap: Opt[Tensor], h0: Opt[Tensor],
            u: Opt[Tensor], w: Opt[Tensor], cu_seqlens: Opt[Tensor], scale: float, exp_decay: bool,
            o_dtype: torch.dtype, save: bool) -> tuple[Tensor, Tensor, Tensor]:
        o, ht, ck = _rec_scan_forward(q, k, v, at, ap, h0, u, w, cu_seqlens, scale, exp_decay, o_dtype, save)
        return o, ht, (ck if ck is not None else _op_empty(v))

    @fwd.register_fake
    def _(q, k, v, at, ap, h0, u, w, cu_seqlens, scale, exp_decay, o_dtype, save):
        B, T, H, V = v.shape
        K = _rec_k(q, k)
        NS = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        nck = _cdiv(T, REC_CHUNK) if cu_seqlens is None else T // REC_CHUNK + NS  # (as _rec_varlen)
        f32 = torch.float32
        ck = v.new_empty(B if cu_seqlens is None else 1, H, nck, K, V, dtype=f32) if save else _op_empty(v)
        return v.new_empty(B, T, H, V, dtype=o_dtype), v.new_empty(NS, H, K, V, dtype=f32), ck

    @torch.library.custom_op(f"mixc::{bwd_name}", mutates_args=())
    def bwd(do: Tensor, dht: Opt[Tensor], q: Opt[Tensor], k: Opt[Tensor], v: Tensor, at: Opt[Tensor],
            ap: Opt[Tensor], u: Opt[Tensor], w: Opt[Tensor], cu_seqlens: Opt[Tensor], ck: Tensor, scale: float,
            exp_decay: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = _rec_scan_backward(do, dht, q, k, v, at, ap, u, w, cu_seqlens, ck, scale, exp_decay)
        return tuple(x if x is not None else _op_empty(v) for x in grads)

    @bwd.register_fake
    def _(do, dht, q, k, v, at, ap, u, w, cu_seqlens, ck, scale, exp_decay):
        B, T, H, V = v.shape
        NS = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        like = [torch.empty_like(x) if x is not None else _op_empty(v) for x in (q, k, v, at, ap)]
        dh0 = v.new_empty(NS, H, _rec_k(q, k), V, dtype=torch.float32)
        return (*like, dh0, *(torch.empty_like(x) if x is not None else _op_empty(v) for x in (u, w)))

    def setup_context(ctx, inputs, output):
        q, k, v, at, ap, h0, u, w, cu_seqlens, scale, exp_decay, o_dtype, save = inputs
        ctx.save_for_backward(q, k, v, at, ap, u, w, cu_seqlens, output[2])
        ctx.scale, ctx.exp_decay, ctx.has_h0 = scale, exp_decay, h0 is not None
        ctx.set_materialize_grads(False)

    def backward(ctx, do, dht, _):
        q, k, v, at, ap, u, w, cu, ck = ctx.saved_tensors
        if ck.numel() == 0:
            raise RuntimeError("rec_scan: the forward ran without save=True, so it has no backward")
        if do is None:  # only the final state reached the loss
            do = v.new_zeros(v.shape, dtype=torch.float32)
        gq, gk, gv, gat, gap, dh0, gu, gw = map(_op_or_none, bwd(do, dht, q, k, v, at, ap, u, w, cu, ck, ctx.scale,
                                                                ctx.exp_decay))
        return gq, gk, gv, gat, gap, (dh0 if ctx.has_h0 else None), gu, gw, None, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


_REC_OP = _rec_define_ops()  # defined as the module loads (not inside a torch.compile trace)


def rec_scan(q, k, v, at, ap, h0, scale=1.0, exp_decay=False, u=None, w=None, o_dtype=torch.float32, cu_seqlens=None):
    """(o [B, T, H, V] in ``o_dtype``, S_T [B, H, K, V] fp32) of the recurrence in kernels.py's docstring over
    a whole sequence; differentiable in q', k', v', at, ap, u', w' and h0 (a [B, H, K, V] initial state or
    None). With ``cu_seqlens`` ([N + 1] cumulative lengths on the device; B = 1) the N packed sequences run in
    one launch, each from its own row of h0 ([N, H, K, V]), and S_T has a row for each. Eager calls run an
    autograd.Function; under torch.compile the same kernels are a torch operator."""
    if h0 is not None:
        h0 = h0.to(torch.float32).contiguous()
    tensors = [x for x in (q, k, v, at, ap, h0, u, w) if x is not None]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    if torch.compiler.is_compiling():
        o, ht, _ = _REC_OP(q, k, v, at, ap, h0, u, w, cu_seqlens, float(scale), bool(exp_decay), o_dtype, grad)
        return o, ht
    if grad:
        return _RecScan.apply(q, k, v, at, ap, h0, u, w, scale, exp_decay, o_dtype, cu_seqlens)
    o, ht, _ = _rec_scan_forward(q, k, v, at, ap, h0, u, w, cu_seqlens, scale, exp_decay, o_dtype, False)
    return o, ht


def rec_step(q, k, v, at, ap, state, out, scale=1.0, exp_decay=False, u=None, w=None):
    """One token (T = 1) in place: ``state`` [B, H, K, V] fp32 (contiguous) becomes S_1, ``out``
    [B, 1, H, V] (last stride 1, any float dtype: the kernel converts as it stores) receives o_1.
    Parallel over batch, heads and value tiles; no allocation, so a CUDA graph can capture it. Returns
    ``out``."""
    _rec_forward(q, k, v, at, ap, state, state, out, scale, exp_decay, False, u, w)
    return out
