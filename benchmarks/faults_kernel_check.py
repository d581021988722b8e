"""CUDA check of the checked-attention kernel (kernels/checked_attention.py): its output against SDPA
(bfloat16, float16, float32; causal with and without cached keys, GQA, no mask), a SmolLM2-shaped
model's logits with the fused checks against the plain model, no detections over clean batches, and
a flipped q, k or v element detected, eagerly and in CUDA-graph replays. Writes JSON; exits 1 on a
failure.

    python benchmarks/faults_kernel_check.py BASE_DIR OUT.json
"""

from __future__ import annotations

import itertools
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from check_output import gpu_us, report

import adaplex.kernels.checked_attention as checked
from adaplex.core.models import load_base
from adaplex.faults.bits import flip_bit
from adaplex.faults.experiment import logits_of
from adaplex.faults.graphed import GraphedForward
from adaplex.faults.hook import DetectorConfig, detections_of
from adaplex.faults.qkv import Recorded
from adaplex.faults.session import armed

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output's max
FUSED = DetectorConfig(fused=True)


def kernel_cases(device: torch.device) -> list[dict]:
    """The kernel's output with every check and with none (its checks compiled out) against SDPA, with a
    row pass and folded; a second call, into the first one's buffers, launches the cached kernel."""
    cases = []
    shapes = [
        (8, 9, 3, 512, 512, True),
        (2, 9, 3, 100, 300, True),  # 200 cached keys before the 100 new ones
        (4, 12, 12, 200, 200, False),
    ]
    for (batch, heads, kv_heads, tokens, keys, causal), dtype, folded in itertools.product(shapes, TOLERANCE, (0, 1)):
        gen = torch.Generator(device=device).manual_seed(tokens)
        q = torch.randn(batch, heads, tokens, 64, generator=gen, device=device).to(dtype)
        k, v = (torch.randn(batch, kv_heads, keys, 64, generator=gen, device=device).to(dtype) for _ in "kv")
        call = partial(checked.checked_attention, q, k, v, 0.125, causal, folded=bool(folded))
        out, found = call((True, True, True), {})
        peak = found.peak().clone()
        unchecked, _ = call((False, False, False), {})
        again, reused = call((True, True, True), {}, reuse=found)
        mask = torch.ones(tokens, keys, dtype=torch.bool, device=device).tril(keys - tokens) if causal else None
        group = heads // kv_heads
        ref = F.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1), mask, scale=0.125
        ).transpose(1, 2)
        error = max((o.float() - ref).abs().max().item() / ref.abs().max().item() for o in (out, unchecked))
        relaunch_equal = torch.equal(out, again) and torch.equal(peak, reused.peak())
        reused_buffers = reused.state.data_ptr() == found.state.data_ptr()
        worst = peak.max().item()
        cases.append(
            {
                "shape": [batch, heads, kv_heads, tokens, keys, int(causal)],
                "dtype": str(dtype).removeprefix("torch."),
                "folded": folded,
                "error": error,
                "peak_excess": worst,
                "relaunch_equal": relaunch_equal,
                "buffers_reused": reused_buffers,
                "ok": error <= TOLERANCE[dtype] and worst <= 0 and relaunch_equal and reused_buffers,
            }
        )
    return cases


def sources(batch: int, tokens: int, device: torch.device) -> dict[str, Recorded]:
    """Projection outputs for q, k, v of SmolLM2's shape (9 heads, 3 K/V heads of 64), rotary-weighted q and k."""
    weights = torch.randn(1, tokens, 64, device=device)
    x = {
        loc: torch.randn(batch, tokens, width, device=device, dtype=torch.bfloat16)
        for loc, width in zip("qkv", (576, 192, 192), strict=True)
    }
    return {"q": Recorded(x["q"], weights, 2), "k": Recorded(x["k"], weights, 2), "v": Recorded(x["v"], None, 2)}


TILES = [(m, n, w, s, None) for m, n in ((64, 64), (128, 64), (128, 128), (128, 32)) for w in (4, 8) for s in (2, 3)]
TILES += [(64, 64, 4, s, 128) for s in (2, 3)]  # a register cap: 4 programs per SM where registers allow


def kernel_times(device: torch.device) -> dict:
    """GPU microseconds per call (every kernel of the call, the pass over K/V included) of SDPA and of
    the kernel with every check and q/k/v references, for each tile choice, and folded, at the
    benchmark's attention shapes (SmolLM2: 9 heads, 3 K/V heads)."""
    times = {}
    for batch, tokens in ((8, 512), (32, 1024)):
        q = torch.randn(batch, 9, tokens, 64, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(batch, 3, tokens, 64, device=device, dtype=torch.bfloat16) for _ in "kv")
        refs = sources(batch, tokens, device)
        shape = f"{batch}x{tokens}"
        times[shape] = {
            "sdpa": gpu_us(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            )
        }
        for tiles in TILES:
            name = "x".join(map(str, tiles))
            times[shape][name] = gpu_us(
                lambda q=q, k=k, v=v, refs=refs, tiles=tiles: checked.checked_attention(
                    q, k, v, 0.125, True, (True, True, True), refs, tiles=tiles, folded=False
                )
            )
        times[shape]["folded"] = gpu_us(  # one launch, with FOLDED_TILES
            lambda q=q, k=k, v=v, refs=refs: checked.checked_attention(
                q, k, v, 0.125, True, (True, True, True), refs, folded=True
            )
        )
    return times


def model_checks(base_dir: str, device: torch.device) -> dict:
    model, _ = load_base(base_dir, dtype=torch.bfloat16)
    model.to(device).requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    false_positives, worst, agree = 0, 0.0, []
    batches = [torch.randint(0, model.config.vocab_size, (4, 256), generator=gen, device=device) for _ in range(20)]
    plain = [logits_of(model, {"input_ids": ids}).float() for ids in batches]
    with armed(model, None, FUSED) as hooks:  # armed once, as a monitored model runs: each layer reuses its buffers
        for ids, expected in zip(batches, plain, strict=True):
            fused = logits_of(model, {"input_ids": ids}).float()
            false_positives += len(detections_of(hooks))
            worst = max(worst, (fused - expected).abs().max().item() / expected.abs().max().item())
            agree.append((fused.argmax(-1) == expected.argmax(-1)).float().mean().item())
    flips = {}
    launch = checked.checked_attention
    inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 128), generator=gen, device=device)}
    for location in "qkv":
        done = []

        def faulty(query, key, value, *args, location=location, done=done, **options):
            tensors = {"q": query, "k": key, "v": value}
            if not done:  # the first layer: sample 1, head 1, token 100, feature 5, exponent bit 14
                t = tensors[location]
                flat = torch.arange(t.numel(), device=t.device).view(t.shape)[1, 1, 100, 5].reshape(1)
                tensors[location] = flip_bit(t, flat, 14).view_as(t)
                done.append(True)
            return launch(tensors["q"], tensors["k"], tensors["v"], *args, **options)

        checked.checked_attention = faulty
        try:
            with armed(model, None, FUSED) as hooks:
                logits_of(model, inputs)
        finally:
            checked.checked_attention = launch
        found = [[d.layer, d.head, d.detector, list(d.location)] for h in hooks for d in h.detections]
        flips[location] = {"detections": len(found), "in_layer_0": [f for f in found if f[0] == 0]}
    start = time.perf_counter()
    for _ in range(20):
        with armed(model, None, FUSED):
            pass
    arming_ms = (time.perf_counter() - start) / 20 * 1e3
    caught = all([0, 1, f"qkv_{loc}", [1, 100]] in found["in_layer_0"] for loc, found in flips.items())
    return {
        "relative_error": worst,
        "top1_agreement": min(agree),
        "false_positives_in_20_batches": false_positives,
        "flips": flips,
        "arming_ms": arming_ms,  # host time to arm and disarm the model (hooks on every layer)
        "ok": worst <= 0.05 and false_positives == 0 and caught,
    }


def graphed_checks(base_dir: str, device: torch.device) -> dict:
    """The armed model captured as a CUDA graph: replays match the plain forward, report nothing when
    clean, and report a flip that a device flag switches on between replays (k of layer 0, sample 1,
    K/V head 1, token 100, exponent bit 14) at its place."""
    model, _ = load_base(base_dir, dtype=torch.bfloat16)
    model.to(device).requires_grad_(False)
    inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (4, 256), device=device)}
    plain = logits_of(model, inputs).float()
    flag = torch.zeros((), dtype=torch.bool, device=device)
    layers, calls = model.config.num_hidden_layers, [0]
    launch = checked.checked_attention

    def switchable(query, key, value, *args, **options):
        if calls[0] % layers == 0:  # layer 0 of every forward, the captured one included
            flat = torch.arange(key.numel(), device=device).view(key.shape)[1, 1, 100, 5].reshape(1)
            key = torch.where(flag, flip_bit(key, flat, 14).view_as(key), key)
        calls[0] += 1
        return launch(query, key, value, *args, **options)

    checked.checked_attention = switchable
    try:
        with armed(model, None, FUSED) as hooks:
            graphed = GraphedForward(model, inputs, hooks)
            clean = graphed()
            error = (graphed.logits.float() - plain).abs().max().item() / plain.abs().max().item()
            flag.fill_(True)
            faulty = [[d.layer, d.head, d.detector, list(d.location)] for d in graphed() if d.layer == 0]
            flag.fill_(False)
            clean_again = graphed()
    finally:
        checked.checked_attention = launch
    return {
        "relative_error": error,
        "clean_detections": len(clean) + len(clean_again),
        "flip_in_layer_0": faulty,
        "ok": error <= 0.05 and not clean and not clean_again and [0, 1, "qkv_k", [1, 100]] in faulty,
    }


def main() -> None:
    base_dir, out = sys.argv[1], sys.argv[2]
    device = torch.device("cuda")
    assert checked.available(torch.empty(1, device=device)), "Triton is not available"
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cases": kernel_cases(device)}
    result["model_bf16"] = model_checks(base_dir, device)
    result["graphed_bf16"] = graphed_checks(base_dir, device)
    result["kernel_us"] = kernel_times(device)
    result["built_in_tiles"] = "x".join(map(str, checked.CHECKED_TILES))
    result["ok"] = all(c["ok"] for c in result["cases"]) and result["model_bf16"]["ok"] and result["graphed_bf16"]["ok"]
    report(result, out)


if __name__ == "__main__":
    main()
