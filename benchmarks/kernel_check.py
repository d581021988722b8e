"""CUDA check of the fused routing kernel against the batched-matmul path (bfloat16, float16, float32),
and of a routed SmolLM2-shaped model's logits with and without it. Writes JSON; exits 1 on a mismatch.

    python benchmarks/kernel_check.py BASE_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from adaplex.bench.route import build
from adaplex.kernels import gathered_lora
from adaplex.models import load_base
from adaplex.routing import route

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output's max


def kernel_cases(device: torch.device) -> list[dict]:
    cases = []
    for batch, tokens, n_in, rank, n_out in [(64, 1, 576, 16, 576), (64, 1, 576, 16, 1536), (8, 300, 1536, 8, 576)]:
        for dtype in TOLERANCE:
            gen = torch.Generator(device=device).manual_seed(tokens)
            shapes = [(batch, tokens, n_in), (batch, n_in, rank), (batch, rank, n_out), (batch, tokens, n_out)]
            x, down, up, base = (torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes)
            down, up = down * 0.05, up * 0.05
            got = gathered_lora.gathered_lora_add(base, x, down, up).float()
            ref = torch.baddbmm(base.float(), torch.bmm(x.float(), down.float()), up.float())
            matmuls = torch.baddbmm(base, torch.bmm(x, down), up).float()
            scale = ref.abs().max().item()
            cases.append(
                {
                    "shape": [batch, tokens, n_in, rank, n_out],
                    "dtype": str(dtype).removeprefix("torch."),
                    "kernel_error": (got - ref).abs().max().item() / scale,
                    "matmul_error": (matmuls - ref).abs().max().item() / scale,
                    "ok": (got - ref).abs().max().item() / scale <= TOLERANCE[dtype],
                }
            )
    return cases


def kernel_times(device: torch.device, rounds: int = 200) -> dict:
    """Microseconds per call for a decode-shaped site: the kernel against bmm + baddbmm."""
    x = torch.randn(64, 1, 576, device=device, dtype=torch.bfloat16)
    down = torch.randn(64, 576, 16, device=device, dtype=torch.bfloat16)
    up = torch.randn(64, 16, 1536, device=device, dtype=torch.bfloat16)
    base = torch.randn(64, 1, 1536, device=device, dtype=torch.bfloat16)
    calls = {
        "kernel": lambda: gathered_lora.gathered_lora_add(base, x, down, up),
        "bmm_baddbmm": lambda: torch.baddbmm(base, torch.bmm(x, down), up),
    }
    times = {}
    for name, call in calls.items():
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(rounds):
            call()
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - start) / rounds * 1e6
    return times


def routed_logits(base_dir: str, device: torch.device) -> dict:
    base, _ = load_base(base_dir, dtype=torch.bfloat16)
    base.to(device).requires_grad_(False)
    keys = [f"k{i}" for i in range(8)]
    routed, _ = build(base, keys, 16)
    ids = torch.randint(0, base.config.vocab_size, (16, 64), device=device)
    per_sample = [keys[i % 8] for i in range(16)]
    with torch.no_grad(), route(routed, per_sample):
        fused = routed.model(input_ids=ids).logits.float()
        with gathered_lora.disabled():
            plain = routed.model(input_ids=ids).logits.float()
    error = (fused - plain).abs().max().item() / plain.abs().max().item()
    agree = (fused.argmax(-1) == plain.argmax(-1)).float().mean().item()
    return {"relative_error": error, "top1_agreement": agree, "ok": error <= 0.05}


def main() -> None:
    base_dir, out = sys.argv[1], sys.argv[2]
    device = torch.device("cuda")
    assert gathered_lora.available(torch.empty(1, device=device)), "Triton is not available"
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cases": kernel_cases(device),
        "decode_site_us": kernel_times(device),
        "routed_model_bf16": routed_logits(base_dir, device),
    }
    result["ok"] = all(c["ok"] for c in result["cases"]) and result["routed_model_bf16"]["ok"]
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
