"""The chunked delta rule in PyTorch: the algorithm of :mod:`mixc.backends.delta.kernels`, step for step, with
batched matrix products per chunk and a loop over chunks. Differentiable, so autograd through it checks the
kernels' backward (tests/test_delta.py). Not part of generated modules.
"""

import torch


def dl_chunked_torch(q, a, b, v, g=None, h0=None, scale=1.0, BT=64, bs=None, vs=None):
    """The same chunked algorithm in PyTorch (differentiable: the tests check the kernels' gradients against
    autograd through it). Shapes as the kernels' ``dl_chunk_fwd``; computes in the inputs' dtype (fp32 or fp64).
    Returns (o, final state)."""
    b = b if bs is None else b * bs[..., None]
    v = v if vs is None else v * vs[..., None]
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
