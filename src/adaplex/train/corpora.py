"""Real text that installed packages ship, read as lists of short texts.

- fortunes: Debian's ``fortunes`` collections (/usr/share/games/fortunes), one topic per file, fortunes
  separated by '%' lines (``apt-get install fortunes``).
- pydoc: Python's ``pydoc_data.topics`` (in every Python): the reference documentation's topics.
"""

from __future__ import annotations

import re
from pathlib import Path
from pydoc_data.topics import topics as _pydoc_topics

from adaplex.errors import ConfigError

FORTUNES_DIR = Path("/usr/share/games/fortunes")


def pydoc_topics() -> dict[str, str]:
    """Python's reference documentation topics, name -> text."""
    return dict(sorted(_pydoc_topics.items()))


def topic_paragraphs() -> dict[str, list[str]]:
    """Each pydoc topic's prose paragraphs (no grammar blocks), whitespace-normalised, 80-600 characters."""
    found = {}
    for name, text in pydoc_topics().items():
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        prose = [p for p in paragraphs if 80 < len(p) <= 600 and not p.startswith(("*", "=")) and "::=" not in p]
        if prose:
            found[name] = prose
    return found


def fortunes(topic: str) -> list[str]:
    """The fortunes of one collection, whitespace-normalised, short ones only (20-400 characters)."""
    path = FORTUNES_DIR / topic
    if not path.is_file():
        raise ConfigError(f"fortunes collection {path} not found; install it with `apt-get install fortunes`")
    entries = [" ".join(e.split()) for e in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    return [e for e in entries if 20 <= len(e) <= 400]


def fortunes_collections() -> list[str]:
    """Names of the installed fortunes collections (files with a '.dat' index beside them)."""
    if not FORTUNES_DIR.is_dir():
        return []
    return sorted(p.stem for p in FORTUNES_DIR.glob("*.dat") if (FORTUNES_DIR / p.stem).is_file())


def split(items: list, heldout_every: int = 10) -> tuple[list, list]:
    """Every ``heldout_every``-th item is held out: (kept, held out)."""
    return [x for i, x in enumerate(items) if i % heldout_every], items[::heldout_every]
