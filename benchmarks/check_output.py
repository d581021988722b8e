"""What the CUDA check scripts share: write the result as JSON, print it, exit 1 unless it is ok."""

from __future__ import annotations

import json
import sys


def report(result: dict, out: str) -> None:
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)
