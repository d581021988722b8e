"""`adaplex info|export|import|merge|convert`: adapter directories and bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adaplex.cli.common import (
    AllowNonfiniteOption,
    BaseOption,
    ForceOption,
    JsonOption,
    OverwriteFileOption,
    OverwriteOption,
    app,
    console,
    emit_json,
    print_mapping,
)
from adaplex.errors import ConfigError, StorageError


def base_for(paths: list[Path], base: str | None):
    """Load the base by the one rule: --base, else the base recorded in the first path, else the default."""
    from adaplex.core.models import choose_base, load_base
    from adaplex.io.describe import recorded_base

    recorded, relative_to = recorded_base(paths[0]) if paths else (None, None)
    return load_base(choose_base(base, recorded), relative_to=relative_to)


def load_all(model, paths: list[Path], force: bool, allow_nonfinite: bool):
    from adaplex.io.storage import load

    handle = None
    for path in paths:
        handle = load(model, path, force=force, allow_nonfinite=allow_nonfinite)
    return handle


@app.command()
def info(
    path: Annotated[Path | None, typer.Argument(help="adapter, bundle or PEFT LoRA directory")] = None,
    base: BaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show an adapter, bundle or PEFT directory (members, sizes, base, versions), or a base model."""
    if path is not None:
        from adaplex.io.describe import describe

        result = describe(path)
        if as_json:
            emit_json(result, None)
            return
        members = result.pop("members", [])
        gates = result.pop("gates", None)
        print_mapping(f"{result['kind']} {path}", {k: v for k, v in result.items() if k != "config"})
        if members:
            table = Table(title="members")
            for column in ("member", "name", "method", "r", "alpha", "role", "tensors", "parameters", "bytes"):
                table.add_column(column, overflow="fold")
            for m in members:
                table.add_row(
                    m["member"],
                    m.get("name", ""),
                    str(m.get("method", "")),
                    str(m.get("r") or ""),
                    str(m.get("alpha") or ""),
                    m.get("role", ""),
                    f"{m['tensors']:,}",
                    f"{m['parameters']:,}",
                    f"{m['bytes']:,}",
                )
            console.print(table)
        if gates:
            print_gates(gates)
        return
    from adaplex.core.inject import all_sites, family_of
    from adaplex.util.names import names_hint

    model, _ = base_for([], base)
    family = family_of(model)
    result = {
        "base": model.config.name_or_path,
        "family": family.name,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": model.config.num_hidden_layers,
        "target_aliases": family.target_aliases(),
        "linear_sites": names_hint([s.name for s in all_sites(model, family)], limit=50),
    }
    if as_json:
        emit_json(result, None)
    else:
        print_mapping(f"base model {result['base']}", result)


def print_gates(rows: list[dict]) -> None:
    """Layer x submodule table of a gated model's final gates, mean ± std over its evaluation set."""
    submodules = [s for s in ("lora", "prefix", "bottleneck") if any(r["submodule"] == s for r in rows)]
    cell = {(r["layer"], r["submodule"]): r for r in rows}
    table = Table(title="final gates (mean ± std over the evaluation set)")
    table.add_column("layer")
    for s in submodules:
        table.add_column(s)
    for layer in sorted({r["layer"] for r in rows}):
        values = [cell.get((layer, s)) for s in submodules]
        table.add_row(str(layer), *(f"{v['mean']:.3f} ± {v['std']:.3f}" if v else "" for v in values))
    console.print(table)


@app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="adapter or bundle directory")],
    out: Annotated[Path, typer.Argument(help="output directory")],
    to: Annotated[str, typer.Option(help="target format")] = "peft",
    combined: Annotated[
        bool, typer.Option(help="a stack of adapters as one PEFT adapter (rank concatenation); not for routed bundles")
    ] = False,
    key: Annotated[list[str], typer.Option(help="routed bundle: export only this key, repeatable")] = [],  # noqa: B006
    lora_only: Annotated[
        bool, typer.Option("--lora-only", help="gated (UniPELT) model: export its LoRA part alone, without the gate")
    ] = False,
    base: BaseOption = None,
    force: ForceOption = False,
    allow_nonfinite: AllowNonfiniteOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Export to PEFT LoRA: one adapter as the PEFT directory OUT; several as OUT/<name> each, or as one
    with --combined; a routed bundle as OUT/<key> for each key (shared ⊕ expert); a gated model's LoRA
    part with --lora-only."""
    from adaplex.io.atomic import atomic_directory, refuse_existing
    from adaplex.io.peft import export_key, export_peft

    if to != "peft":
        raise ConfigError(f"unknown export format {to!r}; the only one is 'peft'")
    refuse_existing(out, overwrite)
    model, _ = base_for([path], base)
    handle = load_all(model, [path], force, allow_nonfinite)
    if handle.banks() and combined:
        raise ConfigError("--combined does not apply to a routed bundle: each key exports as shared ⊕ expert")
    if key and not handle.banks():
        raise ConfigError(f"--key applies to a routed bundle; {path} has no experts")
    gate_configs = [c for c in handle.configs.values() if c.method == "gate"]
    if lora_only:
        loras = [c.gated["lora"] for c in gate_configs if "lora" in c.gated]
        if not loras:
            raise ConfigError(f"--lora-only applies to a gated model with a LoRA part; {path} has none")
        export_peft(handle, loras, out, overwrite=overwrite, ungated=True)
        console.print(f"wrote PEFT LoRA {out} ({', '.join(loras)}, without the gate)")
        return
    if gate_configs:
        gated = ", ".join(n for c in gate_configs for n in c.gated.values())
        raise ConfigError(
            f"{path} is a gated model: learned gates scale {gated} per token and a prefix or bottleneck has no "
            "LoRA form, so it is not a PEFT LoRA; pass --lora-only to export its LoRA part alone, without the gate"
        )
    if handle.banks():  # a routed bundle: one PEFT adapter per key, shared ⊕ expert
        keys = key or [k for bank in handle.banks().values() for k in bank.keys]
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


def parse_experts(specs: list[str]) -> dict[str, Path]:
    """KEY=DIR options as {key: directory}; a missing '=' or a repeated key is an error."""
    experts: dict[str, Path] = {}
    for spec in specs:
        key, sep, directory = spec.partition("=")
        if not sep or not key or not directory:
            raise ConfigError(f"--expert {spec!r} is not KEY=DIR (e.g. --expert v100=runs/v100/adapter)")
        if key in experts:
            raise ConfigError(f"--expert gives key {key!r} twice; give each key one directory")
        experts[key] = Path(directory)
    return experts


@app.command()
def bundle(
    expert: Annotated[list[str], typer.Option("--expert", help="KEY=DIR: the expert of a routing key, repeatable")],
    out: Annotated[Path, typer.Option("--out", help="bundle directory to write")],
    shared: Annotated[Path | None, typer.Option(help="adapter every sample also gets (adaplex or PEFT dir)")] = None,
    base: BaseOption = None,
    force: ForceOption = False,
    allow_nonfinite: AllowNonfiniteOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """A routed bundle from existing adapters (adaplex or PEFT LoRA directories): one expert per key,
    ranks and alphas may differ, plus an optional shared adapter; serve it with `adaplex infer`."""
    from adaplex.io.atomic import refuse_existing
    from adaplex.io.bundle import build_bundle

    experts = parse_experts(expert)
    refuse_existing(out, overwrite)
    model, _ = base_for(list(experts.values()), base)
    build_bundle(model, experts, out, shared, force=force, allow_nonfinite=allow_nonfinite, overwrite=overwrite)
    console.print(f"wrote routed bundle {out}: keys {', '.join(experts)}" + (", shared adapter" if shared else ""))


@app.command("import")
def import_(
    peft_dir: Annotated[Path, typer.Argument(help="PEFT LoRA directory (e.g. a trainer's checkpoint-531/)")],
    out: Annotated[Path, typer.Argument(help="adaplex adapter directory to write")],
    name: Annotated[str | None, typer.Option(help="adapter name (default: the directory's name)")] = None,
    base: BaseOption = None,
    allow_nonfinite: AllowNonfiniteOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Import a PEFT LoRA directory as an adaplex adapter directory (safetensors)."""
    from adaplex.core.adapted import Adapted
    from adaplex.io.atomic import refuse_existing
    from adaplex.io.peft import import_into
    from adaplex.io.peft_format import is_peft_dir
    from adaplex.io.storage import save_adapter

    if not is_peft_dir(peft_dir):
        raise StorageError(f"{peft_dir} is not a PEFT directory (no adapter_config.json with a peft_type)")
    refuse_existing(out, overwrite)
    model, _ = base_for([peft_dir], base)
    adapter_name = import_into(model, peft_dir, name, trainable=False, allow_nonfinite=allow_nonfinite)
    save_adapter(Adapted.of(model), adapter_name, out, overwrite=overwrite)
    console.print(f"imported {peft_dir} as adapter {adapter_name!r} into {out}")


@app.command()
def merge(
    paths: Annotated[list[Path], typer.Argument(help="adapter, bundle or PEFT directories to merge")],
    out: Annotated[Path, typer.Option("--out", help="plain transformers model directory to write")],
    base: BaseOption = None,
    force: ForceOption = False,
    allow_nonfinite: AllowNonfiniteOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Merge adapters into the base: a plain transformers model directory (safetensors)."""
    from adaplex.io.atomic import atomic_directory, refuse_existing

    refuse_existing(out, overwrite)
    model, tokenizer = base_for(paths, base)
    handle = load_all(model, paths, force, allow_nonfinite)
    merged = handle.merged_model()
    with atomic_directory(out, overwrite) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    console.print(f"wrote merged model {out} ({', '.join(handle.configs)} into {model.config.name_or_path})")


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="legacy PyTorch .bin weights file")],
    out: Annotated[Path, typer.Argument(help="safetensors file to write")],
    overwrite: OverwriteFileOption = False,
) -> None:
    """Convert a legacy .bin tensor file (read with weights_only=True) to safetensors, keys unchanged."""
    from safetensors.torch import save_file

    from adaplex.io.tensor_files import read_legacy

    if not source.is_file():
        raise StorageError(f"{source} is not a file")
    if out.exists() and not overwrite:
        raise StorageError(f"{out} already exists; choose another path or pass --overwrite")
    tensors = read_legacy(source)
    staging = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging)
    staging.replace(out)
    console.print(f"wrote {out}: {len(tensors)} tensors")
