"""Sizes of the one-token forms swept with dependent launches, on a decode step as a CUDA graph (batch 64,
64 distinct rank-16 experts on all seven linears, bfloat16), on the SmolLM2-135M shape and a 2-layer
Llama-3-8B shape. Sweeps: llama-3-8b and smollm2-135m, the two-launch form's sizes (and, at 135M, the tile
kernel) with cuBLAS's base linears; linears-135m and linears-8b, the linears-and-shrinks launch's tile
(``GRAPH_LINEAR_SHORT`` on inputs under 2,048, ``GRAPH_LINEAR_LONG`` from it) beside cuBLAS's linears then
the two-launch form. Each variant's graph and the base's are replayed in turn, ``REPLAYS`` a timing, and
the medians over rounds of routed/base are reported. Writes JSON.

    python benchmarks/dependent_sweep.py llama-3-8b|smollm2-135m|linears-135m|linears-8b OUT.json

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


def _cublas_linears(x: torch.Tensor, parts: int) -> None:
    """No sizes for the base linears: they stay cuBLAS's launches, the updates the two-launch form's."""
    return None


CUBLAS = {"linear_sizes": _cublas_linears}


def _linears(**sizes) -> dict:
    """The linears-and-shrinks launch with its tile's ``sizes`` replaced, on short and long inputs."""
    return {
        name: getattr(gathered_lora, name)._replace(**sizes) for name in ("GRAPH_LINEAR_SHORT", "GRAPH_LINEAR_LONG")
    }


# sweep -> (shape, layers (None: all), variants: name -> (gathered_lora's settings replaced, dependent launches))
SWEEPS = {
    "llama-3-8b": ("llama-3-8b", 2, {
        "built-in": (CUBLAS, True),
        "independent": (CUBLAS, False),
        "shrinks-2048": ({**CUBLAS, "PARTIAL_SHRINKS": 2048}, True),
        "shrinks-512": ({**CUBLAS, "PARTIAL_SHRINKS": 512}, True),
        "columns-512": ({**CUBLAS, "ONE_TOKEN": ONE_TOKEN._replace(block_n=512)}, True),
        "columns-2048": ({**CUBLAS, "ONE_TOKEN": ONE_TOKEN._replace(block_n=2048)}, True),
        "warps-2": ({**CUBLAS, "ONE_TOKEN": ONE_TOKEN._replace(warps=2)}, True),
        "warps-8": ({**CUBLAS, "ONE_TOKEN": ONE_TOKEN._replace(warps=8)}, True),
    }),
    "smollm2-135m": ("smollm2-135m", None, {
        "tile kernel": ({**CUBLAS, "built_in_sizes": _tile_kernel}, False),
        "two launches": (CUBLAS, True),
        "two launches, independent": (CUBLAS, False),
        "two launches, columns 256": ({**CUBLAS, "ONE_TOKEN": ONE_TOKEN._replace(block_n=256)}, True),
        "two launches, inputs 256": ({**CUBLAS, "ONE_TOKEN": ONE_TOKEN._replace(block_k=256, block_n=256)}, True),
    }),
    "linears-135m": ("smollm2-135m", None, {  # the linears-and-shrinks launch, then the expand
        "cuBLAS, then two launches": (CUBLAS, True),
        "built-in": (_linears(), True),
        "built-in, independent": (_linears(), False),
        "inputs 32": (_linears(block_k=32), True),
        "inputs 128": (_linears(block_k=128), True),
        "columns 32": (_linears(block_n=32), True),
        "stages 3": (_linears(stages=3), True),
    }),
    "linears-8b": ("llama-3-8b", 2, {
        "cuBLAS, then two launches": (CUBLAS, True),
        "built-in": (_linears(), True),
        "built-in, independent": (_linears(), False),
        "columns 16": (_linears(block_n=16), True),
        "columns 64": (_linears(block_n=64), True),
        "inputs 64": (_linears(block_k=64), True),
        "inputs 256": (_linears(block_k=256), True),
        "samples 32": (_linears(block_m=32), True),
        "warps 8": (_linears(warps=8), True),
        "stages 5": (_linears(stages=5), True),
        "columns 64, warps 8": (_linears(block_n=64, warps=8), True),
        "columns 128, inputs 64": (_linears(block_n=128, block_k=64), True),
        "stages 3": (_linears(stages=3), True),
        "shrinks 2048": ({"PARTIAL_SHRINKS": 2048}, True),
        "shrinks 512": ({"PARTIAL_SHRINKS": 512}, True),
        "expand columns 512": ({"ONE_TOKEN": ONE_TOKEN._replace(block_n=512)}, True),
        "expand columns 2048": ({"ONE_TOKEN": ONE_TOKEN._replace(block_n=2048)}, True),
        "warps 2": (_linears(warps=2), True),
        "inputs 256, stages 2": (_linears(block_k=256, stages=2), True),
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


def main(sweep: str, out: str) -> None:
    name, layers, variants = SWEEPS[sweep]
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
        "sweep": sweep,
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
