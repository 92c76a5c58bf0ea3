"""The chunked form of an attention-form file with a separable weight w(t, u) = phi(q_t) . psi(k_u):
feature maps in PyTorch (or :func:`power_features` for a polynomial of one dot product), then one
linear-attention call of the chunked kernels (:func:`plan_features`, :func:`emit_chunked_features`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.analysis import Analysis, _flatten_mul, product, show
from mixc.ir import T_VAR, Node, Var
from mixc.lower import rename

from ..reference import prologue
from .emit_tensors import _as_btd, _feature_emitter, _header, _is_number, _scale_by
from .plan import NoChunkedForm, _const

# power_features' width rounded up to a multiple of this with zero features: a 153-wide bf16 row (based at
# K = 16) starts at an odd address and every kernel moves it 2 bytes at a time; a 160-wide one, 16 at a time
FEATURE_PAD = 16


@dataclass
class FeatureBlock:
    """One block of the feature maps: coeff * prod(q-side factors) * (A_1 x ... x A_n) against
    prod(k-side factors) * (B_1 x ... x B_n) (x = flattened outer product)."""

    coeff: float
    pairs: list[tuple[Node, Node]]  # (A over the query token, B over the key token), one per factor
    q_factors: list[Node]
    k_factors: list[Node]


def _power_of_one_pair(b: FeatureBlock) -> bool:
    """Whether a feature block is (a . b)^e of one dot product, e >= 2 (a symmetric power serves it)."""
    return len(b.pairs) > 1 and all(pr == b.pairs[0] for pr in b.pairs)


def _polynomial_of_one_pair(blocks: list[FeatureBlock]) -> tuple[Node, Node, int] | None:
    """(A, B, D) if the feature blocks are the degrees 0 .. D (D >= 1, each once) of one dot product A . B
    of two vectors, with number coefficients only: then the whole map is one weighted symmetric power
    of [A, 1] (power_features: C(K + D, D) features, written by one kernel per side on a GPU)."""
    pairs = {pr for b in blocks for pr in b.pairs}
    degrees = sorted(len(b.pairs) for b in blocks)
    if len(pairs) != 1 or degrees != list(range(len(blocks))) or len(blocks) < 2:
        return None
    if not all(_is_number(f) for b in blocks for f in b.q_factors + b.k_factors):
        return None
    ((A, B),) = pairs
    if any(len([v for v in n.idx if v != T_VAR]) != 1 for n in (A, B)):
        return None
    return A, B, degrees[-1]


@dataclass
class FeaturePlan:
    blocks: list[FeatureBlock]
    value: Node  # v'_t[j]
    value_var: Var
    normalised: bool
    width: str
    width_symmetric: str  # with each power of one pair as its symmetric power


def _to_t(n: Node) -> Node:
    """A key-token expression read at the current token instead (u -> t)."""
    from mixc.ir import U_VAR

    return rename(n, {U_VAR: T_VAR})


def plan_features(a: Analysis) -> FeaturePlan:
    from mixc.analysis import _side
    from mixc.ir import U_VAR

    p = a.program
    if not (a.separable and "chunked" in a.forms):
        raise NoChunkedForm(a.reasons.get("chunked", "the weight is not separable"))
    out = p.output.value
    num, den = (out.src[0], out.src[1]) if out.op == "div" else (out, None)
    for s in (num, den):
        if s is not None and not (s.op == "sum" and s.arg == (U_VAR,)):
            raise NoChunkedForm("the output is not sum(u: w * v) or sum(u: w * v) / sum(u: w)")
    factors = _flatten_mul(num.src[0])
    (j,) = p.output.vars if len(p.output.vars) == 1 else (None,)
    if j is None:
        raise NoChunkedForm("the output must have one value axis")
    vf = [f for f in factors if j in f.idx]
    wf = [f for f in factors if j not in f.idx]
    if any(set(f.idx) - {T_VAR, U_VAR, j} for f in vf) or not vf:
        raise NoChunkedForm("the value factor must depend on the key token and the output axis only")
    w = product(wf) if wf else _const(1)
    if den is not None and den.src[0] != w:
        raise NoChunkedForm("the denominator's weight differs from the numerator's")
    from mixc.analysis import separability

    sep = separability(w)
    if not sep.separable:
        raise NoChunkedForm(sep.reason)
    blocks = []
    for coeff, atoms, ranks in sep.terms:
        pairs = []
        for sym, e in atoms.items():
            node = sep.atom_nodes[sym]
            if len(node.arg) != 1:
                raise NoChunkedForm("a dot product over several indices")
            side_t = [f for f in _flatten_mul(node.src[0]) if _side(f) in ("t", "none")]
            side_u = [f for f in _flatten_mul(node.src[0]) if _side(f) == "u"]
            A = product(side_t) if side_t else _const(1)
            B = _to_t(product(side_u)) if side_u else _const(1)
            pairs += [(A, B)] * int(e)
        qf, kf = [], []
        for sym, e in ranks.items():
            node = sep.rank_one_nodes[sym]
            (kf if _side(node) == "u" else qf).extend([_to_t(node) if _side(node) == "u" else node] * e)
        blocks.append(FeatureBlock(float(coeff), pairs, qf, kf))
    from mixc.analysis import sizes_str

    return FeaturePlan(blocks, _to_t(product(vf)), j, den is not None, a.feature_width or "?",
                       sizes_str(sep.width_symmetric) if sep.width_symmetric is not None else "?")


def emit_chunked_features(a: Analysis, fp: FeaturePlan) -> list[str]:
    """Lines of ``chunked(...)`` for an attention-form file with a separable weight."""
    p = a.program
    poly = _polynomial_of_one_pair(fp.blocks)
    lines = _header(f"The chunked form of {p.name}: the weight w(t, u) factors through feature maps of width\n"
                    f"    {fp.width} ({fp.width_symmetric} with symmetric powers); phi(q) and psi(k) are formed "
                    + (f"by power_features\n    (zero features up to a multiple of {FEATURE_PAD}), then one "
                       if poly is not None else "in PyTorch,\n    then one ")
                    + "linear-attention kernel"
                    + (" that carries the normaliser and divides" if fp.normalised else ""))
    nodes = [n for b in fp.blocks for pair in b.pairs for n in pair] + [n for b in fp.blocks for n in
                                                                       b.q_factors + b.k_factors] + [fp.value]
    em = prologue(p, lines, nodes)
    fe = _feature_emitter(p, em, products=True)  # the feature maps: in the kernels' input dtype
    where = f"{p.source.path}:{p.output.pos.line}" if p.output.pos else p.source.path
    em.emit(f"# w(t, u) = {a.separability.weight}  ({where}); feature width {fp.width}")
    j = fp.value_var
    V = em.sizes_var[j.axis]
    if poly is not None:
        A, B, D = poly
        by_degree = sorted(fp.blocks, key=lambda b: len(b.pairs))
        em.emit(f"# a polynomial of degree {D} in ({show(A)}) . ({show(B)}): one weighted symmetric power of "
                f"[x, 1] per side, width {fp.width_symmetric}")
        em.emit(f"# (rounded up to a multiple of {FEATURE_PAD} with zero features: aligned rows for the kernels)")
        sides = []
        for x, factors in ((A, [[_const(b.coeff), *b.q_factors] for b in by_degree]),
                           (B, [b.k_factors for b in by_degree])):
            (i,) = [v for v in x.idx if v != T_VAR]
            xs = _as_btd(fe, x, (i,), f"B, H, T, {em.sizes_var[i.axis]}")
            coeffs = ", ".join(" * ".join(em._paren(em.val(f, "pre")[0]) for f in fs) or "1.0" for fs in factors)
            sides.append(f"power_features(as_dtype({xs}, dt_in), {D}, ({coeffs}), pad={FEATURE_PAD})")
        em.emit(f"phi_q = {sides[0]}")
        em.emit(f"psi_k = {sides[1]}")
    qs, ks = [], []
    for bi, b in enumerate(fp.blocks if poly is None else []):
        em.emit(f"# feature block {bi}: {b.coeff!r} * " + (" x ".join(f"({show(A)})" for A, _ in b.pairs) or "1"))
        qa, ka = [], []
        for A, B in b.pairs:
            (i,) = [v for v in A.idx if v != T_VAR] or [None]
            qa.append(_as_btd(fe, A, (i,), f"B, H, T, {em.sizes_var[i.axis]}") if i else None)
            (i2,) = [v for v in B.idx if v != T_VAR] or [None]
            ka.append(_as_btd(fe, B, (i2,), f"B, H, T, {em.sizes_var[i2.axis]}") if i2 else None)
        if _power_of_one_pair(b) and qa[0] and ka[0]:
            # (a . b)^e through symmetric powers: C(K + e - 1, e) features instead of K^e
            qterm, kterm = (f"symmetric_power({x[0]}, {len(b.pairs)})" for x in (qa, ka))
        else:
            qterm = f"tensor_product({', '.join(qa)})" if qa else "torch.ones(B, T, H, 1, dtype=dt_in, device=dev)"
            kterm = f"tensor_product({', '.join(ka)})" if ka else "torch.ones(B, T, H, 1, dtype=dt_in, device=dev)"
        qterm += _scale_by(fe, b.q_factors)
        kterm += _scale_by(fe, b.k_factors)
        if b.coeff != 1.0:
            qterm = f"{b.coeff!r} * {qterm}"
        qn, kn = em.fresh(), em.fresh()
        em.emit(f"{qn} = {qterm}")
        em.emit(f"{kn} = {kterm}")
        qs.append(qn)
        ks.append(kn)
    v = _as_btd(fe, fp.value, (j,), f"B, H, T, {V}")
    if poly is None:
        em.emit(f"phi_q = torch.cat([{', '.join(qs)}], dim=-1)  # [B, T, H, {fp.width_symmetric}]")
        em.emit(f"psi_k = torch.cat([{', '.join(ks)}], dim=-1)")
    if fp.normalised:
        em.emit("# o = (phi_q^T S) / (phi_q^T z), z = sum psi_k: the kernels carry z and divide")
        em.emit(f"o, _, _ = chunk_normalised(as_dtype(phi_q, dt_in), as_dtype(psi_k, dt_in), as_dtype({v}, dt_in), "
                "cu_seqlens=cu_seqlens)")
    else:
        em.emit(f"o, _ = chunk_recurrence(as_dtype(phi_q, dt_in), as_dtype(psi_k, dt_in), as_dtype({v}, dt_in), "
                "cu_seqlens=cu_seqlens)")
    em.emit("return o, ({} if output_final_state else None)")
    return lines
