"""Inference on stacks of saved adapters: loading `PATH[:WEIGHT]` specs, generating, comparing stages."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from adaplex.core.adapted import Adapted
from adaplex.core.models import choose_base, load_base
from adaplex.errors import ConfigError
from adaplex.io.describe import recorded_base
from adaplex.io.storage import attach
from adaplex.train.config import DataConfig
from adaplex.train.data import Example, build_examples, perplexity, token_stream
from adaplex.util.jsonl import read_lines, read_text
from adaplex.util.progress import report


def parse_adapter(spec: str) -> tuple[Path, float]:
    """'runs/style/adapter:0.5' -> (path, 0.5); no weight means 1."""
    path, sep, weight = spec.rpartition(":")
    if sep and not Path(spec).exists():
        try:
            return Path(path), float(weight)
        except ValueError:
            raise ConfigError(f"--adapter {spec!r}: the weight after ':' must be a number") from None
    return Path(spec), 1.0


def load_stack(
    specs: list[str], base: str | None, allow_nonfinite: bool = False
) -> tuple[Adapted, PreTrainedTokenizerBase, list[str]]:
    """Base model with the adapters of ``specs`` stacked and weighted; returns their names in order."""
    parsed = [parse_adapter(s) for s in specs]
    recorded, relative_to = recorded_base(parsed[0][0]) if parsed else (None, None)
    model, tokenizer = load_base(choose_base(base, recorded), relative_to=relative_to)
    handle = Adapted.of(model)
    names: list[str] = []
    for path, weight in parsed:
        added = attach(model, path, allow_nonfinite=allow_nonfinite)
        for name in added:
            handle.stack.set_weight(name, weight)
        names += added
    return handle, tokenizer, names


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> str:
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


@torch.no_grad()
def generate(handle: Adapted, tokenizer, prompt: str, chat: bool = False, max_new_tokens: int = 40) -> str:
    """Greedy completion of ``prompt`` by the model with its currently active adapters."""
    text = render_prompt(tokenizer, prompt, chat)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(next(handle.model.parameters()).device)
    out = handle.model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def eval_examples(path: Path, tokenizer, block: int = 256, max_tokens: int | None = None) -> list[Example]:
    """Held-out examples from a file, at most ``max_tokens`` tokens in all: .txt is plain text cut into
    blocks (the last one shorter, so a file shorter than one block is evaluated too), .jsonl is chat if
    its records are, else text."""
    if path.suffix != ".jsonl":
        stream = token_stream([read_text(path)], tokenizer)[:max_tokens]
        examples = [
            {"input_ids": b, "labels": b} for i in range(0, len(stream), block) if len(b := stream[i : i + block]) > 1
        ]
        if not examples:
            raise ConfigError(f"{path} has no text to evaluate")
        return examples
    records = read_lines(path)
    first = records[0] if records else {}
    fmt = "chat" if "messages" in first or "response" in first else "jsonl"
    examples = build_examples([path], DataConfig(format=fmt, train=[path], block_size=block), tokenizer, "eval")
    return examples if max_tokens is None else _within(examples, max_tokens)


def _within(examples: list[Example], max_tokens: int) -> list[Example]:
    """The first examples up to ``max_tokens`` tokens in all, the last one cut to fit."""
    kept, left = [], max_tokens
    for example in examples:
        if left < 2:
            break
        kept.append({k: v[:left] if isinstance(v, list) else v for k, v in example.items()})
        left -= len(kept[-1]["input_ids"])
    return kept


def compare(
    handle: Adapted,
    tokenizer,
    names: list[str],
    prompts: list[str],
    evals: list[Path],
    chat: bool,
    max_new_tokens: int,
    eval_block: int = 256,
    max_eval_tokens: int | None = None,
) -> list[dict]:
    """Rows for base, then the first adapter, the first two stacked, ...: completions and perplexities."""
    sets = {str(p): eval_examples(p, tokenizer, eval_block, max_eval_tokens) for p in evals}
    rows = []
    for count in range(len(names) + 1):
        stage = names[:count]
        label = " + ".join(stage) or "base"
        with handle.only(*stage):
            ppl = {}
            for name, examples in sets.items():
                report(f"{label}: perplexity on {name} ({sum(len(e['input_ids']) for e in examples):,} tokens)")
                ppl[name] = perplexity(handle.model, examples, pad_id=tokenizer.pad_token_id or 0)
            report(f"{label}: {len(prompts)} completions")
            completions = [generate(handle, tokenizer, p, chat, max_new_tokens) for p in prompts]
        rows.append({"stage": label, "perplexity": ppl, "completions": completions})
    return rows


def comparison_table(rows: list[dict], prompts: list[str]) -> Table:
    """``compare``'s rows as one table: a row per stage, its perplexities, then its completions."""
    table = Table(title="stages side by side", show_lines=True)
    table.add_column("stage")
    for name in rows[0]["perplexity"]:
        table.add_column(f"ppl {Path(name).parent.name}/{Path(name).name}", justify="right")
    for p in prompts:
        table.add_column(p)
    for row in rows:
        table.add_row(row["stage"], *[f"{v:.2f}" for v in row["perplexity"].values()], *row["completions"])
    return table
