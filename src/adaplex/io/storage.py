"""Saving and loading adapter directories and bundles (``adaplex.io.records`` has their files).

Every write is atomic (``adaplex.io.atomic``); every read is verified before anything is attached,
and a load that fails leaves the model exactly as it was. Wherever an adapter directory is taken, a
bundle or a PEFT LoRA directory works too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaplex.core.adapted import Adapted
from adaplex.core.fingerprint import fingerprint
from adaplex.errors import StorageError
from adaplex.io import peft, peft_format
from adaplex.io.atomic import atomic_directory
from adaplex.io.banks import add_bank_from_experts, expert_config, expert_state
from adaplex.io.records import (
    BUNDLE_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    BundleRecord,
    Record,
    read_adapter_record,
    read_bundle_record,
    write_record,
)
from adaplex.io.tensor_files import read_tensors, write_files
from adaplex.methods import MethodConfig, method_config
from adaplex.util.version import VERSION

log = logging.getLogger(__name__)


def _written_now() -> dict[str, str]:
    return {"adaplex_version": VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds")}


def _base_fields(model: nn.Module, version: str | None, parent: str | None) -> dict[str, Any]:
    return {
        "base": str(model.config.name_or_path or model.config.model_type),
        "base_model_type": model.config.model_type,
        "base_fingerprint": fingerprint(model),
        **_written_now(),
        "version": version,
        "parent": parent,
    }


def write_adapter(
    handle: Adapted,
    name: str,
    directory: Path,
    role: str,
    base_fields: dict[str, Any],
    provenance: dict[str, Any] | None = None,
) -> None:
    """Write adapter ``name`` into an existing, empty ``directory`` (no atomicity here)."""
    write_files(directory, name, role, handle.configs[name], handle.state_dict(name), base_fields, provenance)


def save_adapter(
    handle: Adapted,
    name: str,
    directory: str | Path,
    *,
    role: str = "adapter",
    version: str | None = None,
    parent: str | None = None,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Save one adapter atomically; an existing directory is replaced only with ``overwrite``."""
    handle.stack.check(name)
    directory = Path(directory)
    with atomic_directory(directory, overwrite) as staging:
        write_adapter(handle, name, staging, role, _base_fields(handle.model, version, parent), provenance)
    return directory


def base_fields_of(record: Record) -> dict[str, Any]:
    """Record fields for new adapter files made for the base that ``record`` names, without the model
    in hand (a generator's output is for the base of the zoo it learned from)."""
    return {
        "base": record.base,
        "base_model_type": record.base_model_type,
        "base_fingerprint": record.base_fingerprint,
        **_written_now(),
    }


@dataclass(frozen=True)
class Part:
    """A bundle member that is not an adapter at sites (a classification head): written like one,
    with its role, and read back by ``read_part``, never attached."""

    role: str
    config: MethodConfig
    tensors: dict[str, torch.Tensor]


def save_bundle(
    handle: Adapted,
    directory: str | Path,
    members: dict[str, str] | None = None,
    *,
    roles: dict[str, str] | None = None,
    parts: dict[str, Part] | None = None,
    notes: dict[str, str] | None = None,
    version: str | None = None,
    parent: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save several adapters as one bundle; ``members`` maps member directory -> adapter name, ``parts``
    member directory -> a part that is not an adapter, ``notes`` file name -> text kept beside them
    (gate statistics, say).

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
        for member, part in (parts or {}).items():
            (staging / member).mkdir(parents=True)
            write_files(staging / member, member, part.role, part.config, part.tensors, fields)
            written[member] = part.role
        for file_name, text in (notes or {}).items():
            (staging / file_name).write_text(text, encoding="utf-8")
        write_record(BundleRecord(name=directory.name, members=written, **fields), staging / BUNDLE_FILE)
    return directory


PART_ROLES = ("head",)


def find_part(bundle: str | Path, role: str) -> Path:
    """The directory of the bundle's member of ``role``, read from its files alone."""
    bundle = Path(bundle)
    if not (bundle / BUNDLE_FILE).is_file():
        raise StorageError(f"{bundle} is not a bundle; give the directory a classification run saved")
    members = [m for m, r in read_bundle_record(bundle).members.items() if r == role]
    if not members:
        raise StorageError(f"{bundle} has no {role}; is it a classification model?")
    return bundle / members[0]


def read_part(model: nn.Module, member: Path, force: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config fields and verified tensors of a bundle's part (``find_part``) made for this base."""
    record = read_adapter_record(member)
    check_base(model, fingerprint(model), record, member, force)
    return record.config, read_tensors(member, record)


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


@dataclass(frozen=True)
class _Loading:
    """How one attach reads what it finds: the base's fingerprint, and what the caller allowed."""

    fingerprint: str
    force: bool
    trainable: bool
    allow_nonfinite: bool


def _attach_verified(model: nn.Module, directory: Path, name: str | None, how: _Loading) -> list[str]:
    """Read, verify and attach every adapter under ``directory``; returns the names attached."""
    if peft_format.is_peft_dir(directory):
        return [peft.import_into(model, directory, name, how.trainable, how.allow_nonfinite)]
    if (directory / BUNDLE_FILE).is_file():
        bundle = read_bundle_record(directory)
        check_base(model, how.fingerprint, bundle, directory, how.force)
        loaded = []
        experts = {}
        for member, role in bundle.members.items():
            if role in PART_ROLES:
                continue  # read by read_part, not attached
            if role == "expert":
                record = read_adapter_record(directory / member)
                check_base(model, how.fingerprint, record, directory / member, how.force)
                tensors = read_tensors(directory / member, record, how.allow_nonfinite)
                experts[Path(member).name] = (record.config, tensors)
            else:
                loaded += _attach_verified(model, directory / member, None, how)
        if experts:
            add_bank_from_experts(Adapted.of(model), "experts", experts, str(directory), how.trainable)
            loaded.append("experts")
        return loaded
    record = read_adapter_record(directory)
    check_base(model, how.fingerprint, record, directory, how.force)
    config = method_config(record.config, source=str(directory / CONFIG_FILE))
    tensors = read_tensors(directory, record, how.allow_nonfinite)
    adapter_name = name or record.name
    Adapted.of(model).add_loaded(adapter_name, config, tensors, str(directory / WEIGHTS_FILE), how.trainable)
    return [adapter_name]


def attach(
    model: nn.Module,
    path: str | Path,
    *,
    name: str | None = None,
    force: bool = False,
    trainable: bool = False,
    allow_nonfinite: bool = False,
) -> list[str]:
    """Attach an adapter directory, a bundle (all members) or a PEFT LoRA directory, all or nothing;
    returns the names of the adapters it added. A NaN or infinite value in a file is an error naming
    the tensor unless ``allow_nonfinite``."""
    path = Path(path)
    if not path.is_dir():
        raise StorageError(f"{path} is not a directory; give an adapter, bundle or PEFT LoRA directory")
    existing = Adapted.find(model)
    before = list(existing.configs) if existing is not None else []
    try:
        return _attach_verified(model, path, name, _Loading(fingerprint(model), force, trainable, allow_nonfinite))
    except BaseException:
        handle = Adapted.find(model)
        if handle is not None:
            for added in [n for n in handle.configs if n not in before]:
                handle.remove(added)
            if existing is None:
                handle.detach()
        raise


def load(
    model: nn.Module,
    path: str | Path,
    *,
    name: str | None = None,
    force: bool = False,
    trainable: bool = False,
    allow_nonfinite: bool = False,
) -> Adapted:
    """``attach`` and return the model's handle."""
    attach(model, path, name=name, force=force, trainable=trainable, allow_nonfinite=allow_nonfinite)
    return Adapted.of(model)
