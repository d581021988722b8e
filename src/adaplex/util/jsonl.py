"""Reading UTF-8 text and JSONL files with one-line errors that name the file (and the line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaplex.errors import ConfigError


def read_lines(path: Path) -> list[dict[str, Any]]:
    """JSON objects of a JSONL file; a bad line is an error naming the file and line."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}); give a UTF-8 text file") from None
