"""`adaplex bench train`: adaplex training against PEFT, variants side by side in one run.

Same base, LoRA rank, alpha and targets, same batches. Each round runs K steps of every variant in
turn: adaplex on Lightning (LoRA, MoSLoRA; with the fused loss where it runs, without it, with
compiled blocks), adaplex in a plain PyTorch loop (the engine without Lightning) and PEFT LoRA in the
same plain loop. A step is forward, backward, optimizer step and zero_grad; Lightning steps are timed
by a callback from batch start to batch end. Ratios to PEFT are medians of per-round ratios; peak
memory is each chunk's peak above its start. Every variant trains its own copy of the base
(Lightning's teardown moves a model back to the CPU, which must not reach another variant), and each
step's loss must be on the device asked for. ``profile`` adds, per variant, where a plain-loop step's
time goes (``adaplex.bench.profile``).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from adaplex.bench.overhead import peft_targets
from adaplex.bench.profile import profile_steps
from adaplex.bench.shapes import bench_model
from adaplex.core.adapted import Adapted
from adaplex.core.quantize import Quantization, quantize_linears
from adaplex.errors import ConfigError
from adaplex.methods import LoRAConfig, MoSLoRAConfig
from adaplex.train.module import AdapterLM, adamw
from adaplex.train.speed import compile_blocks, next_token_loss, use_fused_loss
from adaplex.util.measure import device_name, peak_memory_mib, sync

PRECISIONS = ("auto", "bf16-mixed", "bf16-true", "32-true")


@dataclass(frozen=True)
class Variant:
    loop: str  # "lightning" or "plain"
    library: str = "adaplex"  # or "peft"
    method: str = "lora"  # or "moslora"
    fused_loss: str = "auto"
    compile: str | None = None  # torch.compile mode of the decoder blocks


VARIANTS = {
    "adaplex-lora": Variant("lightning"),
    "adaplex-lora-unfused": Variant("lightning", fused_loss="off"),
    "adaplex-lora-compiled": Variant("lightning", compile="default"),
    "adaplex-lora-graphs": Variant("lightning", compile="reduce-overhead"),
    "adaplex-moslora": Variant("lightning", method="moslora"),
    "adaplex-moslora-compiled": Variant("lightning", method="moslora", compile="default"),
    "adaplex-moslora-graphs": Variant("lightning", method="moslora", compile="reduce-overhead"),
    "adaplex-lora-plain-loop": Variant("plain"),
    "peft-lora": Variant("plain", library="peft"),
}
CPU_VARIANTS = ("adaplex-lora", "adaplex-moslora", "adaplex-lora-plain-loop", "peft-lora")  # compiling takes minutes
PEER = "peft-lora"


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
Loss = Callable[[nn.Module, dict], torch.Tensor]


def lightning_chunk(
    handle: Adapted, batches: list[dict], device: torch.device, precision: str, fused_loss: str
) -> Chunk:
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
    module = AdapterLM(handle, lr=1e-4, warmup=0, total_steps=10**6, fused_loss=fused_loss)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return timer.times, timer.devices


def plain_steps(
    model: nn.Module, loss_of: Loss, device: torch.device, autocast: bool
) -> Callable[[dict], tuple[float, str]]:
    """A plain-loop training step on a batch (forward, backward, AdamW step, zero_grad), returning its
    seconds and the device its loss was on."""
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step(batch: dict) -> tuple[float, str]:
        sync(device)
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start, str(loss.device)

    return step


def loss_for(variant: Variant, model: nn.Module, device: torch.device) -> Loss:
    """A variant's loss: PEFT's model computes its own; adaplex's is the engine's (fused where chosen)."""
    if variant.library == "peft":
        return lambda m, batch: m(**batch).loss
    fused = use_fused_loss(variant.fused_loss, model, torch.empty(0, device=device))
    return lambda m, batch: next_token_loss(m, batch, fused)


def variant_model(base: nn.Module, variant: Variant, rank: int, device: torch.device) -> nn.Module:
    """A copy of ``base`` on ``device`` with the variant's rank-``rank`` adapter (alpha 2r, every linear layer)."""
    model = copy.deepcopy(base).to(device)
    lora = LoRAConfig(r=rank, alpha=2 * rank)
    if variant.library == "peft":
        peft = PeftLoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=peft_targets(base, lora.targets)
        )
        return get_peft_model(model, peft).train()
    handle = Adapted.of(model)
    handle.add("adapter", MoSLoRAConfig(r=rank, alpha=2 * rank) if variant.method == "moslora" else lora)
    if variant.compile is not None:
        compile_blocks(model, variant.compile)
    return model.train()


def check_variants(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")


def variants(
    base: nn.Module, rank: int, device: torch.device, names: tuple[str, ...] = CPU_VARIANTS
) -> dict[str, tuple[Variant, nn.Module]]:
    """name -> (variant, its own model on ``device``): each a separate copy of ``base``."""
    check_variants(names)
    return {name: (VARIANTS[name], variant_model(base, VARIANTS[name], rank, device)) for name in names}


def run(
    base_spec: str = "smollm2-135m",
    batch: int = 4,
    seq: int = 128,
    rank: int = 16,
    steps: int = 4,
    rounds: int = 3,
    device: str = "cpu",
    shape: Path | None = None,
    layers: int | None = None,
    precision: str = "auto",
    quantize: Quantization = "none",
    names: tuple[str, ...] | None = None,
    profile: bool = False,
) -> dict:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    torch.manual_seed(0)
    dev = torch.device(device)
    precision = ("bf16-mixed" if dev.type == "cuda" else "32-true") if precision == "auto" else precision
    if quantize != "none" and precision == "bf16-true":
        raise ConfigError(f"--quantize {quantize} trains under bf16-mixed or 32-true, not bf16-true")
    names = names or (tuple(VARIANTS) if dev.type == "cuda" else CPU_VARIANTS)
    check_variants(names)
    bf16_weights = precision == "bf16-true" or (quantize != "none" and precision == "bf16-mixed")
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    base, label = bench_model(base_spec, shape, layers, dtype)
    base.requires_grad_(False)
    quantize_linears(base, quantize, dtype, dev)
    ids = torch.randint(0, base.config.vocab_size, (steps, batch, seq))
    batches = [{"input_ids": i, "labels": i} for i in ids]
    autocast = precision == "bf16-mixed"
    built = variants(base, rank, dev, names)
    del base

    def chunk_of(variant: Variant, model: nn.Module) -> Callable[[], Chunk]:
        if variant.loop == "lightning":
            return lambda: lightning_chunk(Adapted.of(model), batches, dev, precision, variant.fused_loss)
        step = plain_steps(model, loss_for(variant, model, dev), dev, autocast)

        def chunk() -> Chunk:
            timed = [step(b) for b in batches]
            return [t for t, _ in timed], {d for _, d in timed}

        return chunk

    chunks = {name: chunk_of(variant, model) for name, (variant, model) in built.items()}
    expected = str(torch.empty(0, device=dev).device)  # "cuda" -> "cuda:0"
    times: dict[str, list[float]] = {n: [] for n in chunks}
    peaks: dict[str, list[float]] = {n: [] for n in chunks}
    for round_index in range(rounds + 1):  # round 0 warms up (and compiles)
        for name, chunk in chunks.items():
            peak, (step_times, devices) = peak_memory_mib(chunk, dev)
            if devices != {expected}:
                raise RuntimeError(f"bench train: {name} trained on {sorted(devices)}, not on {expected}")
            if round_index:
                times[name].append(statistics.median(step_times[1:]))  # a chunk's first step builds state
                peaks[name].append(peak)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    result = {
        "benchmark": "train",
        "base": label,
        "layers": built[names[0]][1].config.num_hidden_layers,
        "device": device_name(dev),
        "precision": precision,
        "quantize": quantize,
        "variants": list(chunks),
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "steps_per_chunk": steps,
        "rounds": rounds,
        "step_s": {n: statistics.median(t) for n, t in times.items()},
        "peak_mib": {n: max(p) for n, p in peaks.items()},
        "tokens_per_s": {n: batch * seq / statistics.median(t) for n, t in times.items()},
    }
    if PEER in chunks:  # tokens/s against PEFT's = PEFT's step time / the variant's
        result["vs_peft"] = {
            n: {"tokens_per_s_x": ratio(PEER, n), "peak_memory_x": max(peaks[n]) / max(peaks[PEER])}
            for n in chunks
            if n != PEER
        }
    if {"adaplex-moslora", "adaplex-lora"} <= set(chunks):
        result["moslora_vs_lora_step_time_x"] = ratio("adaplex-moslora", "adaplex-lora")
    if profile:
        result["profile"] = {}
        for name, (variant, model) in built.items():
            model.to(dev)  # a Lightning teardown moved it back to the CPU
            step = plain_steps(model, loss_for(variant, model, dev), dev, autocast)
            result["profile"][name] = profile_steps(lambda s=step: s(batches[0]), 3, dev)
    return result
