"""Lightning module training the trainable adapters of an adapted causal LM."""

from __future__ import annotations

import math

import lightning as L
import torch

from adaplex.adapted import Adapted


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


class AdapterLM(L.LightningModule):
    """Next-token loss on batches of token ids; only adapter parameters are optimised."""

    def __init__(self, handle: Adapted, lr: float = 1e-3, warmup: int = 10, total_steps: int = 100) -> None:
        super().__init__()
        self.handle = handle
        self.model = handle.model
        self.lr, self.warmup, self.total_steps = lr, warmup, total_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.handle.trainable_parameters(), lr=self.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup, self.total_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
