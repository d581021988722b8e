"""The Lightning strategy a config's ``trainer.strategy`` names. "fsdp" is Lightning's FSDP set up for
adapters on a frozen base (``AdapterFSDP``); every other name goes to Lightning as it is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from adaplex.errors import ConfigError


class AdapterFSDP(FSDPStrategy):
    """Lightning's FSDP for adapters on a frozen base: each decoder block is an FSDP unit, so the base is
    sharded across the processes and gathered one block at a time; the frozen base weights and the
    trainable adapters inside a block share its unit (``use_orig_params``); checkpoints hold full
    tensors, so a saved adapter is the same file whatever the process count. GPUs only: Lightning builds
    FSDP on the CUDA device of each process."""

    def __init__(self, blocks: set[type[nn.Module]]) -> None:
        super().__init__(auto_wrap_policy=ModuleWrapPolicy(blocks), use_orig_params=True, state_dict_type="full")


def decoder_blocks(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s decoder blocks: those its ``_no_split_modules`` names (transformers
    lists there the modules a device map must not split)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not blocks:
        raise ConfigError(
            f"trainer.strategy fsdp: {type(model).__name__} names no decoder blocks to shard by "
            "(_no_split_modules); use strategy: ddp"
        )
    return blocks


def strategy_for(name: str, model: nn.Module, on_gpu: bool) -> str | Strategy:
    """What ``L.Trainer(strategy=...)`` gets for a config's ``trainer.strategy`` (``on_gpu``: whether the
    run trains on GPUs)."""
    if name != "fsdp":
        return name
    if not on_gpu:
        raise ConfigError("trainer.strategy fsdp shards the base across GPUs and needs them; on CPUs use ddp")
    return AdapterFSDP(decoder_blocks(model))


@contextmanager
def full_parameters(trainer: L.Trainer) -> Iterator[None]:
    """Inside the block the model's parameters are whole on every process: under FSDP each process
    gathers them (every rank must enter), elsewhere nothing happens."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        yield
