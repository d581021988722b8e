"""`adaplex bench overhead|train|route|faults`: benchmarks measured side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adaplex.cli.common import (
    BaseOption,
    JsonOption,
    app,
    at_least,
    bench_app,
    check_device,
    console,
    emit_json,
    print_mapping,
)
from adaplex.cli.faults import fault_inputs
from adaplex.errors import ConfigError

ShapeOption = Annotated[
    Path | None, typer.Option(help="a model config (config.json or its directory): random weights of that shape")
]
LayersOption = Annotated[int | None, typer.Option(min=1, help="with --shape: this many layers")]


@app.command("compare-methods")
def compare_methods(
    config: Annotated[Path, typer.Argument(help="comparison config (YAML; see configs/compare-methods.yaml)")],
    device: Annotated[str, typer.Option(help="cpu or cuda: where latency and memory are measured")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="the JSON (default: OUTPUT/gate-compare.json); plots beside it")] = (
        None
    ),
    as_json: JsonOption = False,
) -> None:
    """Linear probe, LoRA, bottleneck, prefix and UniPELT on one task, data and seeds, at several
    training-set sizes: accuracy and macro-F1 (mean ± std), parameters, latency, memory, plots."""
    check_device(device)
    from adaplex.bench import compare_methods as cm
    from adaplex.util.yamlconfig import load_yaml

    loaded = load_yaml(config, cm.CompareConfig)
    result = cm.compare(loaded, str(config), device)
    target = out or loaded.output / "gate-compare.json"
    cm.write(result, target, target.with_name("gate"))
    sizes = result["sample_sizes"]
    table = Table(title=f"methods on {result['task']} ({result['base']}, {len(result['seeds'])} seeds): macro-F1")
    for column in ("method", *(f"K={s}" if s != "full" else "full" for s in sizes), "accuracy (full)"):
        table.add_column(column, justify="right")
    for column in ("trainable", "latency x base", "peak train MiB"):
        table.add_column(column, justify="right")
    for method, row in result["methods"].items():
        table.add_row(
            method,
            *(f"{row[s]['macro_f1']['mean']:.3f} ± {row[s]['macro_f1']['std']:.3f}" for s in sizes),
            f"{row[sizes[-1]]['accuracy']['mean']:.3f} ± {row[sizes[-1]]['accuracy']['std']:.3f}",
            f"{row['trainable_parameters']:,}",
            f"{row['latency_x_base']:.3f}",
            f"{row['peak_train_mib']:.0f}",
        )
    console.print(table)
    console.print(f"wrote {target} and its plots beside it")
    if as_json:
        emit_json(result, None)


@bench_app.command("gate")
def bench_gate(
    base: Annotated[str, typer.Option("--base", help="encoder: embedded name or directory")] = "minilm-l6",
    batch: Annotated[int, at_least(1, "samples per batch")] = 16,
    seq: Annotated[int, at_least(1, "tokens per sample")] = 128,
    rounds: Annotated[int, at_least(1, "interleaved timing rounds")] = 20,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bfloat16 weights (GPU)")] = False,
    peers: Annotated[bool, typer.Option(help="also run AdapterHub's UniPELT (its own environment)")] = True,
    peer_python: Annotated[
        Path | None, typer.Option(help="python of the environment with AdapterHub's adapters (default: make peers')")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Inference latency of LoRA, prefix, bottleneck and UniPELT relative to the base, with AdapterHub's."""
    check_device(device)
    import torch

    from adaplex.bench import gate

    python = (peer_python or gate.PEER_PYTHON) if peers else None
    result = gate.run(base, batch, seq, rounds, device, torch.bfloat16 if bf16 else torch.float32, python)
    table = Table(title=f"gates on {result['base']} ({result['device']}, {result['dtype']}, batch {batch}x{seq})")
    for column in ("variant", "latency x base", "AdapterHub x base", "trainable", "peak inference MiB"):
        table.add_column(column, justify="right")
    for name, ratio in result["ratio_to_base"].items():
        peer = result["peers"].get(f"adapterhub_{name}")
        table.add_row(
            name,
            f"{ratio:.3f}",
            f"{peer:.3f}" if peer is not None else "-",
            f"{result['trainable_params'][name]:,}",
            f"{result['peak_inference_mib'][name]:.0f}",
        )
    console.print(table)
    if "absent" in result["peer_run"]:
        console.print(f"AdapterHub: {result['peer_run']['absent']}")
    if as_json or out:
        emit_json(result, out)


@bench_app.command("overhead")
def bench_overhead(
    base: BaseOption = None,
    batch: Annotated[int, at_least(1, "samples per batch")] = 4,
    seq: Annotated[int, at_least(1, "tokens per sample")] = 128,
    rank: Annotated[int, at_least(1, "adapter rank")] = 16,
    rounds: Annotated[int, at_least(1, "interleaved timing rounds")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bfloat16 weights (GPU)")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Forward and train-step cost of each method against the base and against PEFT LoRA."""
    check_device(device)
    import torch

    from adaplex.bench import overhead
    from adaplex.core.models import choose_base

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
        emit_json(result, out)


@bench_app.command("train")
def bench_train(
    base: BaseOption = None,
    batch: Annotated[int, at_least(1, "samples per batch")] = 4,
    seq: Annotated[int, at_least(1, "tokens per sample")] = 128,
    rank: Annotated[int, at_least(1, "adapter rank")] = 16,
    steps: Annotated[int, at_least(2, "steps per timed chunk (its first is not timed)")] = 4,
    rounds: Annotated[int, at_least(1, "interleaved rounds")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    shape: ShapeOption = None,
    layers: LayersOption = None,
    precision: Annotated[str, typer.Option(help="auto (bf16-mixed on GPU), bf16-mixed, bf16-true or 32-true")] = "auto",
    quantize: Annotated[str, typer.Option(help="none, 4bit or 8bit: the base's linear layers (bitsandbytes)")] = "none",
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="a variant to run, repeatable (default: all that apply)")
    ] = None,
    profile: Annotated[bool, typer.Option(help="also profile a few plain-loop steps of every variant")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Training step time and peak memory: adaplex (Lightning, and in a plain loop) against PEFT."""
    check_device(device)
    if quantize not in ("none", "4bit", "8bit"):
        raise ConfigError(f"--quantize {quantize!r}: give none, 4bit or 8bit")
    from adaplex.bench import train as train_bench
    from adaplex.core.models import choose_base

    result = train_bench.run(
        choose_base(base, None),
        batch,
        seq,
        rank,
        steps,
        rounds,
        device,
        shape,
        layers,
        precision,
        quantize,
        tuple(variant) if variant else None,
        profile,
    )
    title = f"training step on {result['base']} ({result['device']}, {result['precision']}, base {result['quantize']})"
    table = Table(title=title)
    for column in ("variant", "step s", "tokens/s", "peak MiB", "tokens/s x PEFT", "memory x PEFT"):
        table.add_column(column, justify="right")
    for name, step in result["step_s"].items():
        vs = result.get("vs_peft", {}).get(name)
        table.add_row(
            name,
            f"{step:.3f}",
            f"{result['tokens_per_s'][name]:.0f}",
            f"{result['peak_mib'][name]:.0f}",
            f"{vs['tokens_per_s_x']:.3f}" if vs else "",
            f"{vs['peak_memory_x']:.3f}" if vs else "",
        )
    console.print(table)
    if as_json or out:
        emit_json(result, out)


@bench_app.command("route")
def bench_route(
    base: BaseOption = None,
    adapters: Annotated[list[int], at_least(1, "distinct adapters in the batch, repeatable", "--adapters")] = [8],  # noqa: B006
    batch: Annotated[int, at_least(1, "samples per batch")] = 8,
    seq: Annotated[int, at_least(1, "tokens per sample (decode: cached tokens)")] = 128,
    rank: Annotated[
        list[int], at_least(1, "adapter rank; repeat for mixed ranks (key i gets the i-th, cycling)", "--rank")
    ] = [16],  # noqa: B006
    rounds: Annotated[int, at_least(1, "interleaved rounds")] = 3,
    mode: Annotated[str, typer.Option(help="prefill (full forward) or decode (one cached step)")] = "prefill",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bfloat16 weights (GPU)")] = False,
    peers: Annotated[str, typer.Option(help="peft (PEFT's mixed-adapter batches side by side) or none")] = "peft",
    shape: ShapeOption = None,
    layers: LayersOption = None,
    slots: Annotated[
        int | None, typer.Option(min=1, help="page the bank: experts in host memory, this many on the device")
    ] = None,
    profile: Annotated[bool, typer.Option(help="also profile a few base and routed steps")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Mixed-key batches: adaplex routed experts against PEFT mixed-adapter batches and the base."""
    check_device(device)
    from adaplex.bench import route as route_bench
    from adaplex.core.models import choose_base

    result = route_bench.run(
        choose_base(base, None),
        tuple(adapters),
        batch,
        seq,
        tuple(rank),
        rounds,
        device,
        mode,
        bf16,
        peers=peers,
        shape=shape,
        layers=layers,
        slots=slots,
        profile=profile,
    )
    title = f"{mode} on {result['base']} ({result['device']}, batch {batch}, seq {seq}, rank {result['rank']})"
    table = Table(title=title)
    columns = ("adapters", "base s", "routed x base", "graphs: routed x base", "PEFT x base", "PEFT / routed")
    for column in (*columns, "bank MiB", "bank build s", "first use ms/key"):
        table.add_column(column, justify="right")
    for r in result["results"]:
        table.add_row(
            str(r["adapters"]),
            f"{r['step_s']['base']:.4f}",
            f"{r['routed_x_base']:.2f}",
            f"{r['graph_routed_x_base']:.3f}" if "graph_routed_x_base" in r else "—",
            f"{r['peft_x_base']:.2f}" if "peft_x_base" in r else "—",
            f"{r['peft_x_routed']:.2f}" if "peft_x_routed" in r else "—",
            f"{r['bank_bytes'] / 2**20:.1f}",
            f"{r['bank_build_s']:.2f}",
            f"{r['first_use_per_key_ms']:.2f}" if "first_use_per_key_ms" in r else "—",
        )
    console.print(table)
    if as_json or out:
        emit_json(result, out)


@bench_app.command("faults")
def bench_faults(
    base: BaseOption = None,
    batch: Annotated[int, at_least(1, "samples per batch")] = 4,
    seq: Annotated[int, at_least(1, "tokens per sample")] = 128,
    repeats: Annotated[int, at_least(1, "interleaved rounds")] = 5,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bfloat16 weights (GPU)")] = False,
    graphs: Annotated[
        bool, typer.Option(help="time CUDA-graph replays of the baseline and fused phases (no host launch cost)")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Forward time with every detector on against off (fused attention), interleaved in one run."""
    check_device(device)
    import torch

    from adaplex.faults.bits import top_exponent_bit
    from adaplex.faults.experiment import monitor
    from adaplex.faults.hook import DetectorConfig, FaultPlan

    model, batches = fault_inputs(base, batch, seq, 1, bf16)
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
        model,
        inputs,
        FaultPlan(location="scores", bit=top_exponent_bit(model.dtype)),
        DetectorConfig(),
        repeats,
        graphs,
    )
    print_mapping("detector overhead (percent over the fused baseline)", result["overhead_percent"])
    if as_json or out:
        emit_json(result, out)
