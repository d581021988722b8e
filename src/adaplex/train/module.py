"""Lightning module training the trainable adapters of an adapted causal LM."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy

from adaplex.compose.route import route
from adaplex.core.adapted import Adapted
from adaplex.errors import AdaplexError
from adaplex.train.data import IGNORE
from adaplex.train.gates import GateRegulariser
from adaplex.train.speed import next_token_loss, use_fused_loss


class TrainingDiverged(AdaplexError):
    """The loss became NaN or infinite."""


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"the loss became {loss.item()} at step {step}; the last good checkpoint is kept "
            "under checkpoints/; lower optim.lr (or set gradient_clip) and run again with --resume"
        )


def adamw(
    parameters: list[torch.nn.Parameter], lr: float, weight_decay: float, loss_scaled: bool = False
) -> torch.optim.AdamW:
    """AdamW; its fused kernel (one launch for every tensor) where the parameters are on CUDA and no grad
    scaler scales the loss (16-mixed: a fused step unscales inside itself, after clipping would have
    seen scaled gradients)."""
    fused = bool(parameters) and all(p.is_cuda for p in parameters) and not loss_scaled
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


class AdapterModule(L.LightningModule):
    """What adaplex's training modules share: their optimizer (``adapter_optimizer``) and gradient
    clipping by norm, done here rather than by Lightning's precision plugins, which refuse it for a fused
    optimizer under mixed precision (one that unscales inside its step; under bf16 nothing is scaled) and
    cannot clip by norm under FSDP. Under FSDP the root module clips its sharded gradients (their norm
    is taken across processes)."""

    def adapter_optimizer(
        self, parameters: list[torch.nn.Parameter], lr: float, weight_decay: float, warmup: int, total: int
    ) -> dict[str, Any]:
        """AdamW (fused unless a grad scaler scales the loss) with linear warm-up then cosine decay,
        stepped every optimizer step: what ``configure_optimizers`` returns."""
        optimizer = adamw(parameters, lr, weight_decay, self._loss_scaled())
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _loss_scaled(self) -> bool:
        """Whether a grad scaler scales the loss (16-mixed); False outside a trainer."""
        trainer = self._trainer
        return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Scale the gradients so that their global norm is at most ``gradient_clip_val`` (adaplex's
        trainers leave Lightning's algorithm at its default, norm)."""
        if not gradient_clip_val:
            return
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            strategy.model.clip_grad_norm_(gradient_clip_val)
        else:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)


class AdapterLM(AdapterModule):
    """Next-token loss; only adapter parameters are optimised, and checkpoints hold only them."""

    def __init__(
        self,
        handle: Adapted,
        lr: float = 1e-3,
        warmup: int = 10,
        total_steps: int = 100,
        weight_decay: float = 0.0,
        fused_loss: str = "auto",
    ) -> None:
        super().__init__()
        self.handle = handle
        self.model = handle.model
        self.lr, self.warmup, self.total_steps, self.weight_decay = lr, warmup, total_steps, weight_decay
        self.fused_loss = fused_loss  # auto | on | off, resolved on the first batch (its device decides)
        self._fused: bool | None = None
        self.strict_loading = False  # checkpoints carry the adapters, not the base weights
        self._key_losses: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # this optimizer step's (sum, tokens)
        self.regulariser = GateRegulariser(handle)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self._fused is None:
            self._fused = use_fused_loss(self.fused_loss, self.model, batch["input_ids"])
        return next_token_loss(self.model, batch, self._fused)

    def loss(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        """Mean next-token loss; a batch with routing keys runs routed and logs each key's loss too."""
        keys = batch.get("keys")
        if keys is None:
            return self(batch)
        with route(self.handle, keys):
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            logits = self.model(**inputs, use_cache=False).logits
        labels = batch["labels"][:, 1:]  # (B, T-1)
        per_token = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none"
        ).view(labels.shape)  # (B, T-1)
        counted = labels != IGNORE
        for key in dict.fromkeys(keys):
            rows = torch.tensor([k == key for k in keys], device=labels.device)
            total, tokens = per_token[rows].sum(), counted[rows].sum()
            if stage == "train":  # logged when the optimizer steps, for the keys this step saw
                seen = self._key_losses.get(key, (0.0, 0))
                self._key_losses[key] = (seen[0] + total.detach(), seen[1] + tokens)
            else:
                self.log(f"val_loss/{key}", total / tokens.clamp(min=1), batch_size=int(rows.sum()), sync_dist=True)
        return per_token.sum() / counted.sum().clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with self.regulariser.collecting() as gate_penalty:
            loss = self.loss(batch, "train")
        check_finite(loss, self.global_step)
        penalty, terms = gate_penalty()
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)  # under DDP: the mean over processes
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.device.type == "cuda":  # this process's peak so far (processes of a DDP or FSDP run are alike)
            self.log("peak_mib", torch.cuda.max_memory_allocated(self.device) / 2**20)
        for name, value in terms.items():
            self.log(name, value)
        return loss + penalty

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Free the gradients as soon as the optimizer has stepped (Lightning would only clear them
        in the next step, after its forward, holding them through that forward's activation peak)."""
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            for optimizer in self.trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)
            self._log_key_losses()

    def _log_key_losses(self) -> None:
        """Each key's loss over the optimizer step that just ended, written to the loggers directly: a key
        absent from the step logs nothing (Lightning's step metrics would repeat its last value)."""
        if self._key_losses:
            metrics = {f"train_loss/{k}": (s / n.clamp(min=1)).item() for k, (s, n) in self._key_losses.items()}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)
            self._key_losses.clear()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch, "val"), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val_loss")
        if loss is not None:
            self.log("val_ppl", torch.exp(loss), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        parameters = self.handle.trainable_parameters()
        return self.adapter_optimizer(parameters, self.lr, self.weight_decay, self.warmup, self.total_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapters' tensors: a checkpoint is a few MB, not a copy of the base."""
        adapter_ids = {id(p) for p in self.handle.parameters()}
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if id(p) in adapter_ids}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
