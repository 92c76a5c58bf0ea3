"""The generic chunked Triton kernel against a naive float64 loop: outputs, final states and every gradient.

Runs under TRITON_INTERPRET=1 on the CPU (see conftest.py); on a GPU it runs the compiled kernel.
"""

import pytest
import torch
import torch.nn.functional as F

from mixc.backends.chunked import chunk_normalised, chunk_recurrence

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def naive(q, k, v, gk, gv, gs, h0, cu):
    B, T, H, K = q.shape
    V = v.shape[-1]
    segs = [(b, 0, T) for b in range(B)] if cu is None else [(0, a, c) for a, c in zip(cu[:-1].tolist(),
                                                                                         cu[1:].tolist())]
    o = torch.zeros(B, T, H, V, dtype=torch.float64, device=q.device)
    hts = []
    for n, (b, a, c) in enumerate(segs):
        S = h0[n].double() if h0 is not None else torch.zeros(H, K, V, dtype=torch.float64, device=q.device)
        for t in range(a, c):
            if gk is not None:
                S = S * torch.exp(gk[b, t]).double()[:, :, None]
            if gv is not None:
                S = S * torch.exp(gv[b, t]).double()[:, None, :]
            if gs is not None:
                S = S * torch.exp(gs[b, t]).double()[:, None, None]
            S = S + k[b, t].double()[:, :, None] * v[b, t].double()[:, None, :]
            o[b, t] = torch.einsum("hk,hkv->hv", q[b, t].double(), S)
        hts.append(S)
    return o, torch.stack(hts)


def rel(a, b):
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


CASES = [
    # B, T, H, K, V, decays, cu_seqlens, h0
    (1, 1, 1, 4, 4, "", None, True),
    (2, 37, 2, 5, 7, "", None, True),
    (2, 37, 2, 5, 7, "s", None, True),
    (2, 37, 2, 5, 7, "k", None, True),
    (2, 37, 2, 5, 7, "v", None, False),
    (2, 33, 2, 6, 3, "ks", None, True),
    (1, 37, 2, 5, 7, "k", [0, 5, 5, 20, 37], True),
    (1, 37, 2, 5, 7, "s", [0, 16, 37], False),
    (2, 20, 1, 70, 5, "k", None, True),  # several key blocks
    (2, 20, 1, 5, 70, "v", None, False),  # several value blocks
    (1, 19, 1, 200, 130, "ks", None, True),  # head widths up to 256, not powers of two
    # several 64-token chunks: states passed between chunks, a partial last chunk
    (2, 150, 1, 20, 24, "", None, True),
    (2, 150, 1, 20, 24, "s", None, True),
    (2, 150, 1, 20, 24, "k", None, True),
    (1, 211, 2, 9, 12, "k", [0, 70, 70, 64 + 70, 210, 211], True),
    (1, 211, 2, 9, 12, "s", [0, 129, 211], True),
    (1, 130, 1, 70, 66, "ks", None, False),
    (1, 70, 1, 130, 70, "k", None, True),  # several key blocks, per-key decay, two chunks
]


@pytest.mark.parametrize("B,T,H,K,V,use,cu,h0", CASES,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-V{c[4]}-g{c[5] or 0}" + ("-varlen" if c[6] else "")
                              for c in CASES])
def test_chunk_kernel_matches_the_loop(B, T, H, K, V, use, cu, h0):
    gen = torch.Generator().manual_seed(T * 7 + K)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    gk = F.logsigmoid(r(B, T, H, K)) if "k" in use else None
    gv = F.logsigmoid(r(B, T, H, V)) if "v" in use else None
    gs = F.logsigmoid(r(B, T, H)) if "s" in use else None
    N = B if cu is None else len(cu) - 1
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    s0 = r(N, H, K, V) if h0 else None
    ref = [x.double().to(DEV).requires_grad_() if x is not None else None for x in (q, k, v, gk, gv, gs, s0)]
    ro, rh = naive(*ref, cu_t)
    (ro.square().sum() + (rh * 0.3).sum()).backward()
    ours = [x.detach().float().requires_grad_() if x is not None else None for x in ref]
    o, ht = chunk_recurrence(*ours, cu_seqlens=cu_t, output_final_state=True)
    (o.square().sum() + (ht * 0.3).sum()).backward()
    assert rel(o, ro) < 1e-5 and rel(ht, rh) < 1e-5
    for name, a, b in zip("q k v gk gv gs h0".split(), ours, ref):
        if a is not None:
            assert rel(a.grad, b.grad) < 1e-4, name


def test_sharp_gates_do_not_overflow():
    """Log gates down to -30 per token (decays to exp(-1900) within one chunk) stay finite, gradients included."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 100, 1, 4, 4
    q, k, v = (torch.randn(B, T, H, d, generator=gen).to(DEV) for d in (K, K, V))
    gk = -30 * torch.rand(B, T, H, K, generator=gen).to(DEV)
    ref = [x.double().requires_grad_() for x in (q, k, v, gk)]
    ro, rh = naive(*ref[:3], ref[3], None, None, None, None)
    (ro.square().sum() + rh.sum()).backward()
    ours = [x.detach().float().requires_grad_() for x in ref]
    o, ht = chunk_recurrence(*ours[:3], gk=ours[3], output_final_state=True)
    (o.square().sum() + ht.sum()).backward()
    assert torch.isfinite(o).all() and rel(o, ro) < 1e-5
    for name, a, b in zip("q k v gk".split(), ours, ref):
        assert torch.isfinite(a.grad).all() and rel(a.grad, b.grad) < 1e-4, name


@pytest.mark.parametrize("gdt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cu", [None, [0, 90, 200]])
def test_factored_and_exact_chunks_side_by_side(cu, gdt):
    """Per-key decays: a chunk whose cumulative gates stay within the bound around its middle row goes
    through tensor cores whole (factored), a sharper one through the exact 16-row kernels. Mild and sharp
    chunks alternate here (both kinds are checked to occur); outputs and every gradient match the loop.
    A half-precision decay of 64 keys is summed within the chunk by the forward's kernels themselves
    (_raw_gate)."""
    from mixc.backends.chunked.launch import _factor_bound, key_spans

    gen = torch.Generator().manual_seed(21)
    B, T, H, K, V = (1, 200, 2, 9 if gdt == torch.float32 else 64, 12)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    sharp = ((torch.arange(T) // 64) % 2 == 1).float()[None, :, None, None]  # chunks 1 and 3
    gk = (F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) * (1 + 9 * sharp)).to(gdt)
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    span = key_spans(gk.to(DEV), cu_t)
    bound = _factor_bound(3)  # fp32 inputs on the CPU: ieee products
    assert (span <= bound).any() and (span > bound).any()
    ref = [x.double().to(DEV).requires_grad_() for x in (q, k, v, gk)]
    h0 = torch.randn(B if cu is None else len(cu) - 1, H, K, V, generator=gen, dtype=torch.float64).to(DEV)
    ro, rh = naive(*ref[:3], ref[3], None, None, h0, cu_t)
    do = torch.randn(B, T, H, V, generator=gen).to(DEV)
    ((ro * do).sum() + rh.sum()).backward()
    ours = [x.detach().to(torch.float32 if i < 3 else gdt).requires_grad_() for i, x in enumerate(ref)]
    o, ht = chunk_recurrence(*ours[:3], gk=ours[3], h0=h0.float(), cu_seqlens=cu_t, output_final_state=True)
    ((o * do).sum() + ht.sum()).backward()
    assert rel(o, ro) < 1e-5 and rel(ht, rh) < 1e-5
    # (the decay's gradient comes back in its own dtype: rounded to it)
    tol = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
    for name, a, b in zip("q k v gk".split(), ours, ref):
        assert torch.isfinite(a.grad).all() and rel(a.grad, b.grad) < tol[a.dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_factored_chunk_at_the_bound_stays_finite(dtype):
    """A factored chunk's scores are one product of q e^(G - G_R) and k e^(G_R - G): with a span just
    under the bound, a masked score (a row before the middle row R against a key after it) multiplies two
    factors near e^49 and overflows fp32 in its own entry. The causal select must drop it: the output,
    the final state and every gradient stay finite and match the loop."""
    from mixc.backends.chunked.launch import _factor_bound, key_spans

    gen = torch.Generator().manual_seed(23)
    B, T, H, K, V = (1, 64, 1, 16, 16)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    gk = -1.5 - 0.02 * torch.rand(B, T, H, K, generator=gen)  # G_63 - G_31 about -48.5: factored
    span = key_spans(gk.to(DEV))
    assert span.max() <= _factor_bound(3) and span.max() > 45
    assert (gk[0, :32].sum(0) - gk[0, :1].sum(0)).abs().max() > 44  # e^(2 * 44) > fp32's largest
    ours = [x.to(dtype).to(DEV).requires_grad_() if i < 3 else x.float().to(DEV).requires_grad_()
            for i, x in enumerate((q, k, v, gk))]
    ref = [x.detach().double().requires_grad_() for x in ours]
    ro, rh = naive(*ref[:3], ref[3], None, None, None, None)
    do = torch.randn(B, T, H, V, generator=gen).to(DEV)
    ((ro * do).sum() + rh.sum()).backward()
    o, ht = chunk_recurrence(*ours[:3], gk=ours[3], output_final_state=True)
    ((o.float() * do).sum() + ht.sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(o).all() and rel(o, ro) < tol and rel(ht, rh) < tol
    for name, a, b in zip("q k v gk".split(), ours, ref):
        assert torch.isfinite(a.grad).all() and rel(a.grad, b.grad) < 10 * tol, name


@pytest.mark.parametrize("gdt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cu", [None, [0, 90, 200]])
def test_forward_without_backward_equals_the_training_forward(cu, gdt):
    """Per-key decays: the output kernel forms a factored chunk's scores itself and stores them only when a
    backward will read them (chunk_fwd(backward=False) does not, and writes no cumulative gate G: its kernels
    sum the decay themselves). Both forwards give the output and final state of the loop, with mild
    (factored) and sharp (exact kernels) chunks side by side, and a skip term."""
    from mixc.backends.chunked.launch import _factor_bound, _raw_gate, chunk_fwd, key_spans

    gen = torch.Generator().manual_seed(22)
    B, T, H, K, V = (1, 200, 2, 9 if gdt == torch.float32 else 64, 12)
    q, k, v = (torch.randn(B, T, H, d, generator=gen).to(DEV) for d in (K, K, V))
    sharp = ((torch.arange(T) // 64) % 2 == 1).float()[None, :, None, None]
    gk = (F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) * (1 + 9 * sharp)).to(gdt).to(DEV)
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    span = key_spans(gk, cu_t)
    assert _raw_gate(gk) == (gdt != torch.float32)  # a half-precision decay of 64 keys: read as it is
    assert (span <= _factor_bound(3)).any() and (span > _factor_bound(3)).any()
    h0 = torch.randn(B if cu is None else len(cu) - 1, H, K, V, generator=gen).to(DEV)
    skip = torch.randn(H, generator=gen).to(DEV)
    train = chunk_fwd(q, k, v, gk, h0, cu_t, skip=skip)
    infer = chunk_fwd(q, k, v, gk, h0, cu_t, skip=skip, backward=False)
    assert (infer[3] is None) == (gdt != torch.float32)  # a half-precision decay: no G without a backward
    assert train[3] is not None and train[3].dtype == torch.float32
    ro, rh = naive(q, k, v, gk.double(), None, None, h0, cu_t)  # (the loop's exp in float64)
    ro = ro + skip.double()[:, None] * v.double()
    assert rel(infer[0], ro) < 1e-5 and rel(infer[1], rh) < 1e-5
    assert rel(train[0], ro) < 1e-5 and rel(train[1], rh) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K, V", [(16, 16), (32, 48), (128, 64)])
@pytest.mark.parametrize("use", ["", "s", "k", "k-half"])
def test_half_precision_inputs(use, K, V, dtype):
    """fp16 and bf16 inputs (products in that precision on a GPU, fp32 accumulation; fp32 products in the
    interpreter): outputs and gradients within 2e-2, at head widths whose key loops run one, one and two
    iterations (a launch can compile wrongly for one loop count and rightly for another: BENCHMARKS.md,
    session 7)."""
    gen = torch.Generator().manual_seed(5)
    B, T, H = 1, 80, 2
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    gk = F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) if use.startswith("k") else None
    gs = F.logsigmoid(torch.randn(B, T, H, generator=gen)) if use == "s" else None
    if use == "k-half":  # the decay in the inputs' dtype too (the kernels sum it themselves: _raw_gate)
        gk = gk.to(dtype)
    ref = [x.double().to(DEV).requires_grad_() if x is not None else None for x in (q, k, v, gk, gs)]
    ro, _ = naive(ref[0], ref[1], ref[2], ref[3], None, ref[4], None, None)
    do = torch.randn(B, T, H, V, generator=gen).to(DEV)
    (ro * do).sum().backward()
    ours = [x.detach().to(dtype).requires_grad_() if i < 3 or (i == 3 and use == "k-half") else
            (x.detach().float().requires_grad_() if x is not None else None) for i, x in enumerate(ref)]
    o, _ = chunk_recurrence(ours[0], ours[1], ours[2], gk=ours[3], gs=ours[4])
    assert o.dtype == dtype
    (o.float() * do).sum().backward()
    assert rel(o, ro) < 2e-2
    for name, a, b in zip("q k v gk gs".split(), ours, ref):
        if a is not None:
            assert a.grad.dtype == a.dtype and rel(a.grad, b.grad) < 2e-2, name


def _opcheck_args(gate):
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 70, 2, 8, generator=gen).to(DEV).requires_grad_() for _ in range(3))
    g = None if gate == 0 else F.logsigmoid(torch.randn(1, 70, 2, *([8] if gate == 2 else []), generator=gen))
    g = None if g is None else g.to(DEV).requires_grad_()
    h0 = torch.randn(1, 2, 8, 8, generator=gen).to(DEV).requires_grad_()
    return q, k, v, g, h0


@pytest.mark.parametrize("gate", [0, 1, 2])
def test_custom_operator_passes_opcheck(gate):
    """The chunk-parallel form is a torch.library custom operator: schema, fake (meta) shapes, autograd
    registration and AOT tracing agree with eager execution."""
    from mixc.backends.chunked.ops import _CHUNK_FWD_OP

    q, k, v, g, h0 = _opcheck_args(gate)
    torch.library.opcheck(_CHUNK_FWD_OP, (q, k, v, g, h0, None, 0.5, None, None, False, None, None))
    cu = torch.tensor([0, 30, 70], device=DEV)  # varlen: the stored states' count depends on cu_seqlens
    torch.library.opcheck(_CHUNK_FWD_OP, (q, k, v, g, None, cu, 0.5, None, None, False, None, None))


@pytest.mark.parametrize("gate", [0, 1])
def test_custom_operator_passes_opcheck_normalised(gate):
    from mixc.backends.chunked.ops import _CHUNK_FWD_OP

    q, k, v, g, h0 = _opcheck_args(gate)
    q, k = (F.elu(x.detach()).add(1).requires_grad_() for x in (q, k))
    z0 = torch.rand(1, 2, 8).to(DEV).requires_grad_()
    torch.library.opcheck(_CHUNK_FWD_OP, (q, k, v, g, h0, None, 0.5, None, z0, True, None, None))
    cu = torch.tensor([0, 30, 70], device=DEV)
    torch.library.opcheck(_CHUNK_FWD_OP, (q, k, v, g, None, cu, 0.5, None, None, True, None, None))


def _compiled_matches_eager(f, args):
    """f compiled with fullgraph=True (any graph break fails) gives eager's value and gradients."""
    ref = f(*args)
    want = torch.autograd.grad(ref, args)
    got_l = torch.compile(f, fullgraph=True, backend="eager")(*args)
    got = torch.autograd.grad(got_l, args)
    assert rel(got_l, ref.detach()) < 1e-6
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-6


def test_torch_compile_has_no_graph_break():
    """fullgraph=True fails on any graph break; forward and gradients equal eager execution."""
    q, k, v, g, h0 = _opcheck_args(2)

    def f(q, k, v, g, h0):
        o, ht = chunk_recurrence(q, k, v, gk=g, h0=h0, output_final_state=True)
        return o.square().sum() + ht.sum()

    _compiled_matches_eager(f, (q, k, v, g, h0))


def naive_normalised(q, k, v, gk, gv, gs, h0, z0, cu):
    """o = (q^T S) / (q^T z), z the same recurrence as S with v = 1."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    ones = torch.ones(B, T, H, 1, dtype=v.dtype, device=v.device)
    gv1 = None if gv is None else torch.cat([gv, torch.zeros_like(ones)], -1)
    s0 = None
    if h0 is not None or z0 is not None:
        N = (h0 if h0 is not None else z0).shape[0]
        h = h0 if h0 is not None else torch.zeros(N, H, K, V, dtype=torch.float64, device=q.device)
        z = z0 if z0 is not None else torch.zeros(N, H, K, dtype=torch.float64, device=q.device)
        s0 = torch.cat([h, z[..., None]], -1)
    o, ht = naive(q, k, torch.cat([v, ones], -1), gk, gv1, gs, s0, cu)
    return o[..., :V] / o[..., V:], ht[..., :V], ht[..., V]


NORM_CASES = [
    # B, T, H, K, V, decays, cu_seqlens, initial (h: S, z: the normaliser)
    (1, 1, 1, 4, 4, "", None, "hz"),
    (2, 37, 2, 5, 7, "", None, ""),
    (2, 37, 2, 5, 7, "s", None, "hz"),
    (2, 150, 1, 20, 70, "", None, "h"),  # several chunks, several value blocks, S given without z
    (2, 150, 1, 70, 24, "s", None, "z"),  # several key blocks, z without S
    (1, 211, 2, 9, 12, "s", [0, 70, 70, 64 + 70, 210, 211], "hz"),
    (2, 37, 2, 5, 7, "k", None, "hz"),  # per-key and per-value decays: z as a value column
    (1, 37, 2, 5, 7, "v", [0, 16, 37], "z"),
]


@pytest.mark.parametrize("B,T,H,K,V,use,cu,init", NORM_CASES,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-V{c[4]}-g{c[5] or 0}-{c[7] or 'none'}"
                              + ("-varlen" if c[6] else "") for c in NORM_CASES])
def test_normalised_kernel_matches_the_loop(B, T, H, K, V, use, cu, init):
    """chunk_normalised (the kernels carry the normaliser and divide) against the loop: outputs, final S
    and z, and the gradients of every input, both initial values included."""
    gen = torch.Generator().manual_seed(T * 3 + V)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = F.elu(r(B, T, H, K)) + 1, F.elu(r(B, T, H, K)) + 1  # positive features: den > 0
    v = r(B, T, H, V)
    gk = F.logsigmoid(r(B, T, H, K)) if "k" in use else None
    gv = F.logsigmoid(r(B, T, H, V)) if "v" in use else None
    gs = F.logsigmoid(r(B, T, H)) if "s" in use else None
    N = B if cu is None else len(cu) - 1
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    h0 = r(N, H, K, V) if "h" in init else None
    z0 = torch.rand(N, H, K, generator=gen) if "z" in init else None
    ref = [x.double().to(DEV).requires_grad_() if x is not None else None for x in (q, k, v, gk, gv, gs, h0, z0)]
    ro, rh, rz = naive_normalised(*ref, cu_t)
    do = r(B, T, H, V).to(DEV)
    ((ro * do).sum() + (rh * 0.3).sum() + (rz * 0.7).sum()).backward()
    ours = [x.detach().float().requires_grad_() if x is not None else None for x in ref]
    # a scale cancels in the division (until session 9 the kernels' forward divided by it)
    o, ht, zt = chunk_normalised(*ours, cu_seqlens=cu_t, output_final_state=True, scale=0.37)
    assert o.dtype == torch.float32 and zt.shape == (N, H, K)
    ((o * do).sum() + (ht * 0.3).sum() + (zt * 0.7).sum()).backward()
    assert rel(o, ro) < 1e-5 and rel(ht, rh) < 1e-5 and rel(zt, rz) < 1e-5
    for name, a, b in zip("q k v gk gv gs h0 z0".split(), ours, ref):
        if a is not None:
            assert rel(a.grad, b.grad) < 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K, V", [(16, 16), (16, 24), (16, 48), (64, 64)])
def test_normalised_half_precision(K, V, dtype):
    """fp16 and bf16 inputs: the output comes back in that dtype, divided in fp32 inside the kernel; outputs
    and gradients against the loop on the same rounded inputs. The widths include those where Triton 3.6
    computed wrong dq and dk on the H100 (K 16 with V 24 and 48: BENCHMARKS.md, session 8)."""
    gen = torch.Generator().manual_seed(2)
    B, T, H = 1, 80, 2
    q, k = (F.elu(torch.randn(B, T, H, K, generator=gen)) + 1 for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    gs = F.logsigmoid(torch.randn(B, T, H, generator=gen))
    ours = [x.to(dtype).to(DEV).requires_grad_() if i < 3 else x.float().to(DEV).requires_grad_()
            for i, x in enumerate((q, k, v, gs))]
    ref = [x.detach().double().requires_grad_() for x in ours]
    ro, _, _ = naive_normalised(ref[0], ref[1], ref[2], None, None, ref[3], None, None, None)
    do = torch.randn(B, T, H, V, generator=gen).to(DEV)
    (ro * do).sum().backward()
    o, _, _ = chunk_normalised(ours[0], ours[1], ours[2], gs=ours[3])
    assert o.dtype == dtype
    (o.float() * do).sum().backward()
    assert rel(o, ro) < 2e-2
    for name, a, b in zip("q k v gs".split(), ours, ref):
        assert rel(a.grad, b.grad) < 2e-2, name


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("K", [160, 192])
def test_normalised_wide_keys_on_a_long_sequence(K, scalar):
    """Key widths over 128 that are multiples of 16 (aligned rows: Triton pipelines the key loop's loads):
    with the normaliser z read inside that loop, the output kernel's denominators differed from run to run
    at T 4096 on the H100 (1.8e-2 relative at K 160; BENCHMARKS.md, session 11). Half precision against the
    same kernels on fp32 copies, outputs and gradients, and two runs bit for bit."""
    gen = torch.Generator().manual_seed(K)
    B, T, H, V = (1, 4096, 4, 64) if DEV == "cuda" else (1, 130, 1, 20)
    half = torch.bfloat16 if DEV == "cuda" else torch.float16
    q, k = (F.elu(torch.randn(B, T, H, K, generator=gen) / 4) + 1 for _ in range(2))
    v, do = torch.randn(B, T, H, V, generator=gen), torch.randn(B, T, H, V, generator=gen)
    gs = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3).to(DEV) if scalar else None

    def run(dtype):
        xs = [x.detach().to(DEV, dtype).requires_grad_() for x in (q, k, v)]
        o, _, _ = chunk_normalised(*xs, gs=gs)
        (o.float() * do.to(DEV)).sum().backward()
        return [o.detach()] + [x.grad for x in xs]

    want, got, again = run(torch.float32), run(half), run(half)
    # right (on the H100, these inputs): o under 5e-3, dq 1.4e-2 to 1.6e-2 (a normalised dq cancels); wrong
    # (session 11): o 1.0e-2 to 2.0e-2 (diag_width.py) and reruns that differ
    for name, a, b, c, tol in zip(("o", "dq", "dk", "dv"), got, want, again, (5e-3, 2e-2, 2e-2, 2e-2)):
        assert rel(a, b) < tol, (name, rel(a, b))
        assert torch.equal(a, c), (name, "differs between two runs")


def test_torch_compile_normalised_has_no_graph_break():
    q, k, v, g, h0 = _opcheck_args(1)
    q, k = (F.elu(x.detach()).add(1).requires_grad_() for x in (q, k))

    def f(q, k, v, g, h0):
        o, ht, zt = chunk_normalised(q, k, v, gs=g, h0=h0, output_final_state=True)
        return o.square().sum() + ht.sum() + zt.sum()

    _compiled_matches_eager(f, (q, k, v, g, h0))


@pytest.mark.parametrize("use,cu", [("", None), ("s", None), ("k", None), ("s", [0, 70, 70, 150]), ("v", None)])
def test_skip_term_matches_the_loop(use, cu):
    """o = q^T S + skip[h] v, the skip added in the output kernel; its gradient [H] from the dv kernel."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, K, V = (2, 150, 2, 9, 70) if cu is None else (1, 150, 2, 9, 70)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v, skip = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(H)
    gk = F.logsigmoid(r(B, T, H, K)) if "k" in use else None
    gv = F.logsigmoid(r(B, T, H, V)) if "v" in use else None
    gs = F.logsigmoid(r(B, T, H)) if "s" in use else None
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    ref = [x.double().to(DEV).requires_grad_() if x is not None else None for x in (q, k, v, gk, gv, gs, skip)]
    ro, _ = naive(*ref[:6], None, cu_t)
    ro = ro + ref[6][:, None] * ref[2]
    do = r(B, T, H, V).to(DEV)
    (ro * do).sum().backward()
    ours = [x.detach().float().requires_grad_() if x is not None else None for x in ref]
    o, _ = chunk_recurrence(*ours[:6], cu_seqlens=cu_t, skip=ours[6])
    (o * do).sum().backward()
    assert rel(o, ro) < 1e-5
    for name, a, b in zip("q k v gk gv gs skip".split(), ours, ref):
        if a is not None:
            assert rel(a.grad, b.grad) < 1e-4, name


def test_custom_operator_passes_opcheck_with_skip():
    from mixc.backends.chunked.ops import _CHUNK_FWD_OP

    q, k, v, g, h0 = _opcheck_args(1)
    skip = torch.randn(2).to(DEV).requires_grad_()
    torch.library.opcheck(_CHUNK_FWD_OP, (q, k, v, g, h0, None, 0.5, None, None, False, skip, None))


@pytest.mark.parametrize("K,e", [(5, 2), (4, 3), (16, 2), (3, 1)])
def test_symmetric_power_keeps_the_dot_product(K, e):
    """symmetric_power(a, e) . symmetric_power(b, e) = (a . b)^e with C(K + e - 1, e) features (based's
    second-order term: 136 instead of 256 at K = 16); its gradient matches the full tensor product's."""
    import math

    from mixc.backends.chunked import symmetric_power, tensor_product

    gen = torch.Generator().manual_seed(K + e)
    a, b = (torch.randn(3, 7, K, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sa, sb = symmetric_power(a, e), symmetric_power(b, e)
    assert sa.shape[-1] == math.comb(K + e - 1, e)
    got = (sa * sb).sum(-1)
    assert torch.allclose(got, (a * b).sum(-1) ** e, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(got.sum(), (a, b))
    full = (tensor_product(*[a] * e) * tensor_product(*[b] * e)).sum(-1)
    want = torch.autograd.grad(full.sum(), (a, b))
    assert all(torch.allclose(x, y, rtol=1e-12, atol=1e-12) for x, y in zip(g, want))
    # bf16 picks are exact: the features equal the products of the bf16 entries, rounded once per product
    ab = a.detach().to(torch.bfloat16)
    want_b = symmetric_power(ab.double(), e).to(torch.bfloat16)
    assert torch.allclose(symmetric_power(ab, e).double(), want_b.double(), rtol=2 ** -7 * e, atol=0)


def test_in_kernel_normaliser_refuses_a_per_key_decay():
    """chunk_fwd(norm=True) has no per-key backward: it says so before any work (chunk_normalised
    takes that case through a value column, tested above)."""
    from mixc.backends.chunked import chunk_fwd

    q, k, v, g, _ = _opcheck_args(2)
    with pytest.raises(ValueError, match="per-key decay"):
        chunk_fwd(q.detach(), k.detach(), v.detach(), g.detach(), norm=True)


@pytest.mark.parametrize("use,cu,norm", [("", None, False), ("s", None, False), ("s", [0, 70, 70, 150], False),
                                         ("k", None, False), ("v", None, False), ("s", None, True),
                                         ("", [0, 5, 150], True)])
def test_key_scale_matches_the_loop(use, cu, norm):
    """k'_t = ks_t k_t with ks [B, T, H] applied as the kernels load k (none or scalar decays; scaled
    before the kernels otherwise): outputs, final states and the gradients of k and ks, several key
    blocks, with and without the normaliser (which the scale enters too)."""
    gen = torch.Generator().manual_seed(13)
    B, T, H, K, V = (2, 150, 2, 70, 9) if cu is None else (1, 150, 2, 70, 9)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = (F.elu(r(B, T, H, K)) + 1, F.elu(r(B, T, H, K)) + 1) if norm else (r(B, T, H, K), r(B, T, H, K))
    v, ks = r(B, T, H, V), torch.rand(B, T, H, generator=gen) * 2
    ks[:, 3] = 0.0  # a zero scale: its gradient still comes from k . dk'
    gk = F.logsigmoid(r(B, T, H, K)) if "k" in use else None
    gv = F.logsigmoid(r(B, T, H, V)) if "v" in use else None
    gs = F.logsigmoid(r(B, T, H)) if "s" in use else None
    N = B if cu is None else len(cu) - 1
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    h0 = r(N, H, K, V)
    ref = [x.double().to(DEV).requires_grad_() if x is not None else None for x in (q, k, v, gk, gv, gs, h0, ks)]
    k_ref = ref[1] * ref[7][..., None]
    if norm:
        ro, rh, _ = naive_normalised(ref[0], k_ref, *ref[2:7], None, cu_t)
    else:
        ro, rh = naive(ref[0], k_ref, *ref[2:7], cu_t)
    do = r(B, T, H, V).to(DEV)
    ((ro * do).sum() + (rh * 0.3).sum()).backward()
    ours = [x.detach().float().requires_grad_() if x is not None else None for x in ref]
    if norm:
        o, ht, _ = chunk_normalised(*ours[:7], cu_seqlens=cu_t, output_final_state=True, kscale=ours[7])
    else:
        o, ht = chunk_recurrence(*ours[:7], cu_seqlens=cu_t, output_final_state=True, kscale=ours[7])
    ((o * do).sum() + (ht * 0.3).sum()).backward()
    assert rel(o, ro) < 1e-5 and rel(ht, rh) < 1e-5
    for name, a, b in zip("q k v gk gv gs h0 ks".split(), ours, ref):
        if a is not None:
            assert rel(a.grad, b.grad) < 1e-4, name


def test_key_scale_in_half_precision_and_under_opcheck():
    """fp16 keys with an fp32 scale; the custom operator's schema, fake shapes and autograd with kscale."""
    from mixc.backends.chunked.ops import _CHUNK_FWD_OP

    q, k, v, g, h0 = _opcheck_args(1)
    ks = torch.rand(1, 70, 2).to(DEV).requires_grad_()
    torch.library.opcheck(_CHUNK_FWD_OP, (q, k, v, g, h0, None, 0.5, None, None, False, None, ks))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v, g, ks)]
    ro, _ = naive(ref[0], ref[1] * ref[4][..., None], ref[2], None, None, ref[3], None, None)
    do = torch.randn_like(ro)
    (ro * do).sum().backward()
    ours = [x.detach().to(torch.float16 if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(ref)]
    o, _ = chunk_recurrence(ours[0], ours[1], ours[2], gs=ours[3], kscale=ours[4])
    (o.float() * do).sum().backward()
    assert o.dtype == torch.float16 and rel(o, ro) < 2e-2
    for name, a, b in zip("q k v gs ks".split(), ours, ref):
        assert rel(a.grad, b.grad) < 2e-2, name


def test_normaliser_and_skip_together_are_refused():
    """chunk_fwd divides by the normaliser's readout; a skip added after the division would take the
    wrong cotangent, so the two are refused together (the emitter never asks for both)."""
    from mixc.backends.chunked import chunk_fwd

    q, k, v = (torch.rand(1, 8, 1, 4).to(DEV) for _ in range(3))
    with pytest.raises(ValueError, match="normaliser or a skip"):
        chunk_fwd(q, k, v, norm=True, skip=torch.ones(1).to(DEV))


@pytest.mark.parametrize("e,K,dtype", [(2, 16, torch.float32), (3, 5, torch.float32), (1, 7, torch.float32),
                                       (2, 16, torch.float16)])
def test_power_features_kernels_match_the_matrix_form(e, K, dtype):
    """power_features through its two kernels (forward; gradient of x) against the one-hot matrix form,
    rows not a multiple of the kernels' blocks; the dot-product identity it exists for."""
    from mixc.backends.chunked.power import PowerFeatures, _power_features_torch

    gen = torch.Generator().manual_seed(e * 10 + K)
    c = (1.0, 0.5, -0.25, 0.125)[:e + 1]
    x = torch.randn(2, 37, 3, K, generator=gen).to(DEV, dtype).requires_grad_()
    got = PowerFeatures.apply(x, e, c)
    want = _power_features_torch(x.detach().double().requires_grad_(), e, c)
    assert got.dtype == dtype and got.shape == want.shape
    g = torch.randn(want.shape, generator=gen).to(DEV)
    (gx,) = torch.autograd.grad(got, x, g.to(dtype))
    xd = x.detach().double().requires_grad_()
    (wx,) = torch.autograd.grad(_power_features_torch(xd, e, c), xd, g.double())
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert rel(got, want) < tol and rel(gx, wx) < tol
    if dtype == torch.float32:
        a, b = x.detach(), torch.randn(x.shape, generator=gen).to(DEV)
        s = (a * b).sum(-1).double()
        dot = (PowerFeatures.apply(a, e, c).double() * PowerFeatures.apply(b, e, (1.0,) * (e + 1)).double()).sum(-1)
        assert rel(dot, sum(c[d] * s ** d for d in range(e + 1))) < 1e-5


@pytest.mark.parametrize("K, pad", [(16, 16), (5, 8), (4, 5)])
def test_padded_power_features_add_only_zero_features(K, pad):
    """power_features(pad=p): the width rounded up to a multiple of p; the first features are the unpadded
    map's (both the kernels' path and the matrix form), the rest are 0 and get no gradient into x."""
    from mixc.backends.chunked.power import PowerFeatures, _power_features_torch, power_features

    gen = torch.Generator().manual_seed(K + pad)
    c = (1.0, 0.7, 0.3)
    x = torch.randn(1, 37, 2, K, generator=gen).to(DEV).requires_grad_()
    plain = power_features(x.detach(), 2, c)
    F = plain.shape[-1]
    for got in (PowerFeatures.apply(x, 2, c, pad), _power_features_torch(x, 2, c, pad)):
        assert got.shape[-1] % pad == 0 and got.shape[-1] - F < pad
        assert torch.equal(got[..., F:], torch.zeros_like(got[..., F:]))
        assert rel(got[..., :F], plain) < 1e-6
        g = torch.randn(got.shape, generator=gen).to(DEV)
        (gx,) = torch.autograd.grad(got, x, g)
        (want,) = torch.autograd.grad(power_features(x, 2, c), x, g[..., :F])
        assert rel(gx, want) < 1e-6


@pytest.mark.parametrize("bv", [16, 32, 128])
def test_any_launch_value_block_gives_the_same_result(bv, monkeypatch):
    """The launch table (value block, warps per kernel) is a tuning knob only: every kernel's value
    block set to 16, 32 or 128 gives the loop's outputs and gradients (scalar decay with a skip and a key
    scale, a normaliser, and a per-key decay, with several value blocks)."""
    from mixc.backends.chunked import launch as C

    for name in C.LAUNCH:
        monkeypatch.setitem(C.LAUNCH, name, (bv, 4))
    gen = torch.Generator().manual_seed(bv)
    B, T, H, K, V = 1, 100, 2, 9, 70
    q, k = (F.elu(torch.randn(B, T, H, K, generator=gen)) + 1 for _ in range(2))
    v, skip = torch.randn(B, T, H, V, generator=gen), torch.randn(H, generator=gen)
    gs, gk = F.logsigmoid(torch.randn(B, T, H, generator=gen)), F.logsigmoid(torch.randn(B, T, H, K, generator=gen))
    ks = torch.rand(B, T, H, generator=gen)
    do = torch.randn(B, T, H, V, generator=gen).to(DEV)
    for case in ("skip", "norm", "key"):
        ref = [x.double().to(DEV).requires_grad_() for x in (q, k, v, gs, gk, skip, ks)]
        if case == "skip":
            ro, _ = naive(ref[0], ref[1] * ref[6][..., None], ref[2], None, None, ref[3], None, None)
            ro = ro + ref[5][:, None] * ref[2]
        elif case == "norm":
            ro, _, _ = naive_normalised(ref[0], ref[1], ref[2], None, None, ref[3], None, None, None)
        else:
            ro, _ = naive(ref[0], ref[1], ref[2], ref[4], None, None, None, None)
        (ro * do).sum().backward()
        ours = [x.detach().float().requires_grad_() for x in ref]
        if case == "skip":
            o, _ = chunk_recurrence(ours[0], ours[1], ours[2], gs=ours[3], skip=ours[5], kscale=ours[6])
        elif case == "norm":
            o, _, _ = chunk_normalised(ours[0], ours[1], ours[2], gs=ours[3])
        else:
            o, _ = chunk_recurrence(ours[0], ours[1], ours[2], gk=ours[4])
        (o * do).sum().backward()
        assert rel(o, ro) < 1e-5, case
        for name, a, b in zip("q k v gs gk skip ks".split(), ours, ref):
            if b.grad is not None:
                assert rel(a.grad, b.grad) < 1e-4, (case, name)


def test_inference_skips_autograd_and_gives_the_same_result():
    """Without a gradient wanted the call goes straight to the forward kernels (no autograd node): the
    same output, final state and normaliser as the differentiable path."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 70, 2, 8, 12
    q, k = (F.elu(torch.randn(B, T, H, K, generator=gen)).to(DEV) + 1 for _ in range(2))
    v, ks = torch.randn(B, T, H, V, generator=gen).to(DEV), torch.rand(B, T, H, generator=gen).to(DEV)
    gs = F.logsigmoid(torch.randn(B, T, H, generator=gen)).to(DEV)
    h0 = torch.randn(B, H, K, V, generator=gen).to(DEV)
    with torch.no_grad():
        o, ht = chunk_recurrence(q, k, v, gs=gs, h0=h0, output_final_state=True, kscale=ks)
        on, hn, zn = chunk_normalised(q, k, v, gs=gs, output_final_state=True)
    assert o.grad_fn is None and on.grad_fn is None
    qg = q.clone().requires_grad_()
    og, htg = chunk_recurrence(qg, k, v, gs=gs, h0=h0, output_final_state=True, kscale=ks)
    ong, hng, zng = chunk_normalised(qg, k, v, gs=gs, output_final_state=True)
    assert og.grad_fn is not None
    for a, b in ((o, og), (ht, htg), (on, ong), (hn, hng), (zn, zng)):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("norm", [False, True])
def test_time_invariant_decay_is_read_once_per_head(norm):
    """A scalar decay broadcast from one value per head (RetNet's log gamma) goes to the kernels as those
    H values with token stride 0: the same outputs and gradients (the decay's summed over tokens by
    autograd) as the same decay written out per token."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, K, V = 2, 75, 3, 8, 12
    q, k = (F.elu(torch.randn(B, T, H, K, generator=gen)).to(DEV) + 1 for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen).to(DEV)
    lg = F.logsigmoid(torch.randn(H, generator=gen) + 2).to(DEV)
    h0 = torch.randn(B, H, K, V, generator=gen).to(DEV)
    do = torch.randn(B, T, H, V, generator=gen).to(DEV)
    from mixc.backends.chunked.launch import _flat_gate, _gate_stride

    per_head = lg[None, None, :].expand(B, T, H)
    assert _flat_gate(per_head) is per_head and _gate_stride(per_head, H) == 0  # no copy, token stride 0
    assert _gate_stride(_flat_gate(per_head.contiguous()), H) == H
    outs = []
    for materialise in (False, True):
        x = [t.clone().requires_grad_() for t in (q, k, v, lg, h0)]
        gs = x[3][None, None, :].expand(B, T, H)
        if materialise:
            gs = gs.contiguous()
        if norm:
            o = chunk_normalised(x[0], x[1], x[2], gs=gs)[0]
        else:
            o = chunk_recurrence(x[0], x[1], x[2], gs=gs, h0=x[4])[0]
        grads = torch.autograd.grad(o, [t for t in x if not (norm and t is x[4])], do)
        outs.append((o, *grads))
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("use", ["output", "state", "both"])
def test_gradients_when_only_some_outputs_reach_the_loss(use):
    """The output alone, the final state alone, or both in the loss: the gradients of the float64 loop
    (an output that does not reach the loss has no cotangent, and none is made up)."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 40, 2, 8, 6
    q, k = (torch.randn(B, T, H, K, generator=gen).to(DEV) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen).to(DEV)
    gs = F.logsigmoid(torch.randn(B, T, H, generator=gen)).to(DEV)
    h0 = torch.randn(B, H, K, V, generator=gen).to(DEV)
    wo, wh = torch.randn(B, T, H, V, generator=gen).to(DEV), torch.randn(B, H, K, V, generator=gen).to(DEV)
    got, want = [], []
    for impl, dt in (("kernel", torch.float32), ("loop", torch.float64)):
        x = [t.to(dt).requires_grad_() for t in (q, k, v, gs, h0)]
        if impl == "kernel":
            o, ht = chunk_recurrence(x[0], x[1], x[2], gs=x[3], h0=x[4], output_final_state=True)
        else:
            o, ht = naive(x[0], x[1], x[2], None, None, x[3], x[4], None)
        loss = 0
        if use in ("output", "both"):
            loss = loss + (o * wo.to(dt)).sum()
        if use in ("state", "both"):
            loss = loss + (ht * wh.to(dt)).sum()
        grads = torch.autograd.grad(loss, x, allow_unused=True)  # q does not reach the final state
        (got if impl == "kernel" else want).extend(torch.zeros_like(t) if g is None else g for g, t in zip(grads, x))
    for a, b in zip(got, want):
        assert (a - b.to(a.dtype)).abs().max() < 1e-4 * b.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("gdt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,K,V,cu", [(1, 1, 1, 64, 12, None), (2, 37, 1, 80, 12, None),
                                          (1, 130, 2, 64, 20, [0, 5, 5, 64, 65, 130]), (1, 65, 1, 96, 16, None),
                                          (1, 70, 1, 200, 130, None)],
                         ids=["T1", "K80-T37", "varlen-empty", "K96-T65", "K200-V130"])
def test_raw_half_decay_edge_shapes(B, T, H, K, V, cu, gdt):
    """A half-precision per-key decay of 64+ keys, which the forward's kernels sum themselves (_raw_gate), at
    T = 1, key widths that are not powers of two, a partial last chunk and variable lengths with an empty
    sequence: the inference output and final state, the training ones and every gradient, against the
    loop on the same rounded decay (the decay's gradient comes back rounded to its dtype)."""
    from mixc.backends.chunked.launch import _raw_gate

    gen = torch.Generator().manual_seed(T + K)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) * (K ** -0.25 if d == K else 1) for d in (K, K, V))
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) + 2).to(gdt)
    assert _raw_gate(g)
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    h0 = torch.randn(B if cu is None else len(cu) - 1, H, K, V, generator=gen)
    ref = [x.double().to(DEV).requires_grad_() for x in (q, k, v, g, h0)]
    ro, rh = naive(ref[0], ref[1], ref[2], ref[3], None, None, ref[4], cu_t)
    do = torch.randn(B, T, H, V, generator=gen).to(DEV)
    ((ro * do).sum() + rh.sum()).backward()
    ours = [x.to(DEV).requires_grad_() for x in (q, k, v, g, h0)]
    with torch.no_grad():
        oi, hi = chunk_recurrence(*ours[:3], gk=ours[3], h0=ours[4], cu_seqlens=cu_t, output_final_state=True)
    o, ht = chunk_recurrence(*ours[:3], gk=ours[3], h0=ours[4], cu_seqlens=cu_t, output_final_state=True)
    ((o * do).sum() + ht.sum()).backward()
    for a, b in ((oi, ro), (hi, rh), (o, ro), (ht, rh)):
        assert rel(a, b) < 1e-5
    for name, a, b in zip("q k v g h0".split(), ours, ref):
        assert rel(a.grad, b.grad) < (1e-2 if name == "g" else 1e-4), name
