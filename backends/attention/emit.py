"""Emit the attention form of a program: Triton kernels with the score and mask compiled in, the mask's
tile classifier, and the form function (key/value cache in and out, launch through ``launch.py``).

Everything comes from :func:`plan` (the IR read into sympy); nothing is keyed on a mechanism's name.
"""

from __future__ import annotations

import sympy

from mixc.analysis import Analysis

from .intervals import interval_code
from .kernels import TEMPLATE
from .plan import QK, T_SYM, U_SYM, AttentionPlan, NoAttentionForm, param_symbol, plan
from .printer import NotPrintable, triton_expr


def _ctx(ap: AttentionPlan) -> list[str]:
    """The per-head scalars every score helper takes after (qk, f_t, f_u)."""
    return ["f_h"] + [f"p_{n}" for n in ap.params] + [f"dim_{s}" for s in ap.sizes]


def _helper(name: str, doc: str, expr: sympy.Basic, args: list[str]) -> list[str]:
    return ["@triton.jit", f"def {name}({', '.join(args)}):", f'    """{doc}"""', f"    return {triton_expr(expr)}",
            "", ""]


LOG2E = 1.4426950408889634


def _slope(ap: AttentionPlan) -> sympy.Expr | None:
    """a when the score is s = a qk + b(t, u) with a depending on neither qk nor the positions (one number per
    head: the kernels fold a log2(e) into one multiply and scale dq, dk by a once), else None."""
    a = ap.dscore(QK)
    if a.free_symbols & {QK, T_SYM, U_SYM}:
        return None
    return a


def kernel_source(ap: AttentionPlan) -> list[str]:
    """The jitted helpers (score, its derivatives, the mask) and the kernels, as source lines."""
    ctx = _ctx(ap)
    args = ["qk", "f_t", "f_u", *ctx]
    out = _helper("_attn_score", f"s = {ap.score} (qk = q_t . k_u; t, u positions; head)", ap.score, args)
    a = _slope(ap)
    scaled = a is not None and sympy.expand(ap.score - a * QK) == 0 and bool(a.is_positive)
    if a is not None:
        rest = sympy.expand(ap.score - a * QK)
        out += _helper("_attn_qk_scale", f"the score's slope ds/dqk = {a}, times log2(e)", a * LOG2E, ctx)
        body = "qk * qk_scale" if rest == 0 else f"qk * qk_scale + {triton_expr(rest * LOG2E)}"
        out += ["@triton.jit", f"def _attn_score2({', '.join(['qk', 'f_t', 'f_u', 'qk_scale', *ctx])}):",
                f'    """s * log2(e) = qk * qk_scale + ({rest}) * log2(e) (qk_scale from _attn_qk_scale)"""',
                f"    return {body}", "", ""]
        out += ["@triton.jit", f"def _attn_dqk({', '.join(['ds', 'qk', 'f_t', 'f_u', *ctx])}):",
                f'    """ds/dqk = {a} is one number per head: applied once to dq, dk (_attn_dscale)"""',
                "    return ds", "", ""]
        out += _helper("_attn_dscale", f"ds/dqk = {a}", a, ctx)
    else:
        out += _helper("_attn_qk_scale", "(the score is not linear in qk with a per-head slope: unused)",
                       sympy.Float(LOG2E), ctx)
        out += ["@triton.jit", f"def _attn_score2({', '.join(['qk', 'f_t', 'f_u', 'qk_scale', *ctx])}):",
                '    """s * log2(e)"""', f"    return _attn_score(qk, f_t, f_u, {', '.join(ctx)}) * {LOG2E!r}", "", ""]
        d = ap.dscore(QK)
        out += ["@triton.jit", f"def _attn_dqk({', '.join(['ds', 'qk', 'f_t', 'f_u', *ctx])}):",
                f'    """ds * ds/dqk, ds/dqk = {d}"""', f"    return ds * {triton_expr(d)}", "", ""]
        out += _helper("_attn_dscale", "(ds/dqk is applied per element: _attn_dqk)", sympy.Float(1.0), ctx)
    for i, n in enumerate(ap.learnable):
        d = ap.dscore(param_symbol(n))
        out += _helper(f"_attn_dpar_{i}", f"ds/d{n} = {d}", d, args)
    out += _helper("_attn_visible", f"mask(t, u) = {ap.mask_expr}", ap.mask_expr, ["f_t", "f_u"])
    loads = [f"    p_{n} = tl.load(PARAMS + i_h * NP + {i})  # per-head scalar {n}" for i, n in enumerate(ap.params)]
    init = [f"    dpar_{i} = tl.zeros([BN], tl.float32)  # d loss / d {n}, per key" for i, n in enumerate(ap.learnable)]
    call = f"(qk, f_t, f_u, {', '.join(ctx)})"
    acc = [f"            dpar_{i} += tl.sum(ds * _attn_dpar_{i}{call}, 1)" for i in range(len(ap.learnable))]
    acc_m = [f"            dpar_{i} += tl.sum(tl.where(vis, ds * _attn_dpar_{i}{call}, 0.0), 1)"
             for i in range(len(ap.learnable))]
    store = [f"    tl.store(DPAR + ({i} * tl.num_programs(1) + i_bh) * tl.num_programs(0) + i_n, tl.sum(dpar_{i}, 0))"
             for i, n in enumerate(ap.learnable)]
    text = TEMPLATE
    for hole, fill in (("{CTX_LOADS}", "\n".join(loads) or "    # (the score reads no per-head parameter)"),
                       ("{DPAR_INIT}", "\n".join(init) or "    # (no learnable parameter in the score)"),
                       ("{DPAR_ACC_MASKED}", "\n".join(acc_m) or "            pass  # (no learnable parameter)"),
                       ("{DPAR_ACC}", "\n".join(acc) or "            pass  # (no learnable parameter in the score)"),
                       ("{DPAR_STORE}", "\n".join(store) or "    # (no learnable parameter in the score)"),
                       ("{SCALED}", str(scaled)),
                       ("{DPAR}", "".join(f", dpar_{i}" for i in range(len(ap.learnable)))),
                       ("{CTX_NOH}", "".join(f", {c}" for c in ctx[1:])),
                       ("{CTX}", "".join(f", {c}" for c in ctx)),
                       ("{DIM_ARGS}", "".join(f" dim_{s}," for s in ap.sizes))):
        text = text.replace(hole, fill)
    return out + text.strip("\n").split("\n")


def classifier_source(ap: AttentionPlan) -> list[str]:
    """``_attention_tile_class(t_lo, t_hi, u_lo, u_hi) -> (all visible, none visible)``: interval reasoning on
    the mask over tile bounds (torch tensors, broadcast)."""
    lines, t, f = interval_code(ap.mask_expr, {T_SYM: ("t_lo", "t_hi"), U_SYM: ("u_lo", "u_hi")})
    out = ["def _attention_tile_class(t_lo, t_hi, u_lo, u_hi):",
           f'    """Over the tiles t in [t_lo, t_hi], u in [u_lo, u_hi]: is mask(t, u) = {ap.mask_expr} true on the',
           '    whole tile, false on the whole tile? (interval arithmetic; a tile that is neither is partial)"""']
    out += [f"    {x}" for x in lines]
    out += [f"    return {t}, {f}"]
    return out


def form_source(ap: AttentionPlan, p) -> list[str]:
    cached = list(dict.fromkeys([ap.k, ap.v]))
    keep = f"the last {ap.window} keys" if ap.window else "every key (the mask reads absolute positions)"
    lines = [
        "def attention(inputs, params, states, sizes, output_final_state=False, cu_seqlens=None):",
        '    """Tiled softmax attention (flash-style kernels generated from the score and mask).',
        f"    inputs {{{', '.join(repr(d.name) for d in p.inputs)}}}: [B, T, H, width]; states: the key/value cache",
        f"    {{{', '.join(repr(n) + ': [B, H, Tc, width]' for n in cached)}}} of earlier tokens (absent: none); the",
        f"    final cache keeps {keep}. Returns (o [B, T, H, {ap.vdim}], final cache or None).\"\"\"",
        f"    q_cur = inputs[{ap.q!r}]",
        "    B, T, H = q_cur.shape[0], q_cur.shape[1], q_cur.shape[2]",
        "    off = 0  # position of the first query: the cache length",
    ]
    given = " or ".join(f"states.get({n!r}) is not None" for n in cached)
    lines.append(f"    cached = {given}")
    for n in cached:
        lines.append(f"    x_{n} = inputs[{n!r}]")
    lines.append("    if cached:")
    for n in cached:
        lines += [f"        c_{n} = states.get({n!r})",
                  f"        if c_{n} is None:",
                  f"            raise MixerCallError(\"initial_state needs the whole cache ({', '.join(cached)}); "
                  f"'{n}' is missing\")",
                  f"        x_{n} = torch.cat([c_{n}.to(x_{n}.dtype).transpose(1, 2), x_{n}], 1)"]
    lens = [f"c_{n}.shape[2]" for n in cached]
    lines.append(f"        off = {lens[0]}")
    if len(lens) > 1:
        lines += [f"        if {' != '.join(lens)}:",
                  "            raise MixerCallError(f\"initial_state: the cache entries have different lengths "
                  "{" + ", ".join(lens) + "}\")"]
    lines.append(f"    k_all, v_all = x_{ap.k}, x_{ap.v}  # [B, off + T, H, width]")
    if ap.params:
        cols = ", ".join(f"params[{n!r}].to(torch.float32)" for n in ap.params)
        lines.append(f"    pars = torch.stack([{cols}], 1)  # [H, {len(ap.params)}]: {', '.join(ap.params)}")
    else:
        lines.append("    pars = _attn_nopars(H, q_cur.device)  # (no per-head scalar: never read)")
    dims = "".join(f"float(sizes[{s!r}]), " for s in ap.sizes)
    lines += ["    if cu_seqlens is not None and (cached or output_final_state):  # (own cache lengths)",
              "        cu = [int(c) for c in cu_seqlens.tolist()]",
              "        return _attn_per_sequence(attention, inputs, params, states, sizes, output_final_state, cu)",
              "    # (packed sequences, each attending within itself: cu_seqlens)",
              f"    o = _attn_apply(_ATTN_SPEC, q_cur, k_all, v_all, pars, off, ({dims}), cu_seqlens)"]
    lines.append("    if not output_final_state:")
    lines.append("        return o, None")
    keep_from = f"max(0, x_{{n}}.shape[1] - {ap.window})" if ap.window else "0"
    items = ", ".join(f"{n!r}: x_{n}[:, {keep_from.format(n=n)}:].transpose(1, 2).contiguous()" for n in cached)
    lines.append(f"    return o, {{{items}}}")
    return lines


def emit(a: Analysis) -> tuple[list[str] | None, str]:
    """The attention form's lines for an analysed program, or None and why not."""
    try:
        ap = plan(a.program)
        kernels = kernel_source(ap)
    except (NoAttentionForm, NotPrintable) as e:
        return None, str(e)
    lines = kernels + ["", ""] + classifier_source(ap) + ["", ""]
    lines += ["_ATTN_SPEC = {'fwd': _attn_fwd_kernel, 'dkdv': _attn_bwd_dkdv_kernel, 'dq': _attn_bwd_dq_kernel,",
              "              'decode': _attn_decode_kernel, 'classify': _attention_tile_class,",
              f"              'npl': {len(ap.learnable)}, 'q': {ap.q!r}, 'k': {ap.k!r}, 'v': {ap.v!r},",
              f"              'params': {ap.params!r}, 'sizes': {ap.sizes!r}, 'window': {ap.window!r}}}",
              "_ATTN_SPEC['op'] = _attn_define_ops(_ATTN_SPEC)  # (under torch.compile: one opaque operator)", "",
              ""]
    lines += form_source(ap, a.program)
    return lines, ""


def describe(a: Analysis) -> list[str]:
    """The plan lines ``mixc explain`` prints."""
    try:
        ap = plan(a.program)
    except NoAttentionForm:
        return []
    out = [f"score s = {ap.score} with qk = {ap.q}_t . {ap.k}_u, weights softmax over u, "
           f"values {ap.v}_u",
           f"mask {ap.mask_expr}: tiles classified empty / full / partial by interval arithmetic (empty tiles "
           "skipped, full ones unmasked)",
           f"ds/dqk = {ap.dscore(QK)}" + "".join(f"; ds/d{n} = {ap.dscore(param_symbol(n))}" for n in ap.learnable),
           "decode cache (the form's states): " + (f"the last {ap.window} keys" if ap.window else "every key")]
    return out
