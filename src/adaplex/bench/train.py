"""`adaplex bench train`: adaplex training (Lightning) against PEFT with a plain PyTorch loop.

Same base, LoRA rank, alpha and targets, same batches. Rounds alternate: K Lightning steps of
adaplex LoRA, K of adaplex MoSLoRA, K plain-loop steps of adaplex LoRA (the engine without
Lightning) and K plain-loop steps of PEFT LoRA. A step is forward, backward,
optimizer step and zero_grad; Lightning steps are timed by a callback from batch start to batch
end. Ratios are medians of per-round ratios; peak memory is each chunk's peak above its start. Every
variant trains its own copy of the base (Lightning's teardown moves a model back to the CPU, which
must not reach another variant), and each step's loss must be on the device asked for.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable

import lightning as L
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from adaplex.bench.overhead import peft_targets
from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.methods import LoRAConfig, MoSLoRAConfig
from adaplex.train.module import AdapterLM
from adaplex.util.measure import device_name, peak_memory_mib, sync


class StepTimer(L.Callback):
    """Each step's time, and the devices its losses were on."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0
        self.devices: set[str] = set()

    def on_train_batch_start(self, *args) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, *args) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)
        self.devices.add(str(outputs["loss"].device))


Chunk = tuple[list[float], set[str]]  # step times, the devices the losses were on


def lightning_chunk(handle: Adapted, batches: list[dict], device: torch.device, precision: str) -> Chunk:
    timer = StepTimer(device)
    trainer = L.Trainer(
        max_steps=len(batches),
        accelerator=device.type if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(AdapterLM(handle, lr=1e-4, warmup=0, total_steps=10**6), DataLoader(batches, batch_size=None))
    return timer.times, timer.devices


def plain_chunk(model: nn.Module, batches: list[dict], device: torch.device, bf16: bool) -> Chunk:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    times, devices = [], set()
    for batch in batches:
        sync(device)
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        devices.add(str(loss.device))
    return times, devices


def variants(base: nn.Module, rank: int, device: torch.device) -> dict[str, tuple[str, nn.Module]]:
    """name -> (how it trains: "lightning" or "plain", its own model on ``device``): adaplex LoRA and
    MoSLoRA on Lightning, adaplex LoRA and PEFT LoRA in a plain loop, each a separate copy of ``base``."""
    lora = LoRAConfig(r=rank, alpha=2 * rank)
    found: dict[str, tuple[str, nn.Module]] = {}
    for name, loop, config in (
        ("adaplex-lora", "lightning", lora),
        ("adaplex-moslora", "lightning", MoSLoRAConfig(r=rank, alpha=2 * rank)),
        ("adaplex-lora-plain-loop", "plain", lora),
    ):
        handle = Adapted.of(copy.deepcopy(base).to(device))
        handle.add(name, config)
        found[name] = (loop, handle.model.train())
    peft = PeftLoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=peft_targets(base, lora.targets)
    )
    found["peft-lora"] = ("plain", get_peft_model(copy.deepcopy(base).to(device), peft).train())
    return found


def run(
    base_spec: str = "smollm2-135m",
    batch: int = 4,
    seq: int = 128,
    rank: int = 16,
    steps: int = 4,
    rounds: int = 3,
    device: str = "cpu",
) -> dict:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    dev = torch.device(device)
    bf16 = dev.type == "cuda"
    base, _ = load_base(base_spec)
    base.requires_grad_(False)
    ids = torch.randint(0, base.config.vocab_size, (steps, batch, seq))
    batches = [{"input_ids": i, "labels": i} for i in ids]
    precision = "bf16-mixed" if bf16 else "32-true"

    def chunk_of(loop: str, model: nn.Module) -> Callable[[], Chunk]:
        if loop == "lightning":
            return lambda: lightning_chunk(Adapted.of(model), batches, dev, precision)
        return lambda: plain_chunk(model, batches, dev, bf16)

    chunks = {name: chunk_of(loop, model) for name, (loop, model) in variants(base, rank, dev).items()}
    expected = str(torch.empty(0, device=dev).device)  # "cuda" -> "cuda:0"
    times: dict[str, list[float]] = {n: [] for n in chunks}
    peaks: dict[str, list[float]] = {n: [] for n in chunks}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, chunk in chunks.items():
            peak, (step_times, devices) = peak_memory_mib(chunk, dev)
            if devices != {expected}:
                raise RuntimeError(f"bench train: {name} trained on {sorted(devices)}, not on {expected}")
            if round_index:
                times[name].append(statistics.median(step_times[1:]))  # a chunk's first step builds state
                peaks[name].append(peak)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    return {
        "benchmark": "train",
        "base": base_spec,
        "device": device_name(dev),
        "precision": precision,
        "variants": list(chunks),
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "steps_per_chunk": steps,
        "rounds": rounds,
        "step_s": {n: statistics.median(t) for n, t in times.items()},
        "peak_mib": {n: max(p) for n, p in peaks.items()},
        "tokens_per_s": {n: batch * seq / statistics.median(t) for n, t in times.items()},
        "adaplex_vs_peft": {
            "step_time_x": ratio("adaplex-lora", "peft-lora"),
            "peak_memory_x": max(peaks["adaplex-lora"]) / max(peaks["peft-lora"]),
            "plain_loop_step_time_x": ratio("adaplex-lora-plain-loop", "peft-lora"),
            "plain_loop_peak_memory_x": max(peaks["adaplex-lora-plain-loop"]) / max(peaks["peft-lora"]),
        },
        "moslora_vs_lora_step_time_x": ratio("adaplex-moslora", "adaplex-lora"),
    }
