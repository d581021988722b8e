"""Where a monitored forward's time goes on CUDA: per-kernel GPU time (torch.profiler) of the plain
forward and of the forward with the fused checks, their wall time, GPU busy time and the host's time
to enqueue them (a forward whose wall time exceeds its GPU time, or whose host time comes close to
its wall time, is bound by the host launching kernels), and the GPU time per call of the
checked-attention kernel with each check alone. Writes JSON.

    python benchmarks/faults_profile.py BASE_DIR OUT.json [BATCH SEQ]
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from check_output import gpu_us, kernel_us, report
from faults_kernel_check import FUSED, sources

import adaplex.kernels.checked_attention as checked
from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.faults.experiment import logits_of
from adaplex.faults.hook import detections_of
from adaplex.faults.session import armed


def timings(forward, resolve=lambda: None, repeats: int = 7) -> dict[str, float]:
    """Median ms of the host enqueueing ``forward`` (until it returns, before any sync: close to the
    wall time, the host sets the pace) and of the whole call, ``resolve`` and a sync included."""
    host, wall = [], []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward()
        host.append(time.perf_counter() - start)
        resolve()
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    return {"host_ms": statistics.median(host[1:]) * 1e3, "wall_ms": statistics.median(wall[1:]) * 1e3}


def forward_profile(base_dir: str, batch: int, seq: int) -> dict:
    model, _ = load_base(base_dir, dtype=torch.bfloat16)
    model.to("cuda").requires_grad_(False)
    Adapted.of(model)  # the plain forward runs through the same attention function, unarmed
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    forward = partial(logits_of, model, {"input_ids": ids})
    plain = kernel_us(forward, repeats=3)
    result = {"plain": {**timings(forward), "gpu_ms": sum(plain.values()) / 1e3}}
    with armed(model, None, FUSED) as hooks:
        resolve = partial(detections_of, hooks)
        kernels = kernel_us(lambda: (forward(), resolve()), repeats=3)
        result["checked"] = {**timings(forward, resolve), "gpu_ms": sum(kernels.values()) / 1e3}
    result["added_us_by_kernel"] = {
        name: kernels.get(name, 0.0) - plain.get(name, 0.0)
        for name in sorted(set(kernels) | set(plain), key=lambda n: -abs(kernels.get(n, 0.0) - plain.get(n, 0.0)))
    }
    result["added_us_by_kernel"] = dict(list(result["added_us_by_kernel"].items())[:25])
    result["plain_top_kernels_us"] = dict(list(plain.items())[:12])
    return result


def check_costs(batch: int, seq: int) -> dict[str, dict[str, float]]:
    """GPU µs per call of the checked-attention kernel with each check alone: the attention kernel,
    and the whole call (its pass over V and its fills included)."""
    q = torch.randn(batch, 9, seq, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 3, seq, 64, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    recorded = sources(batch, seq, torch.device("cuda"))
    variants = {
        "none": ((False, False, False), {}),
        "abft": ((True, False, False), {}),
        "softmax": ((False, True, False), {}),
        "bound": ((False, False, True), {}),
        "three": ((True, True, True), {}),
        "qkv_q": ((False, False, False), {"q": recorded["q"]}),
        "qkv_kv": ((False, False, False), {"k": recorded["k"], "v": recorded["v"]}),
        "all": ((True, True, True), recorded),
    }
    costs = {"sdpa": {"call": gpu_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))}}
    for name, (enabled, given) in variants.items():
        kernels = kernel_us(
            lambda e=enabled, g=given: checked.checked_attention(q, k, v, 0.125, True, e, g, folded=False)
        )
        costs[name] = {"attention": kernels.get("checked_attention_kernel", 0.0), "call": sum(kernels.values())}
    for tiles in ((64, 64, 4, 3, None), (64, 64, 4, 2, None), (64, 64, 4, 3, 128), (64, 32, 4, 3, 128)):
        step = partial(
            checked.checked_attention, q, k, v, 0.125, True, (True, True, True), recorded, tiles=tiles, folded=False
        )
        costs["all_" + "x".join(map(str, tiles))] = {"call": gpu_us(step)}
    built_in = checked.PASS_TILES
    for pass_tiles in ((16, 2), (64, 4), (32, 4), (64, 8), (128, 4)):
        checked.PASS_TILES = pass_tiles
        checked._plan.cache_clear()  # plans hold the pass's tiles
        step = partial(checked.checked_attention, q, k, v, 0.125, True, (True, True, True), recorded, folded=False)
        costs["all_pass_" + "x".join(map(str, pass_tiles))] = {"call": gpu_us(step)}
    checked.PASS_TILES = built_in
    checked._plan.cache_clear()
    step = partial(checked.checked_attention, q, k, v, 0.125, True, (True, True, True), recorded, folded=True)
    costs["all_folded"] = {"call": gpu_us(step)}
    return costs


def compiled_resources() -> dict:
    """Registers, spills, stages and shared memory of each compiled variant of the kernels that ran
    (from their launchers' caches)."""
    found = {}
    for launcher in checked._kernels():
        found[launcher.kernel.__name__] = [
            {"regs": k.n_regs, "spills": k.n_spills, "stages": k.metadata.num_stages, "shared": k.metadata.shared}
            for k, _ in launcher.compiled.values()
        ]
    return found


def main() -> None:
    base_dir, out = sys.argv[1], sys.argv[2]
    batch, seq = (int(a) for a in sys.argv[3:5]) if len(sys.argv) > 3 else (32, 1024)
    result = {"device": torch.cuda.get_device_name(0), "batch": batch, "seq": seq}
    result["forward"] = forward_profile(base_dir, batch, seq)
    result["kernel_us"] = check_costs(batch, seq)
    result["compiled"] = compiled_resources()
    result["ok"] = True
    report(result, out)


if __name__ == "__main__":
    main()
