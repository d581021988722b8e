"""One process against N under DDP (or FSDP), same global batch: both loss curves, the largest difference
of the trained adapters, tokens/s of each and, on GPUs, each run's peak memory per process (writes JSON).

    python benchmarks/ddp_check.py BASE_DIR TEXT_FILE OUT.json [cpu|gpu] [N] [BATCH] [BLOCK] [STEPS] [ddp|fsdp]

Runs `adaplex train` twice: one process with batch N·BATCH, then N processes (strategy ddp, or fsdp:
on GPUs only, N may be 1) with BATCH each; on cpu the processes talk over gloo.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

base, text, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
accelerator = sys.argv[4] if len(sys.argv) > 4 else "cpu"
world, batch, block, steps = (int(a) for a in sys.argv[5:9]) if len(sys.argv) > 8 else (2, 4, 32, 12)
strategy = sys.argv[9] if len(sys.argv) > 9 else "ddp"


def run(root: Path, name: str, devices: int, per_process: int, strategy: str) -> dict:
    config = {
        "base": base,
        "output": str(root / name),
        "adapters": [{"name": "style", "config": {"method": "lora", "r": 8, "alpha": 16}}],
        "data": {"format": "text", "train": [text], "block_size": block, "batch_size": per_process},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "max_steps": steps},
        "trainer": {"accelerator": accelerator, "devices": devices, "strategy": strategy,
                    "checkpoint_every_n_steps": steps},
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "adaplex", "train", str(path)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    with open(root / name / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    curve = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    peaks = [float(r["peak_mib"]) for r in rows if r.get("peak_mib")]  # logged on GPUs
    return {"processes": devices, "strategy": strategy, "batch_per_process": per_process, "seconds": round(seconds, 2),
            "tokens_per_s": round(steps * devices * per_process * block / seconds, 1), "train_loss": curve,
            "peak_mib_per_process": max(peaks, default=None)}  # fmt: skip


with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    one, many = run(root, "one", 1, world * batch, "auto"), run(root, strategy, world, batch, strategy)
    a, b = (load_file(root / n / "adapter" / "adapter.safetensors") for n in ("one", strategy))
result = {
    "accelerator": accelerator,
    "one_process": one,
    strategy: many,
    "adapter_max_abs_diff": max((a[k] - b[k]).abs().max().item() for k in a),
    "loss_max_abs_diff": max(abs(x - y) for x, y in zip(one["train_loss"], many["train_loss"], strict=True)),
    "note": "seconds include each command's start (imports, model load); on a 2-core CPU they say little",
}
out.write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
