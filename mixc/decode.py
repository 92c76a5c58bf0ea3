"""A low-overhead decoder for serving loops: one token at a time through the recurrent form's step
kernel, the state kept in a preallocated buffer and updated in place.

``dec = m.decoder(batch_size, num_heads, device=..., dtype=..., **sizes)``, then
``o_t = dec.step(**inputs_t)`` with every input of one token shaped ``[B, H, ...]`` (the ``[B, T, H, ...]``
layout without its T axis); ``o_t`` is ``[B, H, ...]``, a view of a buffer the next step overwrites (copy
it to keep it). ``dec.state`` is the declared states (views of the buffer, ``[B, H, ...]``),
``dec.load_state(states)`` copies states in (say, a chunked prefill's final state), ``dec.reset()``
zeroes them. A step allocates nothing that outlives it and never waits on the device, so a CUDA graph
can capture it (``torch.cuda.graph``) with static input tensors.

Host path: the first step of each input layout (shapes, strides, dtypes, alignment, device) is recorded;
when it is the kernel launch alone on views of the inputs and the decoder's buffers, later steps of that
layout replay the launch with the new inputs' pointers (nothing else runs on the host). ``dec.params`` are
the decoder's own fp32 copies, fixed at construction (update them in place, never rebind them).
"""

from __future__ import annotations

import torch


def bind_decoder(mixer, num_heads: int, device, params: dict | None, sizes: dict,
                 groups: tuple[str, ...]) -> tuple[dict, dict]:
    """What every decoder checks and binds first: (the sizes, bound; ``{name: tensor}``, the given parameters
    and buffers over the mixer's initialisers). Every axis of the ``groups`` of the mixer's metadata must be
    bound, every given parameter known and shaped [H, ...] with the decoder's H."""
    bound = mixer._sizes(sizes)
    for group in groups:
        for name, m in mixer.meta[group].items():
            for a in m["axes"]:
                if a not in bound:
                    raise ValueError(f"{group[:-1]} '{name}' needs size {a}: pass {a}=... to decoder()")
    p = {} if params is None else dict(params)
    defaults = mixer.parameters_init(num_heads, device=device, **sizes)
    unknown = [k for k in p if k not in defaults]
    if unknown:
        raise ValueError(f"unexpected parameter '{unknown[0]}' for mixer '{mixer.name}'")
    for name, x in p.items():
        if x.shape[0] != num_heads:
            raise ValueError(f"parameter '{name}' has H={x.shape[0]} (dim 0) but the decoder has {num_heads}")
    return bound, {k: p.get(k, v) for k, v in defaults.items()}


class Decoder:
    """One-token steps of a compiled mixer; see the module docstring."""

    def __init__(self, mixer, batch_size: int, num_heads: int, *, device="cpu", dtype=torch.float32,
                 params: dict | None = None, **sizes) -> None:
        mod = mixer._module
        if not hasattr(mod, "recurrent_step"):
            why = mixer.meta.get("not_emitted", {}).get("recurrent", "the analysis has no recurrent form")
            raise ValueError(f"mixer '{mixer.name}' has no recurrent step kernel: {why}")
        self.mixer, self._mod = mixer, mod
        self.batch_size, self.num_heads = int(batch_size), int(num_heads)
        bound, p = bind_decoder(mixer, self.num_heads, device, params, sizes, ("inputs", "params", "buffers", "states"))
        meta = mixer.meta
        self.sizes = bound
        self.params = {k: v.to(device=device, dtype=torch.float32) for k, v in p.items()}
        B, H = self.batch_size, self.num_heads
        shape = mod.recurrent_state_shape(B, H, bound)
        self.h = torch.zeros(shape, dtype=torch.float32, device=device)  # the kernels' state layout, fp32
        self._o32 = torch.empty(B, 1, H, shape[3], dtype=torch.float32, device=device)  # [B, H, K, V(, 2)]
        self._out = torch.empty(B, 1, H, *[bound[a] for a in meta["output"]["axes"]], dtype=dtype, device=device)
        self._names = list(meta["inputs"])
        self._shapes = {n: (B, H, *[bound[a] for a in m["axes"]]) for n, m in meta["inputs"].items()}
        # token history ("k@past": the last tokens of an input read at t - m), in buffers of its own
        self.history = {n: torch.zeros(B, H, *[bound[a] for a in m["axes"]], dtype=torch.float32, device=device)
                        for n, m in meta["states"].items() if "@" in n}
        self._o_view = self._out[:, 0]  # what step returns
        # a step that is one launch on views of its inputs is recorded once per input layout and replayed
        self._replay = getattr(mod, "RECURRENT_STEP_REPLAY", False) and hasattr(mod, "rec_step_record")
        self._replays: dict = {}  # input layout -> the recorded step (None: not replayable)
        self._fixed = [self.h, self._out, self._o32, *self.params.values(), *self.history.values()]

    def step(self, **inputs_t: torch.Tensor) -> torch.Tensor:
        """One token: inputs ``[B, H, ...]`` -> output ``[B, H, ...]`` (a view of a reused buffer); the
        state advances in place."""
        try:
            xs = [inputs_t[n] for n in self._names]
        except KeyError as ex:
            raise ValueError(f"missing input '{ex.args[0]}' of one token, shaped [B, H, ...]") from None
        if len(inputs_t) != len(xs):
            extra = [k for k in inputs_t if k not in self._names]
            raise ValueError(f"unexpected input '{extra[0]}'; the mixer takes {', '.join(self._names)}")
        ptrs = [x.data_ptr() for x in xs]
        layout = tuple([(x.shape, x.stride(), x.dtype, x.get_device(), p & 15) for x, p in zip(xs, ptrs)])
        rp = self._replays.get(layout)
        if rp is not None:  # the same layout as a recorded step: its launch again, nothing else
            rp(xs, ptrs)
            return self._o_view
        for n, x in zip(self._names, xs):
            if tuple(x.shape) != self._shapes[n]:
                raise ValueError(f"input '{n}' has shape {tuple(x.shape)}; one token is {self._shapes[n]}")
        x = {n: t.unsqueeze(1) for n, t in zip(self._names, xs)}  # [B, 1, H, ...]

        def run():
            self._mod.recurrent_step(x, self.params, self.h, self.sizes, self._out, self._o32, self.history)

        if self._replay and layout not in self._replays:
            self._replays[layout] = self._mod.rec_step_record(run, xs, self._fixed)
        else:
            run()
        return self._o_view

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The declared states ``{name: [B, H, ...]}`` (fp32 views of the decoder's buffer)."""
        return {**self._mod.recurrent_unpack(self.h), **self.history}

    def load_state(self, states: dict[str, torch.Tensor]) -> None:
        """Copy states ``{name: [B, H, ...]}`` in (a missing one is zero)."""
        unknown = [k for k in states if k not in self.mixer.meta["states"]]
        if unknown:
            raise ValueError(f"unknown state '{unknown[0]}'; the mixer has {', '.join(self.mixer.meta['states'])}")
        for n, buf in self.history.items():
            buf.copy_(states[n]) if n in states else buf.zero_()
        packed = self._mod.recurrent_pack(states, self.sizes)
        if packed is None:
            self.h.zero_()
        else:
            if packed.is_complex():  # the decoder keeps a complex state as fp32 pairs
                packed = torch.view_as_real(packed)
            if tuple(packed.shape) != tuple(self.h.shape):
                raise ValueError(f"states of shape {tuple(packed.shape)} (packed) do not fit the decoder's "
                                 f"{tuple(self.h.shape)}")
            self.h.copy_(packed)

    def reset(self) -> None:
        """Zero the state (start new sequences)."""
        self.h.zero_()
        for buf in self.history.values():
            buf.zero_()
