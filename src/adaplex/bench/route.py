"""`adaplex bench route`: mixed-key batches, adaplex routed experts against PEFT's mixed-adapter batches.

Every sample of the batch uses its own rank-r LoRA adapter (keys cycle through K adapters). adaplex
routes through one ExpertBank per site (gathered batched matmuls); PEFT runs the same adapters
with ``adapter_names``. Where the fused routing kernel runs (CUDA), the routed model is also timed
without it ("adaplex-routed-bmm": batched matmuls). Modes: "prefill" times a full forward of (B, T)
tokens; "decode" times one next-token step of a batch with a KV cache of T tokens (the cache is
cropped back after each step), and on CUDA also that step captured as a CUDA graph over a static
cache, as serving engines run decode (base and routed; PEFT's mixed batches cannot be captured).
"""

from __future__ import annotations

import copy
import statistics
from contextlib import nullcontext

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import DynamicCache

from adaplex.bench.overhead import peft_targets
from adaplex.compose.route import route
from adaplex.core.adapted import Adapted
from adaplex.core.graphs import graphed_decode
from adaplex.core.models import load_base
from adaplex.kernels import gathered_lora
from adaplex.methods import ExpertsConfig
from adaplex.util.measure import device_name, interleaved_times, median_ratio
from adaplex.util.progress import report


def _randomize(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))


def build(base: nn.Module, keys: list[str], rank: int) -> tuple[Adapted, nn.Module]:
    routed = Adapted.of(copy.deepcopy(base))
    routed.add("experts", ExpertsConfig(keys=tuple(keys), r=rank, alpha=2 * rank), trainable=False)
    _randomize(routed.parameters("experts"), 0)
    config = PeftLoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=peft_targets(base, ("all-linear",))
    )
    peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=keys[0])
    for key in keys[1:]:
        peft_model.add_adapter(key, config)
    _randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], 0)
    return routed, peft_model.eval()


def measure(base: nn.Module, ids: torch.Tensor, count: int, rank: int, rounds: int, mode: str) -> dict:
    """Times of base, adaplex routed and PEFT mixed for one number of distinct adapters."""
    batch, seq = ids.shape
    keys = [f"k{i}" for i in range(count)]
    per_sample = [keys[b % count] for b in range(batch)]
    report(f"{count} distinct adapters: building adaplex's bank and PEFT's {count} adapters")
    routed, peft_model = build(base, keys, rank)
    models = {"base": base, "adaplex-routed": routed.model, "peft-mixed": peft_model}
    kwargs = {"base": {}, "adaplex-routed": {}, "peft-mixed": {"adapter_names": per_sample}}
    if gathered_lora.available(ids):  # the same routed model without its fused kernel, side by side
        models["adaplex-routed-bmm"] = routed.model
        kwargs["adaplex-routed-bmm"] = {}
    caches: dict[str, DynamicCache] = {}

    def forward(name: str, **inputs) -> None:
        with torch.no_grad(), gathered_lora.disabled() if name == "adaplex-routed-bmm" else nullcontext():
            models[name](**inputs, **kwargs[name])

    if mode == "decode":
        for name in models:
            caches[name] = DynamicCache(config=base.config)
            with route(routed, per_sample):
                forward(name, input_ids=ids, past_key_values=caches[name])

    def step(name: str):
        def call() -> None:
            if mode == "decode":
                forward(name, input_ids=ids[:, -1:], past_key_values=caches[name])
                caches[name].crop(-1)  # drop the new token: every step sees seq cached tokens
            else:
                forward(name, input_ids=ids)

        return call

    # As in generate(): the batch's routing is set once and holds for every step.
    with route(routed, per_sample):
        steps = {n: step(n) for n in models}
        if mode == "decode" and ids.is_cuda:  # as serving engines run decode: one CUDA graph per step
            steps |= {f"{n}-graph": graphed_decode(models[n], ids) for n in ("base", "adaplex-routed")}
        times = interleaved_times(steps, rounds, ids.device, warmup=2)
    ratios = {
        "routed_bmm_x_base": ("adaplex-routed-bmm", "base"),
        "graph_routed_x_base": ("adaplex-routed-graph", "base-graph"),
        "graph_base_x_base": ("base-graph", "base"),
    }
    ratios = {name: pair for name, pair in ratios.items() if pair[0] in times}
    return {
        "adapters": count,
        "step_s": {n: statistics.median(t) for n, t in times.items()},
        "routed_x_base": median_ratio(times, "adaplex-routed", "base"),
        "peft_x_base": median_ratio(times, "peft-mixed", "base"),
        "peft_x_routed": median_ratio(times, "peft-mixed", "adaplex-routed"),
    } | {name: median_ratio(times, *pair) for name, pair in ratios.items()}


def run(
    base_spec: str = "smollm2-135m",
    adapters: tuple[int, ...] = (8,),
    batch: int = 8,
    seq: int = 128,
    rank: int = 16,
    rounds: int = 3,
    device: str = "cpu",
    mode: str = "prefill",
    bf16: bool = False,
) -> dict:
    dev = torch.device(device)
    base, _ = load_base(base_spec, dtype=torch.bfloat16 if bf16 else torch.float32)
    base.to(dev).requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=dev)
    return {
        "benchmark": "route",
        "base": base_spec,
        "mode": mode,
        "device": device_name(dev),
        "dtype": "bfloat16" if bf16 else "float32",
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "rounds": rounds,
        "results": [measure(base, ids, count, rank, rounds, mode) for count in adapters],
    }
