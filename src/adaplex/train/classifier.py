"""Lightning module training adapters and a classification head: cross-entropy (optionally class
weighted) plus the gates' penalties; accuracy and macro-F1 (torchmetrics) at every evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from adaplex.core.adapted import Adapted
from adaplex.methods.head import ClassifierHead
from adaplex.train.gates import GateRegulariser
from adaplex.train.module import AdapterModule, check_finite


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its LM head (a decoder's ``model``, an encoder itself)."""
    return model.base_model


def classify(handle: Adapted, head: ClassifierHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, classes) of a batch of right-padded input_ids and attention_mask."""
    hidden = backbone(handle.model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    states = hidden.last_hidden_state  # (B, T, d)
    return head(states.to(head.out.weight.dtype), batch["attention_mask"])


def metric_set(classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(classes, average="micro"),
            "macro_f1": MulticlassF1Score(classes, average="macro"),
        }
    )


class AdapterClassifier(AdapterModule):
    """Only the trainable adapters and the head are optimised."""

    def __init__(
        self,
        handle: Adapted,
        head: ClassifierHead,
        class_weights: torch.Tensor | None,
        lr: float,
        warmup: int,
        total_steps: int,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.handle, self.head = handle, head
        self.model = handle.model
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.lr, self.warmup, self.total_steps, self.weight_decay = lr, warmup, total_steps, weight_decay
        self.metrics = metric_set(head.out.out_features)
        self.regulariser = GateRegulariser(handle)
        self.history: list[dict[str, float]] = []  # one row per evaluation
        self._val_loss: list[torch.Tensor] = []  # (sum over the batch, examples) per batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with self.regulariser.collecting() as gate_penalty:
            logits = classify(self.handle, self.head, batch)
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=self.class_weights)
        check_finite(loss, self.global_step)
        penalty, terms = gate_penalty()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(logits))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        for name, value in terms.items():
            self.log(name, value)
        return loss + penalty

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = classify(self.handle, self.head, batch).float()
        self._val_loss.append(
            torch.stack([F.cross_entropy(logits, batch["labels"], reduction="sum"), logits.new_tensor(len(logits))])
        )
        self.metrics.update(logits, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        """val_loss (mean over examples), val_accuracy, val_macro_f1; kept in ``history`` too."""
        scores = {f"val_{k}": v for k, v in self.metrics.compute().items()}
        total, examples = torch.stack(self._val_loss).sum(0)
        scores["val_loss"] = total / examples.clamp(min=1)
        self._val_loss.clear()
        self.metrics.reset()
        self.log_dict(scores, prog_bar=True)
        self.history.append(
            {"epoch": self.current_epoch, "step": self.global_step} | {k: float(v) for k, v in scores.items()}
        )

    def configure_optimizers(self) -> dict[str, Any]:
        parameters = self.handle.trainable_parameters() + list(self.head.parameters())
        return self.adapter_optimizer(parameters, self.lr, self.weight_decay, self.warmup, self.total_steps)
