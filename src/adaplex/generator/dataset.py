"""The generator's training data: the zoo's checkpoints as token grids and its conditioning texts as
encoder embeddings, both cached under ``<zoo>/cache/`` (rebuilt whenever the index changes); the split
into training and held-out subsets; statistics and round-trip checks of the tokenization.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adaplex.errors import ConfigError, StorageError
from adaplex.generator.config import GenConfig
from adaplex.generator.encoder import TextEncoder
from adaplex.generator.tokenizer import Layout, common_layout, detokenize, layout_of, tokenize
from adaplex.generator.zoo import INDEX, Member, Zoo
from adaplex.io.tensor_files import read_safetensors

CACHE = "cache"


@dataclass(frozen=True)
class TokenSet:
    """Every zoo member as a grid: ``grids[i]`` (T, D) is ``members[i]``."""

    layout: Layout
    grids: torch.Tensor  # (N, T, D) float32
    members: list[Member]

    def rows_of(self, subsets: list[str]) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.subset in subsets]


def _index_hash(zoo: Zoo) -> str:
    return hashlib.sha256((zoo.root / INDEX).read_bytes()).hexdigest()


def _cached(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file written for ``key``, or None (absent, stale or unreadable)."""
    if not path.is_file() or not (path.with_suffix(".key").is_file() and path.with_suffix(".key").read_text() == key):
        return None
    try:
        return read_safetensors(path)
    except StorageError:
        return None


def _store(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging)
    staging.replace(path)
    path.with_suffix(".key").write_text(key)


def read_adapters(zoo: Zoo) -> dict[str, dict[str, torch.Tensor]]:
    """Every member's verified tensors by member path (a corrupt member is an error naming it)."""
    found = {}
    for member in zoo.members:
        try:
            found[str(member.path)] = zoo.tensors(member)
        except StorageError as err:
            raise StorageError(f"zoo member {member.path} is damaged: {err}") from None
    return found


def token_set(zoo: Zoo, width: int) -> TokenSet:
    """The zoo tokenized at ``width`` (cached); every member must share one layout."""
    cache = zoo.root / CACHE / f"tokens-w{width}.safetensors"
    key = _index_hash(zoo)
    stored = _cached(cache, key)
    if stored is None:
        adapters = read_adapters(zoo)
        layout = common_layout(adapters, width)
        grids = torch.stack([tokenize(adapters[str(m.path)], layout) for m in zoo.members])
        _store(cache, key, {"grids": grids})
    else:
        first = zoo.tensors(zoo.members[0])
        layout = layout_of(first, width)
        grids = stored["grids"]
    return TokenSet(layout, grids, zoo.members)


def condition_embeddings(zoo: Zoo, encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """Each run's conditioning texts embedded (cached): subset -> (V, P, E); and '<subset>:eval' ->
    (1, P, E), the held-out prompt of the subset."""
    cache = zoo.root / CACHE / f"conditions-{encoder.fingerprint()[:16]}-p{encoder.lines}.safetensors"
    key = _index_hash(zoo)
    stored = _cached(cache, key)
    if stored is None:
        stored = {}
        for run in zoo.runs:
            stored[run["subset"]] = encoder(run["conditions"])
            stored[f"{run['subset']}:eval"] = encoder([run["eval_condition"]])
        _store(cache, key, stored)
    return stored


def split_subsets(zoo: Zoo, config: GenConfig) -> tuple[list[str], list[str]]:
    """(training subsets, held-out subsets): ``heldout`` as given, else every n-th subset by name."""
    names = sorted(zoo.names())
    if config.heldout is None:
        heldout = names[config.heldout_every // 2 :: config.heldout_every]
    else:
        unknown = sorted(set(config.heldout) - set(names))
        if unknown:
            raise ConfigError(f"heldout subset {unknown[0]!r} is not in the zoo {zoo.root}; it holds {names}")
        heldout = sorted(config.heldout)
    train = [n for n in names if n not in heldout]
    if not train:
        raise ConfigError("every zoo subset is held out; nothing is left to train the generator on")
    return train, heldout


def round_trip(zoo: Zoo, width: int) -> dict[str, Any]:
    """Tokenize and detokenize every member; each must come back bitwise (an error names the first that
    does not)."""
    adapters = read_adapters(zoo)
    layout = common_layout(adapters, width)
    for path, tensors in adapters.items():
        back = detokenize(tokenize(tensors, layout), layout)
        for key, tensor in tensors.items():
            if back[key].dtype != tensor.dtype or not torch.equal(back[key].view(-1), tensor.reshape(-1)):
                raise StorageError(f"{path}: tensor {key!r} does not come back bitwise from the token grid")
    return {
        "members": len(adapters),
        "bitwise_exact": len(adapters),
        "tokens": layout.tokens,
        "width": layout.width,
        "layers": list(layout.layers()),
        "padding_share": round(float(layout.padding().float().mean()), 4),
    }


def analyze(zoo: Zoo, width: int) -> dict[str, Any]:
    """Statistics of the zoo: per layer and per tensor kind (e.g. 'q_proj.B') the mean L2 norm, the value
    range, and the spread: the mean std across the zoo of a position over the RMS of its values."""
    tokens = token_set(zoo, width)
    layout = tokens.layout
    rows: dict[tuple[str, str], list[torch.Tensor]] = {}
    row = 0
    for e in layout.entries:
        values = tokens.grids[:, row : row + e.tokens].reshape(len(tokens.members), -1)[:, : math.prod(e.shape)]
        kind = ".".join(e.key.split(".")[-2:])
        rows.setdefault(("layer", "-" if e.layer is None else str(e.layer)), []).append(values)
        rows.setdefault(("kind", kind), []).append(values)
        row += e.tokens
    summary: dict[str, Any] = {"members": len(tokens.members), "runs": len(zoo.runs), "tokens": layout.tokens}
    for (axis, name), parts in rows.items():
        values = torch.cat(parts, dim=1)  # (N, numbers)
        rms = values.pow(2).mean().sqrt().clamp(min=1e-12)
        summary.setdefault(f"{axis}s", []).append(
            {
                axis: name,
                "norm": round(float(values.norm(dim=1).mean()), 5),
                "min": round(float(values.min()), 5),
                "max": round(float(values.max()), 5),
                "spread": round(float(values.std(0, unbiased=False).mean() / rms), 4),
            }
        )
    return summary
