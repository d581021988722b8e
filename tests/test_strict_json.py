"""Machine-readable output parses with a strict JSON parser: no NaN or Infinity."""

from __future__ import annotations

import json
import math

import pytest

from adaplex.util import strict_json


def strict_loads(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nonfinite_values_become_null_and_are_listed():
    record = {"ok": 1.5, "seconds": {"baseline": math.nan, "runs": [1.0, math.inf]}, "ratio": -math.inf}
    parsed = strict_loads(strict_json.dumps(record))
    assert parsed == {
        "ok": 1.5,
        "seconds": {"baseline": None, "runs": [1.0, None]},
        "ratio": None,
        "nonfinite": ["seconds.baseline", "seconds.runs.1", "ratio"],
    }
    assert strict_loads(strict_json.dumps({"a": 1})) == {"a": 1}  # nothing added when all is finite
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"a": math.nan}))  # what the plain encoder writes
