"""`adaplex infer`: batch generation over a JSONL of (key or target, prompt), across worker processes.

Each worker (spawn start method: safe with CUDA) loads its own model and bundle on its own device
(``worker_device``: one GPU a worker where there are several), reads its own contiguous shard,
generates in routed mixed-key batches and writes its shard file; the parent writes every result in
input order. A worker that crashes is reported with its shard (records a..b) and its records get an
"error" field; no other result is lost. Setting the environment variable ADAPLEX_INFER_CRASH_SHARD=i
makes worker i exit abruptly (for testing that path).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaplex.compose.registry import load_registry
from adaplex.compose.route import route
from adaplex.core.models import choose_base, load_base
from adaplex.errors import AdaplexError, ConfigError
from adaplex.infer.generate import render_prompt
from adaplex.io.describe import describe, recorded_base
from adaplex.io.storage import load
from adaplex.util import strict_json
from adaplex.util.jsonl import read_lines


@dataclass(frozen=True)
class Job:
    bundle: Path
    base: str | None
    batch_size: int
    max_new_tokens: int
    chat: bool
    device: str
    allow_nonfinite: bool = False


def resolve_keys(
    records: list[dict[str, Any]], known: list[str], registry: Path | None, strict: bool
) -> list[str | None]:
    """Each record's key: its "key" field, or its "target" mapped through the registry."""
    reg = load_registry(registry) if registry else None
    keys = []
    for i, record in enumerate(records, start=1):
        if "prompt" not in record:
            raise ConfigError(f"record {i}: no 'prompt' field")
        if "key" in record:
            key = record["key"]
        elif "target" in record:
            if reg is None:
                raise ConfigError(f"record {i} has a 'target' but no --registry was given to map it to a key")
            key = reg.resolve(record["target"], strict=strict)
        else:
            key = None
        if key not in (None, "__base__") and key not in known:
            raise ConfigError(f"record {i}: unknown key {key!r}; the bundle has: {', '.join(known)}")
        keys.append(key)
    return keys


def worker_device(device: str, worker: int) -> str:
    """Worker ``worker``'s device: with plain "cuda" on a machine of G GPUs, GPU worker mod G (one GPU a
    worker when there are as many); an explicit device ("cuda:1", "cpu") for every worker."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{worker % torch.cuda.device_count()}"
    return device


def _worker(shard: int, items: list[tuple[int, str | None, str]], job: Job, out: Path) -> None:
    if os.environ.get("ADAPLEX_INFER_CRASH_SHARD") == str(shard):
        os._exit(3)

    device = worker_device(job.device, shard)
    recorded, relative_to = recorded_base(job.bundle)
    model, tokenizer = load_base(choose_base(job.base, recorded), relative_to=relative_to)
    model.to(device)
    handle = load(model, job.bundle, allow_nonfinite=job.allow_nonfinite)
    tokenizer.padding_side = "left"
    lines = []
    for start in range(0, len(items), job.batch_size):
        chunk = items[start : start + job.batch_size]
        texts = [render_prompt(tokenizer, prompt, job.chat) for _, _, prompt in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not job.chat).to(device)
        with torch.no_grad(), route(handle, [key for _, key, _ in chunk]):
            generated = model.generate(
                **batch, max_new_tokens=job.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        for (index, key, prompt), row in zip(chunk, generated, strict=True):
            completion = tokenizer.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            lines.append(strict_json.dumps({"index": index, "key": key, "prompt": prompt, "completion": completion}))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.rename(out)


def run(
    input_path: Path,
    output: Path,
    job: Job,
    workers: int = 1,
    registry: Path | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    if output.exists() and not overwrite:
        raise AdaplexError(f"{output} already exists; choose another path or pass --overwrite")
    for name, value in (
        ("--workers", workers),
        ("--batch-size", job.batch_size),
        ("--max-new-tokens", job.max_new_tokens),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, not {value}")
    info = describe(job.bundle)
    known = [m["member"].removeprefix("experts/") for m in info.get("members", []) if m.get("role") == "expert"]
    if not known:
        raise ConfigError(
            f"{job.bundle} is not a routed bundle (it is a {info['kind']} without experts/<key>/ members); "
            "make one with `adaplex bundle --expert KEY=DIR ...` or a routed training run"
        )
    records = read_lines(input_path)
    if not records:
        raise ConfigError(f"{input_path} holds no records")
    keys = resolve_keys(records, known, registry, strict)
    items = [(i, k, r["prompt"]) for i, (r, k) in enumerate(zip(records, keys, strict=True))]
    workers = max(1, min(workers, len(items)))
    bounds = [(len(items) * w // workers, len(items) * (w + 1) // workers) for w in range(workers)]
    scratch = output.parent / f".{output.name}.shards"
    scratch.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    processes = []
    for w, (a, b) in enumerate(bounds):
        p = context.Process(target=_worker, args=(w, items[a:b], job, scratch / f"{w}.jsonl"))
        p.start()
        processes.append(p)
    results: dict[int, str] = {}
    failures = []
    for w, (p, (a, b)) in enumerate(zip(processes, bounds, strict=True)):
        p.join()
        shard_file = scratch / f"{w}.jsonl"
        if p.exitcode != 0 or not shard_file.is_file():
            failures.append({"worker": w, "records": [a + 1, b], "exit_code": p.exitcode})
            for i in range(a, b):
                results[i] = strict_json.dumps(
                    {
                        "index": i,
                        "key": keys[i],
                        "prompt": items[i][2],
                        "error": f"worker {w} crashed (exit code {p.exitcode})",
                    }
                )
            continue
        for line in shard_file.read_text().splitlines():
            results[json.loads(line)["index"]] = line
    staging = output.with_name(f".{output.name}.tmp")
    staging.write_text("".join(results[i] + "\n" for i in range(len(items))))
    staging.replace(output)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    per_key = dict(Counter("(none)" if k in (None, "__base__") else k for k in keys))
    return {
        "records": len(items),
        "per_key": per_key,
        "workers": workers,
        "devices": [worker_device(job.device, w) for w in range(workers)],
        "failed_shards": failures,
        "output": str(output),
    }
