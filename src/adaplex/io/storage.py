"""Saving and loading adapter directories and bundles (``adaplex.io.records`` has their files).

Every write is atomic (``adaplex.io.atomic``); every read is verified before anything is attached,
and a load that fails leaves the model exactly as it was. Wherever an adapter directory is taken, a
bundle or a PEFT LoRA directory works too.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import nn

from adaplex.core.adapted import Adapted
from adaplex.errors import StorageError
from adaplex.io import peft
from adaplex.io.atomic import atomic_directory
from adaplex.io.banks import add_bank_from_experts, expert_config, expert_state
from adaplex.io.fingerprint import fingerprint
from adaplex.io.records import (
    BUNDLE_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    BundleRecord,
    Record,
    read_adapter_record,
    read_bundle_record,
    read_record,
    read_tensors,
    safetensors_shapes,
    write_files,
    write_record,
)
from adaplex.methods import method_config
from adaplex.util.version import VERSION

log = logging.getLogger(__name__)


def _base_fields(model: nn.Module, version: str | None, parent: str | None) -> dict[str, Any]:
    return {
        "base": str(model.config.name_or_path or model.config.model_type),
        "base_model_type": model.config.model_type,
        "base_fingerprint": fingerprint(model),
        "adaplex_version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": version,
        "parent": parent,
    }


def write_adapter(handle: Adapted, name: str, directory: Path, role: str, base_fields: dict[str, Any]) -> None:
    """Write adapter ``name`` into an existing, empty ``directory`` (no atomicity here)."""
    write_files(directory, name, role, handle.configs[name], handle.state_dict(name), base_fields)


def save_adapter(
    handle: Adapted,
    name: str,
    directory: str | Path,
    *,
    role: str = "adapter",
    version: str | None = None,
    parent: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save one adapter atomically; an existing directory is replaced only with ``overwrite``."""
    handle.stack.check(name)
    directory = Path(directory)
    with atomic_directory(directory, overwrite) as staging:
        write_adapter(handle, name, staging, role, _base_fields(handle.model, version, parent))
    return directory


def save_bundle(
    handle: Adapted,
    directory: str | Path,
    members: dict[str, str] | None = None,
    *,
    roles: dict[str, str] | None = None,
    version: str | None = None,
    parent: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save several adapters as one bundle; ``members`` maps member directory -> adapter name.

    An expert bank is written as one member per key, ``experts/<key>/`` (role "expert"), each a
    plain LoRA/MoSLoRA adapter directory that loads alone.
    """
    members = members or {name: name for name in handle.configs if name not in handle.banks()}
    roles = roles or {}
    handle.stack.check(*members.values())
    directory = Path(directory)
    fields = _base_fields(handle.model, version, parent)
    written: dict[str, str] = {}
    with atomic_directory(directory, overwrite) as staging:
        for member, name in members.items():
            (staging / member).mkdir(parents=True)
            write_adapter(handle, name, staging / member, roles.get(name, "member"), fields)
            written[member] = roles.get(name, "member")
        for bank_name, bank in handle.banks().items():
            for key in bank.keys:
                member = f"experts/{key}"
                if member in written:
                    raise StorageError(f"key {key!r} is in two expert banks; a bundle holds one expert per key")
                (staging / member).mkdir(parents=True)
                write_files(
                    staging / member,
                    f"{bank_name}-{key}",
                    "expert",
                    expert_config(bank, key),
                    expert_state(handle, bank_name, key),
                    fields,
                )
                written[member] = "expert"
        write_record(BundleRecord(name=directory.name, members=written, **fields), staging / BUNDLE_FILE)
    return directory


def check_base(model: nn.Module, own_fingerprint: str, record: Record, source: Path, force: bool) -> None:
    """A different base than the one the adapter was made for is an error unless ``force``."""
    if record.base_fingerprint == own_fingerprint:
        return
    current = model.config.name_or_path or model.config.model_type
    message = (
        f"{source} was made for base {record.base!r} (fingerprint {record.base_fingerprint}), "
        f"not for {current!r} (fingerprint {own_fingerprint})"
    )
    if not force:
        raise StorageError(message + "; pass --base with the right model, or --force to load anyway")
    log.warning("%s; loading anyway (--force)", message)


def _attach_verified(
    model: nn.Module, own_fingerprint: str, directory: Path, name: str | None, force: bool, trainable: bool
) -> list[str]:
    """Read, verify and attach every adapter under ``directory``; returns the names attached."""
    if peft.is_peft_dir(directory):
        return [peft.import_into(model, directory, name=name, trainable=trainable)]
    if (directory / BUNDLE_FILE).is_file():
        bundle = read_bundle_record(directory)
        check_base(model, own_fingerprint, bundle, directory, force)
        loaded = []
        experts = {}
        for member, role in bundle.members.items():
            if role == "expert":
                record = read_adapter_record(directory / member)
                check_base(model, own_fingerprint, record, directory / member, force)
                experts[Path(member).name] = (record.config, read_tensors(directory / member, record))
            else:
                loaded += _attach_verified(model, own_fingerprint, directory / member, None, force, trainable)
        if experts:
            add_bank_from_experts(Adapted.of(model), "experts", experts, str(directory), trainable)
            loaded.append("experts")
        return loaded
    record = read_adapter_record(directory)
    check_base(model, own_fingerprint, record, directory, force)
    config = method_config(record.config, source=str(directory / CONFIG_FILE))
    tensors = read_tensors(directory, record)
    adapter_name = name or record.name
    Adapted.of(model).add_loaded(adapter_name, config, tensors, str(directory / WEIGHTS_FILE), trainable)
    return [adapter_name]


def attach(
    model: nn.Module, path: str | Path, *, name: str | None = None, force: bool = False, trainable: bool = False
) -> list[str]:
    """Attach an adapter directory, a bundle (all members) or a PEFT LoRA directory, all or nothing;
    returns the names of the adapters it added."""
    path = Path(path)
    if not path.is_dir():
        raise StorageError(f"{path} is not a directory; give an adapter, bundle or PEFT LoRA directory")
    existing = Adapted.find(model)
    before = list(existing.configs) if existing is not None else []
    try:
        return _attach_verified(model, fingerprint(model), path, name, force, trainable)
    except BaseException:
        handle = Adapted.find(model)
        if handle is not None:
            for added in [n for n in handle.configs if n not in before]:
                handle.remove(added)
            if existing is None:
                handle.detach()
        raise


def load(
    model: nn.Module, path: str | Path, *, name: str | None = None, force: bool = False, trainable: bool = False
) -> Adapted:
    """``attach`` and return the model's handle."""
    attach(model, path, name=name, force=force, trainable=trainable)
    return Adapted.of(model)


def recorded_base(path: Path) -> tuple[str | None, Path]:
    """The base recorded in an adapter, bundle or PEFT directory, and the directory it is relative to."""
    if peft.is_peft_dir(path):
        return peft.recorded_base(path), path
    record = read_record(path)
    if record is None:
        raise StorageError(f"{path} is not an adapter, bundle or PEFT LoRA directory")
    return record.base, path


def lineage(directory: Path) -> list[str]:
    """Version chain ending at ``directory``: its version, then its parent's, found among its siblings."""

    def record_of(d: Path) -> Record | None:
        try:
            return read_record(d)
        except StorageError:
            return None  # a damaged sibling does not break the chain of the others

    record = record_of(directory)
    if record is None or record.version is None:
        return []
    siblings = {}
    for d in directory.parent.iterdir():
        sibling = record_of(d) if d.is_dir() else None
        if sibling is not None and sibling.version:
            siblings[sibling.version] = sibling
    chain, seen = [record.version], {record.version}
    parent = record.parent
    while parent and parent not in seen:
        chain.append(parent)
        seen.add(parent)
        parent = siblings[parent].parent if parent in siblings else None
    return chain


def describe(path: Path) -> dict[str, Any]:
    """What an adapter, bundle or PEFT directory holds, read from its files without a model."""
    if not path.is_dir():
        raise StorageError(f"{path} is not a directory; give an adapter, bundle or PEFT LoRA directory")
    if peft.is_peft_dir(path):
        config = peft.read_peft_config(path)
        weights = path / peft.PEFT_WEIGHTS
        shapes = safetensors_shapes(weights) if weights.is_file() else {}
        return {
            "kind": "peft-lora",
            "path": str(path),
            "base": config.get("base_model_name_or_path"),
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "targets": config.get("target_modules"),
            "parameters": sum(math.prod(s) for s in shapes.values()),
            "bytes": weights.stat().st_size if weights.is_file() else 0,
        }
    if (path / BUNDLE_FILE).is_file():
        bundle = read_bundle_record(path)
        members = [describe(path / m) | {"member": m} for m in bundle.members]
        return {
            "kind": "bundle",
            "path": str(path),
            "base": bundle.base,
            "base_fingerprint": bundle.base_fingerprint,
            "version": bundle.version,
            "lineage": lineage(path),
            "parameters": sum(m["parameters"] for m in members),
            "bytes": sum(m["bytes"] for m in members),
            "members": members,
        }
    record = read_adapter_record(path)
    weights = path / WEIGHTS_FILE
    return {
        "kind": "adapter",
        "path": str(path),
        "name": record.name,
        "method": record.config.get("method"),
        "role": record.role,
        "config": record.config,
        "base": record.base,
        "base_fingerprint": record.base_fingerprint,
        "dtype": record.dtype,
        "created": record.created,
        "version": record.version,
        "lineage": lineage(path),
        "parameters": sum(math.prod(s) for s in safetensors_shapes(weights).values()),
        "bytes": weights.stat().st_size,
    }
