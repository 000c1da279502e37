"""Kernel tests run the Triton kernels on the CPU interpreter wherever torch sees no CUDA GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
