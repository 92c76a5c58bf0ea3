"""Feature maps of a polynomial in a dot product (based's 1 + s + s^2 / 2): :func:`tensor_product`,
:func:`symmetric_power` and :func:`power_features`, with its two kernels (:class:`PowerFeatures`).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import torch
import triton
import triton.language as tl

try:
    from ..hostint import _cdiv, _pow2
    from .launcher import INTERPRET, _Launch
except ImportError:  # pasted into a generated module, after the modules named here
    pass


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
