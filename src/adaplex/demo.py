"""`adaplex demo`: the main job end to end on the embedded model, on CPU, in a few minutes.

Trains a LoRA adapter on Python's own reference documentation (held-out topics kept aside),
then shows what a new user can judge: held-out perplexity and a completion before and after,
the adapter's size, and that the merged plain model gives the same logits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from adaplex import Adapted, LoRAConfig
from adaplex.models import load_base
from adaplex.train.data import perplexity, pydoc_topics, token_blocks
from adaplex.train.module import AdapterLM

PROMPT = "The `with` statement is used to"


def complete(model: torch.nn.Module, tokenizer, prompt: str, tokens: int = 40) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(out_dir: Path, steps: int = 40, batch: int = 4, block: int = 128, console: Console | None = None) -> dict:
    console = console or Console()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = load_base("smollm2-135m")
    topics = list(pydoc_topics().values())
    train_text, held_text = [t for i, t in enumerate(topics) if i % 10], topics[::10]
    train, held = token_blocks(train_text, tokenizer, block), token_blocks(held_text, tokenizer, block)[:48]
    console.print(f"[bold]base[/] smollm2-135m; data: pydoc topics, {len(train)} train / {len(held)} held-out blocks")

    before = {"perplexity": perplexity(model, held), "completion": complete(model, tokenizer, PROMPT)}
    handle = Adapted.of(model)
    handle.add("pydoc", LoRAConfig(r=8, alpha=16))
    module = AdapterLM(handle, lr=2e-3, warmup=5, total_steps=steps)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model.train()
    trainer.fit(module, DataLoader(train, batch_size=batch, shuffle=True))
    model.eval()
    after = {"perplexity": perplexity(model, held), "completion": complete(model, tokenizer, PROMPT)}

    merged = handle.merged_model().eval()
    probe = held[:2]
    with torch.no_grad():
        merge_gap = (merged(input_ids=probe).logits - model(input_ids=probe).logits).abs().max().item()
    merged.save_pretrained(out_dir / "merged-model")
    tokenizer.save_pretrained(out_dir / "merged-model")
    report = handle.report()[0]

    table = Table(title=f"LoRA r=8 on all linear layers, {steps} steps of {batch}x{block} tokens")
    table.add_column("")
    table.add_column("held-out perplexity", justify="right")
    table.add_column(f"completion of {PROMPT!r}")
    table.add_row("base", f"{before['perplexity']:.2f}", before["completion"])
    table.add_row("adapted", f"{after['perplexity']:.2f}", after["completion"])
    console.print(table)
    console.print(
        f"adapter: {report.parameters:,} parameters ({report.bytes / 2**20:.1f} MiB), "
        f"{100 * report.parameters / sum(p.numel() for p in merged.parameters()):.2f}% of the base"
    )
    console.print(
        f"merged plain model saved to {out_dir / 'merged-model'}; max |logit diff| vs adapted: {merge_gap:.2e}"
    )
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    return {"before": before, "after": after, "merge_gap": merge_gap, "adapter_parameters": report.parameters}
