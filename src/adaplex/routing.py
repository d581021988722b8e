"""Routed adapters: one shared adapter plus an expert bank, every sample routed to its key.

On disk a routed bundle is ``shared/`` (role "shared") and ``experts/<key>/`` (role "expert"), each
a plain LoRA/MoSLoRA adapter directory, so one expert loads alone as an ordinary adapter. In memory
the experts form one ``ExpertBank`` adapter per site so that a mixed batch runs in one pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch

from adaplex.adapted import Adapted
from adaplex.errors import AdapterNameError, StorageError
from adaplex.methods import ExpertBank, ExpertsConfig, LoRAConfig, MoSLoRAConfig, method_config

UNROUTED = (None, "__base__")


def banks(handle: Adapted) -> dict[str, ExpertsConfig]:
    return {n: c for n, c in handle.configs.items() if isinstance(c, ExpertsConfig)}


def route(handle: Adapted, keys: Sequence[str | None], unrouted: str = "shared") -> AbstractContextManager[None]:
    """Route sample b of the batch to expert ``keys[b]`` (in whichever bank holds that key); None or
    "__base__" routes to no expert, and then to the shared adapter alone (``unrouted="shared"``) or to
    nothing ("base")."""
    if unrouted not in ("shared", "base"):
        raise AdapterNameError(f"unrouted must be 'shared' or 'base', not {unrouted!r}")
    found = banks(handle)
    if not found:
        raise AdapterNameError("this model has no expert bank to route; add an 'experts' adapter or load a bundle")
    device = next(handle.model.parameters()).device
    known = {key for config in found.values() for key in config.keys}
    unknown = [k for k in keys if k not in UNROUTED and k not in known]
    if unknown:
        raise AdapterNameError(f"unknown routing key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    routes = {}
    for name, config in found.items():  # a key lives in one bank; the others give that sample no expert
        index = [config.keys.index(k) if k in config.keys else -1 for k in keys]
        routes[name] = torch.tensor(index, dtype=torch.long, device=device)
    return handle.stack.route(routes, unrouted_base=unrouted == "base")


def expert_config(bank: ExpertsConfig, key: str) -> LoRAConfig:
    """The plain LoRA (or MoSLoRA) config of one expert of a bank."""
    fields = {"r": bank.rank(key), "alpha": bank.alpha, "rslora": bank.rslora, "targets": bank.targets}
    if bank.mixer_init is not None:
        return MoSLoRAConfig(mixer_init=bank.mixer_init, **fields)
    return LoRAConfig(**fields)


def _bank_modules(handle: Adapted, name: str) -> dict[str, ExpertBank]:
    """ExpertBank modules of bank ``name`` keyed by their state-dict prefix ('<site>.' or '<site>.parts.q.')."""
    found = {}
    for path, adapter in handle.adapters(name).items():
        for sub, module in adapter.named_modules():
            if isinstance(module, ExpertBank):
                found[f"{path}.{sub}." if sub else f"{path}."] = module
    return found


def expert_state(handle: Adapted, name: str, key: str) -> dict[str, torch.Tensor]:
    """Tensors of one expert, keyed exactly as a LoRA adapter with the same targets would be."""
    config = banks(handle)[name]
    k, rank = config.keys.index(key), config.rank(key)
    return {
        prefix + part: tensor
        for prefix, bank in _bank_modules(handle, name).items()
        for part, tensor in bank.expert_state(k, rank).items()
    }


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
        for field in ("method", "alpha", "rslora", "targets"):
            if getattr(config, field) != getattr(first, field):
                raise StorageError(
                    f"{source}: expert {key!r} has {field}={getattr(config, field)!r} but expert {first_key!r} has "
                    f"{getattr(first, field)!r}; experts of one bundle differ only in rank"
                )
    bank = ExpertsConfig(
        keys=tuple(configs),
        r=max(c.r for c in configs.values()),
        alpha=first.alpha,
        rslora=first.rslora,
        key_ranks={k: c.r for k, c in configs.items()},
        targets=first.targets,
        mixer_init=first.mixer_init if isinstance(first, MoSLoRAConfig) else None,
    )
    handle.add(name, bank, trainable=trainable)
    try:
        modules = _bank_modules(handle, name)
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
    bank = banks(handle).get(bank_name)
    if bank is None or key not in bank.keys:
        raise AdapterNameError(f"no expert {key!r} in bank {bank_name!r}")
    name = f"{bank_name}-{key}"
    handle.add_loaded(name, expert_config(bank, key), expert_state(handle, bank_name, key), f"{bank_name}/{key}")
    try:
        yield name
    finally:
        handle.remove(name)


def export_key(handle: Adapted, key: str, out: Path, overwrite: bool = False) -> Path:
    """One key as a PEFT LoRA directory: the non-expert adapters ⊕ that key's expert by rank concatenation."""
    from adaplex.peft_io import export_peft

    bank_name = next((n for n, c in banks(handle).items() if key in c.keys), None)
    if bank_name is None:
        raise AdapterNameError(f"unknown routing key {key!r}")
    shared = [n for n in handle.stack.active if n not in banks(handle)]
    with expert_as_adapter(handle, bank_name, key) as name:
        return export_peft(handle, [*shared, name], out, weights=handle.stack.weights, overwrite=overwrite)
