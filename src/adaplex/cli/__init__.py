"""`adaplex <command>`: the command-line interface.

Errors a user can cause, AdaplexError subclasses and bad options or arguments alike, are printed as
one line (``error: ...``), exit code 2, no traceback. Commands that measure take --json and then
print one JSON object as the last line.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from adaplex.cli import adapters, bench, faults, run  # noqa: F401 - importing registers the commands
from adaplex.cli.common import app
from adaplex.errors import AdaplexError


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars stay out of the output
    try:
        code = typer.main.get_command(app).main(prog_name="adaplex", standalone_mode=False)
    except typer.TyperException as err:  # click's errors for bad options and arguments
        if type(err).__name__ == "NoArgsIsHelpError":  # a group without a subcommand: its help was printed
            sys.exit(2)
        _fail(err.format_message())
    except AdaplexError as err:
        _fail(str(err))
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)
