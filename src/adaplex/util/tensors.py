"""Small facts about tensors."""

from __future__ import annotations

import torch


def version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for inference tensors, which have none (and which
    only code inside ``torch.inference_mode`` can change)."""
    return -1 if t.is_inference() else t._version
