"""The FFT form's support code, pasted verbatim into generated modules (imports only torch and math).

A time-invariant diagonal recurrence ``h_t = a * h_(t-1) + b x_t``, ``y_t = Re(sum_n c_n h_t[n])`` is the
causal convolution ``y = K * x`` with ``K_l = Re(sum_n c_n b_n a_n^l)``. The functions here build ``K``
from ``log a`` (:func:`_fft_vandermonde`), apply the convolution (:func:`_fft_causal_conv`: real FFTs,
or a Toeplitz product for a few tokens) and evaluate the state after ``T`` tokens
(:func:`_fft_decayed_sum`). Every function takes the real compute dtype (fp32, or fp64 for fp64 inputs)
and its complex partner; autograd differentiates them (the convolution has its own backward).
"""

import math

import torch

_FFT_DIRECT_MAX_T = 32  # at or below this many tokens the convolution is a T x T Toeplitz product (no FFT)


def _fft_size(T):
    """The transform length for a causal convolution of T tokens: the smallest n = 2 m with m >= T and no
    prime factor of m above 7 (fast cuFFT/pocketfft sizes). n >= 2T, so the circular convolution of the
    zero-padded signal and kernel never wraps around into the first T outputs."""
    m = T
    while True:
        r = m
        for f in (2, 3, 5, 7):
            while r % f == 0:
                r //= f
        if r == 1:
            return 2 * m
        m += 1


def _fft_blocks(T):
    """(I, J) with J = ceil(sqrt(T)) and I J >= T: token l = i J + j."""
    J = math.isqrt(max(T - 1, 0)) + 1
    return -(-T // J), J


def _fft_real_dtype(x):
    return x.real.dtype if x.is_complex() else x.dtype


def _fft_vandermonde(w, la, T):
    """K[..., l] = Re(sum_n w[..., n] exp(l la[..., n])) for l = 0 .. T-1.

    w: [..., *M, N] (leading batch dims allowed), la = log a: [*M, N]; real or complex. Returns [..., *M, T]
    in the real dtype. Each power is exp of its exponent, never a running product, so it stays accurate for
    long T: with l = i J + j (J = ceil(sqrt(T))), exp(l la) = exp(i J la) exp(j la), and
        K[i J + j] = Re(sum_n (w_n exp(i J la_n)) exp(j la_n))
    is one batched [I, N] x [N, J] product per channel (real parts: [Re, -Im] x [Re; Im], one real matmul)."""
    I, J = _fft_blocks(T)
    ar = torch.arange(max(I, J), device=la.device, dtype=_fft_real_dtype(la))
    right = torch.exp(la.unsqueeze(-1) * ar[:J])  # exp(j la)          [*M, N, J]
    left = w.unsqueeze(-2) * torch.exp(la.unsqueeze(-2) * (ar[:I] * J).unsqueeze(-1))  # w exp(iJ la)  [..., *M, I, N]
    if left.is_complex() or right.is_complex():
        cplx = left.dtype if left.is_complex() else right.dtype
        left, right = left.to(cplx), right.to(cplx)
        left = torch.cat([left.real, -left.imag], -1)  # Re(L R) = Re L Re R - Im L Im R
        right = torch.cat([right.real, right.imag], -2)
    k = torch.matmul(left, right)  # [..., *M, I, J]
    return k.flatten(-2)[..., :T]


def _fft_decayed_sum(x, la):
    """S[..., n] = sum_s x[..., s] exp((T - 1 - s) la[..., n]): the state a diagonal recurrence with
    transition a = exp(la) and input x reaches after T tokens from zero (the input map applied after).

    x: [B, *M, T] real, la: [*M, N]. Returns [B, *M, N] (complex when la is). Blocked as _fft_vandermonde:
    with l = T - 1 - s = i J + j, S = sum_i exp(i J la) (sum_j x[T - 1 - iJ - j] exp(j la)), one matmul."""
    T = x.shape[-1]
    I, J = _fft_blocks(T)
    real = _fft_real_dtype(la)
    xr = torch.nn.functional.pad(x.to(real).flip(-1), (0, I * J - T)).unflatten(-1, (I, J))  # [B, *M, I, J]
    ar = torch.arange(max(I, J), device=la.device, dtype=real)
    right = torch.exp(la.unsqueeze(-2) * ar[:J].unsqueeze(-1))  # exp(j la)     [*M, J, N]
    left = torch.exp(la.unsqueeze(-2) * (ar[:I] * J).unsqueeze(-1))  # exp(iJ la)  [*M, I, N]
    if right.is_complex():
        n = la.shape[-1]
        part = torch.matmul(xr, torch.cat([right.real, right.imag], -1))  # [B, *M, I, 2N]
        part = torch.complex(part[..., :n], part[..., n:])
    else:
        part = torch.matmul(xr, right)
    return (part * left).sum(-2)


class _FFTCausalConv(torch.autograd.Function):
    """y = irfft(rfft(x, n) rfft(k, n), n)[:T]; the backward is the adjoint, a correlation:
        dx = irfft(rfft(dy, n) conj(rfft(k, n)), n)[:T]
        dk = irfft(sum_batch rfft(dy, n) conj(rfft(x, n)), n)[:T]
    (n >= 2T: neither wraps around). Three transforms forward, three backward; k's transform is made once
    and shared by the batch, and dk is summed over the batch in frequency before its one inverse."""

    @staticmethod
    def forward(ctx, x, k, n):
        T = x.shape[-1]
        xf = torch.fft.rfft(x.to(k.dtype), n=n)  # [B, *M, n/2 + 1]
        kf = torch.fft.rfft(k, n=n)  # [*M, n/2 + 1]
        ctx.save_for_backward(xf, kf)
        ctx.n, ctx.T, ctx.x_dtype = n, T, x.dtype
        return torch.fft.irfft(xf * kf, n=n)[..., :T]

    @staticmethod
    def backward(ctx, gy):
        xf, kf = ctx.saved_tensors
        n, T = ctx.n, ctx.T
        gf = torch.fft.rfft(gy.to(kf.real.dtype), n=n)
        gx = gk = None
        if ctx.needs_input_grad[0]:
            gx = torch.fft.irfft(gf * kf.conj(), n=n)[..., :T].to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            prod = gf * xf.conj()
            lead = tuple(range(prod.dim() - kf.dim()))
            gk = torch.fft.irfft(prod.sum(lead) if lead else prod, n=n)[..., :T]
        return gx, gk, None


def _fft_causal_conv(x, k):
    """y[..., t] = sum_(s <= t) k[..., t - s] x[..., s].

    x: [B, *M, T] (any float dtype, any strides), k: [*M, T] in the real compute dtype. Returns [B, *M, T]
    in k's dtype. Up to _FFT_DIRECT_MAX_T tokens a Toeplitz product (the same K, exact); longer, real FFTs
    of length _fft_size(T) >= 2T (fp32 transforms for bf16/fp16 signals, fp64 for fp64)."""
    T = x.shape[-1]
    if T <= _FFT_DIRECT_MAX_T:
        d = torch.arange(T, device=x.device)
        lag = d.view(T, 1) - d.view(1, T)  # t - s
        toe = k[..., lag.clamp(min=0)] * (lag >= 0).to(k.dtype)  # [*M, T, T]
        return torch.matmul(toe, x.to(k.dtype).unsqueeze(-1)).squeeze(-1)
    return _FFTCausalConv.apply(x, k, _fft_size(T))
