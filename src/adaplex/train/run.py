"""`adaplex train CONFIG`: build the adapted model from a TrainConfig, fit it on Lightning, save.

Output directory: config.yaml (snapshot), logs/ (CSV and TensorBoard), checkpoints/ (adapter-only
Lightning checkpoints, the last ``keep_checkpoints`` of them plus last.ckpt), adapter/ (the final
trained adapter, or a bundle when several adapters train).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from adaplex.compose.gate import UNIPELT, UniPELTConfig, add_unipelt, gates, unipelt_config
from adaplex.core.adapted import Adapted
from adaplex.core.models import choose_base, load_base
from adaplex.errors import ConfigError, StorageError
from adaplex.io.describe import GATE_STATS, recorded_base
from adaplex.io.storage import attach, save_adapter, save_bundle
from adaplex.methods import MethodConfig, method_config
from adaplex.train.config import AdapterSpec, TrainConfig
from adaplex.train.data import CausalLMData, build_examples
from adaplex.train.gates import GateAnalytics
from adaplex.train.module import AdapterLM
from adaplex.train.speed import compile_blocks
from adaplex.train.strategy import full_parameters, strategy_for

log = logging.getLogger(__name__)


def build_model(config: TrainConfig, source: str) -> tuple[tuple[Adapted, dict[str, list[str]]], object]:
    """Base model (the one rule: config.base, else the first loaded adapter's base, else the default)
    with every adapter of the config created or loaded, trained or frozen, and weighted: ((handle, the
    adapter names each spec produced; a bundle produces several), tokenizer)."""
    loaded = [a.path for a in config.adapters if a.path is not None]
    recorded, relative_to = recorded_base(loaded[0]) if loaded else (None, None)
    gpu = uses_gpu(config.trainer.accelerator)
    model, tokenizer = load_base(
        choose_base(config.base, recorded),
        relative_to=relative_to,
        dtype=torch.bfloat16 if config.quantize != "none" and gpu else torch.float32,
        quantize=config.quantize,
        device="cuda" if config.quantize != "none" and gpu else "cpu",
    )
    return model_with_adapters(model, config.adapters, source), tokenizer


def spec_config(spec: AdapterSpec, source: str) -> MethodConfig | UniPELTConfig | None:
    """The validated config of an adapter to create (None: one to load from ``spec.path``)."""
    if spec.config is None:
        return None
    where = f"{source}: adapters.{spec.name}.config"
    if spec.config.get("method") == UNIPELT:
        return unipelt_config(spec.config, where)
    return method_config(spec.config, where)


def model_with_adapters(model, specs: list[AdapterSpec], source: str) -> tuple[Adapted, dict[str, list[str]]]:
    """The model's handle with every spec's adapters created (a ``unipelt`` config: its submodules and
    gate) or loaded, trained or frozen, and weighted; with the adapter names each spec produced."""
    handle = Adapted.of(model)
    produced: dict[str, list[str]] = {}
    for spec in specs:
        config = spec_config(spec, source)
        if config is None:
            produced[spec.name] = attach(model, spec.path, name=spec.name, trainable=spec.train)
        elif isinstance(config, UniPELTConfig):
            produced[spec.name] = add_unipelt(handle, spec.name, config, spec.train)
        else:
            handle.add(spec.name, config, spec.train)
            produced[spec.name] = [spec.name]
        for name in produced[spec.name]:
            handle.stack.set_weight(name, spec.weight)
    return handle, produced


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Lightning's precision for a config's ``precision``: "auto" is bf16-mixed where training runs on a
    GPU, else 32-true."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if uses_gpu(accelerator) else "32-true"


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting trains on a GPU here."""
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def precision_for(config: TrainConfig) -> str:
    return resolve_precision(config.trainer.precision, config.trainer.accelerator)


def lightning_trainer(source: str, **settings: Any) -> L.Trainer:
    """``L.Trainer(**settings)``; settings Lightning refuses (accelerator: gpu without one, fsdp on a CPU)
    become one ConfigError naming ``source``."""
    try:
        return L.Trainer(**settings)
    except (MisconfigurationException, ValueError) as err:
        raise ConfigError(f"{source}: trainer: {' '.join(str(err).split())}") from None


def main_process() -> bool:
    """False in the processes Lightning launches for the other ranks of a DDP run (they say nothing)."""
    return rank_zero_only.rank == 0


def train(config: TrainConfig, source: str = "config", resume: bool = False) -> Path:
    """Run the training the config describes; returns the directory of the final adapter."""
    out = config.output
    last = out / "checkpoints" / "last.ckpt"
    launched_rank = not main_process()  # a process Lightning launched for DDP re-runs this command
    if resume and not last.is_file():
        raise StorageError(f"nothing to resume: {last} does not exist; run without --resume")
    if not resume and not launched_rank and out.exists() and any(out.iterdir()):
        raise StorageError(f"{out} already holds a run; pass --resume to continue it or choose another output")
    L.seed_everything(config.seed, verbose=False)
    (handle, produced), tokenizer = build_model(config, source)
    data = config.data
    train_examples = build_examples(data.train, data, tokenizer)
    eval_examples = build_examples(data.eval, data, tokenizer) if data.eval else []
    per_step = data.batch_size * config.optim.grad_accum
    steps = config.optim.max_steps or math.ceil(len(train_examples) / per_step) * config.optim.max_epochs
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    trainer: L.Trainer | None = None
    try:
        if not resume and not launched_rank:
            (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

        module = AdapterLM(
            handle,
            lr=config.optim.lr,
            warmup=config.optim.warmup_steps,
            total_steps=steps,
            weight_decay=config.optim.weight_decay,
            fused_loss=config.trainer.fused_loss,
        )
        if config.trainer.compile != "off":
            compile_blocks(handle.model, config.trainer.compile)
        datamodule = CausalLMData(
            train_examples, eval_examples, data, steps * per_step, config.seed, tokenizer.pad_token_id or 0
        )
        callbacks: list[L.Callback] = [
            ModelCheckpoint(
                dirpath=out / "checkpoints",
                filename="step-{step}",
                every_n_train_steps=config.trainer.checkpoint_every_n_steps,
                save_top_k=config.trainer.keep_checkpoints,
                monitor="step",
                mode="max",
                save_last=True,
            )
        ]
        if eval_examples and config.eval.early_stopping_patience:
            callbacks.append(EarlyStopping("val_loss", patience=config.eval.early_stopping_patience))
        analytics = GateAnalytics(handle, out / "gates") if eval_examples and gates(handle) else None
        if analytics is not None:
            callbacks.append(analytics)
        loggers = [CSVLogger(out, name="logs", version="csv")]
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            loggers.append(TensorBoardLogger(out, name="logs", version="tb"))
        trainer = lightning_trainer(
            source,
            max_steps=steps,
            max_epochs=1,  # one Lightning epoch is the whole run: StepSampler spans all epochs of the data
            accumulate_grad_batches=config.optim.grad_accum,
            gradient_clip_val=config.optim.gradient_clip,
            val_check_interval=min(config.eval.every_n_steps * config.optim.grad_accum, steps * config.optim.grad_accum)
            if eval_examples
            else None,
            check_val_every_n_epoch=None,
            limit_val_batches=config.eval.max_batches,
            num_sanity_val_steps=0,
            precision=precision_for(config),
            accelerator=config.trainer.accelerator,
            devices=config.trainer.devices,
            strategy=strategy_for(config.trainer.strategy, handle.model, uses_gpu(config.trainer.accelerator)),
            use_distributed_sampler=False,  # CausalLMData splits its one run order across processes
            logger=loggers,
            callbacks=callbacks,
            log_every_n_steps=1,
            enable_model_summary=False,
        )
        handle.model.train()
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if resume else None, weights_only=True)
    except BaseException:
        if not resume and not launched_rank and (trainer is None or trainer.global_step == 0):
            _remove_new(out, existed)  # a run that failed before its first step leaves nothing behind
        raise
    handle.model.eval()
    with full_parameters(trainer):  # every rank gathers FSDP's shards; rank 0 saves
        if not trainer.is_global_zero:
            return out / "adapter"
        final = analytics.final if analytics is not None else None
        return save_result(handle, config, produced, out / "adapter", final)


def _remove_new(out: Path, existed: bool) -> None:
    """Delete what a failed run wrote into ``out``: the directory itself when the run made it."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in out.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def save_result(
    handle: Adapted,
    config: TrainConfig,
    produced: dict[str, list[str]],
    target: Path,
    gate_stats: dict | None = None,
) -> Path:
    """One trained adapter: an adapter directory. Several, or any expert bank: a bundle holding every
    adapter of the run (frozen ones too, so a routed bundle stays whole: shared/ + experts/<key>/); a
    gated model's bundle keeps the last read-out of its gates as gates.json."""
    trained = [n for spec in config.adapters if spec.train for n in produced[spec.name]]
    lineage = {"version": config.version, "parent": config.parent}
    notes = {GATE_STATS: json.dumps(gate_stats, indent=1) + "\n"} if gate_stats else None
    if len(trained) == 1 and not handle.banks():
        return save_adapter(handle, trained[0], target, role=trained[0], overwrite=True, **lineage)
    members = [n for n in handle.configs if n not in handle.banks()]
    if handle.banks():
        return save_bundle(
            handle, target, {n: n for n in members}, roles={n: "shared" for n in members}, overwrite=True, **lineage
        )
    return save_bundle(
        handle, target, {n: n for n in trained}, roles={n: n for n in trained}, notes=notes, overwrite=True, **lineage
    )
