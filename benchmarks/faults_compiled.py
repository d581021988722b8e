"""Experiment: the fused fault checks with their tensor math compiled by torch.compile (Inductor fuses each
check into a few kernels), against the eager checks, side by side. Writes JSON.

    python benchmarks/faults_compiled.py BASE_DIR OUT.json [--bf16] [BATCH SEQ]
"""

from __future__ import annotations

import json
import sys

import torch

from adaplex.adapted import Adapted
from adaplex.bench.measure import interleaved_times, median_ratio
from adaplex.faults import fused, qkv
from adaplex.faults.experiment import armed_logits, logits_of
from adaplex.faults.hook import DetectorConfig
from adaplex.models import load_base


def main() -> None:
    base_dir, out = sys.argv[1], sys.argv[2]
    bf16 = "--bf16" in sys.argv
    sizes = [int(a) for a in sys.argv[3:] if a.isdigit()] or [8, 512]
    model, _ = load_base(base_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.cuda()
    Adapted.of(model)
    inputs = {"input_ids": torch.randint(0, model.config.vocab_size, tuple(sizes), device="cuda")}
    places = [(qkv, "stats"), (qkv, "excess_over"), (fused, "column_excess"), (fused, "padded_inputs")]
    eager = {place: getattr(*place) for place in places}
    compiled = {place: torch.compile(fn, dynamic=False) for place, fn in eager.items()}

    def checked(functions: dict, detectors: DetectorConfig):
        def call():
            for (module, name), fn in functions.items():
                setattr(module, name, fn)
            return armed_logits(model, inputs, None, detectors)

        return call

    full, no_qkv = DetectorConfig(fused=True), DetectorConfig(fused=True, qkv=False)
    phases = {
        "baseline": lambda: logits_of(model, inputs),
        "eager_checks": checked(eager, full),
        "compiled_checks": checked(compiled, full),
        "compiled_without_qkv": checked(compiled, no_qkv),
    }
    times = interleaved_times(phases, 9, torch.device("cuda"), warmup=2)
    result = {
        "batch": sizes,
        "dtype": "bfloat16" if bf16 else "float32",
        "overhead_percent": {p: 100 * (median_ratio(times, p, "baseline") - 1) for p in phases if p != "baseline"},
        "baseline_s": sorted(times["baseline"])[len(times["baseline"]) // 2],
    }
    print(json.dumps(result, indent=1))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
