"""The chunked form: generic Triton kernels for gated linear recurrences, forward and backward, and its emitter.

Every mixer the analysis puts in a chunkable class reduces, after a PyTorch prologue that forms
``q'``, ``k'``, ``v'`` and the log decays from the ``.mix`` expressions, to

    S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) * exp(gs_t) + k_t v_t^T,     o_t = q_t^T S_t

per (sequence, head), with any subset of the decays ``gk`` (per key entry), ``gv`` (per value
entry) and ``gs`` (scalar). Decays enter only as differences of in-chunk cumulative log gates
taken in the direction that is <= 0, so nothing overflows.

Without a per-value decay (identity, scalar and per-key transitions: linear attention, based,
RetNet, Mamba-2, GLA) the call is the chunk-parallel form (:func:`chunk_fwd`, :func:`chunk_bwd`; a
custom operator under torch.compile, so compiled models do not break their graph there):
    forward   _state_walk_kernel the state at every 64-token chunk start (sequential over chunks)
              _out_kernel        per chunk in parallel: o = (q e^G) h + A v (tensor cores), forming
                                 the in-chunk scores A of a per-key decay itself (_intra_key_kernel
                                 for a chunk too sharp to factor)
    backward  _state_walk_kernel the adjoint state at every chunk end (sequential, in reverse)
              _dv_kernel         dv = (k e^(G_L - G)) dh + A^T do
              _dqk_kernel        dq, dk and the log-gate gradient, per chunk (_dqk_key_off_kernel,
                                 _dqk_key_diag_kernel and _dg_key_kernel with a per-key decay)
The log-gate gradient uses dG_t = q_t dq_t - k_t dk_t, summed within the chunk from its end, plus
sum (h dh) at the chunk's end; each token's own term q_t . k_t v_t cancels there and is added to dq,
dk in fp32 only after dG is formed, so no bf16 rounding of it survives. With a per-key decay a chunk
whose cumulative gates stay within e^(+-50) of its middle row (its span, from _local_cumsum_kernel)
is factored: its in-chunk products are whole-chunk tensor-core products around that row. A sharper
chunk is cut into 16-row blocks: blocks against other blocks on tensor cores around a reference row at
their edge, each block against itself exactly (_intra_diag_kernel, _dqk_key_diag_kernel). A bf16 or
fp16 per-key decay of 64+ keys is read as it is (_raw_gate): the walk and the output kernel sum it within
the chunk by one exact tensor-core product (_chunk_cumsum, RAW_G), fp32 G is written only for the
backward, and a forward that no backward follows is the walk and the output kernel alone (SELF_SPAN:
it measures the spans and forms a sharp chunk's scores itself, _exact_scores).
A normaliser (o = q^T S / q^T z, z the same recurrence with v = 1) walks beside the state and
the output kernel divides (NORM); in the backward _dden_kernel forms the denominator's cotangent and
the others divide do by it as they load do. A skip term c_h v_t is added by the output kernel (SKIP),
and a per-token key scale (k'_t = ks_t k_t, mamba2's dt B) is applied as the kernels load k (KS).
:func:`power_features` (based's feature map) has kernels of its own.

With a per-value decay the call is :class:`ChunkRecurrence`: one kernel (:func:`_chunk_fwd_kernel`)
walks each sequence with the state in registers, and the backward is the same kernel three more
times (the adjoint recurrence run in reverse, read three ways).

The package, in pipeline order (the emitter, then the support modules ``mixc compile`` pastes verbatim into
a generated module, in this order; they need only torch and triton, and each imports what it uses from
the ones before it only when it is imported as part of this package):
    plan.py            the chunked plan read from the analysis (:func:`plan.plan`, :class:`plan.ChunkPlan`)
    emit_tensors.py    the prologue's tensors in the kernels' layout and dtype (shared with delta, recurrent)
    emit_features.py   attention-form files with a separable weight: feature maps, then linear attention
    emit.py            the form function's lines, ``mixc explain``'s plan lines, ``BACKEND``
    launcher.py        :class:`launcher._Launch`: launches through Triton's compiled handle
    kernels_common.py  the jit helpers the chunk-parallel kernels share
    kernels_fwd.py     forward kernels: local cumsum and spans, the state walk, in-chunk scores, the output
    kernels_bwd.py     backward kernels: dden, dv, dq/dk/dg (scalar and per-key decays)
    sequential.py      the per-value-decay form: one walking kernel and its autograd
    launch.py          the launch table and :func:`launch.chunk_fwd`, :func:`launch.chunk_bwd`
    power.py           :func:`power.power_features` (based's feature map) and its kernels
    ops.py             the entry points :func:`ops.chunk_recurrence`, :func:`ops.chunk_normalised`: autograd,
                       the custom operator under torch.compile, the floor on log decays
"""

from .launch import LAUNCH, chunk_bwd, chunk_fwd, key_spans
from .ops import ChunkParallel, chunk_normalised, chunk_recurrence
from .power import PowerFeatures, power_features, symmetric_power, tensor_product
from .sequential import ChunkRecurrence, chunk_run

__all__ = ["LAUNCH", "ChunkParallel", "ChunkRecurrence", "PowerFeatures", "chunk_bwd", "chunk_fwd", "chunk_normalised",
           "chunk_recurrence", "chunk_run", "key_spans", "power_features", "symmetric_power", "tensor_product"]

