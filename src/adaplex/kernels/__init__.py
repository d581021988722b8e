"""Triton kernels, used on CUDA when Triton is installed (PyTorch's CUDA wheels ship it)."""
