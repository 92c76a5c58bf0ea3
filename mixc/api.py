"""The Python surface: ``mixc.load`` / ``mixc.loads`` return a :class:`Mixer`."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from . import emit
from .errors import MixError, Source
from .ir import Program, format_program
from .lower import lower
from .parse import parse

FORMS = ("chunked", "recurrent", "fft", "attention")


def compile_program(text: str, path: str = "<string>", **constants) -> Program:
    """Parse and lower `.mix` source (raises a located :class:`MixError`)."""
    source = Source(path, text)
    try:
        module = parse(text, path)
        return lower(module, source, constants)
    except MixError as err:
        raise err.located(source) from None


class Mixer:
    """A compiled mixer. Call it like a function; see ``docs/MECHANISMS.md`` for the contract.

    ``m(**inputs, initial_state=None, output_final_state=False, cu_seqlens=None, form=None)``
    runs a compiled form (``form=None``: the default, ``m.meta["default_form"]``, where its kernels can run on
    the inputs' device, else the reference); ``m.reference(...)`` runs the plain-PyTorch meaning.
    Inputs are ``[B, T, H, ...]``; parameters (``[H, ...]``) default to the file's initialisers.
    """

    def __init__(self, program: Program) -> None:
        from .analysis import analyse

        self.program = program
        self.name = program.name
        self.analysis = analyse(program)
        _, self.plan = emit.form_plan(program, self.analysis)
        self.source_code = emit.module_source(program, self.analysis, self.plan)
        if os.environ.get("MIXC_DEBUG"):
            import sys

            print(f"{format_program(program)}\n\n{self.analysis.explain()}\n\n{self.source_code}", file=sys.stderr)
        self._module: ModuleType = emit.load_module(self.source_code, program.name)
        self.meta = self._module.MIXER

    # -- running ----------------------------------------------------------------------------

    @property
    def generated(self) -> ModuleType:
        """The generated module itself (``source_code`` loaded): its kernels and the module-level settings the
        forms read at each call, e.g. ``m.generated.DL_WORK16 = False`` for fp32 work tensors in the delta form."""
        return self._module

    @property
    def forms(self) -> list[str]:
        """Forms this mixer can run with today (``reference`` always)."""
        return list(self._module.FORMS)

    def __call__(self, *, initial_state=None, output_final_state=False, cu_seqlens=None, form=None, **inputs):
        if form is not None and form not in self._module.FORMS:
            if form in FORMS:
                raise ValueError(f"form {form!r} is not available for mixer '{self.name}' yet; available: "
                                 f"{', '.join(self.forms)}")
            raise ValueError(f"unknown form {form!r}; forms are {', '.join(FORMS)} (and 'reference')")
        return self._module.forward(initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, form=form, **inputs)

    def reference(self, *, initial_state=None, output_final_state=False, cu_seqlens=None, **inputs):
        """The meaning of the file in plain PyTorch (any device, any float dtype; float64 exact)."""
        return self._module.forward(initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, form="reference", **inputs)

    def decoder(self, batch_size: int, num_heads: int, *, device="cpu", dtype=torch.float32, params=None,
                max_len: int | None = None, **sizes):
        """A :class:`mixc.decode.Decoder`: one-token steps (inputs ``[B, H, ...]``) through the recurrent
        form's step kernel, the state in a preallocated buffer updated in place (CUDA-graph capturable). A
        mixer with no recurrent form but an attention form, given ``max_len``, gets a
        :class:`mixc.backends.attention.decode.AttentionDecoder` (a preallocated key/value cache of max_len
        tokens, or a ring buffer of the mask's window)."""
        from .decode import Decoder

        if not hasattr(self._module, "recurrent_step") and "attention" in self.forms:
            if max_len is None:
                raise ValueError(f"mixer '{self.name}' has no recurrent step kernel; its attention form decodes from "
                                 "a key/value cache: pass max_len=... (the most tokens the cache holds)")
            from .backends.attention.decode import AttentionDecoder

            return AttentionDecoder(self, batch_size, num_heads, max_len=max_len, device=device, dtype=dtype,
                                    params=params, **sizes)
        return Decoder(self, batch_size, num_heads, device=device, dtype=dtype, params=params, **sizes)

    # -- parameters and inputs ----------------------------------------------------------------

    def _sizes(self, given: dict) -> dict:
        meta = self.meta
        unknown = [k for k in given if k not in meta["sizes"]]
        if unknown:
            raise ValueError(f"unknown size {unknown[0]!r}; mixer '{self.name}' has sizes "
                             f"{', '.join(meta['sizes']) or '(none)'}")
        sizes = dict(meta["consts_as_sizes"])
        for k, d in meta["sizes"].items():
            if k in given:
                sizes[k] = int(given[k])
            elif d is not None:
                sizes[k] = d
        return sizes

    def parameters_init(self, H: int, *, seed: int = 0, dtype=torch.float32, device="cpu", **sizes) -> dict:
        """Default parameters and buffers ``{name: [H, ...]}`` from the file's initialisers."""
        bound = self._sizes(sizes)
        for group in (self.meta["params"], self.meta["buffers"]):
            for name, m in group.items():
                for a in m["axes"]:
                    if a not in bound:
                        raise ValueError(f"parameter '{name}' needs size {a}: pass {a}=... to parameters_init")
        return self._module.init_params(int(H), bound, seed=seed, dtype=dtype, device=device)

    def random_inputs(self, B: int, T: int, H: int, *, dtype=torch.float32, device="cpu", seed: int = 0,
                      **sizes) -> dict:
        """Random inputs ``{name: [B, T, H, ...]}`` drawn as each input's ``~ sampler`` says."""
        bound = self._sizes(sizes)
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, m in self.meta["inputs"].items():
            missing = [a for a in m["axes"] if a not in bound]
            if missing:
                raise ValueError(f"input '{name}' needs size {missing[0]}: pass {missing[0]}=...")
            shape = (B, T, H, *[bound[a] for a in m["axes"]])
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            out[name] = _sample(m["sampler"], x, gen).to(dtype=dtype, device=device)
        return out

    def module(self, num_heads: int, *, seed: int = 0, **sizes) -> MixerModule:
        """An ``nn.Module`` holding this mixer's parameters (learnable) and buffers."""
        return MixerModule(self, num_heads, seed=seed, **sizes)

    # -- introspection -----------------------------------------------------------------------

    def ir(self) -> str:
        """The printed IR."""
        return format_program(self.program)

    def __repr__(self) -> str:
        return f"<mixc.Mixer '{self.name}' from {self.program.source.path!r}>"

    # -- copying and pickling: a Mixer is its source text and constants, compiled again on load --------

    def __reduce__(self):
        p = self.program
        constants = {**dict(p.consts), **{k: v for k, v in p.sizes if v is not None}}
        return (_rebuild_mixer, (p.source.text, p.source.path, constants))

    def __deepcopy__(self, memo) -> Mixer:
        return self  # immutable once compiled: a copy would be the same compiled code


def _rebuild_mixer(text: str, path: str, constants: dict) -> Mixer:
    """Unpickle a :class:`Mixer`: compile its source again with the constants and sizes it was built with."""
    return Mixer(compile_program(text, path, **constants))


def _sample(kind: str | None, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    f = torch.nn.functional
    if kind in (None, "normal"):
        return x
    if kind == "uniform":
        return torch.rand(x.shape, generator=gen, dtype=x.dtype)
    if kind == "logsigmoid":
        return f.logsigmoid(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "softplus":
        return f.softplus(x)
    if kind == "positive":
        return torch.exp(0.5 * x)
    if kind == "unit":
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    raise ValueError(f"unknown sampler {kind!r}")


class MixerModule(nn.Module):
    """A mixer with its parameters as ``nn.Parameter`` and its buffers registered."""

    def __init__(self, mixer: Mixer, num_heads: int, *, seed: int = 0, **sizes) -> None:
        super().__init__()
        self.mixer = mixer
        self.num_heads = num_heads
        init = mixer.parameters_init(num_heads, seed=seed, **sizes)
        for name in mixer.meta["params"]:
            self.register_parameter(name, nn.Parameter(init[name]))
        for name in mixer.meta["buffers"]:
            self.register_buffer(name, init[name])

    def forward(self, *, initial_state=None, output_final_state=False, cu_seqlens=None, form=None, **inputs):
        params = {n: getattr(self, n) for n in list(self.mixer.meta["params"]) + list(self.mixer.meta["buffers"])}
        return self.mixer(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                          form=form, **inputs, **params)

    def extra_repr(self) -> str:
        return f"mixer={self.mixer.name!r}, num_heads={self.num_heads}"


def loads(source: str, path: str = "<string>", **constants) -> Mixer:
    """Compile `.mix` source text. Keyword arguments override declared constants and sizes."""
    return Mixer(compile_program(source, path, **constants))


def load(path: str | os.PathLike, **constants) -> Mixer:
    """Compile a `.mix` file. Keyword arguments override declared constants and sizes."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise MixError(f"cannot read {p}: {err.strerror}") from None
    return loads(text, str(path), **constants)
