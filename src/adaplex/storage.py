"""Adapter directories and bundles on disk.

Adapter directory: ``adapter_config.json`` (method, hyper-parameters, targets, role, base
identity, version lineage, SHA-256 of the weights, and a checksum of the config itself) beside
``adapter.safetensors`` (tensors keyed '<site path>.<parameter>'). A bundle is a directory with
``bundle.json`` and one adapter directory per member, each loadable alone.

Every write is atomic (``adaplex.atomic``); every read is verified before anything is attached,
and a load that fails leaves the model exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

import adaplex
from adaplex.adapted import _HANDLES, Adapted
from adaplex.atomic import atomic_directory
from adaplex.errors import StorageError
from adaplex.methods import MethodConfig, method_config
from adaplex.models import fingerprint

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
LEGACY_WEIGHTS = "adapter.bin"
BUNDLE_FILE = "bundle.json"


class Record(BaseModel):
    """Fields shared by adapter and bundle records; ``checksum`` covers all the others."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base: str
    base_model_type: str
    base_fingerprint: str
    adaplex_version: str
    created: str
    version: str | None = None
    parent: str | None = None
    checksum: str = ""

    def content_hash(self) -> str:
        fields = self.model_dump(exclude={"checksum"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class AdapterRecord(Record):
    format: Literal["adaplex-adapter"] = "adaplex-adapter"
    role: str = "adapter"
    config: dict[str, Any]
    dtype: str
    weights_sha256: str


class BundleRecord(Record):
    format: Literal["adaplex-bundle"] = "adaplex-bundle"
    members: dict[str, str]  # member directory (relative) -> role


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_record(record: Record, path: Path) -> None:
    record.checksum = record.content_hash()
    path.write_text(json.dumps(record.model_dump(), indent=2) + "\n")


def _read_record(path: Path, kind: type[Record]) -> Record:
    if not path.is_file():
        raise StorageError(f"{path} not found; is {path.parent} an adaplex adapter or bundle directory?")
    try:
        record = kind.model_validate_json(path.read_bytes())
    except (ValidationError, UnicodeDecodeError) as err:
        raise StorageError(f"{path} is corrupt or not an adaplex file ({_first_error(err)}); restore it") from None
    if record.checksum != record.content_hash():
        raise StorageError(f"{path} fails its checksum: the file was changed or damaged; restore it")
    return record


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'file'}: {first['msg']}"
    return type(err).__name__


def _base_fields(model: nn.Module, version: str | None, parent: str | None) -> dict[str, Any]:
    return {
        "base": str(model.config.name_or_path or model.config.model_type),
        "base_model_type": model.config.model_type,
        "base_fingerprint": fingerprint(model),
        "adaplex_version": adaplex.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": version,
        "parent": parent,
    }


def write_adapter(handle: Adapted, name: str, directory: Path, role: str, base_fields: dict[str, Any]) -> None:
    """Write adapter ``name`` into an existing, empty ``directory`` (no atomicity here)."""
    write_files(directory, name, role, handle.configs[name], handle.state_dict(name), base_fields)


def write_files(
    directory: Path,
    name: str,
    role: str,
    config: MethodConfig,
    tensors: dict[str, torch.Tensor],
    base_fields: dict[str, Any],
) -> None:
    """adapter.safetensors and its verified adapter_config.json."""
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    record = AdapterRecord(
        name=name,
        role=role,
        config=config.model_dump(mode="json"),
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        weights_sha256=_sha256(directory / WEIGHTS_FILE),
        **base_fields,
    )
    _write_record(record, directory / CONFIG_FILE)


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
    from adaplex.routing import banks, expert_config, expert_state

    members = members or {name: name for name in handle.configs if name not in banks(handle)}
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
        for bank_name, bank in banks(handle).items():
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
        _write_record(BundleRecord(name=directory.name, members=written, **fields), staging / BUNDLE_FILE)
    return directory


def read_adapter_record(directory: Path) -> AdapterRecord:
    return _read_record(directory / CONFIG_FILE, AdapterRecord)  # type: ignore[return-value]


def read_bundle_record(directory: Path) -> BundleRecord:
    return _read_record(directory / BUNDLE_FILE, BundleRecord)  # type: ignore[return-value]


def read_safetensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; with ``sha256``, the file must match it first."""
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StorageError(f"{path} does not match the checksum in {CONFIG_FILE}: damaged or replaced; restore it")
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, struct.error, ValueError, RuntimeError) as err:
        raise StorageError(f"{path} is truncated or corrupt ({err}); restore it") from None


def read_tensors(directory: Path, record: AdapterRecord) -> dict[str, torch.Tensor]:
    """Tensors of an adapter directory, verified against the record's SHA-256 and dtype.

    safetensors is the format; a legacy ``adapter.bin`` is read with ``weights_only=True``.
    """
    path = directory / WEIGHTS_FILE
    if path.is_file():
        tensors = read_safetensors(path, record.weights_sha256)
    elif (directory / LEGACY_WEIGHTS).is_file():
        path = directory / LEGACY_WEIGHTS
        if _sha256(path) != record.weights_sha256:
            raise StorageError(f"{path} does not match the checksum in {CONFIG_FILE}: damaged or replaced; restore it")
        tensors = read_legacy(path)
    else:
        raise StorageError(f"{directory} has no {WEIGHTS_FILE}; is it an adapter directory?")
    if record.dtype != "mixed":
        for key, tensor in tensors.items():
            if str(tensor.dtype).removeprefix("torch.") != record.dtype:
                raise StorageError(f"{path}: tensor {key!r} is {tensor.dtype}, the config says {record.dtype}")
    return tensors


def read_legacy(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` state dict, read safely (``weights_only=True``: no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise StorageError(
            f"{path} is not a readable PyTorch weights file ({type(err).__name__}); restore it"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StorageError(f"{path} does not hold a flat dict of tensors")
    return state


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the data."""
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise StorageError(f"{path} is truncated or corrupt ({err}); restore it") from None


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
    from adaplex import peft_io

    if peft_io.is_peft_dir(directory):
        return [peft_io.import_into(model, directory, name=name, trainable=trainable)]
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
            from adaplex.routing import add_bank_from_experts

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
    fresh = model not in _HANDLES
    before = list(_HANDLES[model].configs) if not fresh else []
    try:
        return _attach_verified(model, fingerprint(model), path, name, force, trainable)
    except BaseException:
        if model in _HANDLES:
            handle = _HANDLES[model]
            for added in [n for n in handle.configs if n not in before]:
                handle.remove(added)
            if fresh:
                handle.detach()
        raise


def load(
    model: nn.Module, path: str | Path, *, name: str | None = None, force: bool = False, trainable: bool = False
) -> Adapted:
    """``attach`` and return the model's handle."""
    attach(model, path, name=name, force=force, trainable=trainable)
    return Adapted.of(model)


def read_record(directory: Path) -> Record | None:
    """The verified record of a bundle or adapter directory; None when it holds neither file."""
    for file, kind in ((BUNDLE_FILE, BundleRecord), (CONFIG_FILE, AdapterRecord)):
        if (directory / file).is_file():
            return _read_record(directory / file, kind)
    return None


def recorded_base(path: Path) -> tuple[str | None, Path]:
    """The base recorded in an adapter, bundle or PEFT directory, and the directory it is relative to."""
    from adaplex import peft_io

    if peft_io.is_peft_dir(path):
        return peft_io.recorded_base(path), path
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
    from adaplex import peft_io

    if not path.is_dir():
        raise StorageError(f"{path} is not a directory; give an adapter, bundle or PEFT LoRA directory")
    if peft_io.is_peft_dir(path):
        config = peft_io.read_peft_config(path)
        weights = path / peft_io.PEFT_WEIGHTS
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
