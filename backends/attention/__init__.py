"""The attention form: flash-style tiled softmax kernels generated from the score and mask, a key/value
cache for decoding (split-KV for long caches). ``BACKEND`` is what backends/registry.py reads."""


def _backend():
    from mixc.backends.registry import FormBackend

    from .. import custom_op, hostint
    from . import emit, launch

    return FormBackend(form="attention", emit=emit.emit, support=(custom_op, hostint, launch), native_varlen=True,
                       describe=emit.describe)


BACKEND = _backend()
