"""mixc: compile declarative sequence mixers (.mix files) into PyTorch and Triton kernels.

The pipeline, one module per step::

    parse (mixc.parse) -> lower to IR (mixc.lower, mixc.ir) -> emit (mixc.backends, mixc.emit) -> run (mixc.api)
"""

__version__ = "0.1.0"

import os as _os

# Installed, `mixc.backends` and `mixc.grammar` are the repository's backends/ and grammar/ folders
# (pyproject's package-dir). Run from a checkout that was not installed, find them beside mixc/.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "backends", "runtime.py")) and _checkout not in __path__:
    __path__.append(_checkout)

from .api import Mixer, load, loads  # noqa: E402
from .errors import MixError  # noqa: E402

__all__ = ["Mixer", "MixError", "load", "loads", "__version__"]
