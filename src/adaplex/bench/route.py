"""`adaplex bench route`: mixed-key batches, adaplex routed experts against PEFT's mixed-adapter batches.

Every sample of the batch uses its own rank-r LoRA adapter (keys cycle through K adapters). adaplex
routes through one ExpertBank per site (gathered batched matmuls); PEFT runs the same adapters
with ``adapter_names``. Where the fused routing kernel runs (CUDA), the routed model is also timed
without it ("adaplex-routed-bmm": batched matmuls) and, from compute capability 9.0, with update launches
that wait for the base linear's to end before they start ("adaplex-routed-independent"). Modes:
"prefill" times a full forward of (B, T) tokens; "decode" times one next-token step of a batch with a
KV cache of T tokens (the cache is cropped back after each step), and on CUDA also that step captured
as a CUDA graph over a static cache, as serving engines run decode (base and the routed variants; PEFT's
mixed batches cannot be captured).
With ``profile``, a few steps of base and routed are also profiled (``adaplex.bench.profile``): where
the routed step's time goes.
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import DynamicCache

from adaplex.bench.overhead import peft_targets
from adaplex.bench.profile import profile_steps
from adaplex.bench.shapes import bench_model
from adaplex.compose.route import route
from adaplex.core.adapted import Adapted
from adaplex.core.graphs import graphed_decode
from adaplex.errors import ConfigError
from adaplex.kernels import gathered_lora
from adaplex.methods import ExpertsConfig
from adaplex.util.measure import device_name, interleaved_times, median_ratio, sync
from adaplex.util.progress import report

PROFILED = ("base", "adaplex-routed", "base-graph", "adaplex-routed-graph")  # the steps --profile profiles
GRAPHED = ("base", "adaplex-routed", "adaplex-routed-independent")  # the steps also timed as CUDA graphs
# the routed model's variants, by the kernels they run: batched matmuls, and update launches that are not dependent
VARIANTS = {
    "adaplex-routed-bmm": gathered_lora.disabled,
    "adaplex-routed-independent": gathered_lora.independent_launches,
}


def _randomize(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))


def key_ranks(keys: list[str], ranks: tuple[int, ...]) -> dict[str, int]:
    """Key i gets rank ranks[i % len(ranks)]: mixed ranks across the bank."""
    return {k: ranks[i % len(ranks)] for i, k in enumerate(keys)}


def build_routed(base: nn.Module, keys: list[str], ranks: tuple[int, ...]) -> tuple[Adapted, float]:
    """A copy of ``base`` with one bank of random experts of the given ranks; and the seconds it took."""
    started = time.perf_counter()
    routed = Adapted.of(copy.deepcopy(base))
    by_key = key_ranks(keys, ranks)
    alphas = {k: 2.0 * r for k, r in by_key.items()}  # alpha = 2r for every expert, as for PEFT's adapters
    config = ExpertsConfig(keys=tuple(keys), r=ranks[0], key_ranks=by_key, key_alphas=alphas)
    routed.add("experts", config, trainable=False)
    _randomize(routed.parameters("experts"), 0)
    sync(next(base.parameters()).device)
    return routed, time.perf_counter() - started


def build_peft(base: nn.Module, keys: list[str], ranks: tuple[int, ...]) -> nn.Module:
    """PEFT's model of the same adapters (random too), one named adapter per key."""
    targets = peft_targets(base, ("all-linear",))
    configs = {
        k: PeftLoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
        for k, r in key_ranks(keys, ranks).items()
    }
    peft_model = get_peft_model(copy.deepcopy(base), configs[keys[0]], adapter_name=keys[0])
    for key in keys[1:]:
        peft_model.add_adapter(key, configs[key])
    _randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], 0)
    return peft_model.eval()


def first_use(routed: Adapted, keys: list[str], slots: int) -> dict:
    """Page the bank into ``slots`` device slots, then time the route that brings a batch's experts there
    (none resident yet): the cost of a key's first use."""
    pager = routed.page("experts", slots)
    device = next(routed.model.parameters()).device
    sync(device)
    started = time.perf_counter()
    with route(routed, keys):
        sync(device)
    seconds = time.perf_counter() - started
    host = sum(t.numel() * t.element_size() for b in pager.banks for t in b.host.values())
    return {"slots": slots, "first_use_s": seconds, "first_use_per_key_ms": seconds / pager.loads * 1e3,
            "bank_host_bytes": host}  # fmt: skip


def measure(
    base: nn.Module,
    ids: torch.Tensor,
    count: int,
    ranks: tuple[int, ...],
    rounds: int,
    mode: str,
    peers: str,
    slots: int | None = None,
    profile: bool = False,
) -> dict:
    """Times of base, adaplex routed and (``peers="peft"``) PEFT mixed for one number of distinct adapters;
    the bank's size (on the device) and the time to build it; with ``slots``, the bank paged and the cost
    of its batch's first use; with ``profile``, the profiles of base and routed steps."""
    batch, seq = ids.shape
    keys = [f"k{i}" for i in range(count)]
    per_sample = [keys[b % count] for b in range(batch)]
    report(
        f"{count} distinct adapters: building adaplex's bank"
        + (f" and PEFT's {count} adapters" if peers == "peft" else "")
    )
    routed, build_s = build_routed(base, keys, ranks)
    paged = first_use(routed, per_sample, min(slots, count)) if slots is not None else {}
    bank_bytes = sum(p.numel() * p.element_size() for p in routed.parameters("experts"))
    actual_share = sum(key_ranks(keys, ranks).values()) / (len(keys) * max(ranks))  # the bank pads to max rank
    models = {"base": base, "adaplex-routed": routed.model}
    kwargs: dict[str, dict] = {"base": {}, "adaplex-routed": {}}
    if peers == "peft":
        models["peft-mixed"] = build_peft(base, keys, ranks)
        kwargs["peft-mixed"] = {"adapter_names": per_sample}
    if gathered_lora.available(ids):  # the same routed model without its fused kernel, side by side
        models["adaplex-routed-bmm"] = routed.model
        kwargs["adaplex-routed-bmm"] = {}
        if gathered_lora.dependent_launches(ids):  # and with its launches waiting for the base's to end
            models["adaplex-routed-independent"] = routed.model
            kwargs["adaplex-routed-independent"] = {}
    caches: dict[str, DynamicCache] = {}

    def kernels(name: str) -> AbstractContextManager:
        return VARIANTS.get(name.removesuffix("-graph"), nullcontext)()

    def forward(name: str, **inputs) -> None:
        with torch.no_grad(), kernels(name):
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
            for name in GRAPHED:
                if name in models:
                    with kernels(name):
                        steps[f"{name}-graph"] = graphed_decode(models[name], ids)
        times = interleaved_times(steps, rounds, ids.device, warmup=2)
        profiled = [n for n in PROFILED if n in steps] if profile else []
        profiles = {n: profile_steps(steps[n], 5, ids.device) for n in profiled}
    ratios = {
        "peft_x_base": ("peft-mixed", "base"),
        "peft_x_routed": ("peft-mixed", "adaplex-routed"),
        "routed_bmm_x_base": ("adaplex-routed-bmm", "base"),
        "routed_independent_x_base": ("adaplex-routed-independent", "base"),
        "graph_routed_x_base": ("adaplex-routed-graph", "base-graph"),
        "graph_routed_independent_x_base": ("adaplex-routed-independent-graph", "base-graph"),
        "graph_base_x_base": ("base-graph", "base"),
    }
    ratios = {name: pair for name, pair in ratios.items() if pair[0] in times}
    return (
        {
            "adapters": count,
            "step_s": {n: statistics.median(t) for n, t in times.items()},
            "routed_x_base": median_ratio(times, "adaplex-routed", "base"),
            "bank_bytes": bank_bytes,
            "bank_bytes_at_actual_ranks": round(bank_bytes * actual_share),
            "bank_build_s": round(build_s, 3),
        }
        | paged
        | {name: median_ratio(times, *pair) for name, pair in ratios.items()}
        | ({"profiles": profiles} if profiles else {})
    )


def run(
    base_spec: str = "smollm2-135m",
    adapters: tuple[int, ...] = (8,),
    batch: int = 8,
    seq: int = 128,
    ranks: tuple[int, ...] = (16,),
    rounds: int = 3,
    device: str = "cpu",
    mode: str = "prefill",
    bf16: bool = False,
    peers: str = "peft",
    shape: Path | None = None,
    layers: int | None = None,
    slots: int | None = None,
    profile: bool = False,
) -> dict:
    """The routed bench on ``base_spec``, or with ``shape`` on a random model of that config's shape;
    with ``slots``, each bank paged into that many device slots."""
    if peers not in ("peft", "none"):
        raise ConfigError(f"--peers {peers!r}: give peft or none")
    distinct = min(max(adapters), batch)  # the most keys one batch uses
    if slots is not None and slots < distinct:
        raise ConfigError(f"--slots {slots}: a batch uses up to {distinct} keys, all on the device; give at least that")
    dev = torch.device(device)
    base, label = bench_model(base_spec, shape, layers, torch.bfloat16 if bf16 else torch.float32)
    base.to(dev).requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=dev)
    return {
        "benchmark": "route",
        "base": label,
        "layers": base.config.num_hidden_layers,
        "mode": mode,
        "device": device_name(dev),
        "dtype": "bfloat16" if bf16 else "float32",
        "batch": batch,
        "seq": seq,
        "rank": ranks[0] if len(ranks) == 1 else list(ranks),
        "peers": peers,
        "rounds": rounds,
        "slots": slots,
        "results": [measure(base, ids, count, ranks, rounds, mode, peers, slots, profile) for count in adapters],
    }
