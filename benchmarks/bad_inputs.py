"""Runs the bad-input table of tests/test_cli_bad_input.py against a source tree and counts what each
case got: a one-line error with exit code 2, a traceback, acceptance (exit 0), or other output.

    python benchmarks/bad_inputs.py SRC_DIR OUT.json     # e.g. src, or an older checkout's src
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_cli_bad_input import CASES, make_files  # noqa: E402 - the table lives with its test


def outcome(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    if "Traceback" in result.stderr:
        return "traceback"
    if result.returncode == 0:
        return "accepted"
    if result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return "one-line error"
    return f"other (exit {result.returncode}, {len(lines)} lines on stderr)"


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    env = os.environ | {"PYTHONPATH": str(Path(src).resolve())}
    with tempfile.TemporaryDirectory() as scratch:
        root = make_files(Path(scratch))
        cases = {}
        for name, (args, _) in CASES.items():
            command = [sys.executable, "-m", "adaplex", *[a.format(root=root) for a in args]]
            result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=scratch)
            cases[name] = outcome(result)
    summary = {"source": src, "cases": len(cases), "outcomes": dict(Counter(cases.values())), "by_case": cases}
    Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["outcomes"]))


if __name__ == "__main__":
    main()
