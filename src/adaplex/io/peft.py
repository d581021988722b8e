"""PEFT LoRA interop: export adaplex LoRA-family adapters to PEFT directories and import them back.

Export writes ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT saves them
(keys ``base_model.model.<module>.lora_{A,B}.weight``). A plain LoRA on unfused layers exports
as is (same r, alpha, rsLoRA flag). Everything else is folded exactly into plain LoRA:
MoSLoRA's mixer into B (B' = B·M), GPT-2's q/k/v parts into one c_attn LoRA by rank
concatenation (A' = [A_q; A_k; A_v], B' = blockdiag(B_q, B_k, B_v)), and a stack into one
adapter by rank concatenation with each adapter's scale and weight folded into its B; such
modules get rank_pattern/alpha_pattern entries with alpha = rank, i.e. scale 1.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adaplex.core.adapted import Adapted
from adaplex.core.layers import FusedParts
from adaplex.errors import AdapterNameError, StorageError
from adaplex.io.atomic import atomic_directory
from adaplex.io.banks import expert_as_adapter
from adaplex.io.peft_format import PEFT_CONFIG, PEFT_KEY, PEFT_LEGACY_WEIGHTS, PEFT_WEIGHTS, read_peft_config
from adaplex.io.tensor_files import check_finite, read_legacy, read_safetensors
from adaplex.methods import LoRA, LoRAConfig


def _peft_tensors(directory: Path, allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    for file, read in ((PEFT_WEIGHTS, read_safetensors), (PEFT_LEGACY_WEIGHTS, read_legacy)):
        if (directory / file).is_file():
            return check_finite(read(directory / file), directory / file, allow_nonfinite)
    raise StorageError(f"{directory} has no {PEFT_WEIGHTS}; is it a PEFT LoRA directory?")


def _peft_alpha(config: dict[str, Any], module: str) -> float:
    """PEFT's rule: the first alpha_pattern key k with re.match(rf'(.*\\.)?({k})$', module)."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def import_into(
    model: nn.Module, directory: Path, name: str | None, trainable: bool, allow_nonfinite: bool = False
) -> str:
    """Attach a PEFT LoRA directory as an adaplex LoRA adapter (exact: same A, B and scale per module);
    returns its name. A NaN or infinite value is an error naming the tensor unless ``allow_nonfinite``."""
    config = read_peft_config(directory)
    tensors = _peft_tensors(directory, allow_nonfinite)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.match(key)
        if match is None:
            raise StorageError(
                f"{directory / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA A/B weight adaplex can import"
            )
        modules.setdefault(match["module"], {})[match["ab"]] = tensor
    incomplete = [m for m, ab in modules.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise StorageError(f"{directory / PEFT_WEIGHTS}: module {incomplete[0]!r} lacks lora_A or lora_B")
    r = int(config["r"])
    ours = LoRAConfig(
        r=r,
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora", False)),
        targets=tuple(sorted(modules)),
        rank_pattern={m: ab["A"].shape[0] for m, ab in modules.items() if ab["A"].shape[0] != r},
        alpha_pattern={
            m: _peft_alpha(config, m) for m in modules if _peft_alpha(config, m) != config.get("lora_alpha", 8)
        },
    )
    adapter_name = name or re.sub(r"[^A-Za-z0-9_-]", "-", directory.resolve().name) or "peft"
    state = {f"{m}.{ab}": t for m, pair in modules.items() for ab, t in pair.items()}
    Adapted.of(model).add_loaded(adapter_name, ours, state, str(directory / PEFT_WEIGHTS), trainable)
    return adapter_name


def _pieces(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B·scale) of a LoRA, or of a fused layer's LoRA parts concatenated along the rank."""
    if isinstance(adapter, LoRA):
        return adapter.A.detach(), adapter.folded_B().detach() * adapter.scaling
    if isinstance(adapter, FusedParts) and all(isinstance(p, LoRA) for p in adapter.parts.values()):
        A_parts, B_blocks, row = [], [], 0
        total = sum(adapter.part_sizes.values())
        for part, size in adapter.part_sizes.items():
            if part in adapter.parts:
                A, B = _pieces(adapter.parts[part])
                block = B.new_zeros(total, B.shape[1])
                block[row : row + size] = B
                A_parts.append(A)
                B_blocks.append(block)
            row += size
        return torch.cat(A_parts), torch.cat(B_blocks, dim=1)
    raise StorageError(f"{type(adapter).__name__} adapters have no PEFT LoRA form; export LoRA or MoSLoRA only")


def peft_modules(handle: Adapted, weights: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per base module: (A, B) with every adapter's scale and weight folded into B, ranks concatenated."""
    pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, weight in weights.items():
        if not isinstance(handle.configs[name], LoRAConfig):
            raise StorageError(
                f"adapter {name!r} is {handle.configs[name].method}; only LoRA and MoSLoRA export to PEFT"
            )
        for path, adapter in handle.adapters(name).items():
            A, B = _pieces(adapter)
            pieces.setdefault(path, []).append((A, B * weight))
    return {p: (torch.cat([a for a, _ in ab]), torch.cat([b for _, b in ab], dim=1)) for p, ab in pieces.items()}


def _as_is(handle: Adapted, names: list[str]) -> LoRAConfig | None:
    """The config of a single plain LoRA on unfused layers, which exports unchanged."""
    if len(names) != 1:
        return None
    config = handle.configs[names[0]]
    plain = type(config) is LoRAConfig and not config.rank_pattern and not config.alpha_pattern
    unfused = all(isinstance(a, LoRA) for a in handle.adapters(names[0]).values())
    return config if plain and unfused else None


def export_peft(
    handle: Adapted,
    names: list[str],
    out: str | Path,
    *,
    weights: dict[str, float] | None = None,
    overwrite: bool = False,
    ungated: bool = False,
) -> Path:
    """Write adapters ``names`` (their weighted sum when several) as one PEFT LoRA directory; a gated
    adapter only with ``ungated`` (its LoRA alone, at weight 1, without the gate)."""
    out = Path(out)
    handle.stack.check(*names)
    gated = [n for n in names if handle.gate_of(n) is not None]
    if gated and not ungated:
        raise StorageError(
            f"adapter {gated[0]!r} is gated by {handle.gate_of(gated[0])!r}: a learned gate scales it per token, "
            "so no PEFT LoRA computes the same; export it without its gate with --lora-only"
        )
    config = _as_is(handle, names)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    if config is not None:
        for path, adapter in handle.adapters(names[0]).items():
            tensors[f"base_model.model.{path}.lora_A.weight"] = adapter.A.detach()
            tensors[f"base_model.model.{path}.lora_B.weight"] = adapter.B.detach()
            ranks[path] = config.r
        r, alpha, rslora = config.r, config.alpha, config.rslora
    else:
        for path, (A, B) in peft_modules(handle, {n: (weights or {}).get(n, 1.0) for n in names}).items():
            tensors[f"base_model.model.{path}.lora_A.weight"] = A
            tensors[f"base_model.model.{path}.lora_B.weight"] = B
            ranks[path] = A.shape[0]
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha, rslora = float(r), False
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(handle.model, "generate") and handle.family.name != "bert" else None,
        "base_model_name_or_path": str(handle.model.config.name_or_path or ""),
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(ranks),
        "fan_in_fan_out": handle.family.name == "gpt2",
        "rank_pattern": {re.escape(p): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(p): float(k) for p, k in ranks.items() if k != r},
        "inference_mode": True,
    }
    with atomic_directory(out, overwrite) as staging:
        save_file(
            {k: v.contiguous().cpu() for k, v in tensors.items()}, staging / PEFT_WEIGHTS, metadata={"format": "pt"}
        )
        (staging / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


def export_key(handle: Adapted, key: str, out: Path, overwrite: bool = False) -> Path:
    """One key as a PEFT LoRA directory: the non-expert adapters ⊕ that key's expert by rank concatenation."""
    bank_name = next((n for n, c in handle.banks().items() if key in c.keys), None)
    if bank_name is None:
        raise AdapterNameError(f"unknown routing key {key!r}")
    shared = [n for n in handle.stack.active if n not in handle.banks()]
    with expert_as_adapter(handle, bank_name, key) as name:
        return export_peft(handle, [*shared, name], out, weights=handle.stack.weights, overwrite=overwrite)
