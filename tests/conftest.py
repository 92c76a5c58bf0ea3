"""Test setup: without a GPU, Triton kernels run in the interpreter (set before triton is imported)."""

import os
import shutil

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
