"""`adaplex train|generate|infer|compare|demo|data prepare`: training and inference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adaplex.cli.common import (
    AdapterOption,
    AllowNonfiniteOption,
    BaseOption,
    ChatOption,
    JsonOption,
    OverwriteFileOption,
    PromptOption,
    app,
    at_least,
    check_device,
    console,
    data_app,
    emit_json,
)
from adaplex.errors import ConfigError


def check_prompts(prompts: list[str]) -> None:
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("a --prompt is empty; give the text to complete")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="training config (YAML)")],
    resume: Annotated[bool, typer.Option("--resume", help="continue from the output's last checkpoint")] = False,
) -> None:
    """Train adapters on PyTorch Lightning as the YAML config describes (see configs/): a causal LM, or
    with `task: classification` adapters and a head, one run per seed."""
    from adaplex.train.config import ClassificationConfig, load_train_config

    loaded = load_train_config(config)
    if isinstance(loaded, ClassificationConfig):
        if resume:
            raise ConfigError("--resume applies to causal-LM runs; a classification run starts over")
        from adaplex.train.classify_run import run_classification

        summary = run_classification(loaded, source=str(config))
        for run in summary["runs"]:
            console.print(
                f"seed {run['seed']}: accuracy {run['accuracy']:.4f}, macro-F1 {run['macro_f1']:.4f} "
                f"(best epoch {run['best_epoch'] + 1} of {run['epochs']})"
            )
        acc, f1 = summary["accuracy"], summary["macro_f1"]
        console.print(
            f"accuracy {acc['mean']:.4f} ± {acc['std']:.4f}, macro-F1 {f1['mean']:.4f} ± {f1['std']:.4f} over "
            f"{len(summary['runs'])} seeds; models under {loaded.output}/seed-*/model"
        )
        return
    from adaplex.train.run import main_process
    from adaplex.train.run import train as run_training

    result = run_training(loaded, source=str(config), resume=resume)
    if main_process():
        console.print(f"trained adapter saved to {result}")


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="classification model: a run's seed-<s>/model bundle")],
    input_path: Annotated[Path, typer.Argument(help="CSV or JSONL of records with the model's text fields")],
    output: Annotated[Path, typer.Argument(help="JSONL (or .csv) of records with predicted label and probabilities")],
    label_field: Annotated[str, typer.Option(help="field of the true label; scored where every record has it")] = (
        "label"
    ),
    base: BaseOption = None,
    overwrite: OverwriteFileOption = False,
    as_json: JsonOption = False,
) -> None:
    """Classify every record of a file with a trained classification model."""
    from adaplex.infer.classify import load_classifier, predict_file

    if not input_path.is_file():
        raise ConfigError(f"{input_path} is not a file; give a CSV or JSONL file of records")
    summary = predict_file(load_classifier(model, base), input_path, output, label_field, overwrite)
    scores = (
        f": accuracy {summary['accuracy']:.4f}, macro-F1 {summary['macro_f1']:.4f}" if "accuracy" in summary else ""
    )
    console.print(f"wrote {summary['records']} predictions to {output}{scores}")
    if as_json:
        emit_json(summary, None)


@app.command()
def generate(
    prompt: PromptOption,
    adapter: AdapterOption = [],  # noqa: B006 - typer reads the default, never mutates it
    disable: Annotated[list[str], typer.Option(help="adapter name to switch off, repeatable")] = [],  # noqa: B006
    base: BaseOption = None,
    chat: ChatOption = False,
    max_new_tokens: Annotated[int, at_least(1, "tokens to generate per prompt")] = 40,
    allow_nonfinite: AllowNonfiniteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Complete prompts with the base model plus the given adapters (none: the base alone)."""
    check_prompts(prompt)
    from adaplex.infer.generate import generate as complete
    from adaplex.infer.generate import load_stack

    handle, tokenizer, names = load_stack(adapter, base, allow_nonfinite)
    with handle.disable(*disable):
        results = [{"prompt": p, "completion": complete(handle, tokenizer, p, chat, max_new_tokens)} for p in prompt]
    if as_json:
        emit_json({"adapters": handle.stack.weights, "results": results}, None)
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
    workers: Annotated[int, at_least(1, "worker processes")] = 1,
    batch_size: Annotated[int, at_least(1, "records per batch")] = 8,
    max_new_tokens: Annotated[int, at_least(1, "tokens to generate per prompt")] = 40,
    chat: ChatOption = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    base: BaseOption = None,
    overwrite: OverwriteFileOption = False,
    allow_nonfinite: AllowNonfiniteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Generate for every record with its key's expert, in mixed-key batches, across worker processes."""
    check_device(device)
    from adaplex.infer.batch import Job, run

    job = Job(bundle, base, batch_size, max_new_tokens, chat, device, allow_nonfinite)
    summary = run(input_path, output, job, workers, registry, strict, overwrite)
    for failure in summary["failed_shards"]:
        console.print(
            f"[red]worker {failure['worker']} crashed (exit code {failure['exit_code']}); records "
            f"{failure['records'][0]}-{failure['records'][1]} have no completion[/]"
        )
    devices = ", ".join(dict.fromkeys(summary["devices"]))
    console.print(f"wrote {summary['records']} results to {output} with {summary['workers']} workers on {devices}")
    console.print("records per key: " + ", ".join(f"{k} {n}" for k, n in summary["per_key"].items()))
    if as_json:
        emit_json(summary, None)
    if summary["failed_shards"]:
        raise typer.Exit(3)


@app.command()
def compare(
    prompt: PromptOption,
    adapter: AdapterOption,
    eval_file: Annotated[list[Path], typer.Option("--eval", help="held-out .txt or .jsonl, repeatable")] = [],  # noqa: B006
    base: BaseOption = None,
    chat: ChatOption = False,
    max_new_tokens: Annotated[int, at_least(1, "tokens to generate per prompt")] = 40,
    allow_nonfinite: AllowNonfiniteOption = False,
    eval_block: Annotated[int, at_least(2, "tokens per evaluated block")] = 256,
    max_eval_tokens: Annotated[int | None, at_least(2, "evaluate at most this many tokens of each file")] = None,
    as_json: JsonOption = False,
) -> None:
    """Base, stage 1, stage 1+2, ... side by side: completions and held-out perplexities."""
    check_prompts(prompt)
    from adaplex.infer.generate import compare as run_compare
    from adaplex.infer.generate import comparison_table, load_stack

    handle, tokenizer, names = load_stack(adapter, base, allow_nonfinite)
    rows = run_compare(handle, tokenizer, names, prompt, eval_file, chat, max_new_tokens, eval_block, max_eval_tokens)
    console.print(comparison_table(rows, prompt))
    if as_json:
        emit_json({"rows": rows}, None)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="scratch directory for data, runs and the merged model")] = Path("demo-out"),
    steps: Annotated[int, at_least(1, "training steps per stage")] = 30,
) -> None:
    """Stage-wise style + instruct training on the embedded model with real text, compared side by side."""
    from adaplex.apps import demo as demo_job

    demo_job.run(out, steps=steps, console=console)


@data_app.command("prepare")
def data_prepare(out: Annotated[Path, typer.Argument(help="directory to write the data into")]) -> None:
    """Prepare real-text training files (fortunes, Python reference Q&A) under OUT."""
    from adaplex.apps.realdata import prepare

    for name, count in prepare(out).items():
        console.print(f"{out / name}: {count}")
