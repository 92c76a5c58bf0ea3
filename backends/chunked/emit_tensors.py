"""Emitting the prologue's tensors as the chunked kernels take them: an IR expression laid out
[B, T, H, ...] in the inputs' own layout where possible (:func:`_as_btd`; no permutes, per-head
values broadcast by stride 0), in the kernels' input dtype (:func:`_feature_emitter`), and the
normaliser's denominator function (:func:`_den_fn_expr`). The recurrent and delta forms reuse them.
"""

from __future__ import annotations

from mixc.analysis import show
from mixc.ir import T_VAR, Node, Var

from ..reference import INFIX, TORCH_UNARY, input_dtype_emitter
from .plan import NoChunkedForm


def _as_btd(em, node: Node, lay_vars: tuple[Var, ...], shape: str) -> str:
    """Emit ``node`` laid out [B, T, H, *lay_vars] (expanded to full size). An input read as
    declared is passed through untouched (no copy, its own dtype)."""
    key = ("btd", node, lay_vars)
    if key in em.memo:
        return em.memo[key]
    if node.op == "input" and node.src[0].op == "iota" and node.src[0].arg == T_VAR and \
            tuple(node.arg[1]) == tuple(lay_vars):
        name = f"inputs[{node.arg[0]!r}]"
    elif _is_number(node):  # a number (a constant decay, v' = 1): one value per head, broadcast (stride 0)
        e, _ = em.val(node, "pre")
        name = em.fresh()
        full = ", ".join(["B, T, H"] + [em.sizes_var[v.axis] for v in lay_vars])
        ones = ", ".join(["1", "1", "H"] + ["1"] * len(lay_vars))
        em.emit(f"{name} = torch.full(({ones}), {e}, dtype={em.rdt}, device=dev).expand({full})  # {show(node)}")
    elif (direct := _elementwise_btd(em, node, lay_vars)) is not None:
        name = em.fresh()
        dims = ", ".join(["B, T, H"] + [v.axis for v in lay_vars])
        em.emit(f"{name} = {direct}  # [{dims}], the inputs' own layout (no permutes)")
    elif (per_head := _per_head(em, node, lay_vars)) is not None:
        name = em.fresh()
        full = ", ".join(["B, T, H"] + [em.sizes_var[v.axis] for v in lay_vars])
        em.emit(f"{name} = ({per_head}).expand({full})  # per head: one value per head at every token (stride 0)")
    else:
        e, lay = em.val(node, "pre")
        e = em.expand(em.tensor(e, lay), lay if lay is not None else (), (T_VAR, *lay_vars))
        perm = ", ".join(["0", "2", "1"] + [str(3 + i) for i in range(len(lay_vars))])
        name = em.fresh()
        em.emit(f"{name} = ({e}).expand({shape}).permute({perm})")
    em.memo[key] = name
    return name


def _per_head(em, node: Node, lay_vars: tuple[Var, ...]) -> str | None:
    """``node`` as one expression over [H, *lay_vars] when it varies with the head (and ``lay_vars``) only:
    an elementwise formula of parameters, as :func:`_elementwise_btd` has it but without the token axis,
    so that it is formed once per head and broadcast over [B, T] by an expand (no copy, no permutes; the
    kernels read a time-invariant scalar decay per head). None for anything else, numbers included."""
    if T_VAR in node.idx or _is_number(node):
        return None
    return _elementwise_btd(em, node, lay_vars, tok=False)


def _elementwise_btd(em, node: Node, lay_vars: tuple[Var, ...], tok: bool = True) -> str | None:
    """``node`` as one expression in the inputs' own [B, T, H, *lay_vars] layout, when it is an
    elementwise formula (numbers, infix operators, the unary functions) of inputs each read as declared
    at token t over exactly ``lay_vars`` and of parameters (per head, over some of ``lay_vars`` in order),
    every operation taking the full layout: then it needs no permute to [B, H, T, ...] and back, nor
    the views' autograd nodes, which a short call pays for on the host. None for anything else."""
    if _is_number(node):
        e, lay = em.val(node, "pre")
        return e if lay is None else None
    if node.op == "input":
        src = node.src[0]
        if tok and src.op == "iota" and src.arg == T_VAR and tuple(node.arg[1]) == tuple(lay_vars):
            return _input_in(em, node, "as_dtype")
        return None
    if node.op in ("param", "buffer"):  # [H, *axes] broadcast onto [B, T, H, *lay_vars] (axes in that order)
        name, axes = node.arg
        if [v for v in lay_vars if v in axes] != list(axes):
            return None
        ix = [":"] + [":" if v in axes else "None" for v in lay_vars]
        while len(ix) > 1 and ix[-1] == ":":
            ix.pop()
        # (on the inputs' device: the call's checks made sure of it)
        return f"as_dtype(params[{name!r}], real)" + (f"[{', '.join(ix)}]" if len(ix) > 1 else "")
    full = (T_VAR, *lay_vars) if tok else tuple(lay_vars)
    if tuple(node.idx) != full or not (node.op == "neg" or node.op in TORCH_UNARY or node.op in INFIX):
        return None
    args = [_elementwise_btd(em, s, lay_vars, tok) for s in node.src]
    if any(a is None for a in args):
        return None
    if node.op in _PROMOTING and em.rdt == "real":  # an input beside an fp32 tensor: no copy of it first
        for i, (a, b) in enumerate((node.src, node.src[::-1])):
            if a.op == "input" and _real_tensor(b):
                args[i] = _input_in(em, a, "promoted")
                break
    if node.op == "neg":
        return f"(-{em._paren(args[0])})"
    if node.op in TORCH_UNARY:
        return f"{TORCH_UNARY[node.op]}({args[0]})"
    return f"({em._paren(args[0])} {INFIX[node.op]} {em._paren(args[1])})"


def _input_in(em, node: Node, cast: str) -> str:
    """An input read at token t in the emitter's dtype, through runtime ``cast`` (as_dtype or promoted)."""
    return f"{cast}(inputs[{node.arg[0]!r}], {em.rdt})"


_PROMOTING = ("add", "sub", "mul", "div")  # arithmetic that type promotion carries out in the wider dtype


def _real_tensor(n: Node) -> bool:
    """Whether :func:`_elementwise_btd`'s expression for ``n`` is a tensor with dimensions in the real
    dtype (fp32, or fp64 for fp64 inputs): a parameter or input (which it converts), or an operation
    with one such operand. Beside it, a bf16 or fp16 operand of +, -, *, / is computed in the real dtype
    by type promotion, as if converted first, without the copy (runtime ``promoted``)."""
    if n.op in ("param", "buffer", "input"):
        return True
    if _is_number(n):
        return False
    return (n.op == "neg" or n.op in TORCH_UNARY or n.op in INFIX) and any(_real_tensor(x) for x in n.src)


def _is_number(n: Node) -> bool:
    """Whether a value is a plain number at run time (built from constants and sizes only)."""
    return not n.idx and all(x.op not in ("input", "param", "buffer", "state", "iota", "head", "rand", "eye")
                             for x in n.walk())


def _scale_by(em, factors: list[Node]) -> str:
    """`` * f`` for each per-token scalar factor (numbers stay numbers)."""
    out = ""
    for f in factors:
        e, lay = em.val(f, "pre")
        out += f" * {em._paren(e)}" if lay is None else f" * {_as_btd(em, f, (), 'B, H, T')}[..., None]"
    return out


def _feature_emitter(p, em, products: bool = False):
    """An emitter for q', k', v' (and feature maps) in the dtype the kernels take (``dt_in``: the
    inputs' own bf16/fp16, else fp32): one rounding per operation instead of fp32 copies of every
    input and a cast at the end. Decays and the epilogue stay with ``em``, in fp32 at least.
    ``products``: feature maps that multiply inputs together (q (x) q of inputs of 1e3 is 1e6), formed
    in fp32 for fp16 inputs, whose range (65504) they would overflow; bf16 has fp32's range."""
    half = "(torch.bfloat16,)" if products else "(torch.bfloat16, torch.float16)"
    em.emit(f"dt_in = x0.dtype if x0.dtype in {half} else torch.float32")
    return input_dtype_emitter(p, em, "dt_in", "lp")


def _den_fn_expr(em, n: Node, X: Node) -> str:
    """f(d) as a PyTorch expression of the tensor ``d`` (the denominator q'^T z, [B, T, H, 1] fp32), for the
    elementwise function f of Readout.den_fn: X (the readout) is ``d``, numbers are numbers."""
    if n == X:
        return "d"
    if _is_number(n):
        return em._paren(em.val(n, "pre")[0])
    args = [_den_fn_expr(em, x, X) for x in n.src]
    if n.op == "neg":
        return f"(-{args[0]})"
    if n.op in TORCH_UNARY:
        return f"{TORCH_UNARY[n.op]}({args[0]})"
    if n.op in ("min", "max") and len(args) == 2:
        a, b = args if not _is_number(n.src[0]) else args[::-1]
        if _is_number(n.src[0]) or _is_number(n.src[1]):
            return f"torch.clamp_{'max' if n.op == 'min' else 'min'}({a}, {b})"  # (max(a, b): b the least)
        return f"torch.{'minimum' if n.op == 'min' else 'maximum'}({a}, {b})"
    if n.op in ("add", "sub", "mul", "div", "pow"):
        return f"({args[0]} {INFIX[n.op]} {args[1]})"
    raise NoChunkedForm(f"the denominator's function {show(n)} is not elementwise arithmetic of numbers "
                        "and the readout")


def _header(doc: str) -> list[str]:
    """The chunked form's signature and its (two-line) docstring."""
    return ["def chunked(inputs, params, states, sizes, output_final_state=False, cu_seqlens=None):",
            f'    """{doc}."""']
