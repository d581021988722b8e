"""`adaplex demo`: the main job end to end on the embedded model, on CPU, in a few minutes.

1. Prepare real text: Debian fortunes (style) and Python reference Q&A (instruct).
2. Stage 1: train a `style` LoRA on fortunes.
3. Stage 2: train an `instruct` MoSLoRA on the chat data, with `style` loaded frozen and active.
4. Compare base, stage 1 and stage 1+2 side by side: held-out perplexities and answers.
5. Merge both into a plain transformers model and check it gives the same logits.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from adaplex.apps.realdata import fortunes_available, prepare
from adaplex.infer.generate import compare, comparison_table, load_stack
from adaplex.train.config import TrainConfig, short_cpu_run
from adaplex.train.run import train

PROMPTS = ("Explain the 'with' statement in Python.", "Say something wise about computers.")


def stage_config(out: Path, name: str, data: dict, adapters: list[dict], steps: int) -> TrainConfig:
    return short_cpu_run(out / name, adapters, data, steps, version="v1")


def run(out: Path, steps: int = 30, console: Console | None = None) -> list[dict]:
    console = console or Console()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)  # the demo's own scratch directory
    data = out / "data"
    counts = prepare(data)
    source = "Debian fortunes" if fortunes_available() else "Python docs (fortunes not installed)"
    console.print(
        f"[bold]data[/]: style = {source}, {counts['style/train.txt']} texts; "
        f"instruct = {counts['instruct/train.jsonl']} Python Q&A pairs (chat)"
    )

    console.rule("stage 1: style adapter (LoRA r=8)")
    style = train(
        stage_config(
            out,
            "style",
            {
                "format": "text",
                "train": [str(data / "style/train.txt")],
                "eval": [str(data / "style/heldout.txt")],
                "block_size": 128,
                "batch_size": 4,
            },
            [{"name": "style", "config": {"method": "lora", "r": 8, "alpha": 16}}],
            steps,
        )
    )

    console.rule("stage 2: instruct adapter (MoSLoRA r=8) on top of the frozen style adapter")
    instruct = train(
        stage_config(
            out,
            "instruct",
            {
                "format": "chat",
                "train": [str(data / "instruct/train.jsonl")],
                "eval": [str(data / "instruct/heldout.jsonl")],
                "block_size": 192,
                "batch_size": 4,
            },
            [
                {"name": "style", "path": str(style), "train": False},
                {"name": "instruct", "config": {"method": "moslora", "r": 8, "alpha": 16}},
            ],
            steps,
        )
    )

    console.rule("base vs stage 1 vs stage 1+2")
    handle, tokenizer, names = load_stack([str(style), str(instruct)], None)
    rows = compare(
        handle,
        tokenizer,
        names,
        list(PROMPTS),
        [data / "style/heldout.txt", data / "instruct/heldout.jsonl"],
        chat=True,
        max_new_tokens=48,
    )
    console.print(comparison_table(rows, list(PROMPTS)))

    merged = handle.merged_model().eval()
    probe = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        gap = (merged(**probe).logits - handle.model(**probe).logits).abs().max().item()
    merged.save_pretrained(out / "merged-model")
    tokenizer.save_pretrained(out / "merged-model")
    for row in handle.report():
        console.print(f"adapter {row.name}: {row.method}, {row.parameters:,} parameters ({row.bytes / 2**20:.1f} MiB)")
    console.print(f"merged plain model: {out / 'merged-model'} (max |logit diff| vs adapters: {gap:.1e})")
    console.print(f"try: adaplex generate --chat --adapter {style} --adapter {instruct}:0.5 --prompt 'Explain lambda.'")
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    return rows
