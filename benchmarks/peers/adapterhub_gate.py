"""AdapterHub's ``adapters`` (1.3.0) on the same encoder, batch and rounds as `adaplex bench gate`: the
inference latency of its LoRA, prefix tuning, sequential bottleneck and UniPELT relative to its base,
timed in interleaved rounds (A B C ... per round, median of per-round ratios). Runs in its own virtual
environment (`make peers`: adapters pins transformers 4.57); prints one JSON object.

    python adapterhub_gate.py MODEL_DIR BATCH SEQ ROUNDS DEVICE DTYPE
"""

import copy
import json
import statistics
import sys
import time

import adapters
import torch
from adapters import LoRAConfig, PrefixTuningConfig, SeqBnConfig, UniPELTConfig
from transformers import AutoModel

model_dir, batch, seq, rounds, device, dtype = sys.argv[1:7]
batch, seq, rounds = int(batch), int(seq), int(rounds)
dev = torch.device(device)
torch.manual_seed(0)
base = AutoModel.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(dev).eval()
configs = {
    "lora": LoRAConfig(r=8, alpha=16),
    "prefix": PrefixTuningConfig(prefix_length=10),
    "bottleneck": SeqBnConfig(reduction_factor=16),
    "unipelt": UniPELTConfig(),
}
variants = {"base": base}
for name, config in configs.items():
    model = copy.deepcopy(base)
    adapters.init(model)
    model.add_adapter(name, config=config)
    model.set_active_adapters(name)
    variants[name] = model.to(dev, getattr(torch, dtype)).eval()  # adapters are added in float32
ids = torch.randint(1000, base.config.vocab_size, (batch, seq), device=dev)
mask = torch.ones_like(ids)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


times = {n: [] for n in variants}
with torch.no_grad():
    for round_index in range(rounds + 1):
        for name, model in variants.items():
            sync()
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            sync()
            if round_index:
                times[name].append(time.perf_counter() - start)
ratios = {
    n: statistics.median(a / b for a, b in zip(times[n], times["base"], strict=True)) for n in variants if n != "base"
}
print(json.dumps({"library": f"adapters {adapters.__version__}", "ratio_to_base": ratios}))
