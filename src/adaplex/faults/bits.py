"""Bit flips in floating-point tensors."""

from __future__ import annotations

import torch

from adaplex.errors import ConfigError

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bit_width(dtype: torch.dtype) -> int:
    if dtype not in INT_VIEW:
        raise ConfigError(f"bit flips support float32, float16 and bfloat16, not {dtype}")
    return torch.finfo(dtype).bits


def top_exponent_bit(dtype: torch.dtype) -> int:
    """The highest exponent bit (30 for float32, 14 for float16/bfloat16): a flip there scales by 2^±large."""
    return bit_width(dtype) - 2


def check_bit(bit: int, dtype: torch.dtype) -> None:
    width = bit_width(dtype)
    if not 0 <= bit < width:
        raise ConfigError(f"bit {bit} is out of range for {str(dtype).removeprefix('torch.')} (0-{width - 1})")


def flip_bit(tensor: torch.Tensor, flat_index: torch.Tensor, bit: int) -> torch.Tensor:
    """A copy of ``tensor`` with ``bit`` flipped in the elements at ``flat_index`` (bit 0 = LSB)."""
    check_bit(bit, tensor.dtype)
    view = INT_VIEW[tensor.dtype]
    flat = tensor.detach().clone().contiguous().view(view).reshape(-1)
    sign_bit = bit == bit_width(tensor.dtype) - 1
    flat[flat_index] ^= torch.iinfo(view).min if sign_bit else 1 << bit  # the sign bit is the int's minimum
    return flat.view(tensor.dtype).view(tensor.shape)
