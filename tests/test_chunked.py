"""The chunked form against the reference: outputs, final states and every gradient (inputs,
parameters, initial states), at odd shapes, T = 1, variable-length batches and initial states.

Under TRITON_INTERPRET=1 (CPU, conftest.py) with fp32 products; on a GPU the same tests run the
compiled kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixc

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["linear_attention", "based", "retnet", "gla", "mamba2"]
SIZES = {"K": 5, "V": 7, "N": 6, "P": 3}

SYNTHETIC = """
# A mixer that is no example: a value-axis decay, an output gate, a skip and a learnable scale.
size Dk, Dv
input a[Dk], b[Dk], c[Dv]
input f[Dv] ~ logsigmoid
param w[] = 0.5
state M[Dk, Dv]
M[x, y] = exp(f[y]) * M[x, y] + sigmoid(b[x]) * c[y]
out r[y] = w * sum(x: silu(a[x]) * M[x, y]) * sigmoid(c[y]) + c[y]
"""


# A normaliser under a scalar decay, with feature maps no example has (the kernels carry it and divide)
SYNTHETIC_NORM = """
size Dk, Dv
input a[Dk], b[Dk], c[Dv]
input f[] ~ logsigmoid
state M[Dk, Dv], n[Dk]
M[x, y] = exp(f) * M[x, y] + exp(b[x]) * c[y]
n[x] = exp(f) * n[x] + exp(b[x])
out r[y] = sum(x: sigmoid(a[x]) * M[x, y]) / sum(x: sigmoid(a[x]) * n[x])
"""
# The same under a per-key decay (the normaliser becomes a value column)
SYNTHETIC_KEYNORM = SYNTHETIC_NORM.replace("input f[] ~", "input f[Dk] ~").replace("exp(f) *", "exp(f[x]) *")
# A skip 2 w c (a number times a parameter times the value input): added by the output kernel
SYNTHETIC_SKIP = """
size Dk, Dv
input a[Dk], b[Dk], c[Dv]
input f[] ~ logsigmoid
param w[] = 0.5
state M[Dk, Dv]
M[x, y] = exp(f) * M[x, y] + b[x] * c[y]
out r[y] = sum(x: a[x] * M[x, y]) + 2 * w * c[y]
"""
# A per-token scale of the keys (beta, as mamba2's dt), normalised: the kernels scale k as they load it
SYNTHETIC_KSCALE = """
size Dk, Dv
input a[Dk], b[Dk], c[Dv]
input beta[] ~ sigmoid
input f[] ~ logsigmoid
state M[Dk, Dv], n[Dk]
M[x, y] = exp(f) * M[x, y] + beta * exp(b[x]) * c[y]
n[x] = exp(f) * n[x] + beta * exp(b[x])
out r[y] = sum(x: sigmoid(a[x]) * M[x, y]) / sum(x: sigmoid(a[x]) * n[x])
"""
# Attention form: a cubic polynomial of a dot product with other coefficients than based's (the feature map
# is one weighted symmetric power of [a, 1], C(K + 3, 3) features), not normalised
SYNTHETIC_POLY = """
size Dk, Dv
input a[Dk], b[Dk], c[Dv]
let s = 0.5 * sum(i: a[t, i] * b[u, i])
let w = 1 + 2 * s - s ** 2 / 4 + s ** 3 / 6
mask u <= t
out r[j] = sum(u: w * c[u, j])
"""
SYNTHETICS = {"synthetic_poly": SYNTHETIC_POLY, "synthetic": SYNTHETIC, "synthetic_norm": SYNTHETIC_NORM,
              "synthetic_keynorm": SYNTHETIC_KEYNORM,
              "synthetic_skip": SYNTHETIC_SKIP, "synthetic_kscale": SYNTHETIC_KSCALE}


def load(name):
    if name in SYNTHETICS:
        return mixc.loads(SYNTHETICS[name], f"{name}.mix")
    return mixc.load(ROOT / "examples" / f"{name}.mix")


def sizes_of(m):
    return {k: v for k, v in {**SIZES, "Dk": 5, "Dv": 7}.items() if k in m.meta["sizes"]}


def rel(a, b):
    """Relative RMS error; a reference that is (analytically) zero is compared on an absolute scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-2 * b.numel() ** 0.5))


def run_both(m, x, params, s0, cu=None):
    """(reference outputs, final, grads) in float64 and (chunked ...) in float32."""
    out = []
    for dtype, form in ((torch.float64, "reference"), (torch.float32, "chunked")):
        xs = {k: v.detach().to(DEV, dtype).requires_grad_() for k, v in x.items()}
        ps = {k: v.detach().to(DEV, dtype).requires_grad_() for k, v in params.items()}
        ss = {k: v.detach().to(DEV, dtype).requires_grad_() for k, v in (s0 or {}).items()}
        o, fin = m(**xs, **ps, initial_state=ss or None, output_final_state=True, cu_seqlens=cu, form=form)
        loss = (o * torch.linspace(-1, 1, o.shape[-1], device=DEV, dtype=o.dtype)).square().sum()
        loss = loss + sum((f * 0.1).sum() for f in fin.values())
        loss.backward()
        grads = {k: t.grad for k, t in {**xs, **ps, **ss}.items() if t.grad is not None}
        out.append((o, fin, grads))
    return out


def check(ref, ours, tol=1e-3):
    (ro, rf, rg), (o, f, g) = ref, ours
    assert rel(o, ro) < tol
    assert sorted(f) == sorted(rf)
    for k in rf:
        assert rel(f[k], rf[k]) < tol, k
    assert sorted(g) == sorted(rg)
    for k in rg:
        assert rel(g[k], rg[k]) < tol, k


def states_for(m, n, H, sizes):
    gen = torch.Generator().manual_seed(5)
    bound = {**m.meta["consts_as_sizes"], **sizes}
    out = {}
    for s, sm in m.meta["states"].items():
        x = 0.5 * torch.randn(n, H, *[bound[a] for a in sm["axes"]], generator=gen, dtype=torch.float64)
        out[s] = x.abs() + 0.5 if s == "z" else x  # linear attention's normaliser stays positive
    return out


# T = 37 fits one 64-token chunk; T = 150 crosses two chunk edges and ends in a partial chunk
CASES = [(n, B, T, H) for n in NAMES + list(SYNTHETICS) for (B, T, H) in ((2, 37, 2), (1, 1, 3), (1, 150, 1))]


@pytest.mark.parametrize("name,B,T,H", CASES, ids=[f"{c[0]}-B{c[1]}-T{c[2]}-H{c[3]}" for c in CASES])
def test_chunked_matches_reference(name, B, T, H):
    m = load(name)
    assert "chunked" in m.forms
    sz = sizes_of(m)
    x = m.random_inputs(B, T, H, dtype=torch.float64, seed=T, **sz)
    params = m.parameters_init(H, dtype=torch.float64, **sz)
    params = {k: v * 1.1 for k, v in params.items()}
    check(*run_both(m, x, params, states_for(m, B, H, sz)))
    check(*run_both(m, x, params, None))


@pytest.mark.parametrize("cu", [[0, 5, 5, 20, 37], [0, 70, 70, 150]], ids=["one-chunk", "across-chunks"])
@pytest.mark.parametrize("name", NAMES + list(SYNTHETICS))
def test_chunked_varlen(name, cu):
    m = load(name)
    sz = sizes_of(m)
    x = m.random_inputs(1, cu[-1], 2, dtype=torch.float64, seed=3, **sz)
    params = m.parameters_init(2, dtype=torch.float64, **sz)
    check(*run_both(m, x, params, states_for(m, len(cu) - 1, 2, sz), cu=torch.tensor(cu, device=DEV)))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2)] + ([(torch.bfloat16, 2e-2)] if DEV == "cuda" else []))
def test_chunked_low_precision_inputs(dtype, tol):
    m = load("gla")
    x = m.random_inputs(2, 33, 2, dtype=torch.float64, K=8, V=8)
    ref = m.reference(**x)
    o = m(**{k: v.to(DEV, dtype) for k, v in x.items()}, form="chunked")
    assert o.dtype == dtype and rel(o.cpu(), ref) < tol


def test_the_kernels_carry_the_normaliser_and_the_skip():
    """The generated chunked form hands the normaliser and a per-head skip to the kernels, with no
    PyTorch division or addition around them (per-key decays: the normaliser as a value column)."""
    for name in ("linear_attention", "synthetic_norm"):
        src = load(name).source_code
        body = src[src.index("def chunked("):src.index("chunked.native_varlen")]
        assert "chunk_normalised(" in body and "torch.cat" not in body and "o = o[" not in body
    for name, call in (("based", "power_features(as_dtype(inputs['q'], dt_in), 2,"),
                       ("synthetic_poly", "power_features(as_dtype(inputs['a'], dt_in), 3,")):
        src = load(name).source_code  # width C(K + 2, 2) (C(K + 3, 3)), not 1 + K + K^2 (+ K^3)
        body = src[src.index("def chunked("):src.index("chunked.native_varlen")]
        assert call in body and "torch.cat" not in body, name
    body = load("synthetic_skip").source_code
    body = body[body.index("def chunked("):body.index("chunked.native_varlen")]
    assert "skip=" in body and "o = o +" not in body


def test_elementwise_feature_maps_stay_in_the_inputs_layout():
    """q' = elu(q) + 1 (and sigmoid(a), w * silu(a), mamba2's decay dt * A) is formed on [B, T, H, ...] as
    the inputs are: no permute to [B, H, T, ...] and back (views whose autograd nodes a short call pays
    for). A map with an operation on a parameter alone keeps the general path; both match the reference."""
    for name, want in (("linear_attention", "F.elu(as_dtype(inputs['q'], dt_in)) + 1"),
                       ("synthetic_norm", "torch.sigmoid(as_dtype(inputs['a'], dt_in))"),
                       ("synthetic", "as_dtype(params['w'], real)[:, None] * F.silu("),
                       ("mamba2", "promoted(inputs['dt'], real) * as_dtype(params['A'], real)")):
        src = load(name).source_code
        body = src[src.index("def chunked("):src.index("chunked.native_varlen")]
        assert want in body and ".permute(" not in body, name
    m = mixc.loads("size Dk, Dv\ninput a[Dk], b[Dk], c[Dv]\ninput f[] ~ logsigmoid\nparam w[] = 0.5\n"
                   "state M[Dk, Dv]\nM[x, y] = exp(f) * M[x, y] + b[x] * c[y]\n"
                   "out r[y] = sum(x: exp(w) * a[x] * M[x, y])\n", "expw.mix")
    body = m.source_code[m.source_code.index("def chunked("):m.source_code.index("chunked.native_varlen")]
    assert ".permute(" in body  # exp(w): an operation on a parameter alone
    x = m.random_inputs(2, 37, 3, Dk=5, Dv=4)
    assert rel(m(**{k: v.to(DEV) for k, v in x.items()}, form="chunked").cpu(), m.reference(**x)) < 1e-4


def test_the_kernels_scale_the_keys():
    """A per-token factor of k' (mamba2's dt in dt * B[n]) goes to the kernels as a key scale: the
    prologue never forms the scaled keys."""
    for name, scale in (("mamba2", "inputs['dt']"), ("synthetic_kscale", "inputs['beta']")):
        src = load(name).source_code
        body = src[src.index("def chunked("):src.index("chunked.native_varlen")]
        assert f"kscale={scale}" in body, name
        assert "[:, :, :, None] *" not in body, name  # no [B, H, T, 1] x [B, H, T, K] product


def test_a_normaliser_must_decay_like_its_state():
    """n decaying as exp(2 f) while M decays as exp(f) is no normaliser of M: no chunked form (the
    kernels would give n M's decay)."""
    m = mixc.loads(SYNTHETIC_NORM.replace("n[x] = exp(f) * n[x]", "n[x] = exp(2 * f) * n[x]"), "other.mix")
    assert "chunked" not in m.forms


def test_chunked_is_the_default_for_chunkable_mixers():
    for name in NAMES:
        assert load(name).meta["default_form"] == "chunked"
    for name in ("hgrn", "mamba", "softmax_attention"):
        assert "chunked" not in load(name).forms


def test_kernel_forms_on_cpu_without_the_interpreter_fall_back_or_explain():
    """Without CUDA tensors or TRITON_INTERPRET, form=None runs the reference; form='chunked' says why not."""
    code = (
        "import torch, mixc\n"
        f"m = mixc.load({str(ROOT / 'examples' / 'gla.mix')!r})\n"
        "x = m.random_inputs(1, 4, 1, K=2, V=2)\n"
        "assert torch.equal(m(**x), m.reference(**x))\n"
        "try:\n"
        "    m(**x, form='chunked')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "runs Triton kernels" in r.stdout


def test_chunked_wide_heads():
    """Head widths up to 256 and not powers of two (several key and value blocks)."""
    m = load("gla")
    x = m.random_inputs(1, 21, 1, dtype=torch.float64, seed=4, K=200, V=131)
    check(*run_both(m, x, {}, states_for(m, 1, 1, {"K": 200, "V": 131})))


def test_chunked_mixer_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) over a whole mixer call: argument checks, prologue and the kernels
    (a custom operator under compilation) trace as one graph and give the eager result."""
    m = load("gla")
    x = {k: v.to(DEV) for k, v in m.random_inputs(1, 40, 2, seed=1, K=8, V=8).items()}

    def f(q, k, v, g):
        return m(q=q, k=k, v=v, g=g, form="chunked")

    got = torch.compile(f, fullgraph=True, backend="eager")(**x)
    assert rel(got, f(**x)) < 1e-6


def test_an_input_beside_an_fp32_parameter_is_not_copied_first():
    """mamba2's decay dt * A takes a bf16 or fp16 dt as it is (``promoted``): type promotion computes the
    product in fp32, bit for bit the product of dt converted first, and in one launch rather than two.
    Another dtype is converted (fp64 dt with fp32 inputs: the decay stays fp32)."""
    from mixc.backends.runtime import promoted

    A = -torch.rand(4, dtype=torch.float32) * 3
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        x = torch.randn(2, 5, 4).to(dt)
        got = promoted(x, torch.float32) * A
        assert got.dtype == torch.float32 and torch.equal(got, x.float() * A), dt
        assert (promoted(x, torch.float32) is x) == (dt != torch.float64)
