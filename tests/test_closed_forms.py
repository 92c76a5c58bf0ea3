"""Independent checks of the reference backend against closed forms written in this file.

Every mechanism of ``examples/`` (see ``shared/MECHANISMS.md``) is compared in float64 with a
closed form that is computed differently from the reference's token loop wherever one exists:
masked-matmul (parallel / quadratic) forms for the linear mechanisms, decay masks from
cumulative log gates, Toeplitz convolutions for the time-invariant SSMs, the UT transform for
the delta rule and ``scaled_dot_product_attention`` with explicit boolean masks for softmax
attention. Nothing here calls into mixc other than the public API under test.

Also checked: initial / final states (closed form with a nonzero initial state, and splitting
a sequence in two and carrying the state), variable-length batches (``cu_seqlens``, with an
empty sequence and per-sequence initial states) and gradients (``gradcheck``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mixc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
F64 = torch.float64
C128 = torch.complex128
TOL = 1e-10

# Non-powers of two; W and L small so that the masks matter at T = 13.
SIZES = {"K": 4, "V": 5, "N": 6, "P": 3, "D": 4}
CONSTS = {"sliding_window_attention": {"W": 4}, "segment_attention": {"L": 3}}

NAMES = [
    "linear_attention", "based", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "hgrn", "mamba", "s4d",
    "h3", "softmax_attention", "sliding_window_attention", "segment_attention",
]
STATEFUL = [n for n in NAMES if n not in ("based", "softmax_attention", "sliding_window_attention",
                                            "segment_attention")]
WITH_PARAMS = ["retnet", "mamba2", "mamba", "s4d", "h3"]  # declare parameters or buffers
SHAPES = [(2, 13, 3), (2, 1, 3), (1, 17, 2)]

# ---- helpers ------------------------------------------------------------------------------------


@functools.cache
def mixer(name: str) -> mixc.Mixer:
    return mixc.load(EXAMPLES / f"{name}.mix", **CONSTS.get(name, {}))


def sizes_for(name: str) -> dict:
    return {k: v for k, v in SIZES.items() if k in mixer(name).meta["sizes"]}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den > 0 else num


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str = "output") -> None:
    assert a.dtype == b.dtype or (a.is_complex() == b.is_complex()), f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert a.dtype in (F64, C128), f"{what}: computed in {a.dtype}, not float64"
    err = rel_err(a, b)
    assert err < TOL, f"{what}: relative error {err:.3e}"


def assert_states_close(got: dict, want: dict) -> None:
    assert set(got) == set(want), f"states {sorted(got)} != {sorted(want)}"
    for k in want:
        assert_close(got[k], want[k], f"final state '{k}'")


def inputs_for(name: str, B: int, T: int, H: int, seed: int = 0) -> dict:
    return mixer(name).random_inputs(B, T, H, dtype=F64, seed=seed, **sizes_for(name))


def explicit_params(name: str, H: int) -> dict:
    """Parameters different from the defaults (another seed, every value scaled by U(0.8, 1)), valid ranges kept."""
    m = mixer(name)
    p = m.parameters_init(H, seed=1, dtype=F64, **sizes_for(name))
    gen = torch.Generator().manual_seed(123)
    return {k: v * (0.8 + 0.2 * torch.rand(v.shape, generator=gen, dtype=F64)) for k, v in p.items()}


def random_states(name: str, n: int, H: int, sizes: dict, seed: int = 7) -> dict:
    """Nonzero states [n, H, ...] (complex where declared so); z of linear attention kept positive."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s, sm in mixer(name).meta["states"].items():
        shape = (n, H, *[sizes[a] for a in sm["axes"]])
        x = 0.5 * torch.randn(shape, generator=gen, dtype=F64)
        if sm["complex"]:
            x = torch.complex(x, 0.5 * torch.randn(shape, generator=gen, dtype=F64))
        if name == "linear_attention" and s == "z":
            x = x.abs() + 0.5
        out[s] = x
    return out


def state_sizes(name: str, params: dict, sizes: dict | None = None) -> dict:
    sz = {**mixer(name).meta["consts_as_sizes"], **(sizes or sizes_for(name))}
    if name in ("s4d", "h3"):
        sz["N"] = params["A_re"].shape[-1]
    return sz


def bh(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, T, ...]."""
    return x.transpose(1, 2)


def causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


def pair_diff(c: torch.Tensor) -> torch.Tensor:
    """c [B, H, T, ...] -> c_t - c_u as [B, H, T, T, ...] (t the query, u the key)."""
    return c.unsqueeze(3) - c.unsqueeze(2)


def masked_exp_diff(c: torch.Tensor) -> torch.Tensor:
    """exp(c_t - c_u) for u <= t, 0 above the diagonal (no overflow: masked before exp)."""
    T = c.shape[2]
    d = pair_diff(c)
    m = causal(T).view(1, 1, T, T, *([1] * (d.dim() - 4)))
    return torch.exp(torch.where(m, d, torch.full_like(d, -math.inf)))


# ---- closed forms: each takes inputs [B, T, H, ...], params [H, ...], states [B, H, ...] (or {})
# and returns (output [B, T, H, ...], final states dict).


def cf_linear_attention(x, p, s0):
    q, k, v = bh(x["q"]), bh(x["k"]), bh(x["v"])
    B, H, T, K = q.shape
    V = v.shape[-1]
    S0 = s0.get("S", torch.zeros(B, H, K, V, dtype=F64))
    z0 = s0.get("z", torch.zeros(B, H, K, dtype=F64))
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    A = (fq @ fk.transpose(-1, -2)) * causal(T)
    num = A @ v + fq @ S0
    den = A.sum(-1) + (fq * z0.unsqueeze(2)).sum(-1)
    o = num / den.unsqueeze(-1)
    return bh(o), {"S": S0 + fk.transpose(-1, -2) @ v, "z": z0 + fk.sum(2)}


def cf_based(x, p, s0):
    q, k, v = bh(x["q"]), bh(x["k"]), bh(x["v"])
    T, K = q.shape[2], q.shape[3]
    s = K**-0.5 * (q @ k.transpose(-1, -2))
    w = (1 + s + s**2 / 2) * causal(T)
    return bh((w @ v) / w.sum(-1, keepdim=True)), {}


def cf_retnet(x, p, s0):
    q, k, v = bh(x["q"]), bh(x["k"]), bh(x["v"])
    B, H, T, K = q.shape
    V = v.shape[-1]
    S0 = s0.get("S", torch.zeros(B, H, K, V, dtype=F64))
    gamma = p["gamma"].view(1, H, 1, 1)
    ar = torch.arange(T, dtype=F64)
    dist = ar.view(T, 1) - ar.view(1, T)
    decay = torch.where(causal(T), gamma ** dist.clamp(min=0), torch.zeros(()))  # gamma^(t - u), u <= t
    o = (q @ k.transpose(-1, -2) * decay) @ v + gamma ** (ar + 1).view(1, 1, T, 1) * (q @ S0)
    w_last = gamma ** (T - 1 - ar).view(1, 1, T, 1)
    S = gamma ** T * S0 + k.transpose(-1, -2) @ (w_last * v)
    return bh(K**-0.5 * o), {"S": S}


def cf_gla(x, p, s0):
    q, k, v, g = bh(x["q"]), bh(x["k"]), bh(x["v"]), bh(x["g"])
    B, H, T, K = q.shape
    V = v.shape[-1]
    S0 = s0.get("S", torch.zeros(B, H, K, V, dtype=F64))
    G = g.cumsum(2)  # [B, H, T, K]
    # A[t, u] = sum_i q_t[i] exp(G_t[i] - G_u[i]) k_u[i], u <= t
    A = torch.einsum("bhti,bhtui,bhui->bhtu", q, masked_exp_diff(G), k)
    o = A @ v + (q * G.exp()) @ S0
    G_last = G[:, :, -1:]  # [B, H, 1, K]
    S = G_last.exp().transpose(-1, -2) * S0 + (k * (G_last - G).exp()).transpose(-1, -2) @ v
    return bh(K**-0.5 * o), {"S": S}


def cf_mamba2(x, p, s0):
    xx, Bm, C, dt = bh(x["x"]), bh(x["B"]), bh(x["C"]), bh(x["dt"])  # dt [B, H, T]
    Bsz, H, T, P = xx.shape
    N = Bm.shape[-1]
    h0 = s0.get("h", torch.zeros(Bsz, H, N, P, dtype=F64))
    A, D = p["A"].view(1, H, 1), p["D"].view(1, H, 1, 1)
    c = A * dt.cumsum(2)  # A * cumdt_t  [B, H, T]
    L = masked_exp_diff(c)  # exp(A (cumdt_t - cumdt_u)), u <= t
    y = ((C @ Bm.transpose(-1, -2)) * L * dt.unsqueeze(2)) @ xx + c.exp().unsqueeze(-1) * (C @ h0) + D * xx
    w_last = (c[:, :, -1:] - c).exp() * dt  # [B, H, T]
    h = c[:, :, -1].exp().view(Bsz, H, 1, 1) * h0 + (Bm * w_last.unsqueeze(-1)).transpose(-1, -2) @ xx
    return bh(y), {"h": h}


def _delta_ut(q, k, v, beta, g, S0):
    """The (gated) delta rule in closed form via the UT transform, all tokens as one chunk.

    With Gam_t = exp(sum_{r<=t} g_r), S_t = Gam_t S0 + sum_{s<=t} (Gam_t / Gam_s) k_s u_s^T where the pseudo-values
    u solve the unit lower-triangular system (I + strict_tril(beta_t (k_t.k_s) Gam_t/Gam_s)) U = beta (V - Gam K S0).
    """
    T, K = q.shape[2], q.shape[3]
    G = g.cumsum(2)  # [B, H, T]
    dec = masked_exp_diff(G)  # Gam_t / Gam_s, s <= t
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
    A = torch.eye(T, dtype=F64) + torch.where(strict, beta.unsqueeze(-1) * (k @ k.transpose(-1, -2)) * dec, 0.0)
    rhs = beta.unsqueeze(-1) * (v - G.exp().unsqueeze(-1) * (k @ S0))
    U = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    o = G.exp().unsqueeze(-1) * (q @ S0) + ((q @ k.transpose(-1, -2)) * dec) @ U
    w_last = (G[:, :, -1:] - G).exp().unsqueeze(-1)
    S = G[:, :, -1].exp()[..., None, None] * S0 + (k * w_last).transpose(-1, -2) @ U
    return K**-0.5 * o, S


def _delta_loop(q, k, v, beta, g, S):
    """The (gated) delta rule as an explicit loop of K x K matrix products (a second, naive implementation)."""
    K = q.shape[-1]
    eye = torch.eye(K, dtype=F64)
    outs = []
    for t in range(q.shape[2]):
        kt, vt, bt = k[:, :, t].unsqueeze(-1), v[:, :, t].unsqueeze(-2), beta[:, :, t, None, None]
        S = g[:, :, t, None, None].exp() * ((eye - bt * kt @ kt.transpose(-1, -2)) @ S) + bt * kt @ vt
        outs.append(K**-0.5 * (q[:, :, t].unsqueeze(-2) @ S).squeeze(-2))
    return torch.stack(outs, 2), S


def _delta_args(x, s0):
    q, k, v, beta = bh(x["q"]), bh(x["k"]), bh(x["v"]), bh(x["beta"])
    g = bh(x["g"]) if "g" in x else torch.zeros_like(beta)
    B, H, T, K = q.shape
    S0 = s0.get("S", torch.zeros(B, H, K, v.shape[-1], dtype=F64))
    return q, k, v, beta, g, S0


def cf_deltanet(x, p, s0):
    o, S = _delta_ut(*_delta_args(x, s0))
    return bh(o), {"S": S}


cf_gated_deltanet = cf_deltanet


def cf_hgrn(x, p, s0):
    xx, f = bh(x["x"]), bh(x["f"])
    B, H, T, D = xx.shape
    h0 = s0.get("h", torch.zeros(B, H, D, dtype=F64))
    Lf = f.log().cumsum(2)  # [B, H, T, D]
    # h_t = sum_{u<=t} (prod_{u<r<=t} f_r) (1 - f_u) x_u + (prod_{r<=t} f_r) h0
    o = torch.einsum("bhtud,bhud->bhtd", masked_exp_diff(Lf), (1 - f) * xx) + Lf.exp() * h0.unsqueeze(2)
    return bh(o), {"h": o[:, :, -1]}


def cf_mamba(x, p, s0):
    xx, dt, Bm, C = bh(x["x"]), bh(x["dt"]), bh(x["B"]), bh(x["C"])  # x, dt [B, H, T, P]; B, C [B, H, T, N]
    Bsz, H, T, P = xx.shape
    N = Bm.shape[-1]
    h0 = s0.get("h", torch.zeros(Bsz, H, N, P, dtype=F64))
    A, D = p["A"].view(1, H, 1, N, P), p["D"].view(1, H, 1, P)
    c = (dt.unsqueeze(3) * A).cumsum(2)  # sum_{r<=t} dt_r[p] A[n, p]   [B, H, T, N, P]
    h = torch.einsum("bhtunp,bhun,bhup->bhtnp", masked_exp_diff(c), Bm, dt * xx) + c.exp() * h0.unsqueeze(2)
    y = torch.einsum("bhtn,bhtnp->bhtp", C, h) + D * xx
    return bh(y), {"h": h[:, :, -1]}


def _s4d_conv(u, log_dt, A_re, A_im, C_re, C_im, h0):
    """y = K * u with K_l = 2 Re(sum_n C_n dB_n dA_n^l) (explicit Toeplitz matrix), plus the initial state's
    contribution 2 Re(sum_n C_n dA_n^(t+1) h0_n). Channels are the leading dims of the params: u [B, *c, T]."""
    T = u.shape[-1]
    A = torch.complex(A_re, A_im)  # [*c, N]
    C = torch.complex(C_re, C_im)
    dtA = log_dt.exp().unsqueeze(-1) * A
    dA = dtA.exp()
    dB = (dA - 1) / A
    ell = torch.arange(T, dtype=F64)
    powers = torch.exp(ell.view(-1, 1) * dtA.unsqueeze(-2))  # dA^l as exp(l dt A)  [*c, T, N]
    kern = 2 * (powers * (C * dB).unsqueeze(-2)).sum(-1).real  # [*c, T]
    dist = (ell.view(T, 1) - ell.view(1, T)).long()
    toeplitz = torch.where(causal(T), kern[..., dist.clamp(min=0)], 0.0)  # [*c, T, T]
    y = (toeplitz @ u.unsqueeze(-1)).squeeze(-1)
    y = y + 2 * (powers * dA.unsqueeze(-2) * (C * h0).unsqueeze(-2)).sum(-1).real
    back = torch.exp((T - 1 - ell).view(-1, 1) * dtA.unsqueeze(-2))  # dA^(T-1-u)
    h = dA**T * h0 + (back * dB.unsqueeze(-2) * u.unsqueeze(-1).to(C128)).sum(-2)
    return y, h


def cf_s4d(x, p, s0):
    u = bh(x["u"])  # [B, H, T]
    B, H, T = u.shape
    N = p["A_re"].shape[-1]
    h0 = s0.get("h", torch.zeros(B, H, N, dtype=C128))
    y, h = _s4d_conv(u, p["log_dt"], p["A_re"], p["A_im"], p["C_re"], p["C_im"], h0)
    y = y + p["D"].view(1, H, 1) * u
    return bh(y), {"h": h}


def cf_h3(x, p, s0):
    q, k, v = x["q"], x["k"], x["v"]  # [B, T, H, P]
    B, T, H, P = q.shape
    w = p["w"]  # [H, P, M]
    M = w.shape[-1]
    N = p["A_re"].shape[-1]
    h0 = s0.get("h", torch.zeros(B, H, P, N, dtype=C128))
    past = s0.get("k@past", torch.zeros(B, H, M - 1, P, dtype=F64))  # the M - 1 tokens of k before t = 0
    # shift SSM: ks_t = sum_{m<M} w[:, m] k_{t-m} as a depthwise causal conv1d over [past, k]
    kc = torch.cat([past.transpose(1, 2), k], 1).reshape(B, T + M - 1, H * P).transpose(1, 2)  # [B, H*P, M-1+T]
    ks = F.conv1d(kc, w.reshape(H * P, 1, M).flip(-1), groups=H * P)
    xs = ks.reshape(B, H, P, T) * v.permute(0, 2, 3, 1)
    y, h = _s4d_conv(xs, p["log_dt"], p["A_re"], p["A_im"], p["C_re"], p["C_im"], h0)
    k_past = torch.cat([past.transpose(1, 2), k], 1)[:, T:].transpose(1, 2)  # the last M - 1 tokens
    return q * y.permute(0, 3, 1, 2), {"h": h, "k@past": k_past}


def _sdpa(x, mask):
    q, k, v = bh(x["q"]), bh(x["k"]), bh(x["v"])
    return bh(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), {}


def _positions(T):
    ar = torch.arange(T)
    return ar.view(T, 1), ar.view(1, T)  # t, u


def cf_softmax_attention(x, p, s0):
    return _sdpa(x, causal(x["q"].shape[1]))


def cf_sliding_window_attention(x, p, s0):
    t, u = _positions(x["q"].shape[1])
    W = CONSTS["sliding_window_attention"]["W"]
    return _sdpa(x, (t - W < u) & (u <= t))


def cf_segment_attention(x, p, s0):
    t, u = _positions(x["q"].shape[1])
    L = CONSTS["segment_attention"]["L"]
    return _sdpa(x, (L * (torch.div(t, L, rounding_mode="floor") - 1) <= u) & (u <= t))


CLOSED = {n: globals()[f"cf_{n}"] for n in NAMES}


def closed_form(name, x, p=None, s0=None):
    return CLOSED[name](x, p or {}, s0 or {})


def default_params(name: str, H: int) -> dict:
    m = mixer(name)
    if not (m.meta["params"] or m.meta["buffers"]):
        return {}
    sz = {k: v for k, v in sizes_for(name).items() if k != "N"}  # N keeps the file's default where it has one
    if "N" in sizes_for(name) and m.meta["sizes"]["N"] is None:
        sz["N"] = SIZES["N"]
    return m.parameters_init(H, dtype=F64, **sz)


def shape_id(name, B, T, H):
    return f"{name}-B{B}-T{T}-H{H}"


CASES = [pytest.param(n, *s, id=shape_id(n, *s)) for n in NAMES for s in SHAPES]


# ---- tests ----------------------------------------------------------------------------------------


def test_every_example_has_a_closed_form():
    assert sorted(p.stem for p in EXAMPLES.glob("*.mix")) == sorted(NAMES)


@pytest.mark.parametrize("name,B,T,H", CASES)
def test_closed_form_default_params(name, B, T, H):
    """No parameters passed: the file's initialisers (as parameters_init returns them) are used."""
    m = mixer(name)
    x = inputs_for(name, B, T, H)
    o = m.reference(**x)
    want, _ = closed_form(name, x, default_params(name, H))
    assert_close(o, want)
    assert o.dtype == F64


@pytest.mark.parametrize("name,B,T,H", [pytest.param(n, *s, id=shape_id(n, *s)) for n in WITH_PARAMS
                                        for s in SHAPES[:2]])
def test_closed_form_explicit_params(name, B, T, H):
    """Parameters passed as keyword arguments are the ones used (they differ from the defaults)."""
    m = mixer(name)
    x = inputs_for(name, B, T, H, seed=3)
    p = explicit_params(name, H)
    defaults = m.parameters_init(H, dtype=F64, **sizes_for(name))
    assert all(not torch.equal(p[k], defaults[k]) for k in p)
    o = m.reference(**x, **p)
    want, _ = closed_form(name, x, p)
    assert_close(o, want)
    if T > 1:  # at T = 1 a decay (retnet's gamma) does not enter the output
        assert rel_err(o, closed_form(name, x, defaults)[0]) > 1e-6  # the passed values matter


@pytest.mark.parametrize("name,B,T,H", [pytest.param(n, *s, id=shape_id(n, *s)) for n in STATEFUL
                                        for s in SHAPES])
def test_closed_form_initial_and_final_state(name, B, T, H):
    """A nonzero initial state enters the closed form (e.g. q_t^T decay_t S_0); the final state matches too."""
    m = mixer(name)
    x = inputs_for(name, B, T, H, seed=5)
    p = explicit_params(name, H) if name in WITH_PARAMS else {}
    s0 = random_states(name, B, H, state_sizes(name, p))
    o, fin = m.reference(**x, **p, initial_state=s0, output_final_state=True)
    want, want_fin = closed_form(name, x, p, s0)
    assert_close(o, want)
    assert_states_close(fin, want_fin)
    # and from zero: output_final_state without initial_state
    o, fin = m.reference(**x, **p, output_final_state=True)
    want, want_fin = closed_form(name, x, p)
    assert_close(o, want)
    assert_states_close(fin, want_fin)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"], ids=lambda n: f"{n}-B2-T13-H3")
def test_delta_rule_ut_transform_matches_an_explicit_loop(name):
    """The two independent delta-rule implementations of this file agree, and the reference with both."""
    m = mixer(name)
    x = inputs_for(name, 2, 13, 3, seed=23)
    s0 = random_states(name, 2, 3, sizes_for(name))
    args = _delta_args(x, s0)
    o_ut, S_ut = _delta_ut(*args)
    o_loop, S_loop = _delta_loop(*args)
    assert_close(o_ut, o_loop, "UT transform vs loop")
    assert_close(S_ut, S_loop, "UT transform vs loop, final state")
    o, fin = m.reference(**x, initial_state=s0, output_final_state=True)
    assert_close(o, bh(o_loop))
    assert_close(fin["S"], S_loop)


def test_partial_initial_state():
    """An initial state may name only some states; the others start at zero."""
    m = mixer("linear_attention")
    x = inputs_for("linear_attention", 2, 13, 3, seed=29)
    s0 = random_states("linear_attention", 2, 3, sizes_for("linear_attention"))
    for given in ({"S": s0["S"]}, {"z": s0["z"]}):
        o, fin = m.reference(**x, initial_state=given, output_final_state=True)
        want, want_fin = closed_form("linear_attention", x, {}, given)
        assert_close(o, want)
        assert_states_close(fin, want_fin)


def _split_cases():
    out = []
    for n in STATEFUL:
        for split in (1, 6, 12):
            out.append(pytest.param(n, split, id=f"{shape_id(n, 2, 13, 3)}-split{split}"))
    return out


@pytest.mark.parametrize("name,split", _split_cases())
def test_state_round_trip(name, split):
    """Full run == first part (output_final_state) then the rest (initial_state = that final state)."""
    B, T, H = 2, 13, 3
    m = mixer(name)
    x = inputs_for(name, B, T, H, seed=11)
    p = explicit_params(name, H) if name in WITH_PARAMS else {}
    s0 = random_states(name, B, H, state_sizes(name, p))
    for init in (None, s0):
        o, fin = m.reference(**x, **p, initial_state=init, output_final_state=True)
        first = {k: v[:, :split] for k, v in x.items()}
        rest = {k: v[:, split:] for k, v in x.items()}
        o1, mid = m.reference(**first, **p, initial_state=init, output_final_state=True)
        o2, fin2 = m.reference(**rest, **p, initial_state=mid, output_final_state=True)
        assert_close(torch.cat([o1, o2], 1), o, "split output")
        assert_states_close(fin2, fin)
        # the final state returned without output_final_state is not returned at all
        assert isinstance(m.reference(**x, **p, initial_state=init), torch.Tensor)


def test_h3_carries_its_fir_history_in_the_state():
    """h3 reads k[t - m]: the last M - 1 tokens of k are part of the state ('k@past', oldest first)."""
    B, T, H = 2, 13, 3
    m = mixer("h3")
    x = inputs_for("h3", B, T, H, seed=11)
    _, fin = m.reference(**x, output_final_state=True)
    M = m.meta["consts"]["M"]
    assert torch.equal(fin["k@past"], x["k"][:, T - (M - 1):].transpose(1, 2).to(fin["k@past"].dtype))


VARLEN = [[0, 5, 5, 12], [0, 0, 7, 12], [0, 12]]


@pytest.mark.parametrize("name", NAMES, ids=lambda n: f"{n}-B1-T12-H3")
@pytest.mark.parametrize("cu", VARLEN, ids=lambda c: "cu" + "_".join(map(str, c)))
def test_varlen(name, cu):
    """Packed sequences (B = 1, cu_seqlens, an empty one included) == each sequence run on its own."""
    H, T = 3, cu[-1]
    m = mixer(name)
    x = inputs_for(name, 1, T, H, seed=13)
    p = explicit_params(name, H) if name in WITH_PARAMS else {}
    n = len(cu) - 1
    cu_t = torch.tensor(cu)
    inits = [None]
    if name in STATEFUL:
        inits.append(random_states(name, n, H, state_sizes(name, p)))
    # an attention mixer's state is its key/value cache, one length per sequence: not stackable when they differ
    ragged = name not in STATEFUL and bool(m.meta["states"]) and len({b - a for a, b in zip(cu, cu[1:])}) > 1
    for init in inits:
        res = m.reference(**x, **p, cu_seqlens=cu_t, initial_state=init, output_final_state=not ragged)
        o, fin = (res, None) if ragged else res
        o_plain = m.reference(**x, **p, cu_seqlens=cu_t, initial_state=init)
        assert_close(o_plain, o)
        assert o.shape == x[next(iter(x))].shape[:3] + o.shape[3:]
        outs, finals = [], []
        for i in range(n):
            st = None if init is None else {k: v[i : i + 1] for k, v in init.items()}
            if cu[i + 1] == cu[i]:
                finals.append(st if st is not None else {})
                continue
            seg = {k: v[:, cu[i] : cu[i + 1]] for k, v in x.items()}
            o_i, f_i = m.reference(**seg, **p, initial_state=st, output_final_state=True)
            want_i, want_f = closed_form(name, seg, p or default_params(name, H), st)
            assert_close(o_i, want_i, f"sequence {i}")
            outs.append(o_i)
            finals.append(f_i)
            if name in STATEFUL:
                assert_states_close(f_i, want_f)
        assert_close(o, torch.cat(outs, 1), "packed output")
        if name in STATEFUL:
            for k in m.meta["states"]:
                got = fin[k]
                for i, f in enumerate(finals):
                    if k in f:
                        assert_close(got[i : i + 1], f[k], f"final state '{k}' of sequence {i}")
                    else:  # an empty sequence without an initial state: zero
                        assert torch.count_nonzero(got[i]) == 0
                assert got.shape[0] == n
        elif fin:  # an attention mixer's key/value cache (one sequence): its inputs' last tokens [1, H, Tc, width]
            assert set(fin) == set(m.meta["states"])
            for k, c in fin.items():
                assert_close(c, x[k].transpose(1, 2)[:, :, x[k].shape[1] - c.shape[2]:], f"cache '{k}'")
        else:
            assert not fin  # no states: None or {}


# ---- gradients ---------------------------------------------------------------------------------


def _gradcheck(name, B, T, H, param_names=(), with_state=False, sizes=None):
    m = mixer(name)
    sz = sizes or sizes_for(name)
    x = m.random_inputs(B, T, H, dtype=F64, seed=17, **sz)
    p = m.parameters_init(H, dtype=F64, **sz)
    p = {k: p[k] for k in param_names}
    s0 = random_states(name, B, H, state_sizes(name, p, sz), seed=19) if with_state else {}
    names = list(x) + list(p) + [f"state:{k}" for k in s0]
    leaves = [t.clone().requires_grad_(True) for t in [*x.values(), *p.values(), *s0.values()]]

    def fn(*args):
        kw = dict(zip(names, args, strict=True))
        inp = {k: v for k, v in kw.items() if not k.startswith("state:")}
        st = {k[6:]: v for k, v in kw.items() if k.startswith("state:")}
        if not s0:
            return m.reference(**inp)
        o, fin = m.reference(**inp, initial_state=st, output_final_state=True)
        return (o, *fin.values())

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_mamba2():
    _gradcheck("mamba2", 1, 4, 2, ("A", "D"), with_state=True, sizes={"N": 2, "P": 2})


def test_gradcheck_gla():
    _gradcheck("gla", 1, 4, 2, with_state=True, sizes={"K": 2, "V": 3})


def test_gradcheck_s4d():
    _gradcheck("s4d", 1, 5, 2, ("log_dt", "A_re", "A_im", "C_re", "C_im", "D"), sizes={"N": 3})


def test_gradcheck_sliding_window():
    _gradcheck("sliding_window_attention", 1, 6, 2, sizes={"K": 2, "V": 3})


# ---- the catalogue's defaults ------------------------------------------------------------------


def test_default_parameters_follow_the_catalogue():
    H = 4
    g = mixer("retnet").parameters_init(H, dtype=F64)["gamma"]
    assert_close(g, 1 - 2.0 ** (-5 - torch.arange(H, dtype=F64)))
    p = mixer("mamba2").parameters_init(H, dtype=F64)
    assert ((p["A"] <= -1) & (p["A"] >= -16)).all() and torch.equal(p["D"], torch.ones(H, dtype=F64))
    p = mixer("mamba").parameters_init(H, N=6, P=3, dtype=F64)
    assert torch.equal(p["A"], -(torch.arange(6, dtype=F64) + 1).view(1, 6, 1).expand(H, 6, 3))
    assert torch.equal(p["D"], torch.ones(H, 3, dtype=F64))
    p = mixer("s4d").parameters_init(H, dtype=F64)  # N = 64 by default
    assert p["A_re"].shape == (H, 64) and (p["A_re"] == -0.5).all()
    assert_close(p["A_im"], (math.pi * torch.arange(64, dtype=F64)).expand(H, 64))
    assert ((p["log_dt"] >= math.log(1e-3)) & (p["log_dt"] <= math.log(1e-1))).all()
    assert torch.equal(p["D"], torch.ones(H, dtype=F64))
    p = mixer("h3").parameters_init(H, P=3, dtype=F64)
    assert p["w"].shape == (H, 3, 4) and p["A_re"].shape == (H, 3, 64) and "D" not in p
