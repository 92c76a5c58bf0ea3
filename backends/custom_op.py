"""What the forms' torch custom operators share (pasted into generated modules before the forms that use it).

A form that registers its kernels as a torch operator (``torch.library.custom_op``: opaque to torch.compile, so a
compiled model calls it without a graph break) names the operator after a hash of its kernels' source, so two
generated modules pasting different versions of a form never share an operator that is not theirs; optional
outputs travel as empty tensors, since an operator returns tensors only.
This file needs only torch; `mixc compile` pastes it into the generated module.
"""

import torch


def _op_tag(fns, *settings) -> str:
    """16 hex digits of a hash of the source of ``fns`` (jitted kernels, launch wrappers or plain functions) and
    of ``settings`` (module constants that change what they compute)."""
    import hashlib
    import inspect

    def unwrap(f):  # a launcher (_Launch) holds a jitted kernel, which holds the Python function
        while hasattr(f, "fn"):
            f = f.fn
        return f

    src = "".join(inspect.getsource(unwrap(f)) for f in fns) + repr(settings)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _op_defined(name: str):
    """The operator ``mixc::<name>`` when it is already defined (by another module pasting the same source: the
    name carries the tag of its source), else None."""
    try:
        return getattr(torch.ops.mixc, name)
    except (AttributeError, RuntimeError):
        return None


def _op_pair(prefix: str, fns, *settings):
    """(forward name, backward name, the forward operator when it is already defined, else None) of a form's pair
    of operators ``mixc::<prefix>_{fwd,bwd}_<tag>``, the tag hashing ``fns`` and ``settings`` (:func:`_op_tag`)."""
    tag = _op_tag(fns, *settings)
    fwd, bwd = f"{prefix}_fwd_{tag}", f"{prefix}_bwd_{tag}"
    return fwd, bwd, _op_defined(fwd)


def _op_empty(x: torch.Tensor) -> torch.Tensor:
    """The stand-in for an absent optional output: an empty fp32 tensor on ``x``'s device."""
    return x.new_empty(0, dtype=torch.float32)


def _op_or_none(x):
    """None for an absent (``None`` or empty) operator output, else the tensor."""
    return None if x is None or x.numel() == 0 else x
