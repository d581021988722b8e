"""`adaplex train CONFIG` with ``task: classification``: adapters (none: a linear probe) and a head on
Lightning, one run per seed, the best evaluation's weights kept (early stopping on the chosen metric).

Output: config.yaml, summary.json (each seed's scores, their mean and standard deviation), curves.png
(the evaluation metrics per epoch), and per seed: seed-<s>/model/ (a bundle: the adapters, the head, and
the gates' last read-out), seed-<s>/metrics.json, seed-<s>/logs/ and, for gated models, seed-<s>/gates/.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from adaplex.compose.gate import gates
from adaplex.core.adapted import Adapted
from adaplex.core.models import find_base, is_causal_lm, load_base
from adaplex.errors import StorageError
from adaplex.io.describe import GATE_STATS
from adaplex.io.storage import Part, save_bundle
from adaplex.methods.head import ClassifierHead, HeadConfig
from adaplex.train import labelled
from adaplex.train.classifier import AdapterClassifier
from adaplex.train.config import ClassificationConfig
from adaplex.train.gates import GateAnalytics
from adaplex.train.run import model_with_adapters, precision_for, spec_config
from adaplex.util.plots import axes, finish, save

log = logging.getLogger(__name__)
METRICS = ("accuracy", "macro_f1")


@dataclass
class Prepared:
    train: list[labelled.Labelled]
    eval: list[labelled.Labelled]
    labels: tuple[str, ...]
    fields: tuple[str, ...]


def prepare(config: ClassificationConfig, seed: int) -> Prepared:
    """Training and evaluation records of one seed: read and checked, few-shot sampled, balanced."""
    data = config.data
    records, fields = labelled.read_labelled(data.train, data)
    labels = labelled.label_set(records, data.train)
    if data.eval is not None:
        held, _ = labelled.read_labelled(data.eval, data, fields)
        labelled.check_labels(held, labels)
        train = records
    else:
        train, held = labelled.stratified_split(records, data.eval_share, seed=0)  # the same split for every seed
    if data.few_shot is not None:
        shot_seed = seed if data.few_shot.seed is None else data.few_shot.seed
        train = labelled.few_shot(train, data.few_shot.k, shot_seed)
    if data.balance == "oversample":
        train = labelled.oversample(train, seed)
    return Prepared(train, held, labels, fields)


def run_classification(config: ClassificationConfig, source: str = "config") -> dict[str, Any]:
    """Train one model per seed; returns (and writes) the summary."""
    out = config.output
    if out.exists() and any(out.iterdir()):
        raise StorageError(f"{out} already holds a run; choose another output")
    base_dir = find_base(config.base)  # a wrong base or adapter config fails before anything is written
    for spec in config.adapters:
        spec_config(spec, source)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        runs = [train_seed(config, seed, source, out / f"seed-{seed}", is_causal_lm(base_dir)) for seed in config.seeds]
    except BaseException:
        if existed:
            for path in out.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            shutil.rmtree(out, ignore_errors=True)
        raise
    summary = summarise(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_curves(runs, out / "curves.png")
    return summary


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each seed's scores, with their mean and (sample) standard deviation over the seeds."""
    summary: dict[str, Any] = {"runs": runs}
    for metric in METRICS:
        values = [r[metric] for r in runs]
        summary[metric] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    summary["trainable_parameters"] = runs[0]["trainable_parameters"]
    return summary


def train_seed(config: ClassificationConfig, seed: int, source: str, out: Path, causal: bool) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    prepared = prepare(config, seed)
    model, tokenizer = load_base(config.base)
    handle, _ = model_with_adapters(model, config.adapters, source)
    pooling = config.classifier.pooling if config.classifier.pooling != "auto" else ("last" if causal else "mean")
    head_config = HeadConfig(
        labels=prepared.labels,
        pooling=pooling,
        hidden=model.config.hidden_size,
        dropout=config.classifier.dropout,
        text_fields=prepared.fields,
        max_length=config.data.max_length,
    )
    head = ClassifierHead(head_config)
    data = config.data
    pad = tokenizer.pad_token_id or 0
    train_set = labelled.encode(prepared.train, tokenizer, prepared.labels, data.max_length)
    eval_set = labelled.encode(prepared.eval, tokenizer, prepared.labels, data.max_length)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train_set, data.batch_size, shuffle=True, generator=generator, collate_fn=lambda b: labelled.collate(b, pad)
    )
    eval_loader = DataLoader(eval_set, data.eval_batch_size, collate_fn=lambda b: labelled.collate(b, pad))
    per_epoch = -(-len(train_loader) // config.optim.grad_accum)
    if config.optim.max_steps:  # a step budget: as many epochs as it takes, evaluated about ten times
        epochs = -(-config.optim.max_steps // per_epoch)
        every = max(1, epochs // 10)
    else:
        epochs, every = config.optim.max_epochs, 1
    total = config.optim.max_steps or per_epoch * epochs
    weights = labelled.class_weights(prepared.train, prepared.labels) if data.balance == "class_weights" else None
    module = AdapterClassifier(
        handle, head, weights, config.optim.lr, config.optim.warmup_steps, total, config.optim.weight_decay
    )
    monitor, mode = f"val_{config.eval.metric}", "min" if config.eval.metric == "loss" else "max"
    best = KeepBest(handle, head, monitor, mode)
    callbacks: list[L.Callback] = [best]
    if config.eval.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor, mode=mode, patience=config.eval.early_stopping_patience))
    analytics = GateAnalytics(handle, out / "gates") if gates(handle) else None
    if analytics is not None:
        callbacks.append(analytics)
    trainer = L.Trainer(
        max_epochs=epochs,
        max_steps=config.optim.max_steps or -1,
        check_val_every_n_epoch=every,
        accumulate_grad_batches=config.optim.grad_accum,
        gradient_clip_val=config.optim.gradient_clip,
        precision=precision_for(config),
        accelerator=config.trainer.accelerator,
        devices=config.trainer.devices,
        strategy=config.trainer.strategy,
        logger=CSVLogger(out, name="logs", version="csv"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    handle.model.train()
    head.train()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=eval_loader)
    if not module.history or module.history[-1]["step"] != trainer.global_step:
        trainer.validate(module, eval_loader, verbose=False)  # a step budget that ended inside an epoch
    best.restore()
    handle.model.eval()
    head.eval()
    result = {
        "seed": seed,
        "train_examples": len(prepared.train),
        "eval_examples": len(prepared.eval),
        "labels": list(prepared.labels),
        "best_epoch": best.epoch,
        "epochs": len(module.history),
        "trainable_parameters": sum(p.numel() for p in handle.trainable_parameters())
        + sum(p.numel() for p in head.parameters()),
        **{m: best.scores[f"val_{m}"] for m in METRICS},
        "history": module.history,
    }
    final_gates = analytics.history[best.epoch] if analytics is not None and analytics.history else None
    save_classifier(handle, head, head_config, out / "model", final_gates)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def save_classifier(
    handle: Adapted, head: ClassifierHead, config: HeadConfig, target: Path, gate_stats: dict | None
) -> Path:
    """A bundle: every adapter of the model, the head (role "head"), the gates' read-out (gates.json)."""
    notes = {GATE_STATS: json.dumps(gate_stats, indent=1) + "\n"} if gate_stats else None
    parts = {"head": Part("head", config, {k: v.detach() for k, v in head.state_dict().items()})}
    members = {n: n for n in handle.configs}
    return save_bundle(handle, target, members, roles=members, parts=parts, notes=notes)


class KeepBest(L.Callback):
    """Copies the trainable tensors at the best evaluation of ``monitor``; ``restore`` puts them back."""

    def __init__(self, handle: Adapted, head: ClassifierHead, monitor: str, mode: str) -> None:
        self.tensors = [p for p in handle.trainable_parameters()] + list(head.parameters())
        self.monitor, self.mode = monitor, mode
        self.epoch = -1
        self.scores: dict[str, float] = {}
        self._saved: list[torch.Tensor] = []

    def on_validation_end(self, trainer: L.Trainer, module: AdapterClassifier) -> None:
        row = module.history[-1]
        value = row[self.monitor]
        previous = self.scores.get(self.monitor)
        better = previous is None or (value > previous if self.mode == "max" else value < previous)
        if better:
            self.epoch = len(module.history) - 1
            self.scores = dict(row)
            self._saved = [p.detach().clone() for p in self.tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.tensors, self._saved, strict=True):
                p.copy_(saved)


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    """Evaluation accuracy and macro-F1 per epoch, one line per seed."""
    fig, panels = axes(9, 3.2, columns=len(METRICS))
    for ax, metric in zip(panels, METRICS, strict=True):
        for run in runs:
            epochs = [h["epoch"] + 1 for h in run["history"]]
            values = [h[f"val_{metric}"] for h in run["history"]]
            ax.plot(epochs, values, marker="o", markersize=3, label=f"seed {run['seed']}")
        ax.set_ylim(0, 1)
        finish(ax, "epoch", metric)
    save(fig, path)
