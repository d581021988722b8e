"""`adaplex <command>`: the command-line interface.

Errors a user can cause are AdaplexError subclasses: printed as one line, exit code 2, no
traceback. Commands that measure take --json and then print one JSON object as the last line.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as transformers_logging

from adaplex.errors import AdaplexError, ConfigError, StorageError

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
console = Console()

BaseOption = Annotated[str | None, typer.Option("--base", help="base model: embedded name, directory or cached hub id")]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")]
ForceOption = Annotated[bool, typer.Option("--force", help="load onto a base other than the recorded one")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")]


def _emit_json(result: dict, out: Path | None) -> None:
    text = json.dumps(result, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(text)


def _print_mapping(title: str, mapping: dict) -> None:
    table = Table(show_header=False, title=title)
    for key, value in mapping.items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        table.add_row(key, str(value))
    console.print(table)


def _base_for(paths: list[Path], base: str | None):
    """Load the base by the one rule: --base, else the base recorded in the first path, else the default."""
    from adaplex.models import choose_base, load_base
    from adaplex.storage import recorded_base

    recorded, relative_to = recorded_base(paths[0]) if paths else (None, None)
    return load_base(choose_base(base, recorded), relative_to=relative_to)


def _load_all(model, paths: list[Path], force: bool):
    from adaplex.storage import load

    handle = None
    for path in paths:
        handle = load(model, path, force=force)
    return handle


@app.command()
def info(
    path: Annotated[Path | None, typer.Argument(help="adapter, bundle or PEFT LoRA directory")] = None,
    base: BaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show an adapter, bundle or PEFT directory (members, sizes, base, versions), or a base model."""
    if path is not None:
        from adaplex.storage import describe

        result = describe(path)
        if as_json:
            _emit_json(result, None)
            return
        members = result.pop("members", [])
        _print_mapping(f"{result['kind']} {path}", {k: v for k, v in result.items() if k != "config"})
        if members:
            table = Table(title="members")
            for column in ("member", "name", "method", "role", "parameters", "bytes"):
                table.add_column(column)
            for m in members:
                table.add_row(
                    m["member"],
                    m.get("name", ""),
                    str(m.get("method", "")),
                    m.get("role", ""),
                    f"{m['parameters']:,}",
                    f"{m['bytes']:,}",
                )
            console.print(table)
        return
    from adaplex.inject import all_sites, family_of, names_hint

    model, _ = _base_for([], base)
    family = family_of(model)
    result = {
        "base": model.config.name_or_path,
        "family": family.name,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": model.config.num_hidden_layers,
        "target_aliases": sorted(family.aliases),
        "linear_sites": names_hint([s.name for s in all_sites(model, family)], limit=50),
    }
    if as_json:
        _emit_json(result, None)
    else:
        _print_mapping(f"base model {result['base']}", result)


@app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="adapter or bundle directory")],
    out: Annotated[Path, typer.Argument(help="output directory")],
    to: Annotated[str, typer.Option(help="target format")] = "peft",
    combined: Annotated[bool, typer.Option(help="a stack as one adapter (rank concatenation)")] = False,
    key: Annotated[list[str], typer.Option(help="routed bundle: export only this key, repeatable")] = [],  # noqa: B006
    base: BaseOption = None,
    force: ForceOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Export to PEFT LoRA: one directory per adapter (OUT/<name>), or one combined adapter."""
    from adaplex.atomic import atomic_directory, refuse_existing
    from adaplex.peft_io import export_peft

    if to != "peft":
        raise ConfigError(f"unknown export format {to!r}; the only one is 'peft'")
    refuse_existing(out, overwrite)
    model, _ = _base_for([path], base)
    handle = _load_all(model, [path], force)
    from adaplex.routing import banks, export_key

    if banks(handle):  # a routed bundle: one PEFT adapter per key, shared ⊕ expert
        keys = key or [k for bank in banks(handle).values() for k in bank.keys]
        with atomic_directory(out, overwrite) as staging:
            for k in keys:
                export_key(handle, k, staging / k)
        console.print(f"wrote {len(keys)} PEFT LoRA adapters (shared + expert) under {out}: {', '.join(keys)}")
        return
    names = list(handle.configs)
    if combined or len(names) == 1:
        export_peft(handle, names, out, weights=handle.stack.weights, overwrite=overwrite)
        console.print(f"wrote PEFT LoRA {out} ({', '.join(names)})")
        return
    with atomic_directory(out, overwrite) as staging:
        for name in names:
            export_peft(handle, [name], staging / name)
    console.print(f"wrote {len(names)} PEFT LoRA adapters under {out}: {', '.join(names)}")


@app.command("import")
def import_(
    peft_dir: Annotated[Path, typer.Argument(help="PEFT LoRA directory (e.g. a trainer's checkpoint-531/)")],
    out: Annotated[Path, typer.Argument(help="adaplex adapter directory to write")],
    name: Annotated[str | None, typer.Option(help="adapter name (default: the directory's name)")] = None,
    base: BaseOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Import a PEFT LoRA directory as an adaplex adapter directory (safetensors)."""
    from adaplex.atomic import refuse_existing
    from adaplex.peft_io import import_into, is_peft_dir
    from adaplex.storage import save_adapter

    if not is_peft_dir(peft_dir):
        raise StorageError(f"{peft_dir} is not a PEFT directory (no adapter_config.json with a peft_type)")
    refuse_existing(out, overwrite)
    model, _ = _base_for([peft_dir], base)
    adapter_name = import_into(model, peft_dir, name, trainable=False)
    from adaplex.adapted import Adapted

    save_adapter(Adapted.of(model), adapter_name, out, overwrite=overwrite)
    console.print(f"imported {peft_dir} as adapter {adapter_name!r} into {out}")


@app.command()
def merge(
    paths: Annotated[list[Path], typer.Argument(help="adapter, bundle or PEFT directories to merge")],
    out: Annotated[Path, typer.Option("--out", help="plain transformers model directory to write")],
    base: BaseOption = None,
    force: ForceOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Merge adapters into the base: a plain transformers model directory (safetensors)."""
    from adaplex.atomic import atomic_directory, refuse_existing

    refuse_existing(out, overwrite)
    model, tokenizer = _base_for(paths, base)
    handle = _load_all(model, paths, force)
    merged = handle.merged_model()
    with atomic_directory(out, overwrite) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    console.print(f"wrote merged model {out} ({', '.join(handle.configs)} into {model.config.name_or_path})")


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="legacy PyTorch .bin weights file")],
    out: Annotated[Path, typer.Argument(help="safetensors file to write")],
    overwrite: OverwriteOption = False,
) -> None:
    """Convert a legacy .bin tensor file (read with weights_only=True) to safetensors, keys unchanged."""
    from safetensors.torch import save_file

    from adaplex.storage import read_legacy

    if not source.is_file():
        raise StorageError(f"{source} is not a file")
    if out.exists() and not overwrite:
        raise StorageError(f"{out} already exists; choose another path or pass --overwrite")
    tensors = read_legacy(source)
    staging = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging)
    staging.replace(out)
    console.print(f"wrote {out}: {len(tensors)} tensors")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="training config (YAML)")],
    resume: Annotated[bool, typer.Option("--resume", help="continue from the output's last checkpoint")] = False,
) -> None:
    """Train adapters on PyTorch Lightning as the YAML config describes (see configs/)."""
    from adaplex.train.config import TrainConfig
    from adaplex.train.run import train as run_training
    from adaplex.yamlconfig import load_yaml

    result = run_training(load_yaml(config, TrainConfig), source=str(config), resume=resume)
    console.print(f"trained adapter saved to {result}")


AdapterOption = Annotated[list[str], typer.Option("--adapter", help="PATH[:WEIGHT], repeatable, stacked in order")]
PromptOption = Annotated[list[str], typer.Option("--prompt", help="prompt, repeatable")]
ChatOption = Annotated[bool, typer.Option("--chat/--no-chat", help="render prompts with the chat template")]


@app.command()
def generate(
    prompt: PromptOption,
    adapter: AdapterOption = [],  # noqa: B006 - typer reads the default, never mutates it
    disable: Annotated[list[str], typer.Option(help="adapter name to switch off, repeatable")] = [],  # noqa: B006
    base: BaseOption = None,
    chat: ChatOption = False,
    max_new_tokens: int = 40,
    as_json: JsonOption = False,
) -> None:
    """Complete prompts with the base model plus the given adapters (none: the base alone)."""
    from adaplex.infer import generate as complete
    from adaplex.infer import load_stack

    handle, tokenizer, names = load_stack(adapter, base)
    with handle.disable(*disable):
        results = [{"prompt": p, "completion": complete(handle, tokenizer, p, chat, max_new_tokens)} for p in prompt]
    if as_json:
        _emit_json({"adapters": handle.stack.weights, "results": results}, None)
        return
    for r in results:
        console.print(f"[bold]{r['prompt']}[/] {r['completion']}")


@app.command()
def infer(
    input_path: Annotated[Path, typer.Argument(help="JSONL of {key or target, prompt}")],
    output: Annotated[Path, typer.Argument(help="JSONL of completions, in input order")],
    bundle: Annotated[Path, typer.Option(help="routed bundle (shared + experts)")],
    registry: Annotated[Path | None, typer.Option(help="key registry for 'target' fields")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="an unknown target is an error")] = False,
    workers: Annotated[int, typer.Option(help="worker processes")] = 1,
    batch_size: int = 8,
    max_new_tokens: int = 40,
    chat: ChatOption = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    base: BaseOption = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Generate for every record with its key's expert, in mixed-key batches, across worker processes."""
    from adaplex.batch_infer import Job, run

    job = Job(bundle, base, batch_size, max_new_tokens, chat, device)
    summary = run(input_path, output, job, workers, registry, strict, overwrite)
    for failure in summary["failed_shards"]:
        console.print(
            f"[red]worker {failure['worker']} crashed (exit code {failure['exit_code']}); records "
            f"{failure['records'][0]}-{failure['records'][1]} have no completion[/]"
        )
    console.print(f"wrote {summary['records']} results to {output} with {summary['workers']} workers")
    if as_json:
        _emit_json(summary, None)
    if summary["failed_shards"]:
        raise typer.Exit(3)


@app.command()
def compare(
    prompt: PromptOption,
    adapter: AdapterOption,
    eval_file: Annotated[list[Path], typer.Option("--eval", help="held-out .txt or .jsonl, repeatable")] = [],  # noqa: B006
    base: BaseOption = None,
    chat: ChatOption = False,
    max_new_tokens: int = 40,
    as_json: JsonOption = False,
) -> None:
    """Base, stage 1, stage 1+2, ... side by side: completions and held-out perplexities."""
    from adaplex.infer import compare as run_compare
    from adaplex.infer import load_stack

    handle, tokenizer, names = load_stack(adapter, base)
    rows = run_compare(handle, tokenizer, names, prompt, eval_file, chat, max_new_tokens)
    print_comparison(rows, prompt)
    if as_json:
        _emit_json({"rows": rows}, None)


def print_comparison(rows: list[dict], prompts: list[str]) -> None:
    table = Table(title="stages side by side", show_lines=True)
    table.add_column("stage")
    for name in rows[0]["perplexity"]:
        table.add_column(f"ppl {Path(name).parent.name}/{Path(name).name}", justify="right")
    for p in prompts:
        table.add_column(p)
    for row in rows:
        table.add_row(row["stage"], *[f"{v:.2f}" for v in row["perplexity"].values()], *row["completions"])
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="scratch directory for data, runs and the merged model")] = Path("demo-out"),
    steps: Annotated[int, typer.Option(help="training steps per stage")] = 30,
) -> None:
    """Stage-wise style + instruct training on the embedded model with real text, compared side by side."""
    from adaplex import demo as demo_job

    demo_job.run(out, steps=steps, console=console)


data_app = typer.Typer(no_args_is_help=True, help="Real-text data that installed packages ship.")
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(out: Annotated[Path, typer.Argument(help="directory to write the data into")]) -> None:
    """Prepare real-text training files (fortunes, Python reference Q&A) under OUT."""
    from adaplex.realdata import prepare

    for name, count in prepare(out).items():
        console.print(f"{out / name}: {count}")


@bench_app.command("overhead")
def bench_overhead(
    base: BaseOption = None,
    batch: int = 4,
    seq: int = 128,
    rank: int = 16,
    rounds: Annotated[int, typer.Option(help="interleaved timing rounds")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bfloat16 weights (GPU)")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Forward and train-step cost of each method against the base and against PEFT LoRA."""
    import torch

    from adaplex.bench import overhead
    from adaplex.models import choose_base

    result = overhead.run(
        choose_base(base, None), batch, seq, rank, rounds, device, torch.bfloat16 if bf16 else torch.float32
    )
    table = Table(title=f"overhead on {result['base']} ({result['device']}, batch {batch}x{seq}, rank {rank})")
    for column in ("variant", "forward x base", "train step x base", "trainable", "peak train MiB"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(
            row["variant"],
            f"{row['forward_x_base']:.3f}",
            f"{row['train_step_x_base']:.3f}",
            f"{row['trainable_params']:,}",
            f"{row['peak_train_mib']:.0f}",
        )
    console.print(table)
    console.print({k: round(v, 3) for k, v in result["lora_vs_peft"].items()})
    if as_json or out:
        _emit_json(result, out)


@bench_app.command("train")
def bench_train(
    base: BaseOption = None,
    batch: int = 4,
    seq: int = 128,
    rank: int = 16,
    steps: Annotated[int, typer.Option(help="steps per timed chunk")] = 4,
    rounds: Annotated[int, typer.Option(help="interleaved rounds")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Training step time and peak memory: adaplex (Lightning) against PEFT in a plain loop."""
    from adaplex.bench import train as train_bench
    from adaplex.models import choose_base

    result = train_bench.run(choose_base(base, None), batch, seq, rank, steps, rounds, device)
    table = Table(title=f"training step on {result['base']} ({result['device']}, {result['precision']})")
    for column in ("variant", "step s", "tokens/s", "peak MiB"):
        table.add_column(column, justify="right")
    for name, step in result["step_s"].items():
        table.add_row(name, f"{step:.3f}", f"{result['tokens_per_s'][name]:.0f}", f"{result['peak_mib'][name]:.0f}")
    console.print(table)
    console.print(result["adaplex_vs_peft"], {"moslora_vs_lora_step_time_x": result["moslora_vs_lora_step_time_x"]})
    if as_json or out:
        _emit_json(result, out)


@bench_app.command("route")
def bench_route(
    base: BaseOption = None,
    adapters: Annotated[list[int], typer.Option("--adapters", help="distinct adapters in the batch, repeatable")] = [8],  # noqa: B006
    batch: int = 8,
    seq: int = 128,
    rank: int = 16,
    rounds: int = 3,
    mode: Annotated[str, typer.Option(help="prefill (full forward) or decode (one cached step)")] = "prefill",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bfloat16 weights (GPU)")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Mixed-key batches: adaplex routed experts against PEFT mixed-adapter batches and the base."""
    from adaplex.bench import route as route_bench
    from adaplex.models import choose_base

    result = route_bench.run(choose_base(base, None), tuple(adapters), batch, seq, rank, rounds, device, mode, bf16)
    table = Table(title=f"{mode} on {result['base']} ({result['device']}, batch {batch}, seq {seq}, rank {rank})")
    for column in ("adapters", "base s", "routed x base", "PEFT x base", "PEFT / routed"):
        table.add_column(column, justify="right")
    for r in result["results"]:
        table.add_row(
            str(r["adapters"]),
            f"{r['step_s']['base']:.4f}",
            f"{r['routed_x_base']:.2f}",
            f"{r['peft_x_base']:.2f}",
            f"{r['peft_x_routed']:.2f}",
        )
    console.print(table)
    if as_json or out:
        _emit_json(result, out)


def _fault_inputs(base: str | None, batch: int, seq: int, count: int, bf16: bool = False):
    """The base model and ``count`` batches of real text (Python's reference docs) of (batch, seq) tokens."""
    import torch

    from adaplex.models import choose_base, load_base
    from adaplex.train.data import pydoc_topics, token_blocks

    model, tokenizer = load_base(choose_base(base, None), dtype=torch.bfloat16 if bf16 else torch.float32)
    blocks = token_blocks(list(pydoc_topics().values()), tokenizer, seq)
    if len(blocks) < batch * count:
        raise ConfigError(f"only {len(blocks)} blocks of {seq} tokens of text; ask for fewer or shorter batches")
    return model, [blocks[i * batch : (i + 1) * batch] for i in range(count)]


def _detectors(names: list[str], correct: bool):
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
    bit: Annotated[int, typer.Option(help="bit to flip (0 = least significant)")],
    layers: Annotated[str, typer.Option(help="first, all, random or a comma-separated list")] = "first",
    element: Annotated[str | None, typer.Option(help="explicit index, e.g. 0,2,5,3")] = None,
    count: int = 1,
    seed: int = 0,
    detector: Annotated[list[str], typer.Option(help="detector to enable, repeatable (default: all)")] = [],  # noqa: B006
    correct: Annotated[bool, typer.Option(help="recompute attention where a fault is detected")] = False,
    batch: int = 1,
    seq: int = 64,
    base: BaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """One baseline and one injected forward on real text: detections, deviation, silent corruption."""
    from pydantic import ValidationError

    from adaplex.faults.experiment import run_once
    from adaplex.faults.hook import FaultPlan
    from adaplex.yamlconfig import validation_message

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
    model, batches = _fault_inputs(base, batch, seq, 1)
    result = run_once(model, {"input_ids": batches[0]}, plan, _detectors(detector, correct))
    summary = {k: v for k, v in result.to_json().items() if k != "detections"} | {
        "detections": result.detections[:5],
        "detections_total": len(result.detections),
    }
    if as_json:
        _emit_json(result.to_json(), None)
    else:
        _print_mapping(f"fault {location} bit {bit}", summary)


@faults_app.command("sweep")
def faults_sweep(
    config: Annotated[Path, typer.Argument(help="sweep config (YAML)")],
    out: Annotated[Path, typer.Option(help="results JSONL (appended; a rerun resumes)")],
    as_json: JsonOption = False,
) -> None:
    """Run bits x locations x layers x seeds (and clean runs); a killed sweep resumes where it stopped."""
    from rich.progress import Progress

    from adaplex.faults.sweep import SweepConfig, done_ids, sweep
    from adaplex.yamlconfig import load_yaml

    cfg = load_yaml(config, SweepConfig)
    model, batches = _fault_inputs(cfg.base, cfg.batch, cfg.seq, max(1, len(cfg.seeds)))
    total = len(cfg.locations) * len(cfg.bits) * len(cfg.layers) * len(cfg.seeds) + cfg.clean_runs
    with Progress(console=console) as progress:
        task = progress.add_task("sweep", total=total, completed=len(done_ids(out)))
        added = sweep(model, batches, cfg, out, progress=lambda: progress.advance(task))
    console.print(f"{added} runs added to {out}")
    if as_json:
        _emit_json({"added": added, "total": total, "results": str(out)}, None)


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
        _emit_json(summary, None)


@bench_app.command("faults")
def bench_faults(
    base: BaseOption = None,
    batch: int = 4,
    seq: int = 128,
    repeats: int = 5,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bfloat16 weights (GPU)")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Forward time with every detector on against off (fused attention), interleaved in one run."""
    import torch

    from adaplex.faults.bits import top_exponent_bit
    from adaplex.faults.experiment import monitor
    from adaplex.faults.hook import DetectorConfig, FaultPlan

    model, batches = _fault_inputs(base, batch, seq, 1, bf16)
    model.to(device)
    inputs = {"input_ids": batches[0].to(device)}
    name = device if device == "cpu" else torch.cuda.get_device_name(torch.device(device))
    result = {
        "benchmark": "faults",
        "base": model.config.name_or_path,
        "device": name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch": batch,
        "seq": seq,
    } | monitor(
        model, inputs, FaultPlan(location="scores", bit=top_exponent_bit(model.dtype)), DetectorConfig(), repeats
    )
    _print_mapping("detector overhead (percent over the fused baseline)", result["overhead_percent"])
    if as_json or out:
        _emit_json(result, out)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    transformers_logging.disable_progress_bar()
    try:
        app()
    except AdaplexError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
