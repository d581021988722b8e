"""The two-launch form's sizes swept again with dependent launches, on a 2-layer Llama-3-8B shape's decode
step as a CUDA graph (batch 64, 64 distinct rank-16 experts on all seven linears, bfloat16): each variant's
graph and the base's are replayed in turn, ``REPLAYS`` a timing, and the medians over rounds of
routed/base are reported. Writes JSON.

    python benchmarks/dependent_sweep.py OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from adaplex.bench.route import build_routed
from adaplex.bench.shapes import shaped_model
from adaplex.compose.route import route
from adaplex.core.graphs import graphed_decode
from adaplex.kernels import gathered_lora

BATCH, SEQ, ADAPTERS, ROUNDS, REPLAYS = 64, 128, 64, 15, 20
# name -> (partial shrinks, the expand's columns per program, dependent launches)
VARIANTS = {
    "built-in": (1024, 1024, True),
    "independent": (1024, 1024, False),
    "shrinks-2048": (2048, 1024, True),
    "shrinks-512": (512, 1024, True),
    "columns-512": (1024, 512, True),
    "columns-2048": (1024, 2048, True),
}


def _timed(step) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPLAYS * 1e-3


def main(out: str) -> None:
    shape = Path(__file__).parent / "shapes" / "llama-3-8b.json"
    base = shaped_model(shape, 2, torch.bfloat16).cuda().requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ), device="cuda")
    keys = [f"k{i}" for i in range(ADAPTERS)]
    routed, _ = build_routed(base, keys, (16,))
    steps = {"base": graphed_decode(base, ids)}
    saved = gathered_lora.PARTIAL_SHRINKS, gathered_lora.ONE_TOKEN_LONG
    times = {name: [] for name in ["base", *VARIANTS]}
    with route(routed, [keys[b % ADAPTERS] for b in range(BATCH)]):  # held while the graphs replay
        for name, (shrinks, columns, dependent) in VARIANTS.items():
            gathered_lora.PARTIAL_SHRINKS = shrinks
            gathered_lora.ONE_TOKEN_LONG = saved[1]._replace(block_n=columns)
            gathered_lora._plan.cache_clear()
            routed.stack.memo.clear()  # the groups' plans made afresh, with these sizes
            with nullcontext() if dependent else gathered_lora.independent_launches():
                steps[name] = graphed_decode(routed.model, ids)
            print("captured", name, flush=True)
        gathered_lora.PARTIAL_SHRINKS, gathered_lora.ONE_TOKEN_LONG = saved
        for _ in range(ROUNDS + 1):
            for name, step in steps.items():
                times[name].append(_timed(step))
    times = {name: t[1:] for name, t in times.items()}  # the first round warms up
    result = {
        "device": torch.cuda.get_device_name(0),
        "base_step_s": statistics.median(times["base"]),
        "variants": {
            name: {
                "sizes": VARIANTS[name],
                "step_s": statistics.median(times[name]),
                "x_base": statistics.median(a / b for a, b in zip(times[name], times["base"], strict=True)),
            }
            for name in VARIANTS
        },  # fmt: skip
    }
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
