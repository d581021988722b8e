"""Expert banks on disk: a bank is saved as one plain LoRA/MoSLoRA adapter directory per key
(``experts/<key>/`` in a bundle, role "expert"), so one expert loads alone as an ordinary adapter;
in memory the experts form one ``ExpertBank`` per site so that a mixed batch runs in one pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import ValidationError

from adaplex.core.adapted import Adapted
from adaplex.errors import AdapterNameError, StorageError
from adaplex.methods import ExpertsConfig, LoRAConfig, MoSLoRAConfig, method_config
from adaplex.util.yamlconfig import validation_message


def expert_config(bank: ExpertsConfig, key: str) -> LoRAConfig:
    """The plain LoRA (or MoSLoRA) config of one expert of a bank."""
    fields = {"r": bank.rank(key), "alpha": bank.alpha_of(key), "rslora": bank.rslora, "targets": bank.targets}
    if bank.mixer_init is not None:
        return MoSLoRAConfig(mixer_init=bank.mixer_init, **fields)
    return LoRAConfig(**fields)


def expert_state(handle: Adapted, name: str, key: str) -> dict[str, torch.Tensor]:
    """Tensors of one expert, keyed exactly as a LoRA adapter with the same targets would be."""
    config = handle.banks()[name]
    k, rank = config.keys.index(key), config.rank(key)
    return {
        prefix + part: tensor
        for prefix, bank in handle.bank_modules(name).items()
        for part, tensor in bank.expert_state(k, rank).items()
    }


def expert_bank_config(source: str, **fields: Any) -> ExpertsConfig:
    try:
        return ExpertsConfig(**fields)
    except ValidationError as err:
        raise StorageError(validation_message(err, source)) from None


def add_bank_from_experts(
    handle: Adapted,
    name: str,
    experts: dict[str, tuple[dict, dict[str, torch.Tensor]]],
    source: str,
    trainable: bool = False,
) -> None:
    """Build bank ``name`` from per-key (LoRA config fields, tensors); all experts must fit one bank."""
    configs = {k: method_config(fields, f"{source}/experts/{k}") for k, (fields, _) in experts.items()}
    first_key, first = next(iter(configs.items()))
    for key, config in configs.items():
        if not isinstance(config, LoRAConfig):
            raise StorageError(f"{source}: expert {key!r} is {config.method}; experts must be LoRA or MoSLoRA")
        if config.rank_pattern or config.alpha_pattern:
            raise StorageError(
                f"{source}: expert {key!r} has per-site ranks or alphas; an expert has one rank and alpha at every site"
            )
        for field in ("method", "rslora", "targets"):
            if getattr(config, field) != getattr(first, field):
                raise StorageError(
                    f"{source}: expert {key!r} has {field}={getattr(config, field)!r} but expert {first_key!r} has "
                    f"{getattr(first, field)!r}; experts of one bank differ only in rank and alpha"
                )
    bank = expert_bank_config(
        source,
        keys=tuple(configs),
        r=max(c.r for c in configs.values()),
        alpha=first.alpha,
        rslora=first.rslora,
        key_ranks={k: c.r for k, c in configs.items()},
        key_alphas={k: c.alpha for k, c in configs.items() if c.alpha != first.alpha},
        targets=first.targets,
        mixer_init=first.mixer_init if isinstance(first, MoSLoRAConfig) else None,
    )
    handle.add(name, bank, trainable=trainable)
    try:
        modules = handle.bank_modules(name)
        for k, (key, (_, tensors)) in enumerate(experts.items()):
            parts = ("A", "B", "mixer") if bank.mixer_init is not None else ("A", "B")
            expected = {prefix + part for prefix in modules for part in parts}
            if set(tensors) != expected:
                missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
                raise StorageError(f"{source}/experts/{key}: tensor {missing[0]!r} does not fit the bundle's sites")
            for prefix, module in modules.items():
                state = {p: tensors[prefix + p] for p in parts}
                if state["A"].shape[1] != module.A.shape[2] or state["B"].shape[0] != module.B.shape[1]:
                    raise StorageError(f"{source}/experts/{key}: tensor {prefix}A has a shape that does not fit")
                module.load_expert(k, state)
    except StorageError:
        handle.remove(name)
        raise


@contextmanager
def expert_as_adapter(handle: Adapted, bank_name: str, key: str) -> Iterator[str]:
    """Inside the block, expert ``key`` of a bank is also a plain adapter (returned name), so that
    everything a plain LoRA can do (merge, PEFT export) works on it; it is removed on exit."""
    bank = handle.banks().get(bank_name)
    if bank is None or key not in bank.keys:
        raise AdapterNameError(f"no expert {key!r} in bank {bank_name!r}")
    name = f"{bank_name}-{key}"
    handle.add_loaded(name, expert_config(bank, key), expert_state(handle, bank_name, key), f"{bank_name}/{key}")
    try:
        yield name
    finally:
        handle.remove(name)
