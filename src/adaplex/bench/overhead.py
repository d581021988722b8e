"""`adaplex bench overhead`: each adapter method's cost relative to the base model and to PEFT.

Every variant is its own copy of the base model; all are timed in interleaved rounds on the
same batch. Reported per variant: forward and forward+backward time ratios to the base,
trainable parameters and peak memory of a training step; and adaplex LoRA against PEFT LoRA
(same rank, alpha and targets) as paired per-round ratios.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn

from adaplex.core.adapted import Adapted
from adaplex.core.inject import select_sites
from adaplex.core.models import load_base
from adaplex.methods import BottleneckConfig, LoRAConfig, MoSLoRAConfig, PrefixConfig
from adaplex.util.measure import device_name, interleaved_times, median_ratio, peak_memory_mib


@dataclass
class Row:
    variant: str
    forward_s: float
    forward_x_base: float
    train_step_s: float
    train_step_x_base: float
    trainable_params: int
    peak_train_mib: float


def peft_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The module names adaplex would adapt, spelled as PEFT's target_modules (last name component)."""
    handle = Adapted(copy.deepcopy(model))
    return sorted({m.rpartition(".")[2] for m in select_sites(handle.model, handle.family, targets)})


def build_variants(base: nn.Module, rank: int) -> dict[str, nn.Module]:
    lora = LoRAConfig(r=rank, alpha=2 * rank)
    variants: dict[str, nn.Module] = {"base": base}
    for name, config in {
        "adaplex-lora": lora,
        "adaplex-moslora": MoSLoRAConfig(r=rank, alpha=2 * rank),
        "adaplex-bottleneck": BottleneckConfig(),
        "adaplex-prefix": PrefixConfig(length=16),
    }.items():
        model = copy.deepcopy(base)
        Adapted.of(model).add(name, config)
        variants[name] = model
    merged = copy.deepcopy(base)
    handle = Adapted.of(merged)
    handle.add("lora", lora)
    handle.merge()
    variants["adaplex-lora-merged"] = merged
    peft_config = PeftLoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=peft_targets(base, lora.targets)
    )
    variants["peft-lora"] = get_peft_model(copy.deepcopy(base), peft_config)
    return variants


def run(
    base_spec: str = "smollm2-135m",
    batch: int = 4,
    seq: int = 128,
    rank: int = 16,
    rounds: int = 3,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    base, _ = load_base(base_spec, dtype=dtype)
    base.to(dev).requires_grad_(False)
    variants = build_variants(base, rank)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=dev)

    def forward(model: nn.Module):
        def step() -> None:
            with torch.no_grad():
                model(input_ids=ids)

        return step

    def train_step(model: nn.Module):
        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    for model in variants.values():
        model.train()
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in variants.items()}
    # The base's "train step" back-propagates to the input embeddings without weight gradients:
    # the least backward work any adapter needs, since adapters in the first layer need it all.
    base.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    fwd = interleaved_times({n: forward(m) for n, m in variants.items()}, rounds, dev)
    train_merged = variants.pop("adaplex-lora-merged")  # a merged model is for inference only
    trn = interleaved_times({n: train_step(m) for n, m in variants.items()}, rounds, dev)
    peaks = {n: peak_memory_mib(train_step(m), dev)[0] for n, m in variants.items()}
    variants["adaplex-lora-merged"] = train_merged
    rows = []
    for name in variants:
        rows.append(
            Row(
                variant=name,
                forward_s=statistics.median(fwd[name]),
                forward_x_base=median_ratio(fwd, name, "base"),
                train_step_s=statistics.median(trn[name]) if name in trn else float("nan"),
                train_step_x_base=median_ratio(trn, name, "base") if name in trn else float("nan"),
                trainable_params=trainable[name],
                peak_train_mib=peaks.get(name, float("nan")),
            )
        )
    return {
        "benchmark": "overhead",
        "base": base_spec,
        "device": device_name(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "rounds": rounds,
        "note": "base train step: backward to the input embeddings, no weight gradients",
        "rows": [asdict(r) for r in rows],
        "lora_vs_peft": {
            "forward_x_peft": median_ratio(fwd, "adaplex-lora", "peft-lora"),
            "train_step_x_peft": median_ratio(trn, "adaplex-lora", "peft-lora"),
            "merged_forward_x_base": median_ratio(fwd, "adaplex-lora-merged", "base"),
        },
    }
