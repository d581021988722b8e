"""The files of adapter directories and bundles: records, weights, checksums.

Adapter directory: ``adapter_config.json`` (method, hyper-parameters, targets, role, base
identity, version lineage, SHA-256 of the weights, and a checksum of the config itself) beside
``adapter.safetensors`` (tensors keyed '<site path>.<parameter>'). A bundle is a directory with
``bundle.json`` and one adapter directory per member, each loadable alone. Every read is verified:
a missing, corrupt, truncated or replaced file is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from adaplex.errors import StorageError
from adaplex.methods import MethodConfig

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


def write_record(record: Record, path: Path) -> None:
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
    write_record(record, directory / CONFIG_FILE)


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


def read_record(directory: Path) -> Record | None:
    """The verified record of a bundle or adapter directory; None when it holds neither file."""
    for file, kind in ((BUNDLE_FILE, BundleRecord), (CONFIG_FILE, AdapterRecord)):
        if (directory / file).is_file():
            return _read_record(directory / file, kind)
    return None
