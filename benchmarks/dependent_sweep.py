"""The two-launch form's sizes swept again with dependent launches, on a decode step as a CUDA graph
(batch 64, 64 distinct rank-16 experts on all seven linears, bfloat16): on a 2-layer Llama-3-8B shape,
and on the SmolLM2-135M shape the two-launch form against the tile kernel. Each variant's graph and the
base's are replayed in turn, ``REPLAYS`` a timing, and the medians over rounds of routed/base are
reported. Writes JSON.

    python benchmarks/dependent_sweep.py llama-3-8b|smollm2-135m OUT.json

results/dependent-sweep-cuda-smollm2-135m.json was measured while one-token steps on inputs under
2,048 took the tile kernel: its "built-in (tile kernel)" is the "tile kernel" variant here, and its
"two launches" variants set that threshold (``LONG_INPUT``) to 0, as the built-in rule now does.
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
ONE_TOKEN = gathered_lora.ONE_TOKEN


def _tile_kernel(batch: int, tokens: int, n_in: int, parts: int) -> gathered_lora.Sizes:
    """The tile kernel for every step (the built-in rule's form for one-token steps on short inputs until
    the two-launch form beat it there)."""
    return gathered_lora.DECODE if tokens <= 16 else gathered_lora.PREFILL


# shape -> layers (None: all), and its variants: name -> (gathered_lora's settings replaced, dependent launches)
SHAPES = {
    "llama-3-8b": (2, {
        "built-in": ({}, True),
        "independent": ({}, False),
        "shrinks-2048": ({"PARTIAL_SHRINKS": 2048}, True),
        "shrinks-512": ({"PARTIAL_SHRINKS": 512}, True),
        "columns-512": ({"ONE_TOKEN": ONE_TOKEN._replace(block_n=512)}, True),
        "columns-2048": ({"ONE_TOKEN": ONE_TOKEN._replace(block_n=2048)}, True),
        "warps-2": ({"ONE_TOKEN": ONE_TOKEN._replace(warps=2)}, True),
        "warps-8": ({"ONE_TOKEN": ONE_TOKEN._replace(warps=8)}, True),
    }),
    "smollm2-135m": (None, {
        "tile kernel": ({"built_in_sizes": _tile_kernel}, False),
        "two launches": ({}, True),
        "two launches, independent": ({}, False),
        "two launches, columns 256": ({"ONE_TOKEN": ONE_TOKEN._replace(block_n=256)}, True),
        "two launches, inputs 256": ({"ONE_TOKEN": ONE_TOKEN._replace(block_k=256, block_n=256)}, True),
    }),
}  # fmt: skip


def _timed(step) -> float:
    """Seconds per replay of ``step``, over ``REPLAYS`` replays timed by CUDA events."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPLAYS * 1e-3


def main(name: str, out: str) -> None:
    layers, variants = SHAPES[name]
    base = shaped_model(Path(__file__).parent / "shapes" / f"{name}.json", layers, torch.bfloat16)
    base = base.cuda().requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ), device="cuda")
    keys = [f"k{i}" for i in range(ADAPTERS)]
    routed, _ = build_routed(base, keys, (16,))
    steps = {"base": graphed_decode(base, ids)}
    with route(routed, [keys[b % ADAPTERS] for b in range(BATCH)]):  # held while the graphs replay
        for variant, (settings, dependent) in variants.items():
            saved = {setting: getattr(gathered_lora, setting) for setting in settings}
            vars(gathered_lora).update(settings)
            gathered_lora._plan.cache_clear()
            routed.stack.memo.clear()  # the groups' plans made afresh, with these settings
            with nullcontext() if dependent else gathered_lora.independent_launches():
                steps[variant] = graphed_decode(routed.model, ids)
            vars(gathered_lora).update(saved)
            print("captured", variant, flush=True)
        times = {variant: [] for variant in steps}
        for _ in range(ROUNDS + 1):
            for variant, step in steps.items():
                times[variant].append(_timed(step))
    times = {variant: t[1:] for variant, t in times.items()}  # the first round warms up
    result = {
        "device": torch.cuda.get_device_name(0),
        "shape": name,
        "layers": base.config.num_hidden_layers,
        "base_step_s": statistics.median(times["base"]),
        "variants": {
            variant: {
                "settings": {setting: str(value) for setting, value in settings.items()},
                "dependent": dependent,
                "step_s": statistics.median(times[variant]),
                "x_base": statistics.median(a / b for a, b in zip(times[variant], times["base"], strict=True)),
            }
            for variant, (settings, dependent) in variants.items()
        },
    }
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps({v: round(r["x_base"], 4) for v, r in result["variants"].items()}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
