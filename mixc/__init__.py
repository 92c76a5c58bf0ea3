"""mixc: compile declarative sequence mixers (.mix files) into PyTorch and Triton kernels.

The pipeline, one module per step::

    parse (mixc.parse) -> lower to IR (mixc.lower, mixc.ir) -> emit (mixc.backends, mixc.emit) -> run (mixc.api)
"""

__version__ = "0.1.0"

from .api import Mixer, load, loads  # noqa: E402
from .errors import MixError  # noqa: E402

__all__ = ["Mixer", "MixError", "load", "loads", "__version__"]
