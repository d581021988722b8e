"""Triton kernels, used on CUDA when Triton is installed (PyTorch's CUDA wheels ship it)."""

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter runs kernels on CPU tensors


def dot_size(n: int) -> int:
    """The smallest power of two >= max(n, 16): what tl.dot and tl.arange take as a block dimension."""
    return max(16, 1 << (n - 1).bit_length())
