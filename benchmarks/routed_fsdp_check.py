"""A routed bundle (a shared LoRA and two experts) trained by `adaplex train` on one GPU with strategy auto,
then fsdp: the bundles' files, and the largest difference of their tensors, which must carry the same
names (writes JSON). Run from the repository root on the device (Carried: .whl and .devcarry/smollm2):

    python benchmarks/routed_fsdp_check.py OUT.json
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from adaplex.bench.shapes import shaped_model

ROOT = Path("/tmp/routed-fsdp")
SHAPE = Path(".devcarry/smollm2")
PHRASES = ["the quick brown fox jumps", "over the lazy dog again", "pack my box with five dozen", "liquor jugs now"]


def prepare() -> None:
    """A SmolLM2-shaped base of random weights, a registry of two keys and 200 records for each."""
    ROOT.mkdir(exist_ok=True)
    shaped_model(SHAPE / "config.json", None, torch.float32).save_pretrained(ROOT / "base")
    for f in SHAPE.iterdir():
        if f.name != "config.json":
            shutil.copy(f, ROOT / "base")
    (ROOT / "registry.yaml").write_text("keys:\n  alpha: {keywords: ['alpha']}\n  beta: {keywords: ['beta']}\n")
    records = [
        json.dumps({"text": " ".join(PHRASES[(i + k) % 4] for i in range(40)), "target": key})
        for k, key in enumerate(["alpha", "beta"])
        for _ in range(200)
    ]
    (ROOT / "data.jsonl").write_text("\n".join(records))


def train(strategy: str) -> dict:
    experts = {"method": "experts", "keys": ["alpha", "beta"], "r": 8, "alpha": 16}
    config = {
        "base": str(ROOT / "base"),
        "output": str(ROOT / strategy),
        "adapters": [{"name": "shared", "config": {"method": "lora", "r": 8, "alpha": 16}},
                     {"name": "experts", "config": experts}],
        "data": {"format": "jsonl", "train": [str(ROOT / "data.jsonl")], "eval": [], "key_field": "target",
                 "registry": str(ROOT / "registry.yaml"), "block_size": 128, "batch_size": 16},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "max_steps": 30},
        "trainer": {"accelerator": "gpu", "devices": 1, "strategy": strategy, "checkpoint_every_n_steps": 30},
    }  # fmt: skip
    path = ROOT / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "adaplex", "train", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    bundle = ROOT / strategy / "adapter"
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    return {"files": files, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    prepare()
    result = {strategy: train(strategy) for strategy in ("auto", "fsdp")}
    differences = {}
    for name in result["auto"]["files"]:
        if name.endswith(".safetensors"):
            a, b = (load_file(ROOT / s / "adapter" / name) for s in ("auto", "fsdp"))
            if a.keys() != b.keys():
                raise SystemExit(f"{name}: the tensors' names differ between the strategies")
            differences[name] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    result["same_files"] = result["auto"]["files"] == result["fsdp"]["files"]
    result["tensor_max_abs_diff"] = differences
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
