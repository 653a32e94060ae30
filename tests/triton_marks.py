"""Skip marks shared by the Triton tests: kernels on CPU tensors run under the interpreter (which
conftest.py selects when there is no CUDA), compiled kernels need CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from speedx.kernels.triton_jit import interpreter_active

    INTERPRETED = interpreter_active()
else:
    INTERPRETED = False
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs triton's interpreter (CPU tensors)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (compiled Triton)")
