"""A classification head on a transformer's pooled hidden states.

logits = W · dropout(pool(h)) + b, with pool one of:
- cls:  the first token's state (BERT's [CLS]);
- mean: the mean over real tokens (what sentence encoders such as all-MiniLM-L6-v2 are trained for);
- last: the last real token's state (decoder LMs: the only one that has seen the whole input).

It is saved in a bundle beside the adapters, as a member of role "head"; it is not attached to sites.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from adaplex.methods.base import MethodConfig

Pooling = Literal["cls", "mean", "last"]


class HeadConfig(MethodConfig):
    method: Literal["classifier-head"] = "classifier-head"
    targets: tuple[str, ...] = ("pooled",)
    labels: tuple[str, ...] = Field(min_length=2, description="class names, in the order of the logits")
    pooling: Pooling
    hidden: int = Field(gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    text_fields: tuple[str, ...] = Field(("text",), min_length=1, max_length=2, description="the input's fields")
    max_length: int = Field(128, gt=1, description="tokens per input, as trained")

    @model_validator(mode="after")
    def _distinct(self) -> HeadConfig:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels repeat")
        return self


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: Pooling) -> torch.Tensor:
    """(B, T, d) states and (B, T) real-token mask -> (B, d). ``last`` expects right padding."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    last = mask.long().sum(1).clamp(min=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassifierHead(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.pooling = config.pooling
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.hidden, len(config.labels))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d), (B, T) -> logits (B, classes)."""
        return self.out(self.dropout(pool(hidden, mask, self.pooling)))
