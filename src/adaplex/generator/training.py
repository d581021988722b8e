"""`adaplex gen prepare|train`: the generator's data made ready, and its training on Lightning.

Experiment directory: config.yaml (snapshot), checkpoints/ (Lightning checkpoints, last.ckpt),
logs/ (CSV, TensorBoard, and SwanLab offline where swanlab is installed), generator/ (the final
model: ``adaplex.generator.store``). ``--resume`` continues from last.ckpt, data order included.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from adaplex.errors import ConfigError, StorageError
from adaplex.generator.config import GenConfig, GenLoss, GenOptim
from adaplex.generator.dataset import TokenSet, condition_embeddings, split_subsets, token_set
from adaplex.generator.encoder import TextEncoder
from adaplex.generator.model import HyperConvGenerator
from adaplex.generator.store import GeneratorRecord, build_network, generator_record, save_generator
from adaplex.generator.tokenizer import Layout, layout_fields, normalize, with_statistics
from adaplex.generator.zoo import Zoo, read_zoo
from adaplex.train.data import ResumableLoader, StepSampler
from adaplex.train.module import AdapterModule, check_finite
from adaplex.train.run import lightning_trainer, main_process, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything a generator trains on: the zoo, its grids (normalised, padded to ``rows``), the
    layout with the training subsets' statistics, and every run's conditioning embeddings."""

    zoo: Zoo
    tokens: TokenSet
    layout: Layout
    rows: int
    grids: torch.Tensor  # (N, rows, D)
    mask: torch.Tensor  # (rows, D): 1 where a position holds a value
    conditions: dict[str, torch.Tensor]  # subset -> (V, P, E)
    train: list[str]
    heldout: list[str]
    encoder: TextEncoder
    steps: list[int] | None = None  # the checkpoints to learn from (None: all)

    def kept_rows(self, subset: str) -> list[int]:
        rows = self.tokens.rows_of([subset])
        return [i for i in rows if self.steps is None or self.tokens.members[i].step in self.steps]

    def items(self, subsets: list[str], evaluation: bool = False) -> list[tuple[int, torch.Tensor]]:
        """(grid row, condition (P, E)) pairs: every checkpoint of the subsets with each conditioning
        text of its run; for evaluation, each run's last checkpoint with its held-out prompt."""
        found = []
        for subset in subsets:
            rows = self.kept_rows(subset)
            if evaluation:
                last = max(rows, key=lambda i: self.tokens.members[i].step)
                found.append((last, self.conditions[f"{subset}:eval"][0]))
            else:
                found.extend((i, c) for i in rows for c in self.conditions[subset])
        return found


def prepare(config: GenConfig) -> Prepared:
    zoo = read_zoo(config.zoo)
    tokens = token_set(zoo, config.width)
    rows = config.tokens or tokens.layout.tokens
    if rows < tokens.layout.tokens:
        raise ConfigError(
            f"a grid of {rows} tokens is too small for the layout, which needs {tokens.layout.tokens} tokens of "
            f"width {config.width}; raise `tokens` or leave it out"
        )
    train, heldout = split_subsets(zoo, config)
    kept = [i for i in tokens.rows_of(train) if config.steps is None or tokens.members[i].step in config.steps]
    if not kept:
        steps = sorted({m.step for m in tokens.members})
        raise ConfigError(f"the zoo holds no checkpoint at steps {config.steps}; it holds steps {steps}")
    layout = tokens.layout
    if config.normalize:
        layout = with_statistics(layout, tokens.grids[kept])
    grids = normalize(tokens.grids, layout)
    extra = rows - layout.tokens
    mask = (~layout.padding()).float()
    if extra:
        grids = torch.cat([grids, grids.new_zeros(len(grids), extra, layout.width)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(extra, layout.width)])
    encoder = TextEncoder(config.encoder, config.lines)
    conditions = condition_embeddings(zoo, encoder)
    return Prepared(zoo, tokens, layout, rows, grids, mask, conditions, train, heldout, encoder, config.steps)


def summary(prepared: Prepared) -> dict[str, Any]:
    return {
        "zoo": str(prepared.zoo.root),
        "members": len(prepared.tokens.members),
        "grid": [prepared.rows, prepared.layout.width],
        "layout_tokens": prepared.layout.tokens,
        "layers": list(prepared.layout.layers()),
        "train_subsets": len(prepared.train),
        "heldout_subsets": prepared.heldout,
        "train_pairs": len(prepared.items(prepared.train)),
        "condition": list(next(iter(prepared.conditions.values())).shape[1:]),
    }


class _Pairs(Dataset):
    def __init__(self, grids: torch.Tensor, items: list[tuple[int, torch.Tensor]]) -> None:
        self.grids, self.items = grids, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row, cond = self.items[i]
        return cond, self.grids[row]


class GeneratorData(L.LightningDataModule):
    """Training pairs in a resumable order over the whole run; the held-out subsets for validation."""

    def __init__(self, prepared: Prepared, optim: GenOptim, seed: int) -> None:
        super().__init__()
        self.train = _Pairs(prepared.grids, prepared.items(prepared.train))
        self.heldout = _Pairs(prepared.grids, prepared.items(prepared.heldout, evaluation=True))
        self.optim, self.seed = optim, seed

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, per_step = trainer.world_size, self.optim.batch_size * trainer.world_size  # one order, split
        sampler = StepSampler(len(self.train), self.optim.max_steps * per_step, self.seed, trainer.global_rank, world)
        loader = ResumableLoader(self.train, batch_size=self.optim.batch_size, sampler=sampler)
        loader.consumed = lambda: trainer.global_step * per_step
        return loader

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(self.heldout, batch_size=self.optim.batch_size) if len(self.heldout) else []


def grid_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: GenLoss
) -> dict[str, torch.Tensor]:
    """mse · mean((pred - target)²) + l1 · mean|pred - target| over the real positions (mask (T, D))."""
    diff = (pred.float() - target) * mask  # (B, T, D)
    count = mask.sum() * pred.shape[0]
    mse, l1 = diff.pow(2).sum() / count, diff.abs().sum() / count
    return {"loss": weights.mse * mse + weights.l1 * l1, "mse": mse, "l1": l1}


class GeneratorModule(AdapterModule):
    def __init__(self, network: HyperConvGenerator, mask: torch.Tensor, loss: GenLoss, optim: GenOptim) -> None:
        super().__init__()
        self.network, self.weights, self.optim = network, loss, optim
        self.register_buffer("mask", mask, persistent=False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        cond, target = batch
        terms = grid_loss(self.network(cond), target, self.mask, self.weights)
        check_finite(terms["loss"], self.global_step)
        self.log_dict({f"train_{k}": v for k, v in terms.items()}, prog_bar=True, sync_dist=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return terms["loss"]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        cond, target = batch
        terms = grid_loss(self.network(cond), target, self.mask, self.weights)
        self.log_dict({f"val_{k}": v for k, v in terms.items()}, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        parameters = list(self.network.parameters())
        return self.adapter_optimizer(parameters, o.lr, o.weight_decay, o.warmup_steps, o.max_steps)


def new_record(config: GenConfig, prepared: Prepared, network_grid: tuple[int, int]) -> GeneratorRecord:
    zoo = prepared.zoo
    return generator_record(
        zoo.members[0].record,
        shape=config.model,
        grid=network_grid,
        rows=prepared.rows,
        lines=config.lines,
        embed=prepared.encoder.width,
        encoder=config.encoder,
        encoder_fingerprint=prepared.encoder.fingerprint(),
        layout=layout_fields(prepared.layout),
        adapter=zoo.members[0].record.config,
        zoo=str(zoo.root),
        train_subsets=prepared.train,
        heldout_subsets=prepared.heldout,
    )


def _loggers(config: GenConfig) -> list[Logger]:
    out = config.output
    loggers: list[Logger] = [CSVLogger(out, name="logs", version="csv"), TensorBoardLogger(out, "logs", "tb")]
    if config.trainer.swanlab and importlib.util.find_spec("swanlab"):
        from swanlab.integration.pytorch_lightning import SwanLabLogger  # optional: only where installed

        loggers.append(
            SwanLabLogger(
                project="adaplex-generator", experiment_name=out.name, logdir=str(out / "logs"), mode="offline"
            )
        )
    return loggers


def train_generator(config: GenConfig, resume: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Train the generator the config describes (or, with ``dry_run``, check data, shapes and one step
    without writing anything); a summary of the run."""
    out = config.output
    last = out / "checkpoints" / "last.ckpt"
    snapshot = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if resume:
        if not last.is_file():
            raise StorageError(f"nothing to resume: {last} does not exist; run without --resume")
        if (out / "config.yaml").read_text() != snapshot:
            raise ConfigError(f"the config differs from the one {out} was started with; resume with that one")
    elif not dry_run and main_process() and out.exists() and any(out.iterdir()):
        raise StorageError(f"{out} already holds a run; pass --resume to continue it or choose another output")
    L.seed_everything(config.seed, verbose=False)
    prepared = prepare(config)
    L_, t = prepared.layout.layers() if prepared.rows == prepared.layout.tokens else (1, prepared.rows)
    record = new_record(config, prepared, (L_, t))
    network = build_network(record)
    module = GeneratorModule(network, prepared.mask, config.loss, config.optim)
    data = GeneratorData(prepared, config.optim, config.seed)
    info = summary(prepared) | {"parameters": sum(p.numel() for p in network.parameters())}
    if dry_run:
        return info | _one_step(module, data)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if not resume and main_process():
        (out / "config.yaml").write_text(snapshot)
    trainer = lightning_trainer(
        str(config.output),
        max_steps=config.optim.max_steps,
        max_epochs=1,
        gradient_clip_val=config.optim.gradient_clip,
        val_check_interval=min(config.trainer.val_every_n_steps, config.optim.max_steps) if prepared.heldout else None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        precision=resolve_precision(config.trainer.precision, config.trainer.accelerator),
        accelerator=config.trainer.accelerator,
        devices=config.trainer.devices,
        strategy=config.trainer.strategy,
        use_distributed_sampler=False,  # GeneratorData splits its one run order across processes
        logger=_loggers(config),
        callbacks=[
            ModelCheckpoint(
                dirpath=out / "checkpoints",
                filename="step-{step}",
                every_n_train_steps=config.trainer.checkpoint_every_n_steps,
                save_top_k=2,
                monitor="step",
                mode="max",
                save_last=True,
            )
        ],
        log_every_n_steps=10,
        enable_model_summary=False,
    )
    began = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=last if resume else None, weights_only=True)
    except BaseException:
        if not resume and trainer.global_step == 0 and not existed and main_process():
            shutil.rmtree(out, ignore_errors=True)  # a run that failed before its first step leaves nothing
        raise
    seconds = time.perf_counter() - began
    if trainer.is_global_zero:  # the other processes of a DDP run hold the same weights
        save_generator(out / "generator", record, network.cpu(), prepared.layout)
    metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items()}
    return info | {
        "generator": str(out / "generator"),
        "steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "pairs_per_second": round(trainer.global_step * config.optim.batch_size * trainer.world_size / seconds, 1),
        "metrics": metrics,
    }


def _one_step(module: GeneratorModule, data: GeneratorData) -> dict[str, Any]:
    """One forward and backward pass on a training batch: the shapes and the first loss."""
    cond, target = next(iter(DataLoader(data.train, batch_size=data.optim.batch_size)))
    pred = module.network(cond)
    if pred.shape != target.shape:
        raise ConfigError(f"the generator emits {tuple(pred.shape)} but the grids are {tuple(target.shape)}")
    terms = grid_loss(pred, target, module.mask, module.weights)
    terms["loss"].backward()
    return {"dry_run": True, "batch": list(cond.shape), "output": list(pred.shape), "loss": terms["loss"].item()}
