"""Adapter tensors on disk: safetensors written beside their verified record, read back checked against
the record's SHA-256 and dtype; legacy PyTorch ``.bin`` files read with ``weights_only=True`` only."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from adaplex.errors import StorageError
from adaplex.io.records import (
    CONFIG_FILE,
    LEGACY_WEIGHTS,
    WEIGHTS_FILE,
    AdapterRecord,
    file_sha256,
    write_record,
)
from adaplex.methods import MethodConfig


def write_files(
    directory: Path,
    name: str,
    role: str,
    config: MethodConfig,
    tensors: dict[str, torch.Tensor],
    base_fields: dict[str, Any],
    provenance: dict[str, Any] | None = None,
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
        weights_sha256=file_sha256(directory / WEIGHTS_FILE),
        provenance=provenance,
        **base_fields,
    )
    write_record(record, directory / CONFIG_FILE)


def read_safetensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; with ``sha256``, the file must match it first."""
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StorageError(f"{path} does not match the checksum in {CONFIG_FILE}: damaged or replaced; restore it")
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, struct.error, ValueError, RuntimeError) as err:
        raise StorageError(f"{path} is truncated or corrupt ({err}); restore it") from None


def check_finite(tensors: dict[str, torch.Tensor], source: Path, allow: bool) -> dict[str, torch.Tensor]:
    """``tensors``, unless one holds a NaN or an infinite value and ``allow`` is false: then an error
    naming it (such an adapter turns every output it touches into NaN)."""
    if not allow:
        for key, tensor in tensors.items():
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                raise StorageError(
                    f"{source}: tensor {key!r} holds NaN or infinite values; retrain or restore it, "
                    "or pass --allow-nonfinite to load it anyway"
                )
    return tensors


def read_tensors(directory: Path, record: AdapterRecord, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of an adapter directory, verified against the record's SHA-256 and dtype, and finite
    unless ``allow_nonfinite``.

    safetensors is the format; a legacy ``adapter.bin`` is read with ``weights_only=True``.
    """
    path = directory / WEIGHTS_FILE
    if path.is_file():
        tensors = read_safetensors(path, record.weights_sha256)
    elif (directory / LEGACY_WEIGHTS).is_file():
        path = directory / LEGACY_WEIGHTS
        if file_sha256(path) != record.weights_sha256:
            raise StorageError(f"{path} does not match the checksum in {CONFIG_FILE}: damaged or replaced; restore it")
        tensors = read_legacy(path)
    else:
        raise StorageError(f"{directory} has no {WEIGHTS_FILE}; is it an adapter directory?")
    if record.dtype != "mixed":
        for key, tensor in tensors.items():
            if str(tensor.dtype).removeprefix("torch.") != record.dtype:
                raise StorageError(f"{path}: tensor {key!r} is {tensor.dtype}, the config says {record.dtype}")
    return check_finite(tensors, path, allow_nonfinite)


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
