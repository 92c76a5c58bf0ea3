"""The reference form: plain PyTorch source emitted from the IR. It *is* the meaning of a file.

Every value is a tensor laid out ``[B|1, H|1, *extents(idx)]`` (batch and head dimensions of
size 1 where the value does not vary along them), or a Python number when it depends on
nothing but sizes. A recurrence runs as a Python loop over tokens: everything that does not
read a state is computed for all tokens at once before the loop (the *prologue*), the loop
carries the states. Attention form needs no loop: the key-token axis ``u`` is one more
index, and ``sum(u: ...)`` / ``softmax(u: ...)`` are masked by ``mask(t, u)``.
"""

from __future__ import annotations

from mixc.history import history_name, token_history
from mixc.ir import T_VAR, U_VAR, Node, Program, Var

# torch functions for unary ops on tensors; math functions where the operand is a number.
TORCH_UNARY = {
    "exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt", "abs": "torch.abs", "real": "torch.real",
    "imag": "_imag", "conj": "torch.conj_physical", "elu": "F.elu", "sigmoid": "torch.sigmoid",
    "logsigmoid": "F.logsigmoid", "softplus": "F.softplus", "silu": "F.silu", "relu": "torch.relu",
    "tanh": "torch.tanh", "cos": "torch.cos", "sin": "torch.sin", "floor": "torch.floor",
}
MATH_UNARY = {"exp": "math.exp", "log": "math.log", "sqrt": "math.sqrt", "abs": "abs", "floor": "math.floor",
              "cos": "math.cos", "sin": "math.sin"}
INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "**",
         "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|"}

PRELUDE = '''
import math

import torch
import torch.nn.functional as F


def _imag(x):
    return torch.imag(x) if x.is_complex() else torch.zeros_like(x)


def _token_gather(x, pos):
    """x[:, :, pos] for an integer tensor of token positions; zero where pos < 0 (before the start)."""
    valid = pos >= 0
    out = x[:, :, pos.clamp(min=0)]
    return out * valid.view(*valid.shape, *([1] * (out.dim() - 2 - valid.dim()))).to(out.dtype)
'''


def _num(v) -> str:
    if isinstance(v, complex):
        return f"complex({v.real!r}, {v.imag!r})"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return f"float('{v}')"
    return repr(v)


class Emitter:
    """Emits the lines computing IR nodes, tracking each value's layout.

    ``phase`` is ``pre`` (prologue, all tokens: the token index t is an axis), ``step`` (inside
    the token loop, states are the previous ones, t is the loop counter) or ``out`` (inside
    the loop after the update, states are the new ones).
    """

    def __init__(self, sizes_var: dict[str, str], lines: list[str], indent: str, rdt: str, cdt: str,
                 dev: str, mask_var: str | None = None) -> None:
        self.sizes_var = sizes_var  # axis name -> python expression of its extent
        self.lines = lines  # the prologue (and everything outside the loop)
        self.loop: list[str] = []  # the body of the token loop
        self.indent = indent
        self.rdt, self.cdt, self.dev = rdt, cdt, dev
        self.memo: dict[tuple[Node, str], tuple[str, tuple[Var, ...] | None]] = {}
        self.count = 0
        self.mask_var = mask_var
        self.leaf_names: dict[tuple[str, str], str] = {}
        self.state_names: dict[str, str] = {}
        self.slices: dict[Node, str] = {}
        self.loop_indent = indent + "    "
        self.history: dict[str, int] = {}  # input -> number of past tokens carried across calls
        self.leaf_defs: dict[tuple[str, str], list[str]] = {}  # lines binding a leaf, emitted on first use

    # layout: None for a Python number, else the index vars after the two leading dims
    def layout(self, n: Node, phase: str) -> tuple[Var, ...]:
        return tuple(v for v in n.idx if not (phase != "pre" and v == T_VAR))

    def fresh(self) -> str:
        self.count += 1
        return f"x{self.count}"

    def emit(self, line: str, indent: str | None = None) -> None:
        """Append a line: to the loop body when indented as the loop, else to the prologue."""
        if indent is not None and indent == self.loop_indent:
            self.loop.append(indent + line)
        else:
            self.lines.append(self.indent + line)

    def extent(self, v: Var) -> str:
        return self.sizes_var[v.axis]

    def expand(self, expr: str, src: tuple[Var, ...] | None, dst: tuple[Var, ...]) -> str:
        """Re-lay a value from layout ``src`` onto ``dst`` (a superset): permute, then insert axes."""
        if src is None or src == dst:
            return expr
        order = [v for v in dst if v in src]
        if order != list(src):
            perm = [0, 1] + [2 + src.index(v) for v in order]
            expr = f"{expr}.permute({', '.join(map(str, perm))})"
        if len(order) == len(dst):
            return expr
        ix = [":", ":"] + [":" if v in src else "None" for v in dst]
        while ix and ix[-1] == ":":
            ix.pop()
        return f"{expr}[{', '.join(ix)}]"

    def tensor(self, expr: str, lay: tuple | None) -> str:
        """A tensor for a value that may be a Python number."""
        if lay is not None:
            return expr
        return f"torch.full((1, 1), {expr}, dtype={self.rdt}, device={self.dev})"

    def val(self, n: Node, phase: str) -> tuple[str, tuple[Var, ...] | None]:
        """(expression, layout) of node ``n`` in ``phase``; emits the computing line once."""
        if phase != "pre" and not self.state_dependent(n):
            if self.hoistable(n):
                return self.sliced(n)
            phase = "loop"  # computed per token inside the loop, shared by step and out
        key = (n, phase)
        if key in self.memo:
            return self.memo[key]
        out = self._compute(n, phase)
        self.memo[key] = out
        return out

    def sliced(self, n: Node) -> tuple[str, tuple[Var, ...] | None]:
        """A prologue value seen from inside the loop (at token t)."""
        expr, lay = self.val(n, "pre")
        if lay is None or T_VAR not in lay:
            return expr, lay
        if n not in self.slices:
            name = self.fresh()
            pos = lay.index(T_VAR)
            ix = ", ".join([":", ":"] + [":"] * pos + ["t"])
            self.emit(f"{name} = {expr}[{ix}]", self.loop_indent)
            self.slices[n] = name
        return self.slices[n], tuple(v for v in lay if v != T_VAR)

    def leaf(self, op: str, name: str) -> str:
        """The variable holding an input or parameter, bound (in the prologue) on first use."""
        key = (op, name)
        if key in self.leaf_defs:
            for line in self.leaf_defs.pop(key):
                self.lines.append(self.indent + line)
        return self.leaf_names[key]

    def hoistable(self, n: Node) -> bool:
        """Whether a state-free value is computed for all tokens before the loop: only when that
        does not blow up memory (no more axes than the tensors it reads, e.g. exp(g[i]) but not
        the outer product k[i] * v[j], which is formed per token inside the loop)."""
        axes = [v for v in n.idx if v not in (T_VAR, U_VAR)]
        if len(axes) <= 1:
            return True
        leaves = [x for x in n.walk() if x.op in ("input", "param", "buffer")]
        return any(len(axes) <= len([v for v in x.idx if v not in (T_VAR, U_VAR)]) for x in leaves)

    def state_dependent(self, n: Node) -> bool:
        return any(x.op == "state" for x in n.walk())

    def _assign(self, expr: str, lay, indent: str | None = None) -> tuple[str, tuple | None]:
        name = self.fresh()
        self.emit(f"{name} = {expr}", indent)
        return name, lay

    def _compute(self, n: Node, phase: str) -> tuple[str, tuple[Var, ...] | None]:  # noqa: C901
        op = n.op
        lay = self.layout(n, phase)
        indent = self.loop_indent if phase != "pre" else None
        if op == "const":
            return _num(n.arg), None
        if op == "dim":
            return self.sizes_var[n.arg], None
        if op == "iota":
            v = n.arg
            if phase != "pre" and v == T_VAR:
                return "t", None
            return self._assign(f"torch.arange({self.extent(v)}, dtype={self.rdt}, device={self.dev})"
                                f".view(1, 1, {self.extent(v)})", (v,), indent)
        if op == "head":
            return self._assign(f"torch.arange(H, dtype={self.rdt}, device={self.dev}).view(1, H)", (), indent)
        if op in ("input", "param", "buffer"):
            name, vars_ = n.arg
            base = self.leaf(op, name)
            if op != "input":
                return self.expand(base, tuple(vars_), lay) if tuple(vars_) != lay else base, lay
            tok = n.src[0]
            if tok.op == "iota" and tok.arg in (T_VAR, U_VAR):
                src_lay = (tok.arg, *vars_)
                return self.expand(base, src_lay, lay), lay
            pos_expr, pos_lay = self.val(tok, "pre")
            pos_name = self.fresh()
            lead = ", ".join(["0", "0"] + [":"] * len(pos_lay))
            past = self.history.get(name, 0)  # the tokens before this call sit in front of the input
            shift = f" + {past}" if past else ""
            self.emit(f"{pos_name} = ({pos_expr}).long()[{lead}]{shift}")
            src = f"ext_{name}" if past else base
            src_lay = (*pos_lay, *vars_)
            return self._assign(self.expand(f"_token_gather({src}, {pos_name})", src_lay, lay), lay)
        if op == "state":
            name, vars_ = n.arg
            return self.expand(self.state_names[name], tuple(vars_), lay), lay
        if op == "eye":
            a, b = n.arg
            e = f"torch.eye({self.extent(a)}, dtype={self.rdt}, device={self.dev}).view(1, 1, {self.extent(a)}, " \
                f"{self.extent(b)})"
            return self._assign(self.expand(e, (a, b), lay), lay, indent)
        if op == "rand":
            raise ValueError("random draws only appear in initialisers")
        if op in ("sum", "softmax"):
            return self._reduce(n, phase, lay, indent)
        srcs = [self.val(s, phase) for s in n.src]
        if all(sl is None for _, sl in srcs):  # arithmetic on numbers (sizes)
            return self._scalar(n, [e for e, _ in srcs]), None
        if op == "neg":
            return self._assign(f"-{self._paren(srcs[0][0])}", lay, indent)
        if op == "not":
            return self._assign(f"~{self._paren(srcs[0][0])}", lay, indent)
        if op in TORCH_UNARY:
            x = self.tensor(*srcs[0])
            x = self.expand(x, srcs[0][1] if srcs[0][1] is not None else (), lay)
            return self._assign(f"{TORCH_UNARY[op]}({x})", lay, indent)
        args = [self.expand(e, sl, lay) if sl is not None else e for e, sl in srcs]
        if op in INFIX:
            return self._assign(f"{self._paren(args[0])} {INFIX[op]} {self._paren(args[1])}", lay, indent)
        if op == "complex":
            a, b = (self.expand(self.tensor(e, sl), sl if sl is not None else (), lay) for e, sl in srcs)
            return self._assign(f"torch.complex(*torch.broadcast_tensors({a}, {b}))", lay, indent)
        if op in ("min", "max"):
            a, b = (self.expand(self.tensor(e, sl), sl if sl is not None else (), lay) for e, sl in srcs)
            fn = "torch.minimum" if op == "min" else "torch.maximum"
            return self._assign(f"{fn}({a}, {b})", lay, indent)
        if op == "where":
            c, a, b = args
            if srcs[0][1] is None:  # a condition on numbers alone (sizes): a tensor, so the branches broadcast
                c = f"torch.tensor({c}, device={self.dev})"
            if srcs[1][1] is None and srcs[2][1] is None:  # two numbers: a tensor of the compute dtype, not int64
                dt = self.cdt if n.dtype == "complex" else self.rdt
                a = f"torch.tensor({a}, dtype={dt}, device={self.dev})"
            return self._assign(f"torch.where({c}, {a}, {b})", lay, indent)
        raise NotImplementedError(f"reference backend: op '{op}'")  # pragma: no cover

    @staticmethod
    def _paren(e: str) -> str:
        """``e`` made safe as an operand of an infix operator."""
        if e.replace("_", "").replace(".", "").isalnum():
            return e
        depth = 0
        for i, c in enumerate(e):  # already one bracketed group, or a call / subscript?
            depth += c in "([" and 1 or 0
            depth -= c in ")]" and 1 or 0
            if depth == 0 and c in " +-*/%<>=&|~" and i > 0:
                return f"({e})"
        return e if not e.startswith("-") else f"({e})"

    def _scalar(self, n: Node, args: list[str]) -> str:
        op = n.op
        if op == "neg":
            return f"(-{self._paren(args[0])})"
        if op in INFIX and op not in ("and", "or"):
            return f"({self._paren(args[0])} {INFIX[op]} {self._paren(args[1])})"
        if op in MATH_UNARY and n.src[0].dtype != "complex":
            return f"{MATH_UNARY[op]}({args[0]})"
        if op == "complex":
            return f"complex({args[0]}, {args[1]})"
        if op in ("min", "max"):
            return f"{op}({args[0]}, {args[1]})"
        if op == "where":
            return f"({self._paren(args[1])} if {self._paren(args[0])} else {self._paren(args[2])})"
        if op in ("and", "or"):
            return f"({self._paren(args[0])} {op} {self._paren(args[1])})"
        if op == "not":
            return f"(not {self._paren(args[0])})"
        # anything else: lift to a tensor
        t = self.tensor(args[0], None)
        return f"{TORCH_UNARY[op]}({t}).item()"

    def _reduce(self, n: Node, phase: str, lay: tuple[Var, ...], indent) -> tuple[str, tuple]:
        """sum (as one einsum over the factors of a product) or softmax; key-token axes masked."""
        body = n.src[0]
        vars_ = n.arg if n.op == "sum" else (n.arg,)
        factors = _product_factors(body) if n.op == "sum" else [body]
        complex_ = body.dtype == "complex"
        numbers: list[str] = []
        tensors: list[tuple[str, tuple[Var, ...]]] = []
        for f in factors:
            e, sl = self.val(f, phase)
            if sl is None:
                numbers.append(e)
            else:
                tensors.append((f"{e}.to({self.cdt})" if complex_ and f.dtype != "complex" else e, sl))
        full = tuple(lay) + tuple(v for v in vars_ if v not in lay)
        if U_VAR in vars_:  # apply mask(t, u) to the first factor that has u (or to a lifted one)
            mask_lay = (T_VAR, U_VAR)
            k = next((i for i, (_, sl) in enumerate(tensors) if U_VAR in sl), None)
            if k is None:
                tensors.append((f"torch.ones((1, 1, 1), dtype={self.rdt}, device={self.dev})", (U_VAR,)))
                k = len(tensors) - 1
            e, sl = tensors[k]
            tgt = tuple(v for v in full if v in sl or v in mask_lay)
            fill = "float('-inf')" if n.op == "softmax" else "0.0"
            masked = f"torch.where({self.expand(self.mask_var, mask_lay, tgt)}, {self.expand(e, sl, tgt)}, {fill})"
            tensors[k] = self._assign(masked, tgt, indent)
        if n.op == "softmax":
            e, sl = tensors[0]
            e = self.expand(e, sl, lay)
            sm = f"torch.softmax({e}, dim={2 + lay.index(U_VAR)})"
            return self._assign(f"torch.nan_to_num({sm}, nan=0.0)", lay, indent)
        if not tensors:
            tensors = [(self.tensor(numbers.pop(0), None), ())]
        absent = [v for v in vars_ if not any(v in sl for _, sl in tensors)]
        if len(tensors) == 1:
            e, sl = tensors[0]
            present = [v for v in vars_ if v in sl]
            red = e
            if present:
                dims = tuple(2 + sl.index(v) for v in present)
                red = f"{e}.sum(dim={dims if len(dims) > 1 else dims[0]})"
            red = self.expand(red, tuple(v for v in sl if v not in vars_), lay)
        else:
            letters = {v: chr(ord("c") + i) for i, v in enumerate(full)}
            spec = ",".join("ab" + "".join(letters[v] for v in sl) for _, sl in tensors)
            spec += "->ab" + "".join(letters[v] for v in lay)
            red = f"torch.einsum('{spec}', {', '.join(e for e, _ in tensors)})"
        scale = [self._paren(x) for x in numbers] + [self.extent(v) for v in absent]
        if scale:
            red = f"{red} * {' * '.join(scale)}"
        return self._assign(red, lay, indent)


def _product_factors(n: Node) -> list[Node]:
    if n.op == "mul":
        return _product_factors(n.src[0]) + _product_factors(n.src[1])
    return [n]


def _init_lines(p: Program) -> list[str]:
    """``init_params(H, sizes, seed, dtype, device)``: each param/buffer from its initialiser."""
    out = [
        "def init_params(H, sizes, seed=0, dtype=torch.float32, device='cpu'):",
        '    """Default parameters and buffers, {name: [H, ...]}: computed in float64 on the CPU from the',
        '    initialisers in the .mix file (random draws seeded per tensor), then cast and moved."""',
        "    out = {}",
    ]
    for d in p.params + p.buffers:
        sizes_var = {ax: f"sizes[{ax!r}]" for ax in {v.axis for v in d.init_vars} | set(d.axes)}
        sizes_var["H"] = "H"  # the number of heads ('H' is reserved: never a declared size)
        for ax in _axes_in(d.init):
            sizes_var.setdefault(ax, f"sizes[{ax!r}]")
        em = Emitter(sizes_var, out, "    ", "torch.float64", "torch.complex128", "'cpu'")
        em.count = 0
        out.append(f"    # {d.kind} {d.name}{d.shape_str()}")
        rands = [n for n in d.init.walk() if n.op == "rand"]
        if rands:  # one generator per tensor, seeded by its name; its draws in a fixed order
            out.append(f"    gen = torch.Generator().manual_seed(seed_for({d.name!r}, seed))")
        for r in rands:
            name = em.fresh()
            shape = ", ".join(["1", "H"] + [sizes_var[v.axis] for v in r.idx])
            gen = "gen"
            draw = "torch.rand" if r.arg[0] == "uniform" else "torch.randn"
            lo, lo_l = em.val(r.src[0], "pre")
            hi, hi_l = em.val(r.src[1], "pre")
            if r.arg[0] == "uniform":
                expr = f"{em._paren(lo)} + ({hi} - {lo}) * {name}_u"
            else:
                expr = f"{em._paren(lo)} + {em._paren(hi)} * {name}_u"
            out.append(f"    {name}_u = {draw}(({shape},), generator={gen}, dtype=torch.float64)")
            out.append(f"    {name} = {expr}")
            em.memo[(r, "pre")] = (name, tuple(r.idx))
        e, lay = em.val(d.init, "pre")
        e = em.expand(em.tensor(e, lay), lay if lay is not None else (), tuple(d.init_vars))
        shape = ", ".join(["1", "H"] + [sizes_var[a] for a in d.axes])
        out.append(f"    out[{d.name!r}] = {e}.expand({shape})[0].to(dtype=dtype, device=device).contiguous()")
    out.append("    return out")
    return out


def _axes_in(n: Node) -> set[str]:
    out = set()
    for x in n.walk():
        out.update(v.axis for v in x.idx)
        if x.op == "dim":
            out.add(x.arg)
    return out


def prologue(p: Program, lines: list[str], extra_nodes=()) -> Emitter:
    """Lines binding sizes, inputs ([B, H, T, ...] in the compute dtype), token history and
    parameters, and an :class:`Emitter` that can compute any node of ``p`` from them."""
    lines += [
        f"    x0 = inputs[{p.inputs[0].name!r}]",
        "    B, T, H = x0.shape[0], x0.shape[1], x0.shape[2]",
        "    real = torch.float64 if x0.dtype == torch.float64 else torch.float32",
        "    cplx = torch.complex128 if real == torch.float64 else torch.complex64",
        "    dev = x0.device",
    ]
    axes = sorted({a for d in p.inputs + p.params + p.buffers + p.states for a in d.axes}
                  | {a for r in list(p.roots()) + list(extra_nodes) for a in _axes_in(r)} - {"T"})
    sizes_var = {"T": "T"}
    for a in axes:
        sizes_var[a] = f"sz_{a}"
        lines.append(f"    sz_{a} = sizes[{a!r}]")
    em = Emitter(sizes_var, lines, "    ", "real", "cplx", "dev")
    _input_leaves(p, em, "real", "in")
    history = token_history(p)
    em.history = history
    for name, past in history.items():
        d = next(x for x in p.inputs if x.name == name)
        key = history_name(name)
        shape = ", ".join(["B", "H", str(past)] + [sizes_var[a] for a in d.axes])
        em.leaf("input", name)
        lines.append(f"    past_{name} = states.get({key!r})  # the last {past} tokens of {name} before this call")
        lines.append(f"    past_{name} = torch.zeros({shape}, dtype=real, device=dev) if past_{name} is None "
                     f"else past_{name}.to(dtype=real, device=dev)")
        lines.append(f"    ext_{name} = torch.cat([past_{name}, in_{name}], dim=2)")
    _param_leaves(p, em)
    return em


def _input_leaves(p: Program, em: Emitter, dtype_var: str, prefix: str) -> None:
    """Each input, bound on first use as ``{prefix}_{name}``: cast to ``dtype_var``, laid out [B, H, T, ...]."""
    for d in p.inputs:
        nm = f"{prefix}_{d.name}"
        perm = ", ".join(["0", "2", "1"] + [str(3 + i) for i in range(len(d.axes))])
        em.leaf_defs[("input", d.name)] = [
            f"{nm} = inputs[{d.name!r}].to({dtype_var}).permute({perm})  # [B, H, T, {', '.join(d.axes)}]"
            .replace(", ]", "]")]
        em.leaf_names[("input", d.name)] = nm


def _param_leaves(p: Program, em: Emitter) -> None:
    for d in p.params + p.buffers:
        nm = f"{'pm' if d.kind == 'param' else 'bf'}_{d.name}"
        em.leaf_defs[(d.kind, d.name)] = [f"{nm} = params[{d.name!r}].to(dtype=real, device=dev).unsqueeze(0)  # [1, H"
                                          + "".join(f", {a}" for a in d.axes) + "]"]
        em.leaf_names[(d.kind, d.name)] = nm


def input_dtype_emitter(p: Program, em: Emitter, dtype_var: str, prefix: str) -> Emitter:
    """A second emitter over ``em``'s lines and sizes whose inputs (and constants) are in the dtype
    named by ``dtype_var`` instead of the compute dtype; parameters stay in the compute dtype. For
    programs without reads of past tokens."""
    out = Emitter(em.sizes_var, em.lines, em.indent, dtype_var, em.cdt, em.dev)
    out.count = 1000  # its names (x1001, ...) never meet em's
    _input_leaves(p, out, dtype_var, prefix)
    _param_leaves(p, out)
    return out


def emit_reference(p: Program) -> list[str]:
    """Lines of ``init_params`` and ``reference(inputs, params, states, sizes, output_final_state)``."""
    from .attention.plan import reference_cache_lines

    cached = reference_cache_lines(p)  # attention form with a key/value cache: a wrapper over the full run
    lines = _init_lines(p)
    lines += ["", ""]
    if cached:
        lines += cached + ["", ""]
    name = "_reference_tokens" if cached else "reference"
    lines += [
        f"def {name}(inputs, params, states, sizes, output_final_state=False):",
        '    """The meaning of the .mix file in plain PyTorch: a loop over tokens for the states,',
        '    masked quadratic attention for sums over key tokens. inputs {name: [B, T, H, ...]},',
        '    params {name: [H, ...]}, states {name: [B, H, ...]} (missing = zeros).',
        '    Returns (o [B, T, H, ...], final states or None)."""',
    ]
    em = prologue(p, lines)
    sizes_var = em.sizes_var
    history = em.history
    if p.mask is not None:
        e, lay = em.val(p.mask, "pre")
        em.emit(f"mask = {em.expand(em.tensor(e, lay), lay or (), (T_VAR, U_VAR))}.expand(1, 1, T, T)"
                "  # mask(t, u): key u visible from query t")
        em.mask_var = "mask"
    elif p.has_key_tokens:
        em.emit("mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril().view(1, 1, T, T)  # causal: u <= t")
        em.mask_var = "mask"
    out = p.output
    out_axes = [v.axis for v in out.vars]
    out_shape_tail = "".join(f", {sizes_var[a]}" for a in out_axes)
    if not p.states:
        e, lay = em.val(out.value, "pre")
        e = em.expand(em.tensor(e, lay), lay or (), (T_VAR, *out.vars))
        em.emit(f"o = {e}.expand(B, H, T{out_shape_tail})")
        final = "{}"
        for name in history:
            final = final[:-1] + (", " if final != "{}" else "") + f"{history_name(name)!r}: ext_{name}[:, :, T:]}}"
    else:
        for d in p.states:
            shape = ", ".join(["B", "H"] + [sizes_var[a] for a in d.axes])
            dt = "cplx" if d.complex else "real"
            em.emit(f"st_{d.name} = states.get({d.name!r})")
            em.emit(f"st_{d.name} = torch.zeros({shape}, dtype={dt}, device=dev) if st_{d.name} is None "
                    f"else st_{d.name}.to(dtype={dt}, device=dev)")
            em.state_names[d.name] = f"st_{d.name}"
        loop = em.loop_indent
        new_names = []
        for eq in p.updates:
            d = p.decl(eq.target)
            e, lay = em.val(eq.value, "step")
            shape = ", ".join(["B", "H"] + [sizes_var[a] for a in d.axes])
            e = em.expand(em.tensor(e, lay), lay or (), tuple(eq.vars))
            nm = f"new_{eq.target}"
            em.emit(f"{nm} = ({e}).expand({shape})" + (".to(cplx)" if d.complex else ""), loop)
            new_names.append((eq.target, nm))
        em.emit(", ".join(f"st_{a}" for a, _ in new_names) + " = " + ", ".join(b for _, b in new_names), loop)
        e, lay = em.val(out.value, "out")
        e = em.expand(em.tensor(e, lay), lay or (), tuple(out.vars))
        em.emit(f"o_steps.append(({e}).expand(B, H{out_shape_tail}))", loop)
        em.emit("o_steps = []")
        em.emit("for t in range(T):")
        lines.extend(em.loop)
        em.emit("o = torch.stack(o_steps, dim=2)")
        final = "{" + ", ".join([f"{d.name!r}: st_{d.name}" for d in p.states]
                                + [f"{history_name(n)!r}: ext_{n}[:, :, T:]" for n in history]) + "}"
    perm = ", ".join(["0", "2", "1"] + [str(3 + i) for i in range(len(out_axes))])
    lines.append(f"    o = o.permute({perm})  # [B, T, H{''.join(', ' + a for a in out_axes)}]")
    lines.append(f"    return o, ({final} if output_final_state else None)")
    return lines
