"""`adaplex bench gate`: inference latency of LoRA, prefix, bottleneck and UniPELT relative to the base,
their trainable parameters and peak memory, measured side by side in interleaved rounds on one batch;
and AdapterHub's ``adapters`` UniPELT measured the same way in its own environment, where it is installed.

Defaults follow the UniPELT paper and AdapterHub's configs: LoRA r = 8 on q and v, prefix length 10,
bottleneck reduction factor 16, sigmoid gates.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from adaplex.compose.gate import UniPELTConfig, add_unipelt
from adaplex.core.adapted import Adapted
from adaplex.core.models import find_base, load_base
from adaplex.util.measure import device_name, interleaved_times, median_ratio, peak_memory_mib

PEER_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "peers" / "adapterhub_gate.py"
PEER_PYTHON = Path(__file__).resolve().parents[3] / ".venv-adapterhub" / "bin" / "python"
UNIPELT = UniPELTConfig()
SINGLE = {"lora": UNIPELT.lora, "prefix": UNIPELT.prefix, "bottleneck": UNIPELT.bottleneck}


def build_variants(base: nn.Module) -> dict[str, nn.Module]:
    variants: dict[str, nn.Module] = {"base": base}
    for name, config in SINGLE.items():
        model = copy.deepcopy(base)
        Adapted.of(model).add(name, config)
        variants[name] = model
    model = copy.deepcopy(base)
    add_unipelt(Adapted.of(model), "unipelt", UNIPELT)
    variants["unipelt"] = model
    return variants


def run_peer(python: Path, model_dir: Path, batch: int, seq: int, rounds: int, device: str, dtype: str) -> dict:
    """The peer script's JSON, or {"absent": why}."""
    if not python.is_file():
        return {"absent": f"no {python}: run `make peers` to install AdapterHub's adapters in its own environment"}
    command = [str(python), str(PEER_SCRIPT), str(model_dir), str(batch), str(seq), str(rounds), device, dtype]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        return {"absent": f"the AdapterHub run failed: {result.stderr.strip().splitlines()[-1:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(
    base_spec: str = "minilm-l6",
    batch: int = 16,
    seq: int = 128,
    rounds: int = 20,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    peer_python: Path | None = PEER_PYTHON,
) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    base, _ = load_base(base_spec, dtype=dtype)
    base.to(dev)
    variants = build_variants(base)
    ids = torch.randint(1000, base.config.vocab_size, (batch, seq), device=dev)
    mask = torch.ones_like(ids)

    def forward(model: nn.Module):
        def step() -> None:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)

        return step

    trainable = {
        n: sum(p.numel() for p in Adapted.find(m).trainable_parameters()) if n != "base" else 0
        for n, m in variants.items()
    }
    times = interleaved_times({n: forward(m) for n, m in variants.items()}, rounds, dev)
    peaks = {n: peak_memory_mib(forward(m), dev)[0] for n, m in variants.items()}
    name = str(dtype).removeprefix("torch.")
    peer = (
        run_peer(peer_python, find_base(base_spec), batch, seq, rounds, device, name)
        if peer_python is not None
        else {"absent": "not run (--no-peers)"}
    )
    return {
        "benchmark": "gate",
        "base": base_spec,
        "device": device_name(dev),
        "dtype": name,
        "batch": batch,
        "seq": seq,
        "rounds": rounds,
        "ratio_to_base": {n: median_ratio(times, n, "base") for n in variants if n != "base"},
        "base_forward_ms": 1e3 * sorted(times["base"])[len(times["base"]) // 2],
        "trainable_params": trainable,
        "peak_inference_mib": peaks,
        "peers": {f"adapterhub_{k}": v for k, v in peer.get("ratio_to_base", {}).items()},
        "peer_run": peer,
    }


if __name__ == "__main__":  # pragma: no cover - python -m adaplex.bench.gate for a quick look
    print(json.dumps(run(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 5)))
