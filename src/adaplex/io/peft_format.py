"""The files of a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``): names,
key format, and its config read and checked for what adaplex can represent."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from adaplex.errors import StorageError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_LEGACY_WEIGHTS = "adapter_model.bin"
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layers_to_transform": "layers_to_transform",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "lora_bias": "LoRA bias terms",
}


def module_of(key: str) -> str:
    """The module a PEFT LoRA tensor key belongs to ('base_model.model.<module>.lora_A.weight')."""
    match = PEFT_KEY.match(key)
    return match["module"] if match else key


def is_peft_dir(directory: Path) -> bool:
    path = directory / PEFT_CONFIG
    if not path.is_file():
        return False
    try:
        return "peft_type" in json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_peft_config(directory: Path) -> dict[str, Any]:
    path = directory / PEFT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StorageError(f"{path} is not readable JSON ({type(err).__name__}); restore it") from None
    if config.get("peft_type") != "LORA":
        raise StorageError(f"{path}: PEFT type {config.get('peft_type')!r} is not LoRA; adaplex imports LoRA only")
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise StorageError(f"{path}: {what} cannot be represented by adaplex; remove it or merge it first")
    if config.get("bias", "none") != "none":
        raise StorageError(f"{path}: bias={config['bias']!r} cannot be represented by adaplex; use bias='none'")
    return config


def recorded_base(directory: Path) -> str | None:
    return read_peft_config(directory).get("base_model_name_or_path")
