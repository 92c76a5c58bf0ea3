"""Emit the FFT form of a time-invariant recurrence: K from the parameters, a causal convolution by real FFTs.

:func:`plan` reads the analysis's normal form (never a mechanism's name). For one state updated as
``h_t = a h_(t-1) + b x_t`` (``a``, ``b`` fixed per head, channel and mode; ``x_t`` the token-dependent
signal, constant along the modes) and read out as ``o_t = g_t Re(sum_modes c h_t) + skip_t`` (``c`` fixed,
``g_t`` a token-dependent gate over the channels), the output is ``g_t (K * x)_t + skip_t`` with
``K_l = Re(sum_n c_n b_n a_n^l)``. The emitted function forms ``log a``, ``b``, ``c``, the signal, the gate and
the skip with the reference's :class:`~mixc.backends.reference.Emitter` (PyTorch), and calls the support
code of :mod:`mixc.backends.fft.kernels` for K, the convolution and the states.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.analysis import Analysis, StateForm, Term, product, readout, show, state_free, token_dependent
from mixc.history import history_name, token_history
from mixc.ir import T_VAR, Node, Var
from mixc.lower import make, rename

from ..reference import Emitter, prologue


class NoFFTForm(Exception):
    """Why a program has no FFT form in this backend (the message says it in words)."""


@dataclass
class FFTPlan:
    state: str
    complex_state: bool
    read_vars: tuple[Var, ...]  # the readout's index variables of the state, in its declared order
    channels: tuple[Var, ...]  # the ones the readout keeps (output axes), in the output's order
    modes: tuple[Var, ...]  # the ones the readout sums over, in the declared order
    log_a: Node | None  # log a when the transition is exp(...) (its argument); else None
    a: Node  # the transition a (sign included)
    b: Node  # the input map: the input term's fixed factors (sign included)
    signal: Node  # the input term's token-dependent factors x_t (over the channels)
    c: Node  # the readout's fixed factors (sign included)
    gate: Node | None  # the readout's token-dependent factors g_t
    skip: Node | None  # the state-free part of the output
    skip_in_k: Node | None  # skip = s x_t with s fixed and no gate: s is added to K_0 instead
    real: bool  # the output takes the real part of the readout


def _const(v) -> Node:
    return Node("const", arg=v)


def _signed(factors: list[Node], sign: int) -> Node:
    node = product(factors) if factors else _const(1)
    return node if sign > 0 else make("neg", (node,), None)


def _terms_node(terms: list[Term]) -> Node | None:
    out = None
    for t in terms:
        node = _signed(list(t.factors), 1)
        if t.summed:
            node = make("sum", (node,), None, tuple(t.summed))
        if out is None:
            out = node if t.sign > 0 else make("neg", (node,), None)
        else:
            out = make("add" if t.sign > 0 else "sub", (out, node), None)
    return out


def _real_paths(n: Node, state: str) -> set[bool]:
    """For each path from the output down to a read of ``state``: whether it passes a ``real``. Refuses
    ``imag`` and ``conj`` on such a path (the normal form treats them as linear, their value is not)."""
    out: set[bool] = set()
    memo: set[tuple[int, bool]] = set()

    def go(x: Node, seen: bool) -> None:
        if (id(x), seen) in memo:
            return
        memo.add((id(x), seen))
        if x.op == "state" and x.arg[0] == state:
            out.add(seen)
            return
        if state_free(x):
            return
        if x.op in ("imag", "conj"):
            raise NoFFTForm(f"the output takes {x.op}(...) of the state {state}")
        for s in x.src:
            go(s, seen or x.op == "real")

    go(n, False)
    return out


def plan(a: Analysis) -> FFTPlan:
    """The FFT plan of an analysed program (raises NoFFTForm with the reason)."""
    p = a.program
    if "fft" not in a.forms:
        raise NoFFTForm(a.reasons.get("fft", "not time invariant"))
    if a.kind != "recurrence" or len(a.states) != 1:
        raise NoFFTForm(f"{len(a.states)} states: the FFT form convolves one diagonal state")
    s: StateForm = a.states[0]
    decl = p.decl(s.name)
    if s.coupled or len(s.linear) != 1 or s.linear[0].summed or tuple(s.linear[0].state.arg[1]) != tuple(s.axes):
        raise NoFFTForm(f"the transition of {s.name} is not one diagonal term ({s.transition_reason})")
    if len(s.inputs) != 1 or s.inputs[0].summed:
        raise NoFFTForm(f"the input of {s.name} is not one product")
    rd = readout(p.output.value)
    if rd is None or rd.ratio is not None:
        raise NoFFTForm("the output is not linear in the state")
    if any(t.state is None or t.state.arg[0] != s.name for t in rd.terms) or len(rd.terms) != 1:
        raise NoFFTForm(f"the output does not read {s.name} through one term")
    if any(not all(state_free(f) for f in t.factors) for t in rd.terms + rd.skip):
        raise NoFFTForm("the output is not linear in the state (a function of it appears)")
    rt = rd.terms[0]
    read = tuple(rt.state.arg[1])
    if len(set(read)) != len(read):
        raise NoFFTForm(f"the readout indexes {s.name} with a repeated index")
    to_read = dict(zip(s.axes, read))
    modes = tuple(v for v in read if v in rt.summed)
    out_vars = tuple(p.output.vars)
    kept = [v for v in read if v not in rt.summed]
    if not set(kept) <= set(out_vars):
        raise NoFFTForm(f"the readout keeps axes of {s.name} the output does not have")
    channels = tuple(v for v in out_vars if v in kept)
    # transition a (renamed to the readout's variables)
    lin = s.linear[0]
    factors = [rename(f, to_read) for f in lin.factors]
    if any(token_dependent(f) for f in factors):
        raise NoFFTForm(f"the transition of {s.name} depends on the tokens")
    a_node = _signed(factors, lin.sign)
    log_a = None
    if lin.sign > 0 and factors and all(f.op == "exp" for f in factors):
        log_a = factors[0].src[0]
        for f in factors[1:]:
            log_a = make("add", (log_a, f.src[0]), None)
    # input: fixed map b times the signal
    inp = s.inputs[0]
    fixed = [rename(f, to_read) for f in inp.factors if not token_dependent(f)]
    sig = [rename(f, to_read) for f in inp.factors if token_dependent(f)]
    if any(v in modes for f in sig for v in f.idx):
        raise NoFFTForm(f"the input signal of {s.name} varies along the modes the readout sums")
    if any(v not in read and v != T_VAR for f in fixed + sig for v in f.idx):
        raise NoFFTForm(f"the input of {s.name} has an index the state does not")
    # readout: fixed c times the gate
    c_f = [f for f in rt.factors if not token_dependent(f)]
    g_f = [f for f in rt.factors if token_dependent(f)]
    if any(v in modes for f in g_f for v in f.idx):
        raise NoFFTForm("the readout's token-dependent factor varies along the modes")
    if any(v not in read and v != T_VAR for f in c_f for v in f.idx):
        raise NoFFTForm("the readout's fixed factor has an index the state does not")
    paths = _real_paths(p.output.value, s.name)
    if len(paths) != 1:
        raise NoFFTForm(f"the output takes the real part of some reads of {s.name} but not others")
    real = paths.pop()
    if decl.complex and not real:
        raise NoFFTForm(f"the state {s.name} is complex but the output does not take its real part")
    signal = product(sig) if sig else _const(1)
    gate = product(g_f) if g_f else None
    skip = _terms_node(rd.skip)
    skip_in_k = None
    if gate is None and len(rd.skip) == 1:
        skip_in_k = _skip_coefficient(rd.skip[0], sig, channels)
    return FFTPlan(s.name, decl.complex, read, channels, modes, log_a, a_node, _signed(fixed, inp.sign), signal,
                   _signed(c_f, rt.sign), gate, skip, skip_in_k, real)


def _skip_coefficient(t: Term, sig: list[Node], channels: tuple[Var, ...]) -> Node | None:
    """``s`` when the skip term is ``s * x_t`` with ``s`` fixed over the channels only (then ``s`` adds to
    K_0: the convolution carries the skip), else None."""
    rest = list(t.factors)
    for f in sig:
        if f not in rest:
            return None
        rest.remove(f)
    if t.summed or any(token_dependent(f) or any(v not in channels for v in f.idx) for f in rest):
        return None
    return _signed(rest, t.sign)


def _header(doc: str) -> list[str]:
    return ["def fft(inputs, params, states, sizes, output_final_state=False, cu_seqlens=None):", f'    """{doc}"""']


def emit_fft(a: Analysis, fp: FFTPlan) -> list[str]:
    """Lines of ``fft(inputs, params, states, sizes, output_final_state, cu_seqlens)``."""
    p = a.program
    lines = _header(f"The FFT form of {p.name}: K_l = Re(sum_n c_n b_n a_n^l) from the parameters, then\n"
                    f"    o = g (K * x) + skip by real FFTs (a Toeplitz product up to _FFT_DIRECT_MAX_T tokens).\n"
                    f"    inputs [B, T, H, ...]; returns (o [B, T, H, ...], final states or None).")
    extra = [n for n in (fp.a, fp.log_a, fp.b, fp.signal, fp.c, fp.gate, fp.skip, fp.skip_in_k) if n is not None]
    em = prologue(p, lines, extra)
    sz = em.sizes_var
    ch, md = fp.channels, fp.modes
    ch_sizes = [sz[v.axis] for v in ch]
    md_sizes = [sz[v.axis] for v in md]
    nf = " * ".join(md_sizes) or "1"
    per = ", ".join(["H", *ch_sizes, nf])  # [H, *C, N] (the modes flattened)
    full = ", ".join(["1, H", *ch_sizes, *md_sizes])

    # the parameters' side (a, b, c, K) in float64 whatever the inputs: K and the maps are small ([H, ...]),
    # and a formula such as (exp(dt A) - 1) / A loses digits to cancellation in fp32
    em.emit("pdt, pcdt = torch.float64, torch.complex128  # K and the maps from the parameters: float64")
    pe = _param_emitter(p, em)

    def per_mode(node: Node, what: str) -> str:
        """``node`` over (channels, modes) per head, as [H, *C, N] in float64."""
        e, lay = pe.val(node, "pre")
        e = pe.expand(pe.tensor(e, lay), lay if lay is not None else (), ch + md)
        name = pe.fresh()
        pe.emit(f"{name} = ({e}).expand({full})[0].reshape({per})  # {what}  [{per}]")
        return name

    def per_token(node: Node, dst: tuple[Var, ...], shape: str, what: str) -> str:
        e, lay = em.val(node, "pre")
        e = em.expand(em.tensor(e, lay), lay if lay is not None else (), (T_VAR, *dst))
        name = em.fresh()
        em.emit(f"{name} = ({e}).expand({shape})  # {what}  [{shape}]")
        return name

    src = p.source.path
    upd = next(eq for eq in p.updates if eq.target == fp.state)
    em.emit(f"# {fp.state}_t = a {fp.state}_(t-1) + b x_t  ({src}:{upd.pos.line if upd.pos else '?'}) with")
    em.emit(f"#   a = {show(fp.a)},  b = {show(fp.b)},  x_t = {show(fp.signal)}")
    em.emit(f"# o_t = {'g_t ' if fp.gate is not None else ''}{'Re' if fp.real else ''}(sum(modes: c {fp.state}_t))"
            f"{' + skip_t' if fp.skip is not None else ''} with c = {show(fp.c)}"
            + (f",  g_t = {show(fp.gate)}" if fp.gate is not None else "")
            + (f",  skip_t = {show(fp.skip)}" if fp.skip is not None else ""))
    if fp.log_a is not None:
        la = per_mode(fp.log_a, f"log a = {show(fp.log_a)}")
    else:
        av = per_mode(fp.a, f"a = {show(fp.a)}")
        la = em.fresh()
        em.emit(f"{la} = torch.log({av}.to(pcdt))  # log a (complex: a may be negative)")
    wb = per_mode(fp.b, f"b = {show(fp.b)}")
    wc = per_mode(fp.c, f"c = {show(fp.c)}")
    ksh = ", ".join(["H", *ch_sizes])
    em.emit(f"kern = _fft_vandermonde({wc} * {wb}, {la}, T)  # K_l = Re(sum_n c_n b_n a_n^l), l < T  [{ksh}, T]")
    if fp.skip_in_k is not None:
        e, lay = pe.val(fp.skip_in_k, "pre")
        e = pe.expand(pe.tensor(e, lay), lay if lay is not None else (), ch)
        em.emit(f"kern = torch.cat([kern[..., :1] + ({e}).expand(1, {ksh})[0].unsqueeze(-1), kern[..., 1:]], -1)"
                f"  # skip {show(fp.skip)} = s x_t: K_0 += s")
    em.emit("kern = kern.to(real)  # the convolution runs in fp32 (fp64 for fp64 inputs)")
    xshape = ", ".join(["B, H, T", *ch_sizes])
    x = per_token(fp.signal, ch, xshape, f"x_t = {show(fp.signal)}")
    em.emit(f"xs = {x}.movedim(2, -1)  # tokens last  [{', '.join(['B, H', *ch_sizes, 'T'])}]")
    em.emit("y = _fft_causal_conv(xs, kern)  # (K * x)_t")
    dt = "cplx" if fp.complex_state else "real"
    decl_pos = [(ch + md).index(v) for v in fp.read_vars]  # declared axis -> position in (channels, modes)
    to_cm = [2 + fp.read_vars.index(v) for v in ch + md]
    h0_shape = ", ".join(["B, H", *ch_sizes, nf])
    em.emit(f"h0 = states.get({fp.state!r})")
    em.emit("if h0 is not None:")
    pm = "" if to_cm == sorted(to_cm) else f".permute(0, 1, {', '.join(map(str, to_cm))})"
    em.emit(f"    h0 = h0.to(dtype={dt}, device=dev){pm}.reshape({h0_shape})  # [B, H, *C, N]")
    em.emit(f"    y0 = _fft_vandermonde({wc} * h0 * torch.exp({la}), {la}, T)  # Re(sum_n c_n a_n^(t+1) h0_n)")
    em.emit("    y = y + y0.to(real)")
    em.emit("y = y.movedim(-1, 2)  # [B, H, T, *C]")
    o = "y"
    if fp.gate is not None:
        g = per_token(fp.gate, tuple(p.output.vars), ", ".join(["B, H, T"] + [sz[v.axis] for v in p.output.vars]),
                      f"gate g_t = {show(fp.gate)}")
        o = f"{g} * {em.expand('y', (T_VAR, *ch), (T_VAR, *p.output.vars))}"
    else:
        o = em.expand("y", (T_VAR, *ch), (T_VAR, *p.output.vars))
    if fp.skip is not None and fp.skip_in_k is None:
        e, lay = em.val(fp.skip, "pre")
        e = em.expand(em.tensor(e, lay), lay if lay is not None else (), (T_VAR, *p.output.vars))
        o = f"{o} + {em._paren(e)}"
    out_shape = ", ".join(["B, H, T"] + [sz[v.axis] for v in p.output.vars])
    em.emit(f"o = ({o}).expand({out_shape})")
    em.emit("final = None")
    em.emit("if output_final_state:")
    em.emit(f"    hT = {wb} * _fft_decayed_sum(xs, {la})  # b sum_s a^(T-1-s) x_s")
    em.emit("    if h0 is not None:")
    em.emit(f"        hT = hT + torch.exp(T * {la}) * h0  # + a^T h0")
    cplx_h = fp.log_a is None or fp.log_a.dtype == "complex" or fp.b.dtype == "complex"
    conv = "" if fp.complex_state else ".real" if cplx_h else ""
    back = ", ".join(["B, H", *ch_sizes, *md_sizes])
    perm = ", ".join(["0", "1"] + [str(2 + i) for i in decl_pos])
    hist = "".join(f", {history_name(n)!r}: ext_{n}[:, :, T:]" for n in token_history(p))
    pm = "" if decl_pos == sorted(decl_pos) else f".permute({perm})"
    em.emit(f"    hT = hT{conv}.to({dt}).reshape({back}){pm}  # [B, H, ...] as declared")
    em.emit(f"    final = {{{fp.state!r}: hT{hist}}}")
    perm_o = ", ".join(["0", "2", "1"] + [str(3 + i) for i in range(len(p.output.vars))])
    em.emit(f"return o.permute({perm_o}), final  # [B, T, H, ...]")
    return lines


def _param_emitter(p, em: Emitter) -> Emitter:
    """An emitter over ``em``'s lines whose parameters, buffers and constants are float64 (``pdt``)."""
    out = Emitter(em.sizes_var, em.lines, em.indent, "pdt", "pcdt", em.dev)
    out.count = 1000  # its names (x1001, ...) never meet em's
    for d in p.params + p.buffers:
        nm = f"{'pk' if d.kind == 'param' else 'bk'}_{d.name}"
        out.leaf_defs[(d.kind, d.name)] = [f"{nm} = params[{d.name!r}].to(dtype=pdt, device=dev).unsqueeze(0)  # [1, H"
                                           + "".join(f", {a}" for a in d.axes) + "]"]
        out.leaf_names[(d.kind, d.name)] = nm
    return out


def plan_or_reason(a: Analysis) -> tuple[FFTPlan | None, str]:
    try:
        return plan(a), "fft form emitted"
    except NoFFTForm as ex:
        return None, str(ex)


def emit_any(a: Analysis) -> tuple[list[str] | None, str]:
    """The FFT form's lines, or None and the reason there is none."""
    fp, why = plan_or_reason(a)
    return (emit_fft(a, fp), why) if fp is not None else (None, why)


def describe(a: Analysis) -> list[str]:
    """What the FFT form computes where, in words (for ``mixc explain``); empty without an FFT form."""
    fp, _ = plan_or_reason(a)
    if fp is None:
        return []
    st = fp.state
    la = f"log a = {show(fp.log_a)}" if fp.log_a is not None else f"log a = log({show(fp.a)}) (complex)"
    out = [f"K_l = {'Re' if fp.real else ''}(sum over {', '.join(v.name for v in fp.modes) or 'no modes'}: c b a^l), "
           f"l < T, from the parameters: a = {show(fp.a)}, b = {show(fp.b)}, c = {show(fp.c)}",
           f"a^l = exp(l log a) ({la}), never a running product: with l = i J + j (J = ceil(sqrt T)), "
           "K is one batched [I, N] x [N, J] matmul per channel, in float64 (complex128) whatever the inputs "
           "(K and the maps are [H, ...]: cheap; fp32 would lose digits to cancellation such as exp(dt A) - 1), "
           "then cast to the compute dtype; autograd carries the gradients to the parameters through K",
           f"signal x_t = {show(fp.signal)}: PyTorch prologue, in fp32 for bf16/fp16 inputs",
           "choice by length: T <= 32 tokens (_FFT_DIRECT_MAX_T): a T x T Toeplitz product of the same K (exact; "
           "no FFT launches); longer: real FFTs (rfft/irfft) of length n = 2m >= 2T (m 7-smooth: no wrap-around), "
           "rfft(K) once per call and shared across the batch, fp32 transforms for bf16/fp16; backward: rfft(dy), "
           "then irfft for dx and for dK summed over the batch in frequency. When a recurrent form is emitted "
           "too, a call with no form runs it for short sequences instead (mixc explain: 'short sequences')"]
    if fp.skip_in_k is not None:
        out.append(f"skip {show(fp.skip)}: {show(fp.skip_in_k)} added to K_0 (the convolution carries it)")
    elif fp.skip is not None:
        out.append(f"skip {show(fp.skip)}: PyTorch epilogue")
    if fp.gate is not None:
        out.append(f"output gate {show(fp.gate)}: PyTorch epilogue")
    out.append(f"initial state {st}: + Re(sum_n c_n a_n^(t+1) {st}0_n), the same blocked Vandermonde; final "
               f"state: a^T {st}0 + b sum_s a^(T-1-s) x_s (a blocked weighted sum, only when asked for)")
    hist = token_history(a.program)
    if hist:
        out.append("token history " + ", ".join(f"{history_name(n)} ({L} tokens)" for n, L in hist.items())
                   + ": read before the first token and carried in the final state, as the reference does")
    out.append("variable-length batches (cu_seqlens): the runtime runs each sequence")
    return out


def _backend():
    from ..registry import FormBackend
    from . import kernels

    return FormBackend(form="fft", emit=emit_any, support=(kernels,), native_varlen=False, describe=describe,
                       triton=False)


BACKEND = _backend()

