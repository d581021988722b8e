"""A routed bundle from adapters that exist: one expert per key (adaplex or PEFT LoRA directories) and
an optional shared adapter, served in one mixed batch (``route``) like a bundle trained routed."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from adaplex.core.adapted import Adapted
from adaplex.errors import StorageError
from adaplex.io.banks import add_bank_from_experts
from adaplex.io.storage import attach, save_bundle
from adaplex.methods import LoRAConfig

BANK = "experts"
SHARED = "shared"


def _take_expert(
    model: nn.Module, directory: Path, force: bool, allow_nonfinite: bool
) -> tuple[LoRAConfig, dict, frozenset[str]]:
    """The expert in ``directory``, read and verified as any load: its config, tensors and sites."""
    handle = Adapted.of(model)
    name = _attach_one(model, directory, "bundle-expert", force, allow_nonfinite)
    try:
        config = handle.configs[name]
        if not isinstance(config, LoRAConfig):
            raise StorageError(f"{directory} is a {config.method} adapter; an expert must be LoRA or MoSLoRA")
        return config, handle.state_dict(name), frozenset(handle.sites(name))
    finally:
        handle.remove(name)


def _attach_one(model: nn.Module, directory: Path, name: str, force: bool, allow_nonfinite: bool) -> str:
    names = attach(model, directory, name=name, force=force, allow_nonfinite=allow_nonfinite)
    if len(names) != 1:
        raise StorageError(f"{directory} is a bundle; give an adapter or PEFT LoRA directory")
    return names[0]


def build_bundle(
    model: nn.Module,
    experts: dict[str, Path],
    out: Path,
    shared: Path | None = None,
    *,
    force: bool = False,
    allow_nonfinite: bool = False,
    version: str | None = None,
    parent: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a routed bundle to ``out``: ``experts`` maps each routing key to an adapter directory.

    Experts may differ in rank and alpha; they must adapt the same sites (targets that differ are an
    error naming the keys and the sites) and be all LoRA or all MoSLoRA. ``model`` is the base they
    were made for (each file's fingerprint is checked, unless ``force``); it is left as it was."""
    if not experts:
        raise StorageError("a routed bundle needs at least one expert (KEY=DIR)")
    existing = Adapted.find(model)
    before = list(existing.configs) if existing is not None else []
    handle = Adapted.of(model)
    try:
        taken = {key: _take_expert(model, directory, force, allow_nonfinite) for key, directory in experts.items()}
        first_key, (first, _, first_sites) = next(iter(taken.items()))
        for key, (_, _, sites) in taken.items():
            if sites != first_sites:
                odd = sorted(sites ^ first_sites)
                raise StorageError(
                    f"experts {first_key!r} and {key!r} adapt different sites ({', '.join(odd[:4])}"
                    f"{', ...' if len(odd) > 4 else ''}); the experts of a bundle must target the same layers"
                )
        fields = {
            k: config.model_copy(update={"targets": first.targets}).model_dump() for k, (config, _, _) in taken.items()
        }
        add_bank_from_experts(
            handle, BANK, {k: (fields[k], tensors) for k, (_, tensors, _) in taken.items()}, "bundle experts"
        )
        members = {}
        if shared is not None:
            _attach_one(model, shared, SHARED, force, allow_nonfinite)
            members = {SHARED: SHARED}
        return save_bundle(
            handle, out, members, roles={SHARED: "shared"}, version=version, parent=parent, overwrite=overwrite
        )
    finally:
        for name in [n for n in handle.configs if n not in before]:
            handle.remove(name)
        if existing is None:
            handle.detach()
