"""Emit the chunked form of a program: a PyTorch prologue forming q', k', v' and the log decays from the
analysis's normal form (:mod:`.plan`), one call of the chunked kernels (:func:`chunk_recurrence` or
:func:`chunk_normalised` of :mod:`.ops`), and an epilogue (output gate, skip, normaliser division);
``BACKEND`` registers the form, its support modules pasted into the generated module in order.
"""

from __future__ import annotations

from mixc.analysis import Analysis, _flatten_mul, product, show

from ..reference import prologue
from .emit_features import (
    FEATURE_PAD,
    _polynomial_of_one_pair,
    _power_of_one_pair,
    emit_chunked_features,
    plan_features,
)
from .emit_tensors import _as_btd, _den_fn_expr, _feature_emitter, _header, _is_number, _per_head
from .plan import ChunkPlan, NoChunkedForm, _const, _kernel_skip, _key_scale, _normaliser_in_kernel, plan


def emit_chunked(a: Analysis, cp: ChunkPlan) -> list[str]:
    """Lines of ``chunked(inputs, params, states, sizes, output_final_state, cu_seqlens)``."""
    p = a.program
    lines = _header(f"The chunked form of {p.name}: q', k', v' and log decays in PyTorch, then one chunked\n"
                    f"    kernel for the {a.transition} recurrence of state {cp.state}"
                    + (f" (with its normaliser {cp.normaliser}, divided in the kernel)" if _normaliser_in_kernel(cp)
                       else f" (with its normaliser {cp.normaliser} as a value column)" if cp.normaliser else ""))
    extra = [n for n in (cp.q, cp.k, cp.v, cp.g, cp.gate, cp.skip) if n is not None]
    em = prologue(p, lines, extra)  # decays and the epilogue: in the compute dtype (fp32 at least)
    fe = _feature_emitter(p, em)  # q', k', v': in the kernels' input dtype
    K, V = em.sizes_var[cp.key.axis], em.sizes_var[cp.value.axis]
    upd = next((eq for eq in p.updates if eq.target == cp.state), None)
    src = p.source.path
    where_u = f"{src}:{upd.pos.line}" if upd is not None and upd.pos else src
    where_o = f"{src}:{p.output.pos.line}" if p.output.pos else src
    em.emit(f"# k'_t = {show(cp.k)},  v'_t = {show(cp.v)}  (the update of {cp.state}, {where_u})")
    em.emit(f"# q'_t = {show(cp.q)}  (the output {p.output.target}, {where_o})")
    # number factors of q' (such as K ** -0.5) scale the kernel's output instead of a copy of q
    numbers, tensors = [], []
    for f in _flatten_mul(cp.q):
        (numbers if _is_number(f) else tensors).append(f)
    scale = " * ".join(em._paren(em.val(f, "pre")[0]) for f in numbers) or "1.0"
    q = _as_btd(fe, product(tensors) if tensors else _const(1), (cp.key,), f"B, H, T, {K}")
    kscale, k_rest = _key_scale(cp)
    k = _as_btd(fe, k_rest, (cp.key,), f"B, H, T, {K}")
    v = _as_btd(fe, cp.v, (cp.value,), f"B, H, T, {V}")
    gargs = ""
    if cp.decay != "none":
        em.emit(f"# log decay ({cp.decay}): {show(cp.g)}")
        if cp.decay == "scalar":
            g = _as_btd(em, cp.g, (), "B, H, T")
            gargs = f", gs={g}"
        elif cp.decay == "key":
            g = _as_btd(em, cp.g, (cp.key,), f"B, H, T, {K}")
            gargs = f", gk={g}"
        else:
            g = _as_btd(em, cp.g, (cp.value,), f"B, H, T, {V}")
            gargs = f", gv={g}"
    if kscale is not None:
        ks = _as_btd(em, kscale, (), "B, H, T")
        em.emit(f"# key scale {show(kscale)}: the kernels multiply k by it as they load k")
        gargs += f", kscale={ks}"
    st = f"states.get({cp.state!r})"
    em.emit(f"h0 = {st}")
    tr = ".transpose(-1, -2)" if cp.transposed else ""
    em.emit(f"h0 = None if h0 is None else as_dtype(h0, torch.float32){tr}")
    skip = cp.skip
    if (coef := _kernel_skip(cp)) is not None:
        sk = em.fresh()
        if (per_head := _per_head(em, coef, ())) is not None:  # [H] as it is (no views)
            em.emit(f"{sk} = {per_head}  # skip {show(skip)}: added in the kernel")
        else:
            e, lay = em.val(coef, "pre")
            em.emit(f"{sk} = ({em.tensor(e, lay)}).expand(1, H).reshape(H)  # skip {show(skip)}: added in the kernel")
        gargs += f", skip={sk}"
        skip = None
    if cp.normaliser:
        em.emit(f"z0 = states.get({cp.normaliser!r})")
        em.emit("z0 = None if z0 is None else as_dtype(z0, torch.float32)")
        gargs += ", h0=h0, z0=z0"
    else:
        gargs += ", h0=h0"
    # the kernel's output stays in the inputs' dtype unless an epilogue follows (then fp32)
    epilogue = cp.gate is not None or skip is not None
    args = (f"as_dtype({q}, dt_in), as_dtype({k}, dt_in), as_dtype({v}, dt_in){gargs}, cu_seqlens=cu_seqlens, "
            f"output_final_state=output_final_state, scale={scale}" + (", out_dtype=real)" if epilogue else ")"))
    if cp.normaliser and cp.den_fn is not None:
        X, fden = cp.den_fn
        em.emit(f"# o = (q'^T {cp.state}) / f(d), d = q'^T {cp.normaliser}, f(d) = {show(fden)}: "
                f"{cp.normaliser} as one more value column, f and the division in PyTorch (autograd)")
        em.emit("def den_fn(d):  # [B, T, H, 1] fp32")
        em.emit(f"    return {_den_fn_expr(em, fden, X)}")
        em.emit(f"o, ht, zt = chunk_normalised({args[:-1]}, den_fn=den_fn)")
        final = (f"{{{cp.state!r}: as_dtype(ht{tr}, real), {cp.normaliser!r}: as_dtype(zt, real)}} "
                 "if output_final_state else None")
    elif cp.normaliser:
        em.emit(f"# o = (q'^T {cp.state}) / (q'^T {cp.normaliser}): " + ("the kernels carry it and divide"
                if _normaliser_in_kernel(cp) else f"{cp.normaliser} as one more value column"))
        em.emit(f"o, ht, zt = chunk_normalised({args}")
        final = (f"{{{cp.state!r}: as_dtype(ht{tr}, real), {cp.normaliser!r}: as_dtype(zt, real)}} "
                 "if output_final_state else None")
    else:
        em.emit(f"o, ht = chunk_recurrence({args}")
        final = f"{{{cp.state!r}: as_dtype(ht{tr}, real)}} if output_final_state else None"
    if cp.gate is not None:
        gname = _as_btd(em, cp.gate, (cp.value,), f"B, H, T, {V}")
        em.emit(f"o = o * {gname}")
    if skip is not None:
        sname = _as_btd(em, skip, (cp.value,), f"B, H, T, {V}")
        em.emit(f"o = o + {sname}")
    em.emit(f"return o, ({final})")
    return lines


def chunk_plan_or_reason(a: Analysis) -> tuple[ChunkPlan | None, str]:
    try:
        return plan(a), "chunked kernel emitted"
    except NoChunkedForm as ex:
        return None, str(ex)


def describe(a: Analysis) -> list[str]:
    """What the chunked form hands to the kernels and what stays in PyTorch, in words (for ``mixc
    explain``); empty when there is no chunked form."""
    try:
        if a.kind == "attention":
            fp = plan_features(a)
            blocks = []
            for b in fp.blocks:
                e = len(b.pairs)
                blocks.append("1" if not e else f"({show(b.pairs[0][0])})^{e} as a symmetric power"
                              if _power_of_one_pair(b) else " x ".join(f"({show(A)})" for A, _ in b.pairs))
            poly = _polynomial_of_one_pair(fp.blocks)
            if poly is not None:
                blocks = [f"a polynomial of degree {poly[2]} in ({show(poly[0])}) . ({show(poly[1])}), as one weighted "
                          "symmetric power of [x, 1] per side"]
            where = "one kernel per side, power_features" if poly is not None else "PyTorch"
            pad = f", rounded up to a multiple of {FEATURE_PAD} with zero features (aligned rows)" if poly else ""
            out = [f"feature maps ({where}): {' + '.join(blocks)}; width {fp.width}, "
                   f"{fp.width_symmetric} as stored{pad}"]
            if fp.normalised:
                out.append("normaliser: carried beside the state by the kernels; the output kernel divides")
            return out
        cp = plan(a)
    except NoChunkedForm:
        return []
    kscale, k_rest = _key_scale(cp)
    out = [f"q' = {show(cp.q)}, k' = {show(k_rest)}, v' = {show(cp.v)} (PyTorch prologue, in the inputs' dtype)"]
    if kscale is not None:
        out.append(f"key scale {show(kscale)}: k' is scaled by it per token as the kernels load it "
                   "(the scaled keys are never stored)")
    if cp.decay != "none":
        out.append(f"log decay ({cp.decay}): {show(cp.g)}, floored at -60 (a decay of 0 weighs e^-60) and summed "
                   "within each 64-token chunk by the kernels")
        if cp.decay == "key":
            out.append("per-key decay: a chunk whose summed gates stay within e^(+-50) of its middle row takes its "
                       "in-chunk products whole on tensor cores; a sharper chunk takes exact 16-row blocks")
            out.append("per-key decay in bf16/fp16 with 64+ keys: read as it is and summed by a tensor-core product "
                       "in the kernels (fp32 sums written only for the backward; no backward: two kernels)")
    if cp.den_fn is not None:
        out.append(f"normaliser {cp.normaliser}: an extra value column; o = num / f(den) with f(den) = "
                   f"{show(cp.den_fn[1])}, a PyTorch epilogue (its gradient by autograd)")
    elif cp.normaliser:
        out.append(f"normaliser {cp.normaliser}: " + ("carried beside the state by the kernels; the output kernel "
                                                       "divides" if _normaliser_in_kernel(cp) else "an extra value "
                                                       f"column (per-{cp.decay} decay); divided in PyTorch"))
    if cp.gate is not None:
        out.append(f"output gate {show(cp.gate)}: PyTorch epilogue")
    if cp.skip is not None:
        out.append(f"skip {show(cp.skip)}: " + ("added by the output kernel" if _kernel_skip(cp) is not None
                                                 else "PyTorch epilogue"))
    return out


def emit_any(a: Analysis) -> tuple[list[str] | None, str]:
    """The chunked form's lines for any analysed program, or None and the reason there is none."""
    try:
        if a.kind == "attention":
            return emit_chunked_features(a, plan_features(a)), "chunked kernel emitted"
        return emit_chunked(a, plan(a)), "chunked kernel emitted"
    except NoChunkedForm as ex:
        return None, str(ex)


def _backend():
    from .. import custom_op, hostint
    from ..registry import FormBackend
    from . import kernels_bwd, kernels_common, kernels_fwd, launch, launcher, ops, power, sequential

    # pasted in this order: each module after the ones it imports from (ops defines its operator at import)
    support = (custom_op, hostint, launcher, kernels_common, kernels_fwd, kernels_bwd, sequential, launch, power, ops)
    return FormBackend(form="chunked", emit=emit_any, support=support, native_varlen=True, describe=describe)


BACKEND = _backend()
