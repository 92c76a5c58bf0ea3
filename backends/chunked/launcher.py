"""The chunked kernels' launcher: :class:`_Launch` launches a Triton kernel through its compiled handle
after the first launch of each specialisation (``FAST_LAUNCH``; ``MIXC_FAST_LAUNCH=0`` turns it off).
This file needs only torch and triton; `mixc compile` pastes it into the generated module.
"""

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# MIXC_FAST_LAUNCH=0 sends every launch through Triton's own dispatch (see _Launch)
FAST_LAUNCH = not INTERPRET and os.environ.get("MIXC_FAST_LAUNCH", "1") != "0"


def _arg_key(a):
    """What Triton specialises a runtime argument on: a tensor's dtype and whether its address is a
    multiple of 16; an int's being 1, a multiple of 16, and its width (32 or 64 bits); else its type."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if type(a) is int:
        return a == 1, a % 16 == 0, -0x80000000 <= a < 0x80000000
    return type(a)


class _Launch:
    """A Triton kernel launched through its compiled handle: ``kernel[grid](*args, **constexprs)`` as
    usual. The first launch of each specialisation (the current device, :func:`_arg_key` of every
    positional argument, the keyword arguments) goes through Triton, which compiles the kernel and
    returns its compiled handle; later ones launch that handle directly with every parameter in order,
    skipping Triton's per-call binding and cache key, most of a launch's host time (BENCHMARKS.md,
    session 5). Keyword arguments must be constexprs or launch options (num_warps), positional ones the
    runtime arguments (a launch that passes a constexpr by position, or a runtime argument by keyword, always
    goes through Triton). In the interpreter, with MIXC_FAST_LAUNCH=0, or when a Triton version returns no
    compiled handle, every launch goes through Triton."""

    def __init__(self, fn):
        self.fn = fn
        self.handles = {}  # specialisation -> (compiled kernel, the parameters after the positional ones)

    def __getitem__(self, grid):
        if not FAST_LAUNCH:
            return self.fn[grid]
        return lambda *args, **kwargs: self._run(grid, args, kwargs)

    def _run(self, grid, args, kwargs):
        """Launch; returns (compiled kernel, the parameters after the positional ones) when the specialisation
        is cached (or now is), else None."""
        key = (torch.cuda.current_device(), tuple(map(_arg_key, args)), tuple(kwargs.items()))
        hit = self.handles.get(key)
        if hit is not None:  # the handle reads all three grid sizes
            hit[0][grid if len(grid) == 3 else (*grid, 1, 1)[:3]](*args, *hit[1])
            return hit
        compiled = self.fn[grid](*args, **kwargs)
        params = getattr(self.fn, "params", None)
        if params is None or not hasattr(compiled, "__getitem__"):  # not a Triton with compiled handles
            return None
        if any(p.is_constexpr for p in params[:len(args)]):  # a constexpr passed by position: its value is not
            return None  # in the key (only _arg_key's classes), so this launch must not be cached
        params = params[len(args):]
        if not all(p.is_constexpr for p in params):
            return None
        self.handles[key] = (compiled, tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params))
        return self.handles[key]

    @property
    def __name__(self):
        return self.fn.__name__
