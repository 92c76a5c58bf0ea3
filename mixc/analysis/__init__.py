"""Analysis: the compiler's decisions, each with its reason in words (pass 3 of the pipeline).

Every backend reads an :class:`Analysis`; nothing downstream looks at a mechanism's name.

* :func:`normal_form` rewrites each state update as ``S_t = A_t(S_{t-1}) + k'_t v'_t^T`` and
  the output as ``o_t = q'_t^T S_t (+ skip)``, naming the expressions that play each part.
* :func:`classify_transition` names the structure of ``A_t`` (identity, constant_scalar,
  scalar, diagonal_key, diagonal_value, elementwise, delta, gated_delta).
* :func:`separability` decides whether a pairwise score ``w(t, u)`` factors into finite
  feature maps, and of what width (sympy), or says why not.
* :func:`time_invariance` decides whether the system is a convolution, and its kernel.
* :func:`analyse` turns the above into the legal forms and the default (:class:`Analysis`).

The package, one decision a module:
    printing.py      IR expressions as maths (:func:`show`), for the reasons and ``mixc explain``
    terms.py         the normal form of an update: its terms, :class:`StateForm`, the transition class
    readouts.py      the output as a readout of the states (:class:`Readout`)
    separable.py     feature maps of a pairwise score (:func:`separability`)
    intervals.py     interval bounds of expressions (:func:`bounds`); decays within (0, 1]
    decisions.py     :func:`analyse`: the whole analysis, time invariance, legal forms and the default
"""

from __future__ import annotations

from .decisions import Analysis, analyse, time_invariance
from .intervals import bounds, decay_in_unit_interval
from .printing import factors_str, show, sizes_str
from .readouts import Readout, readout
from .separable import Separability, separability
from .separable import _side as _side
from .terms import (
    StateForm,
    Term,
    classify_transition,
    expand_terms,
    expand_terms_free,
    normal_form,
    product,
    state_free,
    token_dependent,
)
from .terms import _flatten_mul as _flatten_mul
from .terms import _k_factors as _k_factors

__all__ = ["Analysis", "Readout", "Separability", "StateForm", "Term", "analyse", "bounds", "classify_transition",
           "decay_in_unit_interval", "expand_terms", "expand_terms_free", "factors_str", "normal_form", "product",
           "readout", "separability", "show", "sizes_str", "state_free", "time_invariance", "token_dependent"]
# (_flatten_mul, _k_factors and _side are imported here too: the backends' emitters import them from mixc.analysis)
