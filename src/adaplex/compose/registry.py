"""Key registry (YAML): free-form target strings -> routing keys.

    default: i7
    keys:
      v100: {keywords: ["-model=v100"], aliases: ["tesla-v100"], adapter: experts/v100}
      i7:   {keywords: ["core-avx2"]}

A target resolves to: a key or alias equal to it (case-insensitive); else the key whose keyword
occurs in it (the longest keyword wins); else the default key with a warning, or, strict, an error
listing the known keys. A keyword or alias that belongs to two keys is an error when loading.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adaplex.errors import AdaplexError
from adaplex.util.yamlconfig import load_yaml

log = logging.getLogger(__name__)


class RegistryError(AdaplexError):
    """An unknown target or a registry that contradicts itself."""


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keywords: list[str] = []
    aliases: list[str] = []
    adapter: Path | None = Field(None, description="expert adapter directory of this key")


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    keys: dict[str, KeyEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Registry:
        if self.default is not None and self.default not in self.keys:
            raise ValueError(f"default {self.default!r} is not one of the keys")
        owner: dict[str, str] = {}
        for key, entry in self.keys.items():
            for word in [key, *entry.aliases, *entry.keywords]:
                word = word.lower()
                if owner.get(word, key) != key:
                    raise ValueError(f"{word!r} belongs to both {owner[word]!r} and {key!r}")
                owner[word] = key
        return self

    def resolve(self, target: str | None, strict: bool = False) -> str | None:
        """The key for a free-form target string (None stays None: no expert)."""
        if target is None:
            return None
        lowered = target.strip().lower()
        for key, entry in self.keys.items():
            if lowered == key.lower() or lowered in (a.lower() for a in entry.aliases):
                return key
        hits = [(len(w), key) for key, e in self.keys.items() for w in e.keywords if w.lower() in lowered]
        if hits:
            return max(hits)[1]
        known = ", ".join(self.keys)
        if strict or self.default is None:
            raise RegistryError(f"target {target!r} matches no key; known keys: {known}")
        log.warning("target %r matches no key of (%s); using the default %r", target, known, self.default)
        return self.default


def load_registry(path: Path) -> Registry:
    registry = load_yaml(path, Registry)
    for entry in registry.keys.values():
        if entry.adapter is not None and not entry.adapter.is_absolute():
            entry.adapter = Path(path).parent / entry.adapter
    return registry
