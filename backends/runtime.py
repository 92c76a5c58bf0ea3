"""Call-time support shared by every emitted mixer module.

This file needs only torch. `mixc compile` pastes its text into each generated module, so a
compiled mixer runs where mixc is not installed; mixc's own runtime executes the same text.
It checks and binds a call (shapes, sizes, dtypes, devices, parameters, initial states,
``cu_seqlens``) from the module's ``MIXER`` metadata, then runs one form.
"""

import zlib

import torch


class MixerCallError(ValueError):
    """A compiled mixer was called with a wrong argument; the message names it."""


def _shape(axes, lead=()):
    return "[" + ", ".join([*lead, *axes]) + "]"


def seed_for(name, seed):
    """Deterministic per-tensor seed for initialisers (independent of device and call order)."""
    return (zlib.crc32(name.encode()) + 1000003 * int(seed)) % (2**63)


def compute_dtypes(dtype):
    """(real, complex) dtypes the reference computes in: at least float32."""
    if dtype == torch.float64:
        return torch.float64, torch.complex128
    return torch.float32, torch.complex64


class Binding:
    """Sizes bound from the tensors of one call, with who bound each (for messages)."""

    def __init__(self, meta):
        self.meta = meta
        self.value = dict(meta["consts_as_sizes"])
        self.source = {k: f"constant {k}" for k in self.value}

    def bind(self, size, value, who):
        if size in self.value and self.value[size] != value:
            raise MixerCallError(
                f"size {size} disagrees: {who} has {size}={value}, "
                f"but {self.source[size]} has {size}={self.value[size]}"
            )
        if size not in self.value:
            self.value[size] = int(value)
            self.source[size] = who

    def need(self, size, wanted_by):
        if size in self.value:
            return self.value[size]
        default = self.meta["sizes"].get(size)
        if default is not None:
            self.value[size] = default
            self.source[size] = f"the default {size}={default}"
            return default
        raise MixerCallError(
            f"size {size} (needed by {wanted_by}) is not bound: no argument has it. Pass a tensor that has it, "
            f"or give it a value when loading (load(..., {size}=...))"
        )


def _check_tensor(name, what, x, rank, shape_str):
    if not isinstance(x, torch.Tensor):
        raise MixerCallError(f"{what} '{name}' must be a torch.Tensor of shape {shape_str}, got {type(x).__name__}")
    if x.dim() != rank:
        raise MixerCallError(f"{what} '{name}' must have shape {shape_str} ({rank} dims), got {tuple(x.shape)}")


_BOUND = {}  # a checked call's signature -> what binding it found (see bind_call)


def _signature(meta, kwargs, initial_state):
    """Everything bind_call's checks read from a call without cu_seqlens: the names passed and each
    tensor's shape, dtype and device. Raises AttributeError for anything not a tensor (None included),
    which then takes the checked path and its message."""
    sig = [id(meta)]
    for k, x in kwargs.items():
        sig.append((k, x.shape, x.dtype, x.device))
    if initial_state is not None:
        for k, x in initial_state.items():
            sig.append(("initial_state", k, x.shape, x.dtype, x.device))
    return tuple(sig)


def bind_call(meta, kwargs, initial_state, cu_seqlens, init_params):
    """Check one call and return (inputs, params, states, sizes, dims, out_dtype). A call whose signature
    (_signature) passed the checks before takes their result again without repeating them: the host
    time of a short call matters (BENCHMARKS.md, session 5)."""
    key = None
    # (under torch.compile the checks are traced once anyway, and torch 2.11's dynamo cannot trace id())
    if cu_seqlens is None and not torch.compiler.is_compiling():
        try:
            key = _signature(meta, kwargs, initial_state)
        except AttributeError:  # something not a tensor (None included): the checks say what
            pass
        hit = _BOUND.get(key) if key is not None else None
        if hit is not None:  # (no None among the initial states: _signature refused it)
            sizes, dims, dtype, given, defaults = hit
            params = {n: kwargs[n] if n in given else x for n, x in defaults.items()}
            return kwargs, params, dict(initial_state or {}), dict(sizes), dims, dtype
    bound = _bind_checked(meta, kwargs, initial_state, cu_seqlens, init_params)
    if key is not None:
        if len(_BOUND) >= 1024:  # many shapes (decoding at growing lengths): start over
            _BOUND.clear()
        _, params, _, sizes, dims, dtype = bound
        given = frozenset(n for n in params if n in kwargs and kwargs[n] is params[n])
        defaults = {n: None if n in given else x for n, x in params.items()}  # every parameter, in order
        _BOUND[key] = (dict(sizes), dims, dtype, given, defaults)
    return bound


def _bind_checked(meta, kwargs, initial_state, cu_seqlens, init_params):
    """bind_call's checks, each with its message."""
    inputs_meta = meta["inputs"]
    param_meta = {**meta["params"], **meta["buffers"]}
    known = list(inputs_meta) + list(param_meta)
    for k in kwargs:
        if k not in known:
            raise MixerCallError(
                f"unexpected argument '{k}': mixer '{meta['name']}' takes inputs {', '.join(inputs_meta) or '(none)'}"
                + (f" and parameters {', '.join(param_meta)}" if param_meta else "")
            )
    missing = [k for k in inputs_meta if k not in kwargs or kwargs[k] is None]
    if missing:
        k = missing[0]
        raise MixerCallError(f"missing input '{k}' of shape {_shape(inputs_meta[k]['axes'], ('B', 'T', 'H'))}")
    sizes = Binding(meta)
    dims = {}
    dims_src = {}
    first = None
    for name, im in inputs_meta.items():
        x = kwargs[name]
        shape_str = _shape(im["axes"], ("B", "T", "H"))
        _check_tensor(name, "input", x, 3 + len(im["axes"]), shape_str)
        if not x.is_floating_point():
            raise MixerCallError(f"input '{name}' must be a floating-point tensor, got {x.dtype}")
        if first is None:
            first = (name, x)
        else:
            if x.dtype != first[1].dtype:
                raise MixerCallError(f"input '{name}' is {x.dtype} but input '{first[0]}' is {first[1].dtype}")
            if x.device != first[1].device:
                raise MixerCallError(f"input '{name}' is on {x.device} but input '{first[0]}' is on {first[1].device}")
        for d, label in enumerate(("B", "T", "H")):
            if label in dims and dims[label] != x.shape[d]:
                raise MixerCallError(
                    f"input '{name}' has {label}={x.shape[d]} (dim {d}) but input '{dims_src[label]}' has "
                    f"{label}={dims[label]}"
                )
            dims.setdefault(label, int(x.shape[d]))
            dims_src.setdefault(label, name)
        for d, axis in enumerate(im["axes"]):
            sizes.bind(axis, int(x.shape[3 + d]), f"input '{name}' (dim {3 + d})")
    if first is None:
        raise MixerCallError(f"mixer '{meta['name']}' declares no inputs")
    dtype, device = first[1].dtype, first[1].device
    B, T, H = dims["B"], dims["T"], dims["H"]
    if T < 1:
        raise MixerCallError(f"input '{first[0]}' has T=0: a sequence needs at least one token")
    params = {}
    for name, pm in param_meta.items():
        x = kwargs.get(name)
        if x is None:
            continue
        shape_str = _shape(pm["axes"], ("H",))
        _check_tensor(name, "parameter", x, 1 + len(pm["axes"]), shape_str)
        if x.shape[0] != H:
            raise MixerCallError(f"parameter '{name}' has H={x.shape[0]} (dim 0) but the inputs have H={H}")
        if x.device != device:
            raise MixerCallError(f"parameter '{name}' is on {x.device} but the inputs are on {device}")
        if not x.is_floating_point():
            raise MixerCallError(f"parameter '{name}' must be a floating-point tensor, got {x.dtype}")
        for d, axis in enumerate(pm["axes"]):
            sizes.bind(axis, int(x.shape[1 + d]), f"parameter '{name}' (dim {1 + d})")
        params[name] = x
    n_seq = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise MixerCallError("cu_seqlens must be a 1-D integer tensor of sequence boundaries [0, ..., T]")
        if B != 1:
            raise MixerCallError(f"with cu_seqlens the inputs hold sequences packed along T, so B must be 1, got B={B}")
        if len(cu_seqlens) < 2:
            raise MixerCallError(f"cu_seqlens must start at 0, end at T={T} and never decrease, got "
                                 f"{cu_seqlens.tolist()}")
        if torch.compiler.is_compiling():  # no host read of the values in a graph: a check that runs with it
            ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
            torch._assert_async(ok, f"cu_seqlens must start at 0, end at T={T} and never decrease")
        else:
            cu = [int(c) for c in cu_seqlens.tolist()]
            if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
                raise MixerCallError(f"cu_seqlens must start at 0, end at T={T} and never decrease, got {cu}")
        n_seq = len(cu_seqlens) - 1
    states = {}
    if initial_state is None:
        initial_state = {}
    if not isinstance(initial_state, dict):
        raise MixerCallError(f"initial_state must be a dict mapping state names ({', '.join(meta['states'])}) "
                             f"to tensors [B, H, ...], got {type(initial_state).__name__}")
    for k in initial_state:
        if k not in meta["states"]:
            raise MixerCallError(
                f"initial_state has '{k}', but mixer '{meta['name']}' has states "
                f"{', '.join(meta['states']) or '(none)'}"
            )
    lead = "N" if cu_seqlens is not None else "B"
    for name, sm in meta["states"].items():
        x = initial_state.get(name)
        if x is None:
            continue
        shape_str = _shape(sm["axes"], (lead, "H"))
        _check_tensor(name, "initial_state", x, 2 + len(sm["axes"]), shape_str)
        if x.shape[0] != n_seq or x.shape[1] != H:
            raise MixerCallError(
                f"initial_state '{name}' must have shape {shape_str} with {lead}={n_seq}, H={H}; got {tuple(x.shape)}"
            )
        if x.device != device:
            raise MixerCallError(f"initial_state '{name}' is on {x.device} but the inputs are on {device}")
        if x.is_complex() and not sm["complex"]:
            raise MixerCallError(f"initial_state '{name}' is complex but the state is real")
        for d, axis in enumerate(sm["axes"]):
            sizes.bind(axis, int(x.shape[2 + d]), f"initial_state '{name}' (dim {2 + d})")
        states[name] = x
    for group in (meta["params"], meta["buffers"], meta["states"]):
        for name, m in group.items():
            for axis in m["axes"]:
                sizes.need(axis, f"'{name}'")
    for name, default in meta["sizes"].items():  # a size read only as a value takes its default
        if default is not None and name not in sizes.value:
            sizes.need(name, "the mixer")
    if any(n not in params for n in param_meta):
        defaults = default_params(init_params, H, sizes.value, device, compute_dtypes(dtype)[0])
        for n in param_meta:
            params.setdefault(n, defaults[n])
    return kwargs, params, states, sizes.value, (B, T, H, n_seq), dtype


def zero_state(meta, name, sizes, H, dtype, inputs):
    """A zero initial state [1, H, ...] in the dtype the forms compute states in."""
    real, cplx = compute_dtypes(dtype)
    device = next(iter(inputs.values())).device
    sm = meta["states"][name]
    shape = (1, H, *[sizes[a] for a in sm["axes"]])
    return torch.zeros(shape, dtype=cplx if sm["complex"] else real, device=device)


_DEFAULTS = {}


def _constant_result(fn):
    """``fn`` made opaque to torch.compile: its result is computed when the call is traced and kept as a constant
    of the graph (the file's default parameters are: a random initialiser's torch.Generator cannot be traced)."""
    try:
        return torch._dynamo.assume_constant_result(fn)
    except Exception:  # a torch without dynamo
        return fn


@_constant_result
def default_params(init_params, H, sizes, device, dtype=torch.float64):
    """The file's default parameters for this head count, sizes and device, computed once in float64
    (they are deterministic) and kept in ``dtype`` (the forms' compute dtype, so converting them per call
    costs nothing) rather than made on every call; the cache never hands out a tensor to be modified."""
    key = (init_params, H, tuple(sorted(sizes.items())), str(device), dtype)
    if key not in _DEFAULTS:
        made = init_params(H, sizes, dtype=torch.float64, device=device)
        cplx = torch.complex128 if dtype == torch.float64 else torch.complex64
        _DEFAULTS[key] = {k: v.to(cplx if v.is_complex() else dtype) for k, v in made.items()}
    return _DEFAULTS[key]


def as_dtype(x, dtype):
    """``x.to(dtype)`` without the call when x already has it: even a no-op ``.to`` is a dispatched aten op,
    host time that a short call pays several times (the chunked prologue and run_call use this)."""
    return x if x.dtype == dtype else x.to(dtype)


def promoted(x, dtype):
    """x as an operand of +, -, * or / whose other operand is a tensor (with dimensions) of ``dtype``, a float
    type at least as wide as bf16 and fp16: type promotion then computes in ``dtype``, as if x were converted
    first, without the copy (one launch fewer in a short call's prologue). Any other x is converted."""
    return x if x.dtype in (torch.bfloat16, torch.float16, dtype) else x.to(dtype)


def split_varlen(x, cu, i, axis):
    """Sequence i of a packed tensor along `axis`."""
    return x.narrow(axis, cu[i], cu[i + 1] - cu[i])


def run_call(meta, form_fn, kwargs, initial_state, output_final_state, cu_seqlens, init_params):
    """Bind a call and run one form; handles variable-length batches by running each sequence."""
    inputs, params, states, sizes, (B, T, H, n_seq), dtype = bind_call(
        meta, kwargs, initial_state, cu_seqlens, init_params
    )
    inputs = {k: inputs[k] for k in meta["inputs"]}
    if cu_seqlens is not None and getattr(form_fn, "native_varlen", False):
        o, final = form_fn(inputs, params, states, sizes, output_final_state, cu_seqlens=cu_seqlens)
    elif cu_seqlens is None:
        o, final = form_fn(inputs, params, states, sizes, output_final_state)
    else:
        cu = [int(c) for c in cu_seqlens.tolist()]
        outs, finals = [], []
        for i in range(n_seq):
            st = {k: v[i : i + 1] for k, v in states.items()}
            if cu[i + 1] == cu[i]:  # an empty sequence: no output, its state passes through
                finals.append({k: st.get(k, zero_state(meta, k, sizes, H, dtype, inputs)) for k in meta["states"]})
                continue
            seg = {k: split_varlen(v, cu, i, 1) for k, v in inputs.items()}
            o_i, f_i = form_fn(seg, params, st, sizes, True)
            outs.append(o_i)
            finals.append(f_i)
        o = torch.cat(outs, dim=1)
        final = None
        if output_final_state:
            for k in finals[0]:
                shapes = sorted({tuple(f[k].shape[1:]) for f in finals})
                if len(shapes) > 1:  # a key/value cache holds each sequence's own tokens
                    raise MixerCallError(
                        f"final state '{k}' has a different shape in each packed sequence ({shapes}), so it cannot "
                        "be stacked [N, H, ...]: pass output_final_state=False, or run the sequences separately")
            final = {k: torch.cat([f[k] for f in finals], dim=0) for k in finals[0]}
    o = as_dtype(o, dtype)
    return (o, final) if output_final_state else o
