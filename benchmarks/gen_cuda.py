"""Generation on CUDA: seconds per adapter (one prompt, and 32 in one batch), and the per-sample path in
bfloat16 (the fused kernel, no autograd) against each generated adapter loaded alone.

    python benchmarks/gen_cuda.py GENERATOR BASE OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.generator.generate import PromptToLoRA
from adaplex.io.storage import load
from adaplex.util.measure import device_name

generator_dir, base, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
device = torch.device("cuda")
generator = PromptToLoRA(generator_dir, device)
prompts = [f"Python reference documentation on topic {i}.\nA sample input {i}.\nAnother one." for i in range(32)]


def timed(batch: list[str], repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        generator.tensors(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times) / len(batch)


timed(prompts[:1], 3)  # warm-up
single, batched = timed(prompts[:1]), timed(prompts)
model, tokenizer = load_base(base, dtype=torch.bfloat16)
model.to(device)
ids = torch.randint(0, model.config.vocab_size, (4, 64), device=device)
with torch.no_grad(), generator.applying(Adapted.of(model), prompts[:4]):
    together = model(input_ids=ids).logits.float()
worst = 0.0
with tempfile.TemporaryDirectory() as tmp:
    paths = generator.save(prompts[:4], Path(tmp) / "adapters")
    for b, path in enumerate(paths):
        alone, _ = load_base(base, dtype=torch.bfloat16)
        load(alone.to(device), path)
        with torch.no_grad():
            worst = max(
                worst, float((alone(input_ids=ids[b : b + 1]).logits.float() - together[b : b + 1]).abs().max())
            )
result = {
    "device": device_name(device),
    "seconds_per_adapter": round(single, 5),
    "seconds_per_adapter_batched_32": round(batched, 5),
    "per_sample_bf16_max_abs_diff": round(worst, 5),
    "logit_scale": round(float(together.abs().max()), 3),
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result))
