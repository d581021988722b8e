"""What an adapter, bundle or PEFT LoRA directory holds and which base it records, read from its
files alone (no model, no torch: ``adaplex info`` answers at once)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaplex.errors import StorageError
from adaplex.io import peft_format
from adaplex.io.records import (
    BUNDLE_FILE,
    WEIGHTS_FILE,
    Record,
    read_adapter_record,
    read_bundle_record,
    read_record,
    safetensors_shapes,
)
from adaplex.util.names import names_hint

GATE_STATS = "gates.json"  # a gated model's last gate read-out, kept in its bundle


def recorded_base(path: Path) -> tuple[str | None, Path]:
    """The base recorded in an adapter, bundle or PEFT directory, and the directory it is relative to."""
    if peft_format.is_peft_dir(path):
        return peft_format.recorded_base(path), path
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


def _weights_summary(path: Path, site_of: Callable[[str], str]) -> dict[str, Any]:
    """Tensor count, parameters, bytes and the sites (layer numbers folded) of a safetensors file."""
    shapes = safetensors_shapes(path) if path.is_file() else {}
    return {
        "sites": names_hint(sorted({site_of(k) for k in shapes}), limit=50),
        "tensors": len(shapes),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "bytes": path.stat().st_size if path.is_file() else 0,
    }


def describe(path: Path) -> dict[str, Any]:
    """What an adapter, bundle or PEFT directory holds, read from its files without a model."""
    if not path.is_dir():
        raise StorageError(f"{path} is not a directory; give an adapter, bundle or PEFT LoRA directory")
    if peft_format.is_peft_dir(path):
        config = peft_format.read_peft_config(path)
        return {
            "kind": "peft-lora",
            "path": str(path),
            "method": "lora",
            "base": config.get("base_model_name_or_path"),
            "r": config.get("r"),
            "alpha": config.get("lora_alpha"),
            "targets": config.get("target_modules"),
        } | _weights_summary(path / peft_format.PEFT_WEIGHTS, peft_format.module_of)
    if (path / BUNDLE_FILE).is_file():
        bundle = read_bundle_record(path)
        members = [describe(path / m) | {"member": m} for m in bundle.members]
        gates = _gate_stats(path / GATE_STATS)
        return {
            "kind": "bundle",
            "path": str(path),
            "base": bundle.base,
            "base_fingerprint": bundle.base_fingerprint,
            "version": bundle.version,
            "lineage": lineage(path),
            "tensors": sum(m["tensors"] for m in members),
            "parameters": sum(m["parameters"] for m in members),
            "bytes": sum(m["bytes"] for m in members),
            "members": members,
        } | ({"gates": gates} if gates is not None else {})
    record = read_adapter_record(path)
    return {
        "kind": "adapter",
        "path": str(path),
        "name": record.name,
        "method": record.config.get("method"),
        "r": record.config.get("r"),
        "alpha": record.config.get("alpha"),
        "targets": record.config.get("targets"),
        "role": record.role,
        "config": record.config,
        "base": record.base,
        "base_fingerprint": record.base_fingerprint,
        "dtype": record.dtype,
        "created": record.created,
        "version": record.version,
        "lineage": lineage(path),
    } | _weights_summary(path / WEIGHTS_FILE, _site_of)


def _gate_stats(path: Path) -> list[dict[str, Any]] | None:
    """A gated model's last gate read-out (layer, submodule, mean, std), or None."""
    if not path.is_file():
        return None
    try:
        readout = json.loads(path.read_text(encoding="utf-8"))
        return [{k: r[k] for k in ("layer", "submodule", "mean", "std")} for r in readout["gates"]]
    except (ValueError, KeyError, TypeError):
        raise StorageError(f"{path} is damaged (not a gate read-out); restore it or delete it") from None


def _site_of(key: str) -> str:
    """The site of an adapter tensor key '<site path>.<parameter>' (a fused part's '.parts.q' as '.q')."""
    return key.rpartition(".")[0].replace(".parts.", ".")
