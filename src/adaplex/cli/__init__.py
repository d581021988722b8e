"""`adaplex <command>`: the command-line interface.

Errors a user can cause, AdaplexError subclasses and bad options or arguments alike, are printed as
one line (``error: ...``), exit code 2, no traceback. Commands that measure take --json and then
print one JSON object as the last line.
"""

from __future__ import annotations

import logging
import os
import sys

import click
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
    except click.exceptions.NoArgsIsHelpError as help_:
        help_.show()  # a command group named without a subcommand: its help, as click prints it
        sys.exit(2)
    except (AdaplexError, click.ClickException) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
