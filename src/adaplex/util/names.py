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
