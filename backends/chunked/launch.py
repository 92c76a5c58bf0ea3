"""Launching the chunk-parallel kernels: block sizes, the launch table (``LAUNCH``: value block, warps
and stages per kernel), chunk layout with ``cu_seqlens``, and the forward and backward passes
:func:`chunk_fwd` and :func:`chunk_bwd` (plain functions of tensors; autograd is in ops.py).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import torch

try:
    from ..hostint import _cdiv, _pow2
    from .kernels_bwd import (
        _dden_kernel,
        _dg_key_kernel,
        _dqk_kernel,
        _dqk_key_diag_kernel,
        _dqk_key_off_kernel,
        _dv_kernel,
    )
    from .kernels_fwd import (
        _intra_diag_kernel,
        _intra_key_kernel,
        _local_cumsum_kernel,
        _out_kernel,
        _state_walk_kernel,
    )
    from .launcher import INTERPRET
except ImportError:  # pasted into a generated module, after the modules named here
    pass


# ---- launching -------------------------------------------------------------------------------


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
