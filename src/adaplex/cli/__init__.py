"""`adaplex <command>`: the command-line interface.

Errors a user can cause, AdaplexError subclasses and bad options or arguments alike, are printed as
one line (``error: ...``), exit code 2, no traceback. Commands that measure take --json and then
print one JSON object as the last line.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from adaplex.cli import adapters, bench, faults, gen, run  # noqa: F401 - importing registers the commands
from adaplex.cli.common import app, phase_lines
from adaplex.errors import AdaplexError

# Deprecations inside the pinned libraries, about their own code, that a user can do nothing about
# (each matched by its exact message, so that every other warning still shows).
LIBRARY_DEPRECATIONS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 on torch 2.13
    r"`is_gradient_checkpointing` is deprecated",  # PEFT 0.21 on transformers 5.23
)


class _NoAdverts(logging.Filter):
    """Drops Lightning's tips advertising its cloud services: they say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_libraries() -> None:
    """Clean output: Lightning's INFO lines once (it prints them itself), no adverts, no library
    deprecation notices, no loading bars from transformers."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("lightning").propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional hub kernel (never fetched here) and
    # warns on every import that it is missing; its own CPU kernels run instead
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    quiet_libraries()
    try:
        with phase_lines():
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
