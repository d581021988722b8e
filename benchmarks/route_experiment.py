"""Routing experiment on real text: keys = Debian fortunes topics, base model = smollm2-135m (CPU).

Per-key held-out perplexity of (base), (one LoRA for all keys), (a separate LoRA per key) and
(shared + experts), at equal adapter parameters (total rank 16 on the same targets) and equal
training tokens. Writes benchmarks/results/route-experiment.json and prints a markdown table.

    .venv/bin/python benchmarks/route_experiment.py [--steps 48]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from adaplex.apps.realdata import prepare
from adaplex.compose.route import route
from adaplex.core.models import load_base
from adaplex.io.storage import load
from adaplex.train.config import TrainConfig, short_cpu_run
from adaplex.train.data import collate, token_blocks
from adaplex.train.run import train

KEYS = ("computers", "science", "politics", "work")
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def config(out: Path, name: str, adapters: list[dict], data: dict, steps: int) -> TrainConfig:
    return short_cpu_run(out / name, adapters, data, steps)


def lora(r: int) -> dict:
    return {"method": "lora", "r": r, "alpha": 2 * r, "targets": TARGETS}


@torch.no_grad()
def key_perplexity(model, tokenizer, text_path: Path, key: str | None, handle=None) -> float:
    blocks = token_blocks(text_path.read_text().splitlines(), tokenizer, 128)[:24]
    total, count = 0.0, 0
    for start in range(0, len(blocks), 8):
        batch = collate([{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks[start : start + 8]], 0)
        batch.pop("keys", None)
        if handle is not None:
            with route(handle, [key] * len(batch["input_ids"])):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        tokens = batch["input_ids"].numel() - len(batch["input_ids"])
        total, count = total + loss.item() * tokens, count + tokens
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=48, help="training steps per approach (split across keys)")
    parser.add_argument("--work", type=Path, default=Path("runs/route-experiment"))
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    data_dir = args.work / "data"
    prepare(data_dir)
    topics = data_dir / "topics"
    keyed_train = topics / "train-subset.jsonl"
    keyed_train.write_text(
        "\n".join(line for line in (topics / "train.jsonl").read_text().splitlines() if json.loads(line)["key"] in KEYS)
    )
    heldout = {k: topics / k / "heldout.txt" for k in KEYS}
    text = {"block_size": 128, "batch_size": 4, "eval": []}

    runs = {
        "one LoRA for all (r=16)": train(
            config(
                args.work,
                "all",
                [{"name": "all", "config": lora(16)}],
                {"format": "jsonl", "train": [str(keyed_train)], **text},
                args.steps,
            )
        ),
        "shared r=8 + experts r=2": train(
            config(
                args.work,
                "routed",
                [
                    {"name": "shared", "config": lora(8)},
                    {
                        "name": "experts",
                        "config": {"method": "experts", "keys": list(KEYS), "r": 2, "alpha": 4, "targets": TARGETS},
                    },
                ],
                {"format": "jsonl", "train": [str(keyed_train)], "key_field": "key", **text},
                args.steps,
            )
        ),
    }
    separate = {
        k: train(
            config(
                args.work,
                f"sep-{k}",
                [{"name": k, "config": lora(4)}],
                {"format": "text", "train": [str(topics / k / "train.txt")], **text},
                args.steps // len(KEYS),
            )
        )
        for k in KEYS
    }

    table: dict[str, dict[str, float]] = {}
    model, tokenizer = load_base("smollm2-135m")
    table["base"] = {k: key_perplexity(model, tokenizer, heldout[k], None) for k in KEYS}
    for name, path in runs.items():
        model, tokenizer = load_base("smollm2-135m")
        handle = load(model, path)
        routed = "experts" in handle.configs
        table[name] = {k: key_perplexity(model, tokenizer, heldout[k], k, handle if routed else None) for k in KEYS}
    table["separate LoRA per key (4 x r=4)"] = {}
    for k, path in separate.items():
        model, tokenizer = load_base("smollm2-135m")
        load(model, path)
        table["separate LoRA per key (4 x r=4)"][k] = key_perplexity(model, tokenizer, heldout[k], None)
    result = {"benchmark": "route-experiment", "keys": list(KEYS), "steps": args.steps, "perplexity": table}
    Path("benchmarks/results/route-experiment.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| approach | " + " | ".join(KEYS) + " | mean |")
    print("|---|" + "---:|" * (len(KEYS) + 1))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in KEYS) + f" | {sum(row.values()) / len(KEYS):.2f} |")


if __name__ == "__main__":
    main()
