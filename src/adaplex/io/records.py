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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open

from adaplex.errors import StorageError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
LEGACY_WEIGHTS = "adapter.bin"
BUNDLE_FILE = "bundle.json"


LATE_FIELDS = ("provenance",)  # added after files were written without them: hashed only when set


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
        unset_late = {k for k in LATE_FIELDS if getattr(self, k, None) is None}
        fields = self.model_dump(exclude={"checksum"} | unset_late)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class AdapterRecord(Record):
    format: Literal["adaplex-adapter"] = "adaplex-adapter"
    role: str = "adapter"
    config: dict[str, Any]
    dtype: str
    weights_sha256: str
    provenance: dict[str, Any] | None = None  # where the weights came from (a generator and its prompt, a zoo run)


class BundleRecord(Record):
    format: Literal["adaplex-bundle"] = "adaplex-bundle"
    members: dict[str, str]  # member directory (relative) -> role


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_record(record: Record, path: Path) -> None:
    record.checksum = record.content_hash()
    path.write_text(json.dumps(record.model_dump(), indent=2) + "\n")


def read_record_file(path: Path, kind: type[Record]) -> Record:
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


def read_adapter_record(directory: Path) -> AdapterRecord:
    return read_record_file(directory / CONFIG_FILE, AdapterRecord)  # type: ignore[return-value]


def read_bundle_record(directory: Path) -> BundleRecord:
    return read_record_file(directory / BUNDLE_FILE, BundleRecord)  # type: ignore[return-value]


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the data."""
    try:
        with safe_open(path, "numpy") as f:  # shapes only: no tensor is read
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise StorageError(f"{path} is truncated or corrupt ({err}); restore it") from None


def read_record(directory: Path) -> Record | None:
    """The verified record of a bundle or adapter directory; None when it holds neither file."""
    for file, kind in ((BUNDLE_FILE, BundleRecord), (CONFIG_FILE, AdapterRecord)):
        if (directory / file).is_file():
            return read_record_file(directory / file, kind)
    return None
