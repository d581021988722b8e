"""Where the host's time goes in an eager routed decode step: Python's profiler (cProfile) over steps
of the base and of the routed model (one expert per sample), side by side, at a random model of a
config's shape. The functions with the most time of their own, and the per-step wall times, go to
JSON. A CUDA decode step of a small model is bound by the host launching kernels (bench route
--profile shows it), so this is where its eager overhead is.

    python benchmarks/route_host.py SHAPE_CONFIG OUT.json [DEVICE]
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

from adaplex.bench.route import build_routed
from adaplex.bench.shapes import shaped_model
from adaplex.compose.route import route
from adaplex.util.measure import mean_seconds

BATCH, SEQ, KEYS, STEPS, TOP = 64, 128, 64, 50, 25


def decode_step(model, ids: torch.Tensor):
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache)

    def step() -> None:
        model(input_ids=ids[:, -1:], past_key_values=cache)
        cache.crop(-1)

    return step


def profiled(step, device: torch.device) -> dict:
    mean_seconds(step, 5, device)  # warm-up
    wall = mean_seconds(step, STEPS, device)
    profiler = cProfile.Profile()
    profiler.enable()
    mean_seconds(step, STEPS, device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own s, total s, callers)
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:TOP]
    return {
        "step_ms": wall * 1e3,
        "top_own_us_per_step": [
            {"function": f"{Path(f).name}:{line}({name})", "calls": calls // STEPS, "own_us": own / STEPS * 1e6}
            for (f, line, name), (_, calls, own, _, _) in rows
        ],
    }


def main() -> None:
    shape, out = Path(sys.argv[1]), Path(sys.argv[2])
    device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = shaped_model(shape, None, dtype).to(device).requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ), device=device)
    keys = [f"k{i}" for i in range(KEYS)]
    results = {}
    with torch.no_grad():
        results["base"] = profiled(decode_step(base, ids), device)
        routed, _ = build_routed(base, keys, (16,))
        with route(routed, [keys[b % KEYS] for b in range(BATCH)]):
            results["routed"] = profiled(decode_step(routed.model, ids), device)
    results["routed_x_base"] = results["routed"]["step_ms"] / results["base"]["step_ms"]
    out.write_text(json.dumps({"shape": str(shape), "device": str(device), "batch": BATCH} | results, indent=1))
    for name in ("base", "routed"):
        print(f"{name}: {results[name]['step_ms']:.2f} ms/step")
        for row in results[name]["top_own_us_per_step"][:15]:
            print(f"  {row['own_us']:8.0f} us  {row['calls']:5d}  {row['function']}")
    print(f"routed/base {results['routed_x_base']:.3f}")


if __name__ == "__main__":
    main()
