"""Without a GPU, Triton kernels run in Triton's interpreter.

Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when `sparta.kernels` is imported, so it
is set here, before pytest imports any test module. On a GPU machine the kernels run on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
