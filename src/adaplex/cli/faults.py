"""`adaplex faults run|sweep|report`: fault injection experiments."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adaplex.cli.common import (
    BaseOption,
    JsonOption,
    at_least,
    console,
    emit_json,
    faults_app,
    print_mapping,
)
from adaplex.errors import ConfigError, StorageError


def fault_inputs(base: str | None, batch: int, seq: int, count: int, bf16: bool = False):
    """The base model and ``count`` batches of real text (Python's reference docs) of (batch, seq) tokens."""
    import torch

    from adaplex.core.models import choose_base, load_base
    from adaplex.train.corpora import pydoc_topics
    from adaplex.train.data import token_blocks

    model, tokenizer = load_base(choose_base(base, None), dtype=torch.bfloat16 if bf16 else torch.float32)
    blocks = token_blocks(list(pydoc_topics().values()), tokenizer, seq)
    if len(blocks) < batch * count:
        raise ConfigError(f"only {len(blocks)} blocks of {seq} tokens of text; ask for fewer or shorter batches")
    return model, [blocks[i * batch : (i + 1) * batch] for i in range(count)]


def detectors_from(names: list[str], correct: bool):
    from adaplex.faults.hook import DetectorConfig

    known = [n for n in DetectorConfig.model_fields if n != "correct"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown detector {unknown[0]!r}; choose from {', '.join(known)}")
    chosen = names or [n for n in known if n != "kv_tied"]
    return DetectorConfig(**{n: n in chosen for n in known}, correct=correct)


@faults_app.command("run")
def faults_run(
    location: Annotated[str, typer.Option(help="q, k, v, scores, weights or output")],
    bit: Annotated[int, typer.Option(min=0, help="bit to flip (0 = least significant)")],
    layers: Annotated[str, typer.Option(help="first, all, random or a comma-separated list")] = "first",
    element: Annotated[str | None, typer.Option(help="explicit index, e.g. 0,2,5,3")] = None,
    count: Annotated[int, at_least(1, "random elements to flip")] = 1,
    seed: int = 0,
    detector: Annotated[list[str], typer.Option(help="detector to enable, repeatable (default: all)")] = [],  # noqa: B006
    correct: Annotated[bool, typer.Option(help="recompute attention where a fault is detected")] = False,
    batch: Annotated[int, at_least(1, "samples")] = 1,
    seq: Annotated[int, at_least(1, "tokens per sample")] = 64,
    base: BaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """One baseline and one injected forward on real text: detections, deviation, silent corruption."""
    from pydantic import ValidationError

    from adaplex.faults.experiment import run_once
    from adaplex.faults.hook import FaultPlan
    from adaplex.util.yamlconfig import validation_message

    try:
        plan = FaultPlan(
            location=location,
            bit=bit,
            count=count,
            seed=seed,
            layers=layers if layers in ("first", "all", "random") else [int(x) for x in layers.split(",")],
            elements=[[int(x) for x in element.split(",")]] if element else None,
        )
    except (ValidationError, ValueError) as err:
        message = validation_message(err, "fault") if isinstance(err, ValidationError) else str(err)
        raise ConfigError(f"{message}; see adaplex faults run --help") from None
    model, batches = fault_inputs(base, batch, seq, 1)
    result = run_once(model, {"input_ids": batches[0]}, plan, detectors_from(detector, correct))
    summary = {k: v for k, v in result.to_json().items() if k != "detections"} | {
        "detections": result.detections[:5],
        "detections_total": len(result.detections),
    }
    if as_json:
        emit_json(result.to_json(), None)
    else:
        print_mapping(f"fault {location} bit {bit}", summary)


@faults_app.command("sweep")
def faults_sweep(
    config: Annotated[Path, typer.Argument(help="sweep config (YAML)")],
    out: Annotated[Path, typer.Option(help="results JSONL (appended; a rerun resumes)")],
    as_json: JsonOption = False,
) -> None:
    """Run bits x locations x layers x seeds (and clean runs); a killed sweep resumes where it stopped."""
    from rich.progress import Progress

    from adaplex.faults.sweep import SweepConfig, done_ids, sweep
    from adaplex.util.yamlconfig import load_yaml

    cfg = load_yaml(config, SweepConfig)
    model, batches = fault_inputs(cfg.base, cfg.batch, cfg.seq, max(1, len(cfg.seeds)))
    total = len(cfg.locations) * len(cfg.bits) * len(cfg.layers) * len(cfg.seeds) + cfg.clean_runs
    with Progress(console=console) as progress:
        task = progress.add_task("sweep", total=total, completed=len(done_ids(out)))
        added = sweep(model, batches, cfg, out, progress=lambda: progress.advance(task))
    console.print(f"{added} runs added to {out}")
    if as_json:
        emit_json({"added": added, "total": total, "results": str(out)}, None)


@faults_app.command("report")
def faults_report(
    results: Annotated[Path, typer.Argument(help="results JSONL of a sweep")],
    png: Annotated[Path | None, typer.Option(help="heatmap PNG to write")] = None,
    as_json: JsonOption = False,
) -> None:
    """Detection and silent-corruption rates per bit and location, false positives, timings."""
    from adaplex.faults.sweep import report

    if not results.is_file():
        raise StorageError(f"{results} not found; run adaplex faults sweep first")
    summary = report(results, png)
    table = Table(title=f"faults in {results.name}: detection rate / silent corruption rate")
    table.add_column("location")
    bits = sorted({int(b) for cells in summary["per_location_bit"].values() for b in cells})
    for bit in bits:
        table.add_column(str(bit), justify="right")
    for location, cells in summary["per_location_bit"].items():
        table.add_row(
            location,
            *[
                f"{cells[str(b)]['detection_rate']:.2f}/{cells[str(b)]['sdc_rate']:.2f}" if str(b) in cells else ""
                for b in bits
            ],
        )
    console.print(table)
    console.print(
        f"false positives: {summary['false_positives']} of {summary['clean_runs']} clean runs; "
        f"detected {summary['detected_of_significant']} of the {summary['significant_runs']} "
        "significant faults"
    )
    if as_json:
        emit_json(summary, None)
