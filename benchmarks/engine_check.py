"""CUDA check of the weight channel on a SmolLM2-shaped model in bfloat16: per-sample given LoRAs and
routed banks through the fused kernel (one launch for q/k/v and for gate/up) against the batched
matmuls, each sample against the same adapter alone, and unrouted="base" with a prefix. Writes JSON;
exits 1 on a mismatch.

    python benchmarks/engine_check.py BASE_DIR OUT.json
"""

from __future__ import annotations

import sys

import torch
from check_output import report

from adaplex.bench.route import build_routed
from adaplex.compose.route import route
from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.kernels import gathered_lora
from adaplex.methods import GivenLoRAConfig, LoRAConfig, PrefixConfig

TOLERANCE = 0.05  # largest |difference| relative to the logits' largest, bfloat16 through 30 layers


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def given_loras(base: torch.nn.Module, device: torch.device, batch: int = 8, rank: int = 8) -> dict:
    """A batch of 8 generated-style LoRAs on every linear layer: fused kernel vs matmuls vs each alone."""
    model = Adapted.of(base)
    model.add("gen", GivenLoRAConfig(r=rank, alpha=2 * rank))
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for site, slot in model.sites("gen").items():
        _, n_in, n_out = slot.shape
        A = torch.randn(batch, rank, n_in, generator=gen, device=device) * 0.02
        B = torch.randn(batch, n_out, rank, generator=gen, device=device) * 0.02
        weights[site] = (A.bfloat16(), B.bfloat16())
    ids = torch.randint(0, base.config.vocab_size, (batch, 64), device=device)
    with torch.no_grad(), model.given("gen", weights):
        fused = base(input_ids=ids).logits
        with gathered_lora.disabled():
            matmuls = base(input_ids=ids).logits
    with torch.no_grad(), model.disable():
        plain = base(input_ids=ids).logits
    alone = []
    for b in (0, batch - 1):
        one = {site: (A[b : b + 1], B[b : b + 1]) for site, (A, B) in weights.items()}
        with torch.no_grad(), model.given("gen", one):
            alone.append(relative(fused[b : b + 1], base(input_ids=ids[b : b + 1]).logits))
    model.detach()
    errors = {"kernel_vs_matmuls": relative(fused, matmuls), "sample_vs_alone": max(alone)}
    return errors | {"adapters_change_logits": relative(fused, plain), "ok": max(errors.values()) <= TOLERANCE}


def unrouted_base_with_prefix(base: torch.nn.Module, device: torch.device) -> dict:
    """Routed batch (bank of 4 keys, a prefix shared adapter) with unrouted='base': each sample vs alone."""
    routed, _ = build_routed(base, [f"k{i}" for i in range(4)], (16,))
    routed.add("shared", PrefixConfig(length=8))
    routed.add("style", LoRAConfig(r=8, targets=("q", "v")))
    with torch.no_grad():
        for p in routed.parameters("style"):
            p.normal_(0, 0.02)
    routed.model.to(device=device, dtype=torch.bfloat16)
    keys = ["k0", None, "k3", "k1", None, "k2"]
    ids = torch.randint(0, base.config.vocab_size, (len(keys), 48), device=device)
    with torch.no_grad(), route(routed, keys, unrouted="base"):
        together = routed.model(input_ids=ids).logits
    with torch.no_grad(), routed.disable():
        bare = routed.model(input_ids=ids).logits
    errors = []
    for b, key in enumerate(keys):
        with torch.no_grad(), route(routed, [key], unrouted="base"):
            errors.append(relative(together[b : b + 1], routed.model(input_ids=ids[b : b + 1]).logits))
    unrouted = max(relative(together[b : b + 1], bare[b : b + 1]) for b, k in enumerate(keys) if k is None)
    worst = max(*errors, unrouted)
    return {"sample_vs_alone": max(errors), "unrouted_vs_base": unrouted, "ok": worst <= TOLERANCE}


def main() -> None:
    base_dir, out = sys.argv[1], sys.argv[2]
    device = torch.device("cuda")
    assert gathered_lora.available(torch.empty(1, device=device)), "Triton is not available"
    base, _ = load_base(base_dir, dtype=torch.bfloat16)
    base.to(device).requires_grad_(False)
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "given_loras_bf16": given_loras(base, device),
        "unrouted_base_with_prefix_bf16": unrouted_base_with_prefix(base, device),
    }
    result["ok"] = all(part["ok"] for part in list(result.values())[2:])
    report(result, out)


if __name__ == "__main__":
    main()
