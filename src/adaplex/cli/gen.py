"""`adaplex gen zoo|prepare|analyze|test-tokenization|train|generate|eval`: prompt-to-LoRA generation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adaplex.cli.common import JsonOption, app, check_device, console, emit_json, print_mapping

gen_app = typer.Typer(no_args_is_help=True, help="Generate LoRA adapters from text: zoo, tokenizer, generator.")
app.add_typer(gen_app, name="gen")


@gen_app.command()
def zoo(
    config: Annotated[Path, typer.Argument(help="zoo config (YAML), e.g. configs/gen-zoo.yaml")],
    json_out: JsonOption = False,
    out: Annotated[Path | None, typer.Option("--out", help="also write the summary (JSON) here")] = None,
) -> None:
    """Train one small LoRA per data subset, keeping checkpoints; resumes where a killed build stopped."""
    from adaplex.generator.zoo import build_zoo, load_zoo_config

    summary = build_zoo(load_zoo_config(config))
    if json_out or out:
        emit_json(summary, out)
    else:
        print_mapping("zoo", summary)


def show(result: dict, json_out: bool, title: str) -> None:
    if json_out:
        emit_json(result, None)
    else:
        print_mapping(title, result)


ZooArgument = Annotated[Path, typer.Argument(help="zoo directory (built by `adaplex gen zoo`)")]
WidthOption = Annotated[int, typer.Option("--width", min=1, help="token width D of the grid")]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")]


@gen_app.command()
def prepare(
    config: Annotated[Path, typer.Argument(help="generator config (YAML)")], json_out: JsonOption = False
) -> None:
    """Build (and cache) the token dataset and the conditioning embeddings a generator trains on."""
    from adaplex.generator.config import load_gen_config
    from adaplex.generator.training import prepare as prepare_data
    from adaplex.generator.training import summary

    result = summary(prepare_data(load_gen_config(config)))
    show(result, json_out, "generator data")


@gen_app.command()
def analyze(
    zoo_dir: ZooArgument,
    width: WidthOption = 384,
    json_out: JsonOption = False,
) -> None:
    """Statistics of a zoo: per layer and per tensor kind, norms, ranges and how much they vary."""
    from adaplex.generator.dataset import analyze as zoo_statistics
    from adaplex.generator.zoo import read_zoo

    result = zoo_statistics(read_zoo(zoo_dir), width)
    if json_out:
        emit_json(result, None)
        return
    for axis in ("layer", "kind"):
        table = Table(title=f"by {axis} ({result['members']} checkpoints of {result['runs']} runs)")
        for column in (axis, "norm", "min", "max", "spread"):
            table.add_column(column, justify="left" if column == axis else "right")
        for row in result[f"{axis}s"]:
            table.add_row(*(str(row[c]) for c in (axis, "norm", "min", "max", "spread")))
        console.print(table)


@gen_app.command("test-tokenization")
def test_tokenization(
    zoo_dir: ZooArgument,
    width: WidthOption = 384,
    json_out: JsonOption = False,
) -> None:
    """Tokenize and detokenize every checkpoint of a zoo; each must come back bitwise."""
    from adaplex.generator.dataset import round_trip
    from adaplex.generator.zoo import read_zoo

    result = round_trip(read_zoo(zoo_dir), width)
    show(result, json_out, "round trip")


@gen_app.command("train")
def train_command(
    config: Annotated[Path, typer.Argument(help="generator config (YAML), e.g. configs/gen-train.yaml")],
    resume: Annotated[bool, typer.Option("--resume", help="continue from the output's last checkpoint")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check data, shapes and one step; write nothing")] = False,
    json_out: JsonOption = False,
) -> None:
    """Train the hyper-convolutional generator on a zoo (Lightning)."""
    from adaplex.generator.config import load_gen_config
    from adaplex.generator.training import train_generator
    from adaplex.train.run import main_process

    result = train_generator(load_gen_config(config), resume=resume, dry_run=dry_run)
    if main_process():  # the other processes of a DDP run say nothing
        show(result, json_out, "generator")


@gen_app.command()
def generate(
    generator: Annotated[Path, typer.Argument(help="generator directory (<run>/generator)")],
    prompts: Annotated[list[str] | None, typer.Argument(help="prompts: a description, then sample inputs")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="prompts, one per line")] = None,
    out: Annotated[Path, typer.Option("--out", help="directory to write the adapters into")] = Path("generated"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")] = False,
    device: DeviceOption = "cpu",
) -> None:
    """Generate one LoRA adapter directory per prompt (loadable and exportable like any adapter)."""
    from adaplex.generator.generate import PromptToLoRA, check_prompts, read_prompt_file
    from adaplex.io.atomic import refuse_existing

    check_device(device)
    texts = [p.replace("\\n", "\n") for p in prompts or []] + (read_prompt_file(file) if file else [])
    check_prompts(texts)
    refuse_existing(out, overwrite)  # before any model is loaded
    for path in PromptToLoRA(generator, device).save(texts, out, overwrite):
        console.print(str(path))


@gen_app.command("eval")
def eval_command(
    generator: Annotated[Path, typer.Argument(help="generator directory (<run>/generator)")],
    zoo_dir: Annotated[
        Path | None, typer.Option("--zoo", help="zoo directory (default: the one it learned from)")
    ] = None,
    seen: Annotated[int, typer.Option("--seen", min=0, help="training subsets to score with new prompts")] = 6,
    blocks: Annotated[int, typer.Option("--blocks", min=1, help="held-out blocks scored per subset")] = 8,
    block: Annotated[int, typer.Option("--block", min=2, help="tokens per scored block")] = 64,
    device: DeviceOption = "cpu",
    json_out: JsonOption = False,
    out: Annotated[Path | None, typer.Option("--out", help="also write the result (JSON) here")] = None,
) -> None:
    """Perplexity of generated adapters against base, trained, zoo-mean and nearest-zoo adapters."""
    from adaplex.generator.evaluate import evaluate

    check_device(device)
    result = evaluate(generator, zoo_dir, seen=seen, block=block, max_blocks=blocks, device=device)
    if json_out or out:
        emit_json(result, out)
    if not json_out:
        for group in ("heldout", "seen"):
            if group in result:
                ppl = result[group]["ppl"]
                console.print(
                    f"{group}: recovered {result[group]['recovered_share']} of the trained gain; ppl "
                    + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
                )
        console.print(f"{result['seconds_per_adapter']:.3f} s per adapter ({result['device']})")
