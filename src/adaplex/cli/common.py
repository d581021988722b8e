"""The typer app, its sub-apps, the options several commands share, and output helpers."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from adaplex.errors import ConfigError
from adaplex.util import strict_json
from adaplex.util.progress import reporting

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient adapters on transformers models: inspect, merge, export, import, benchmark.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks measured side by side in one run.")
app.add_typer(bench_app, name="bench")
faults_app = typer.Typer(no_args_is_help=True, help="Attention fault injection and detection.")
app.add_typer(faults_app, name="faults")
data_app = typer.Typer(no_args_is_help=True, help="Real-text data that installed packages ship.")
app.add_typer(data_app, name="data")
console = Console()
if not console.is_terminal:  # piped or captured: tables as wide as they need, never folded into 80 columns
    console.width = 200

BaseOption = Annotated[str | None, typer.Option("--base", help="base model: embedded name, directory or cached hub id")]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")]
AllowNonfiniteOption = Annotated[
    bool, typer.Option("--allow-nonfinite", help="load adapters holding NaN or infinite values anyway")
]
ForceOption = Annotated[bool, typer.Option("--force", help="load onto a base other than the recorded one")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")]
OverwriteFileOption = Annotated[bool, typer.Option("--overwrite", help="replace an existing output file")]
AdapterOption = Annotated[list[str], typer.Option("--adapter", help="PATH[:WEIGHT], repeatable, stacked in order")]
PromptOption = Annotated[list[str], typer.Option("--prompt", help="prompt, repeatable")]
ChatOption = Annotated[bool, typer.Option("--chat/--no-chat", help="render prompts with the chat template")]


def check_device(device: str) -> None:
    """--device must name the CPU or a CUDA device this machine has."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device {device!r} is not cpu, cuda or cuda:N")
    if device != "cpu":
        import torch  # only here: the command line starts without torch

        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has no such CUDA device; use --device cpu")


def at_least(least: int, help: str, *names: str) -> typer.models.OptionInfo:
    """An integer option that must be ``least`` or more (a bad value is a one-line error)."""
    return typer.Option(*names, min=least, help=help)


@contextmanager
def phase_lines() -> Iterator[None]:
    """Long work reports its phases (``adaplex.util.progress``); inside the block they are printed on
    stderr with the time elapsed, where stderr is a terminal (piped output stays as it was)."""
    if not sys.stderr.isatty():
        yield
        return
    err, start = Console(stderr=True), time.perf_counter()
    with reporting(lambda message: err.print(f"[dim]{time.perf_counter() - start:7.1f} s  {message}[/]")):
        yield


def emit_json(result: dict, out: Path | None) -> None:
    """Print ``result`` as one JSON line (the last line of a --json command); also write it to ``out``."""
    text = strict_json.dumps(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(strict_json.dumps(result, indent=2) + "\n")
    print(text)


def print_mapping(title: str, mapping: dict) -> None:
    """A two-column table of ``mapping``."""
    table = Table(show_header=False, title=title)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in mapping.items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        table.add_row(key, str(value))
    console.print(table)
