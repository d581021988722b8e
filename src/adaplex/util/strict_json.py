"""JSON that every strict parser reads: no NaN or Infinity (they become null, and the record says where)."""

from __future__ import annotations

import json
import math
from typing import Any

NONFINITE_FIELD = "nonfinite"  # the paths of the values that were NaN or infinite, e.g. "seconds.baseline"


def finite(value: Any, path: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every non-finite float replaced by None; their dotted paths appended to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(path or "value")
        return None
    if isinstance(value, dict):
        return {k: finite(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, f"{path}.{i}" if path else str(i), found) for i, v in enumerate(value)]
    return value


def dumps(record: dict[str, Any], **options: Any) -> str:
    """``record`` as strict JSON; any NaN or infinite value is null and listed under "nonfinite"."""
    found: list[str] = []
    clean = finite(record, found=found)
    if found:
        clean[NONFINITE_FIELD] = found
    return json.dumps(clean, allow_nan=False, default=str, **options)
