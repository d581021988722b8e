"""`adaplex <command>`: the command-line interface.

Errors a user can cause are AdaplexError subclasses: printed as one line, exit code 2, no
traceback. Commands that measure take --json and then print one JSON object as the last line.
"""

from __future__ import annotations

import logging
import sys

from transformers.utils import logging as transformers_logging

from adaplex.cli import adapters, bench, faults, run  # noqa: F401 - importing registers the commands
from adaplex.cli.common import app
from adaplex.errors import AdaplexError


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    transformers_logging.disable_progress_bar()
    try:
        app()
    except AdaplexError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
