"""Matching module names against user patterns."""

from __future__ import annotations

import re


def name_matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` is ``name``, its dotted suffix ('q_proj'), or a regex matching it whole."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def names_hint(names: list[str], limit: int = 12) -> str:
    """Distinct module names with layer numbers folded: 'model.layers.*.self_attn.q_proj, ...'."""
    folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    more = f" (+{len(folded) - limit} more)" if len(folded) > limit else ""
    return ", ".join(folded[:limit]) + more
