"""`adaplex bench train`: adaplex training (Lightning) against PEFT with a plain PyTorch loop.

Same base, LoRA rank, alpha and targets, same batches. Rounds alternate: K Lightning steps of
adaplex LoRA, K of adaplex MoSLoRA, K plain-loop steps of adaplex LoRA (the engine without
Lightning) and K plain-loop steps of PEFT LoRA. A step is forward, backward,
optimizer step and zero_grad; Lightning steps are timed by a callback from batch start to batch
end. Ratios are medians of per-round ratios; peak memory is each chunk's peak above its start.
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
    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def on_train_batch_start(self, *args) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def lightning_chunk(handle: Adapted, batches: list[dict], device: torch.device, precision: str) -> list[float]:
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
    return timer.times


def plain_chunk(model: nn.Module, batches: list[dict], device: torch.device, bf16: bool) -> list[float]:
    model.to(device)  # a Lightning fit of the same model before it leaves it on the CPU
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    times = []
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
    return times


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
    lora = LoRAConfig(r=rank, alpha=2 * rank)
    handles = {}
    for name, config in {"adaplex-lora": lora, "adaplex-moslora": MoSLoRAConfig(r=rank, alpha=2 * rank)}.items():
        handle = Adapted.of(copy.deepcopy(base).to(dev))
        handle.add(name, config)
        handle.model.train()
        handles[name] = handle
    peft_model = get_peft_model(
        copy.deepcopy(base).to(dev),
        PeftLoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=peft_targets(base, lora.targets)),
    ).train()
    ids = torch.randint(0, base.config.vocab_size, (steps, batch, seq))
    batches = [{"input_ids": i, "labels": i} for i in ids]
    precision = "bf16-mixed" if bf16 else "32-true"
    chunks: dict[str, Callable[[], list[float]]] = {
        name: (lambda h=h: lightning_chunk(h, batches, dev, precision)) for name, h in handles.items()
    }
    chunks["adaplex-lora-plain-loop"] = lambda: plain_chunk(handles["adaplex-lora"].model, batches, dev, bf16)
    chunks["peft-lora"] = lambda: plain_chunk(peft_model, batches, dev, bf16)
    times: dict[str, list[float]] = {n: [] for n in chunks}
    peaks: dict[str, list[float]] = {n: [] for n in chunks}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, chunk in chunks.items():
            peak, step_times = peak_memory_mib(chunk, dev)
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
