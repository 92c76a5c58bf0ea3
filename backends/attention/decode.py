"""A key/value-cache decoder for the attention form: one token at a time against a preallocated cache.

``dec = m.decoder(batch_size, num_heads, max_len=N, device=..., dtype=..., **sizes)``, then
``o = dec.prefill(**inputs)`` (inputs ``[B, T, H, ...]``, output ``[B, T, H, V]``) and ``o_t = dec.step(**inputs_t)``
(inputs ``[B, H, ...]``, output ``[B, H, V]``, a view of a buffer the next step overwrites).

The cache is ``[B, H, CAP, width]`` per cached input (keys, values) in the decoder's dtype. CAP is ``max_len``, or,
when the mask keeps only the last W keys (the plan's window; the score then depends on t - u only), ``min(W,
max_len)`` slots used as a ring buffer (position u in slot u % W). A step writes the token's key and value in place
(``index_copy_`` at a device-side position), runs the generated split-KV kernel over the filled slots (the length is
read on the device) and merges the splits into the output buffer: no host synchronisation, no allocation that
outlives the step, so ``torch.cuda.graph`` can capture it with static inputs (a replay advances the device position
only: ``dec.length``, the host count of tokens, counts step() calls).
"""

from __future__ import annotations

import torch

from mixc.decode import bind_decoder


class AttentionDecoder:
    """One-token steps of a compiled attention-form mixer over a key/value cache; see the module docstring."""

    def __init__(self, mixer, batch_size: int, num_heads: int, *, max_len: int, device="cpu",
                 dtype=torch.float32, params: dict | None = None, **sizes) -> None:
        mod = mixer._module
        spec = getattr(mod, "_ATTN_SPEC", None)
        if spec is None or "attention" not in mod.FORMS:
            why = mixer.meta.get("not_emitted", {}).get("attention", "the analysis has no attention form")
            raise ValueError(f"mixer '{mixer.name}' has no attention form to decode with: {why}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int (the cache's tokens), got {max_len!r}")
        self.mixer, self._mod, self._spec = mixer, mod, spec
        self.batch_size, self.num_heads, self.max_len = int(batch_size), int(num_heads), max_len
        self.device, self.dtype = torch.device(device), dtype
        meta = mixer.meta
        bound, p = bind_decoder(mixer, self.num_heads, device, params, sizes, ("inputs", "params", "buffers"))
        self.sizes = bound
        H = self.num_heads
        self.params = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in p.items()}
        if spec["params"]:  # [H, NP]: the per-head scalars the score reads, in the kernel's order
            self._pars = torch.stack([self.params[n].reshape(H) for n in spec["params"]], 1).contiguous()
        else:
            self._pars = torch.zeros(H, 1, dtype=torch.float32, device=device)
        self._dims = tuple(float(bound[s]) for s in spec["sizes"])
        window = spec["window"]
        self.ring = window is not None and window < max_len
        self.capacity = window if self.ring else max_len
        self._names = list(meta["inputs"])
        self._widths = {n: tuple(bound[a] for a in meta["inputs"][n]["axes"]) for n in self._names}
        self._cached = list(dict.fromkeys([spec["k"], spec["v"]]))
        B = self.batch_size
        self.cache = {n: torch.zeros(B, H, self.capacity, *[bound[a] for a in meta["inputs"][n]["axes"]],
                                     dtype=dtype, device=device) for n in self._cached}
        dv = self.cache[spec["v"]].shape[3]
        self._cache_device = self.cache[spec["v"]].device  # concrete (cuda:0 where device was "cuda")
        bn, ns, _ = mod._attn_decode_plan(self.capacity, B * H, self.device)
        self._op = torch.empty(ns, B * H, mod._attn_width(dv), dtype=torch.float32, device=device)
        self._lp = torch.empty(ns, B * H, dtype=torch.float32, device=device)
        self._out = torch.empty(B, H, dv, dtype=dtype, device=device)
        self._pos = torch.zeros(1, dtype=torch.int64, device=device)  # the next token's position (device)
        self.length = 0  # tokens in the sequence so far (host)

    # -- the cache ----------------------------------------------------------------------------------------

    def _slots(self) -> torch.Tensor:
        """The slots of the kept tokens, oldest first."""
        n = min(self.length, self.capacity)
        pos = torch.arange(self.length - n, self.length, device=self.device)
        return pos % self.capacity if self.ring else pos

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The cache as the functional form's states ``{name: [B, H, n, width]}``, oldest token first (copies)."""
        idx = self._slots()
        return {n: c.index_select(2, idx) for n, c in self.cache.items()}

    def load_state(self, states: dict[str, torch.Tensor], length: int | None = None) -> None:
        """Copy a cache ``{name: [B, H, n, width]}`` in (say, the functional form's final state): the n tokens
        before position ``length`` (default n; a ring buffer's cache may be the last n of a longer sequence), the
        last ``capacity`` of them kept."""
        unknown = [k for k in states if k not in self.cache]
        if unknown:
            raise ValueError(f"unknown state '{unknown[0]}'; the cache holds {', '.join(self.cache)}")
        missing = [k for k in self.cache if k not in states]
        if missing:
            raise ValueError(f"load_state needs the whole cache: '{missing[0]}' is missing")
        lens = {int(x.shape[2]) for x in states.values()}
        if len(lens) != 1:
            raise ValueError(f"states: the cache entries have different lengths {sorted(lens)}")
        n = lens.pop()
        if n > self.capacity and not self.ring:
            raise ValueError(f"states hold {n} tokens but the decoder's max_len is {self.max_len}")
        for name, c in self.cache.items():
            x = states[name]
            if tuple(x.shape[:2]) != tuple(c.shape[:2]) or x.shape[3] != c.shape[3]:
                raise ValueError(f"state '{name}' has shape {tuple(x.shape)}; the cache is [B, H, n, width] = "
                                 f"{tuple(c.shape[:2])} x n x {c.shape[3]}")
        length = n if length is None else int(length)
        if length < n or (length != n and not self.ring):
            raise ValueError(f"load_state: length={length} with {n} cached tokens (a cache that is not a ring "
                             "buffer holds every token: length = n)")
        self.length = length
        self._pos.fill_(length)
        idx = self._slots()
        for name, c in self.cache.items():
            c.index_copy_(2, idx, states[name][:, :, n - idx.numel():].to(c.dtype))

    def reset(self) -> None:
        """Empty the cache (start new sequences)."""
        self.length = 0
        self._pos.zero_()

    def truncate(self, length: int) -> None:
        """Drop the tokens from ``length`` on (a plain cache only: a ring buffer has overwritten older slots)."""
        if self.ring:
            raise ValueError("truncate: the cache is a ring buffer of the last "
                             f"{self.capacity} keys; the tokens before them are gone")
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate: length must be in 0..{self.length}, got {length}")
        self.length = length
        self._pos.fill_(length)

    # -- running ------------------------------------------------------------------------------------------

    def _check(self, inputs: dict, rank: int, what: str) -> None:
        for n in self._names:
            if n not in inputs:
                raise ValueError(f"missing input '{n}' of {what}")
        extra = [k for k in inputs if k not in self._names]
        if extra:
            raise ValueError(f"unexpected input '{extra[0]}'; the mixer takes {', '.join(self._names)}")
        for n, x in inputs.items():
            if x.dim() != rank or x.shape[0] != self.batch_size or x.shape[rank - 2] != self.num_heads or \
                    tuple(x.shape[rank - 1:]) != self._widths[n]:
                raise ValueError(f"input '{n}' has shape {tuple(x.shape)}; {what} is "
                                 f"{'[B, H, width]' if rank == 3 else '[B, T, H, width]'} with B = "
                                 f"{self.batch_size}, H = {self.num_heads}, width = "
                                 f"{', '.join(map(str, self._widths[n])) or '(none)'}")
            if x.device != self._cache_device:
                raise ValueError(f"input '{n}' is on {x.device}; the decoder's cache is on {self._cache_device}")

    def prefill(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Run T tokens (inputs ``[B, T, H, ...]``) after the cached ones through the attention form and keep
        their keys and values: the output ``[B, T, H, V]``."""
        self._check(inputs, 4, "a prefill, shaped [B, T, H, ...]")
        T = next(iter(inputs.values())).shape[1]
        if not self.ring and self.length + T > self.max_len:
            raise ValueError(f"prefill of {T} tokens after {self.length} exceeds max_len={self.max_len}")
        init = self.state if self.length else None
        o, final = self.mixer(**inputs, **self.params, initial_state=init, output_final_state=True, form="attention")
        self.load_state(final, self.length + T)
        return o

    def step(self, **inputs_t: torch.Tensor) -> torch.Tensor:
        """One token: inputs ``[B, H, ...]`` -> output ``[B, H, V]`` (a view of a reused buffer); the token's key
        and value are written into the cache in place."""
        self._check(inputs_t, 3, "one token")
        if not self.ring and self.length >= self.max_len:
            raise ValueError(f"step: the cache is full (max_len={self.max_len}); reset() or a larger max_len")
        spec = self._spec
        slot = torch.remainder(self._pos, self.capacity) if self.ring else self._pos
        for n, c in self.cache.items():
            c.index_copy_(2, slot, inputs_t[n].unsqueeze(2).to(c.dtype))
        q = inputs_t[spec["q"]]
        q = q if q.stride(-1) == 1 else q.contiguous()
        self._mod._attn_decode(spec, q, self.cache[spec["k"]], self.cache[spec["v"]], self._pos, self._pars,
                               self._dims, self._out, self._op, self._lp, self.ring)
        self._pos.add_(1)
        self.length += 1
        return self._out
