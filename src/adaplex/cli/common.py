"""The typer app, its sub-apps, the options several commands share, and output helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from adaplex.util import strict_json

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

BaseOption = Annotated[str | None, typer.Option("--base", help="base model: embedded name, directory or cached hub id")]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")]
AllowNonfiniteOption = Annotated[
    bool, typer.Option("--allow-nonfinite", help="load adapters holding NaN or infinite values anyway")
]
ForceOption = Annotated[bool, typer.Option("--force", help="load onto a base other than the recorded one")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")]
AdapterOption = Annotated[list[str], typer.Option("--adapter", help="PATH[:WEIGHT], repeatable, stacked in order")]
PromptOption = Annotated[list[str], typer.Option("--prompt", help="prompt, repeatable")]
ChatOption = Annotated[bool, typer.Option("--chat/--no-chat", help="render prompts with the chat template")]


def at_least(least: int, help: str, *names: str) -> typer.models.OptionInfo:
    """An integer option that must be ``least`` or more (a bad value is a one-line error)."""
    return typer.Option(*names, min=least, help=help)


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
