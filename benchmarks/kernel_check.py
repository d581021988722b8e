"""CUDA check of the fused routing kernel against the batched-matmul path (bfloat16, float16, float32),
and of a routed SmolLM2-shaped model's logits with and without it. Writes JSON; exits 1 on a mismatch.

    python benchmarks/kernel_check.py BASE_DIR OUT.json
"""

from __future__ import annotations

import sys
import time

import torch
from check_output import report

from adaplex.bench.route import build_routed
from adaplex.compose.route import route
from adaplex.core.graphs import static_generate
from adaplex.core.models import load_base
from adaplex.kernels import gathered_lora

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


def grouped_cases(device: torch.device) -> list[dict]:
    """q/k/v-shaped parts in one launch against each part computed with matmuls in float32."""
    cases = []
    for tokens in (1, 40):
        for dtype in TOLERANCE:
            gen = torch.Generator(device=device).manual_seed(tokens)
            x = torch.randn(8, tokens, 576, generator=gen, device=device).to(dtype)
            parts = [
                tuple((torch.randn(s, generator=gen, device=device) * 0.05).to(dtype) for s in shapes)
                for shapes in [[(8, tokens, n), (8, 576, 16), (8, 16, n)] for n in (576, 192, 192)]
            ]
            got = gathered_lora.grouped_lora_add(x, parts)
            worst = 0.0
            for out, (base, down, up) in zip(got, parts, strict=True):
                ref = torch.baddbmm(base.float(), torch.bmm(x.float(), down.float()), up.float())
                worst = max(worst, (out.float() - ref).abs().max().item() / ref.abs().max().item())
            cases.append(
                {
                    "tokens": tokens,
                    "dtype": str(dtype).removeprefix("torch."),
                    "error": worst,
                    "ok": worst <= TOLERANCE[dtype],
                }
            )
    return cases


def _host_us(call, rounds: int = 200) -> float:
    """Microseconds per eager call (host launch cost included)."""
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / rounds * 1e6


def _graph_us(call, launches: int = 50, replays: int = 20) -> float:
    """GPU microseconds per call: ``launches`` calls captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * launches)


def _decode_site(device: torch.device, n_in: int, n_out: int) -> tuple[torch.Tensor, ...]:
    """(base, down, up) of one decode-step site: batch 64, one token, rank 16, bfloat16."""
    shapes = [(64, 1, n_out), (64, n_in, 16), (64, 16, n_out)]
    return tuple(torch.randn(s, device=device, dtype=torch.bfloat16) * 0.05 for s in shapes)


# SmolLM2-135M's sites in a decode step: q/k/v and gate/up read one input each
SITES = {"q": (576, 576), "kv": (576, 192), "up": (576, 1536), "down": (1536, 576)}
GROUPS = {"qkv": ("q", "kv", "kv"), "gate_up": ("up", "up")}
TILES = [(16, n, k, 4) for n in (64, 128, 256) for k in (64, 128, 256)] + [(16, 256, 128, 2), (16, 128, 128, 2)]


def kernel_times(device: torch.device) -> dict:
    """Decode-shaped sites, microseconds per call: eager (host cost included) and GPU time under
    CUDA graphs; the kernel against bmm + baddbmm, q/k/v and gate/up grouped against one launch
    each, and the GPU time of every tile choice (the built-in one is marked)."""
    sites = {name: _decode_site(device, *shape) for name, shape in SITES.items()}
    xs = {n_in: torch.randn(64, 1, n_in, device=device, dtype=torch.bfloat16) for n_in, _ in SITES.values()}
    x_of = {name: xs[shape[0]] for name, shape in SITES.items()}
    base, down, up = sites["up"]
    calls = {
        "kernel": lambda: gathered_lora.gathered_lora_add(base, x_of["up"], down, up),
        "bmm_baddbmm": lambda: torch.baddbmm(base, torch.bmm(x_of["up"], down), up),
    }
    for group, members in GROUPS.items():
        parts = [sites[m] for m in members]
        x = x_of[members[0]]
        calls[f"{group}_grouped"] = lambda x=x, parts=parts: gathered_lora.grouped_lora_add(x, parts)
        calls[f"{group}_separate"] = lambda x=x, parts=parts: [
            gathered_lora.gathered_lora_add(b, x, d, u) for b, d, u in parts
        ]
    times = {name: {"eager_us": _host_us(call), "graph_us": _graph_us(call)} for name, call in calls.items()}
    tiles = {}
    for name, members in {**{s: (s,) for s in SITES}, **GROUPS}.items():
        parts, x = [sites[m] for m in members], x_of[members[0]]
        tiles[name] = {
            "x".join(map(str, t)): _graph_us(
                lambda t=t, x=x, parts=parts: gathered_lora.grouped_lora_add(x, parts, tiles=t)
            )
            for t in TILES
        }
    return {"calls": times, "tiles_graph_us": tiles, "built_in_tiles": "16x256x128x2"}


def routed_logits(base_dir: str, device: torch.device) -> dict:
    base, _ = load_base(base_dir, dtype=torch.bfloat16)
    base.to(device).requires_grad_(False)
    keys = [f"k{i}" for i in range(8)]
    routed, _ = build_routed(base, keys, (16,))
    ids = torch.randint(0, base.config.vocab_size, (16, 64), device=device)
    per_sample = [keys[i % 8] for i in range(16)]
    with torch.no_grad(), route(routed, per_sample):
        fused = routed.model(input_ids=ids).logits.float()
        with gathered_lora.disabled():
            plain = routed.model(input_ids=ids).logits.float()
    error = (fused - plain).abs().max().item() / plain.abs().max().item()
    agree = (fused.argmax(-1) == plain.argmax(-1)).float().mean().item()
    return {"relative_error": error, "top1_agreement": agree, "ok": error <= 0.05}


def graphed_generation(base_dir: str, device: torch.device, new_tokens: int = 32) -> dict:
    """A routed batch of 64 (8 keys) decoded greedily over a static cache: every step a CUDA graph
    replay against the same steps run eagerly (equal tokens expected), and against generate()."""
    base, _ = load_base(base_dir, dtype=torch.bfloat16)
    base.to(device).requires_grad_(False)
    keys = [f"k{i}" for i in range(8)]
    routed, _ = build_routed(base, keys, (16,))
    ids = torch.randint(0, base.config.vocab_size, (64, 128), device=device)
    with torch.no_grad(), route(routed, [keys[i % 8] for i in range(64)]):
        seconds = {}
        for graphed in (True, False):
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = static_generate(routed.model, ids, new_tokens, graphed=graphed)
            torch.cuda.synchronize()
            seconds["graphed" if graphed else "eager"] = time.perf_counter() - start
            if graphed:
                replayed = tokens
        reference = routed.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)[
            :, ids.shape[1] :
        ]
    return {
        "new_tokens": new_tokens,
        "graphed_equals_eager": bool(torch.equal(replayed, tokens)),
        "agreement_with_generate": (replayed == reference).float().mean().item(),
        "seconds_with_capture": seconds,
        "ok": bool(torch.equal(replayed, tokens)),
    }


def main() -> None:
    base_dir, out = sys.argv[1], sys.argv[2]
    device = torch.device("cuda")
    assert gathered_lora.available(torch.empty(1, device=device)), "Triton is not available"
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cases": kernel_cases(device),
        "grouped_cases": grouped_cases(device),
        "decode_site_us": kernel_times(device),
        "routed_model_bf16": routed_logits(base_dir, device),
        "routed_graphed_generation": graphed_generation(base_dir, device),
    }
    result["ok"] = (
        all(c["ok"] for c in result["cases"] + result["grouped_cases"])
        and result["routed_model_bf16"]["ok"]
        and result["routed_graphed_generation"]["ok"]
    )
    report(result, out)


if __name__ == "__main__":
    main()
