"""Forward time of the embedded model with a rank-16 LoRA merged into it (the wrappers left in place)
against the plain model, interleaved over 9 rounds on the CPU: what merging costs at inference.

    python benchmarks/merged_vs_base.py
"""

from __future__ import annotations

import copy
import statistics

import torch

from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.methods import LoRAConfig
from adaplex.util.measure import interleaved_times, median_ratio


def main() -> None:
    torch.manual_seed(0)
    base, _ = load_base("smollm2-135m")
    merged = copy.deepcopy(base)
    handle = Adapted.of(merged)
    handle.add("lora", LoRAConfig(r=16, alpha=32))
    handle.merge()
    ids = torch.randint(0, base.config.vocab_size, (4, 128))

    def forward(model: torch.nn.Module):
        def step() -> None:
            with torch.no_grad():
                model(input_ids=ids)

        return step

    times = interleaved_times({"base": forward(base), "merged": forward(merged)}, 9, torch.device("cpu"))
    print(f"merged / base: {median_ratio(times, 'merged', 'base'):.3f} (base {statistics.median(times['base']):.3f} s)")


if __name__ == "__main__":
    main()
