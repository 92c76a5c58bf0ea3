"""The whole analysis of a program (:func:`analyse` -> :class:`Analysis`): each state's normal form and
transition class, the readout, time invariance (:func:`time_invariance`: a convolution and its
kernel), attention files' mask and separability, the legal forms and the default, each with its
reason in words.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import T_VAR, U_VAR, Node, Program, Var, toposort
from .intervals import decay_in_unit_interval
from .printing import show, sizes_str
from .readouts import Readout, readout
from .separable import Separability, separability
from .terms import (
    StateForm,
    _flatten_mul,
    _k_factors,
    _split_outer,
    classify_transition,
    normal_form,
    product,
    state_free,
    token_dependent,
)


@dataclass
class Analysis:
    program: Program
    kind: str  # recurrence | attention | pointwise
    transition: str | None
    transition_reason: str
    states: list[StateForm]
    readout_text: list[str]
    separable: bool | None
    separability: Separability | None
    feature_width: str | None
    time_invariant: bool
    ti_reason: str
    kernel: str | None
    forms: list[str]
    default_form: str
    reasons: dict[str, str]
    notes: list[str]
    mask_causal: bool | None = None

    def to_json(self) -> dict:
        return {
            "mixer": self.program.name,
            "kind": self.kind,
            "forms": self.forms,
            "default_form": self.default_form,
            "separable": self.separable,
            "feature_width": self.feature_width,
            "feature_width_symmetric": (sizes_str(self.separability.width_symmetric)
                                        if self.separability and self.separability.separable else None),
            "transition": self.transition,
            "states": {s.name: {"transition": s.transition, "k": s.k, "v": s.v, "decay": s.decay,
                                "normaliser_of": s.normaliser_of} for s in self.states},
            "time_invariant": self.time_invariant,
            "kernel": self.kernel,
            "reasons": self.reasons,
            "notes": self.notes,
        }

    def explain(self) -> str:
        out = [f"analysis of {self.program.name}:"]
        out.append(f"  kind: {self.kind}")
        if self.kind == "attention":
            sep = self.separability
            out.append(f"  pairwise weight: w(t, u) = {sep.weight}" if sep else "")
            for a in (sep.atoms if sep else []):
                out.append(f"    {a}")
            out.append(f"  separable: {'yes' if self.separable else 'no'} -- {sep.reason}")
            if self.separable:
                out.append(f"  feature width: {self.feature_width}")
            out.append(f"  mask: {'causal (u <= t)' if self.mask_causal else 'not the plain causal mask'}")
        for s in self.states:
            out.append(f"  state {s.name}[{', '.join(str(v) for v in s.axes)}]: transition {s.transition} -- "
                       f"{s.transition_reason}")
            if s.normaliser_of:
                out.append(f"    normaliser: a running sum of {s.k} under {s.normaliser_of}'s decay, i.e. an extra "
                           f"value column of {s.normaliser_of} (v' = 1); the chunked kernels carry it beside "
                           f"{s.normaliser_of} and divide")
            elif s.k is not None and len(s.axes) == 1:
                out.append(f"    input: {s.name}_t = A_t({s.name}_(t-1)) + {s.k}")
            elif s.k is not None:
                out.append(f"    normal form: {s.name}_t = A_t({s.name}_(t-1)) + k'_t v'_t^T with k' = {s.k}, "
                           f"v' = {s.v}")
            elif s.inputs:
                out.append(f"    input: {' + '.join(t.show() for t in s.inputs)}")
        out.extend(f"  {line}" for line in self.readout_text)
        if self.kind == "recurrence":
            out.append(f"  time invariant: {'yes' if self.time_invariant else 'no'} -- {self.ti_reason}")
            if self.kernel:
                out.append(f"    kernel: {self.kernel}")
        for note in self.notes:
            out.append(f"  note: {note}")
        out.append("  forms:")
        for f in ("chunked", "recurrent", "fft", "attention"):
            mark = "yes" if f in self.forms else "no "
            out.append(f"    {f:<10} {mark}  {self.reasons.get(f, '')}")
        out.append(f"  default: {self.default_form} -- {self.reasons.get('default', '')}")
        return "\n".join(x for x in out if x)


def _mask_is_causal(p: Program) -> bool:
    if p.mask is None:
        return True
    import torch

    from ..lower import eval_int_expr

    n = 64
    tt = torch.arange(n).view(n, 1)
    uu = torch.arange(n).view(1, n)
    sizes = {k: (v if v is not None else n) for k, v in p.sizes}
    got = torch.as_tensor(eval_int_expr(p.mask, {"t": tt, "u": uu}, sizes)).expand(n, n)
    return bool((got == (uu <= tt)).all())


def analyse(p: Program) -> Analysis:
    """Run every analysis on a verified program."""
    reasons: dict[str, str] = {}
    notes: list[str] = []
    out = p.output
    if p.has_key_tokens:
        return _analyse_attention(p, reasons, notes)
    if not p.states:
        reasons["recurrent"] = "no state and no key tokens: the output is a per-token function"
        return Analysis(p, "pointwise", None, "no state", [], [], None, None, None, False, "no state", None,
                        ["recurrent"], "recurrent", {**reasons, "default": "the only form"}, notes)
    rd = readout(out.value)
    # key axis of each state: the axis its readout sums over
    key_axes: dict[str, Var | None] = {}
    readout_lines: list[str] = []
    if rd is not None:
        parts = [rd] if rd.ratio is None else list(rd.ratio)
        for part in parts:
            for t in part.terms:
                name, read = t.state.arg
                summed = [v for v in read if v in t.summed]
                key_axes.setdefault(name, summed[0] if len(summed) == 1 else None)
    states: list[StateForm] = []
    for eq in p.updates:
        sf = normal_form(p, eq)
        decl_axes = eq.vars
        ka = key_axes.get(eq.target)
        key = None
        if ka is not None:  # map the readout's index to the update's own index variable
            decl = p.decl(eq.target)
            pos = [i for i, a in enumerate(decl.axes) if a == ka.axis]
            key = decl_axes[pos[0]] if len(pos) == 1 else (decl_axes[0] if decl_axes else None)
        elif len(decl_axes) == 2:
            key = decl_axes[0]
        sf.key_axis = key
        sf.transition, sf.transition_reason = classify_transition(sf, key)
        if len(sf.inputs) == 1 and key is not None:
            value = next((v for v in decl_axes if v != key), None)
            sf.k, sf.v = _split_outer(sf.inputs[0], key, value)
            sf.k_factors = tuple(_k_factors(sf.inputs[0], value))
        elif len(sf.inputs) == 1 and len(decl_axes) <= 1:
            sf.k, sf.v = sf.inputs[0].show(), None
            sf.k_factors = tuple(sf.inputs[0].factors)
        states.append(sf)
    # normaliser states: same transition as a matrix state, input = that state's k', read as a ratio
    for z in states:
        if len(z.axes) != 1 or z.k is None:
            continue
        for s in states:
            if s is z or len(s.axes) != 2 or s.k is None or not _same_decay(z, s):
                continue
            same_k = _same_up_to_names(z.k_factors, s.k_factors, z.axes[0], s.key_axis)
            if same_k and z.inputs[0].sign == s.inputs[0].sign:
                z.normaliser_of = s.name
    main = max(states, key=lambda s: (len(s.axes), s.normaliser_of is None))
    if rd is not None:
        readout_lines = _readout_lines(rd)
    transition = main.transition
    # time invariance
    ti, ti_reason, kernel = time_invariance(p, states, rd)
    # forms
    forms = ["recurrent"]
    reasons["recurrent"] = "a linear recurrence always runs as a scan over tokens (decode, and training fallback)"
    chunkable = {"identity", "constant_scalar", "scalar", "diagonal_key", "diagonal_value", "delta", "gated_delta"}
    others = [s for s in states if s is not main and s.normaliser_of is None]
    bad_decay = _decay_problem(main, p) if main.transition in chunkable else None
    if (len(main.axes) == 2 and main.transition in chunkable and main.k is not None and main.v is not None
            and not others and bad_decay is None and rd is not None):
        forms.insert(0, "chunked")
        how = {"delta": "the WY representation of products of (I - b k k^T)",
               "gated_delta": "the WY representation with cumulative scalar gates"}.get(
            main.transition, "a T x T decay mask per head")
        reasons["chunked"] = (f"{main.transition} transition of a {' x '.join(v.axis for v in main.axes)} state "
                              f"with an outer-product input: chunks become masked matmuls ({how})")
    else:
        if len(main.axes) < 2:
            why = (f"the state {main.name} has one axis: each entry is an independent scalar scan, with no "
                   "matrix products to put on tensor cores")
        elif main.transition == "elementwise":
            why = f"{main.transition_reason}; the compiler emits a scan"
        elif main.k is None:
            why = "the input term is not an outer product k' v'^T"
        elif others:
            why = f"several independent states ({', '.join(s.name for s in [main] + others)})"
        elif bad_decay is not None:
            why = bad_decay
        elif rd is None:
            why = "the output is not linear in the states (a state read inside a non-linear function)"
        else:
            why = f"the {main.transition} transition has no chunked algorithm"
        reasons["chunked"] = f"not available: {why}"
    if ti:
        forms.append("fft")
        reasons["fft"] = f"time invariant: the output is a causal convolution of the input ({kernel})"
    else:
        reasons["fft"] = f"not available: {ti_reason}"
    reasons["attention"] = "not available: the file is a recurrence with no pairwise score"
    default, rule = _default(forms)
    reasons["default"] = rule
    width = main.key_axis.axis if main.key_axis is not None and len(main.axes) == 2 else None
    return Analysis(p, "recurrence", transition, main.transition_reason, states, readout_lines, None, None, width,
                    ti, ti_reason, kernel, forms, default, reasons, notes)


def _decay_problem(s: StateForm, p: Program) -> str | None:
    """Why the decay of a chunkable state is not one the chunked kernels can take (None when it is): the
    factors of its diagonal term (the scalar gate of a gated delta rule) must be provably in [0, 1]."""
    diag = [t for t in s.linear if not t.summed and tuple(t.state.arg[1]) == tuple(s.axes)]
    return decay_in_unit_interval(list(diag[0].factors), p) if diag else None


def _same_decay(z: StateForm, s: StateForm) -> bool:
    """Whether the vector state z decays exactly as the matrix state s along s's key axis (then z is
    s's recurrence with v' = 1): one linear term each, the same sign and the same factors once z's
    axis is renamed to s's key axis (the state itself left out)."""
    if len(z.linear) != len(s.linear):
        return False
    if not z.linear:
        return True
    tz, ts = z.linear[0], s.linear[0]
    if len(z.linear) != 1 or tz.sign != ts.sign:
        return False
    return _same_up_to_names(tuple(tz.factors), tuple(ts.factors), z.axes[0], s.key_axis)


def _same_up_to_names(a: tuple[Node, ...], b: tuple[Node, ...], va: Var, vb: Var | None) -> bool:
    """Whether two factor lists are equal once the index ``va`` is renamed ``vb``."""
    from ..lower import rename

    if vb is None or va.axis != vb.axis or len(a) != len(b):
        return False
    return sorted(map(hash, (rename(x, {va: vb}) for x in a))) == sorted(map(hash, b)) and \
        set(rename(x, {va: vb}) for x in a) == set(b)


def _readout_lines(rd: Readout) -> list[str]:
    def one(r: Readout) -> str:
        parts = [t.show() for t in r.terms] + [t.show() for t in r.skip]
        return " + ".join(parts) if parts else "0"

    if rd.ratio is not None and rd.den_fn is not None:
        return [f"readout: o_t = ({one(rd.ratio[0])}) / f(d), d = {one(rd.ratio[1])}, f(d) = {show(rd.den_fn[1])}"
                "  (a normalised readout through an elementwise function of its denominator)"]
    if rd.ratio is not None:
        return [f"readout: o_t = ({one(rd.ratio[0])}) / ({one(rd.ratio[1])})  (a normalised readout)"]
    lines = []
    for t in rd.terms:
        q = " * ".join(show(f, 6) for f in t.factors) or "1"
        lines.append(f"readout: q' = {('-' if t.sign < 0 else '') + q} against {show(t.state)}"
                     + (f" summed over {', '.join(v.name for v in t.summed)}" if t.summed else ""))
    if rd.skip:
        lines.append(f"skip: {' + '.join(t.show() for t in rd.skip)}")
    return lines


def time_invariance(p: Program, states: list[StateForm], rd: Readout | None) -> tuple[bool, str, str | None]:
    """LTI when the transition, the input map and the readout do not change with the tokens; the
    token-dependent parts may only be a signal on channel axes entering the state and a gate on the
    output. Returns (time_invariant, reason, kernel)."""
    for s in states:
        for t in s.linear + s.coupled:
            for f in t.factors:
                if token_dependent(f):
                    return False, f"the transition of {s.name} depends on the tokens ({show(f)})", None
    if rd is None:
        return False, "the readout is not linear in the states", None
    if rd.ratio is not None:
        return False, "the output divides one readout by another (a normalised readout)", None
    kernels = []
    for s in states:
        if len(s.inputs) != 1:
            return False, f"the input of {s.name} is not one product", None
        inp = s.inputs[0]
        modes = set()
        for t in rd.terms:
            if t.state.arg[0] == s.name:
                modes |= {v.axis for v in t.state.arg[1] if v in t.summed}
        for f in inp.factors:
            axes = {v.axis for v in f.idx if v != T_VAR}
            if token_dependent(f) and axes & modes:
                return False, (f"the input map of {s.name} changes with the tokens ({show(f)} varies along the "
                               f"state axis summed by the readout)"), None
        for t in rd.terms:
            for f in t.factors:
                axes = {v.axis for v in f.idx if v != T_VAR}
                if token_dependent(f) and axes & modes:
                    return False, f"the readout changes with the tokens ({show(f)})", None
        coef = " * ".join(show(f, 6) for t in s.linear for f in t.factors) or "1"
        maps = " * ".join(show(f, 6) for f in inp.factors if not token_dependent(f)) or "1"
        sig = " * ".join(show(f, 6) for f in inp.factors if token_dependent(f)) or "1"
        ro = " * ".join(show(f, 6) for t in rd.terms if t.state.arg[0] == s.name for f in t.factors
                        if not token_dependent(f)) or "1"
        mode_vars = sorted({v.name for t in rd.terms if t.state.arg[0] == s.name for v in t.summed})
        lead = f"sum({', '.join(mode_vars)}: " if mode_vars else "("
        body = f"{lead}{ro} * ({coef}) ** l * {maps})"
        if rd.real or any(x.op == "real" and not state_free(x) for x in toposort([p.output.value])):
            body = f"Re({body})"
        kernels.append(f"K_l = {body} (Vandermonde in the modes), "
                       f"applied to the signal {sig}")
    firs = [n for n in toposort(p.roots()) if n.op == "input" and n.src and not (n.src[0].op == "iota")]
    reason = "the transition, input map and readout do not depend on the tokens"
    if firs:
        taps = sorted({v.axis for n in firs for v in n.src[0].idx if v not in (T_VAR, U_VAR)})
        reason += f"; reads of past tokens ({show(firs[0])}) are finite causal filters over {', '.join(taps)}"
    return True, reason, "; ".join(kernels)


def _default(forms: list[str]) -> tuple[str, str]:
    for f, rule in (("chunked", "chunked when legal: tensor-core matmuls for training"),
                    ("fft", "fft for time-invariant systems: O(T log T) convolution"),
                    ("attention", "attention when no finite state exists"),
                    ("recurrent", "recurrent: the scan is the only form")):
        if f in forms:
            return f, rule
    return forms[0], "the only form"  # pragma: no cover


def _analyse_attention(p: Program, reasons: dict, notes: list) -> Analysis:
    sums = [n for n in toposort([p.output.value]) if n.op == "sum" and U_VAR in n.arg]
    softmaxes = [n for n in toposort([p.output.value]) if n.op == "softmax"]
    causal = _mask_is_causal(p)
    if softmaxes:
        sep = Separability(False, weight=f"softmax over u of {show(softmaxes[0].src[0])}",
                           reason="softmax normalises exp of the score, and exp of a dot product has no finite "
                                  "feature map: no recurrent state exists")
    else:
        seps = []
        for s in sums:
            factors = _flatten_mul(s.src[0])
            weight = [f for f in factors if not (set(f.idx) - {T_VAR, U_VAR})]
            w = product(weight) if weight else Node("const", arg=1)
            seps.append(separability(w))
        bad = [x for x in seps if not x.separable]
        sep = bad[0] if bad else seps[0]
        if not bad and len({str(x.width) for x in seps}) > 1:
            notes.append("the sums over u have different feature widths")
    separable = sep.separable
    width = sizes_str(sep.width) if separable else None
    forms = ["attention"]
    reasons["attention"] = "masked quadratic attention over (t, u) tiles computes any score exactly"
    if separable and causal:
        forms = ["chunked", "recurrent", "attention"]
        reasons["chunked"] = (f"the weight is separable (feature width {width}): a state of width {width} "
                              "carries the past, and chunks become masked matmuls")
        reasons["recurrent"] = f"separable weight: a recurrent state of width {width} (and a constant-size decode)"
    elif separable:
        why = "the mask is not the plain causal mask u <= t, so a running state cannot drop the tokens it hides"
        reasons["chunked"] = f"not available: {why}"
        reasons["recurrent"] = f"not available: {why}"
    else:
        reasons["chunked"] = f"not available: {sep.reason}"
        reasons["recurrent"] = (f"not available as a fixed-size state: {sep.reason}; decoding uses a key/value "
                                "cache in the attention form")
    reasons["fft"] = "not available: the weight depends on the token contents, not only on t - u"
    default, rule = _default(forms)
    reasons["default"] = rule
    return Analysis(p, "attention", None, "", [], [], separable, sep, width, False,
                    "attention depends on token contents", None, forms, default, reasons, notes, causal)
