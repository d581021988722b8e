"""CUDA check of the fused routing kernels against float32 sample-by-sample references (bfloat16, float16,
float32; tables with shared rows, gains and mixed ranks), their decode-site GPU times under CUDA graphs
at the SmolLM2-135M and Llama-3-8B layer shapes with a sweep of the kernels' sizes, the fused base-linear
forms (``GroupedLinearLoRA``) beside cuBLAS's base linears at both shapes' sites, and a routed model's
logits (a prefill and a one-token step; in bfloat16, and in float32 under bfloat16 autocast) and graphed
generation with and without them. Writes JSON;
exits 1 on a mismatch.

    python benchmarks/kernel_check.py SHAPE_CONFIG OUT.json
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from check_output import report

from adaplex.bench.route import build_routed
from adaplex.bench.shapes import shaped_model
from adaplex.compose.route import route
from adaplex.core.graphs import static_generate
from adaplex.kernels import gathered_lora
from adaplex.kernels.gathered_lora import GroupedLinearLoRA, LinearSizes, SplitSizes, TileSizes

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output's max
BATCH, RANK = 64, 16


def _table(device, dtype, batch, tokens, rows_of, n_in, n_outs, rank, gen):
    """x, parts [(base, down, up, gain, ranks)], rows: a table of ``rows_of`` rows, mixed ranks."""
    x = torch.randn(batch, tokens, n_in, generator=gen, device=device).to(dtype)
    rows = torch.arange(batch, device=device) % rows_of
    gain = torch.linspace(0.5, 1.5, batch, device=device)
    ranks = torch.tensor([rank, rank // 2, 0, 3] * (batch // 4), dtype=torch.int32, device=device)
    parts = []
    for n_out in n_outs:
        base = torch.randn(batch, tokens, n_out, generator=gen, device=device).to(dtype)
        down = (torch.randn(rows_of, rank, n_in, generator=gen, device=device) * 0.05).to(dtype)
        up = (torch.randn(rows_of, rank, n_out, generator=gen, device=device) * 0.05).to(dtype)
        parts.append((base, down, up, gain, ranks))
    return x, parts, rows


def _reference(x, base, down, up, gain, ranks, rows):
    mask = (torch.arange(down.shape[1], device=x.device) < ranks.view(-1, 1)).float()  # (B, r)
    h = torch.bmm(x.float(), down[rows].float().transpose(1, 2)) * mask.unsqueeze(1) * gain.view(-1, 1, 1)
    return torch.baddbmm(base.float(), h, up[rows].float())


def kernel_cases(device: torch.device) -> list[dict]:
    cases = []
    for n_in, n_outs in [(576, (576, 192, 192)), (14336, (4096, 4096)), (4096, (14336,)), (1536, (576,))]:
        for dtype in TOLERANCE:
            gen = torch.Generator(device=device).manual_seed(n_in)
            tokens = 1 if len(n_outs) > 1 else 300  # grouped decode, or one prefill part
            x, parts, rows = _table(device, dtype, 8, tokens, 3, n_in, n_outs, RANK, gen)
            got = gathered_lora.grouped_lora_add(x, parts, rows)
            worst = max(
                ((g.float() - (r := _reference(x, *p, rows))).abs().max() / r.abs().max()).item()
                for g, p in zip(got, parts, strict=True)
            )
            name = str(dtype).removeprefix("torch.")
            case = {"n_in": n_in, "n_outs": list(n_outs), "tokens": x.shape[1], "dtype": name, "error": worst}
            cases.append(case | {"ok": worst <= TOLERANCE[dtype]})
    return cases


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


# a decode step's launches per layer: q/k/v and gate/up read one input each; (in, outs)
SHAPES = {
    "135m": {"qkv": (576, (576, 192, 192)), "o": (576, (576,)), "gate_up": (576, (1536, 1536)), "down": (1536, (576,))},
    "8b": {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
           "down": (14336, (4096,))},
}  # fmt: skip
SWEEP = {  # per shape: tiles on short inputs, the two-launch form's sizes on long ones
    "135m": [
        *(TileSizes(16, 512, k, 2) for k in (64, 128, 256)),
        *(TileSizes(16, 1024, k, w) for k in (64, 128) for w in (4, 8)),
        SplitSizes(256, 512, 1, 4),
    ],
    "8b": [
        *(SplitSizes(k, 512, c, 4) for k in (256, 1024, 2048) for c in (1, 2, 4)),
        *(SplitSizes(k, 1024, c, w) for k in (512, 1024) for c in (1, 2) for w in (4, 8)),
    ],
}


def _site(x: torch.Tensor, parts: list, rows: torch.Tensor, sweep: list) -> dict:
    full = [(b, d, u, g, torch.full_like(r, RANK)) for b, d, u, g, r in parts]  # every expert at rank 16

    def launch(sizes=None, parts=full) -> None:
        gathered_lora.grouped_lora_add(x, parts, rows, sizes)

    def bmm() -> None:
        for b, d, u, g, _ in full:
            torch.baddbmm(b, torch.bmm(x, d[rows].transpose(1, 2)) * g.view(-1, 1, 1).to(x.dtype), u[rows])

    built_in = _graph_us(launch)
    sweep = {f"{type(t).__name__[0]}" + "x".join(map(str, t)): _graph_us(lambda t=t: launch(t)) for t in sweep}
    moved = x.nbytes + sum(2 * b.nbytes + d.nbytes + u.nbytes for b, d, u, _, _ in full)
    return {
        "graph_us": built_in,
        "graph_us_mixed_ranks": _graph_us(lambda: launch(parts=parts)),  # ranks 16, 8, 0, 3: 6.75 of 16 on average
        "bmm_graph_us": _graph_us(bmm),
        "eager_us": _host_us(launch),
        "bytes": moved,
        "gb_per_s": moved / built_in / 1e3,
        "best_swept": min(sweep, key=sweep.get),
        "sweep_us": sweep,
    }


def site_times(device: torch.device) -> dict:
    """Per launch of a decode step (batch 64, 64 distinct rank-16 experts, bf16): GPU µs under CUDA
    graphs with the built-in tiles and each swept tile, with mixed ranks, the batched-matmul path's,
    the host's eager µs, and the bytes the launch must read and write (x, base, out and the experts),
    as GB/s at the built-in tiles."""
    result = {}
    for shape, sites in SHAPES.items():
        for site, (n_in, n_outs) in sites.items():
            gen = torch.Generator(device=device).manual_seed(n_in)
            result[f"{shape}-{site}"] = _site(
                *_table(device, torch.bfloat16, BATCH, 1, BATCH, n_in, n_outs, RANK, gen), SWEEP[shape]
            )
    return result


LINEAR_SWEEP = [  # the built-in first
    LinearSizes(16, n, c, k, 32, w)
    for n, c, k, w in ((64, 1, 64, 8), (64, 1, 64, 4), (128, 1, 64, 8), (64, 1, 128, 8), (64, 2, 64, 8), (32, 2, 64, 8))
]


def linear_site_inputs(device: torch.device, n_in: int, n_outs: tuple[int, ...]) -> tuple:
    """A decode site's x (BATCH, 1, n_in), base weights (out, n_in), tables of BATCH distinct rank-RANK
    experts (every one at its full rank) and rows, bf16, seeded by ``n_in``."""
    gen = torch.Generator(device=device).manual_seed(n_in)
    x, parts, rows = _table(device, torch.bfloat16, BATCH, 1, BATCH, n_in, n_outs, RANK, gen)
    tables = [(d, u, g, torch.full_like(r, RANK)) for _, d, u, g, r in parts]
    weights = [(torch.randn(n, n_in, generator=gen, device=device) * n_in**-0.5).to(x.dtype) for n in n_outs]
    return x, weights, tables, rows


def _linear_site(x: torch.Tensor, weights: list, tables: list, rows: torch.Tensor) -> dict:
    def linears() -> list[torch.Tensor]:
        return [torch.nn.functional.linear(x, w) for w in weights]

    def linears_then_update() -> None:
        gathered_lora.grouped_lora_add(x, [(b, *t) for b, t in zip(linears(), tables, strict=True)], rows)

    bases = [(x.float() @ w.float().T).to(x.dtype) for w in weights]
    refs = [_reference(x, b, *t, rows) for b, t in zip(bases, tables, strict=True)]

    def error(outs: list[torch.Tensor]) -> float:
        return max(((o.float() - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, refs, strict=True))

    with gathered_lora.graph_kernels():  # the linears-and-shrinks launch, then the expand: what graphs run
        split = GroupedLinearLoRA(x, weights, tables, rows)
    result = {
        "linears_us": _graph_us(linears),
        "linears_then_update_us": _graph_us(linears_then_update),
        "linears_and_shrinks_us": _graph_us(lambda: split(x)),
        "linears_and_shrinks_error": error(split(x)[1]),
    }
    if x.shape[-1] < gathered_lora.LONG_INPUT:  # the base-and-update kernel: eager steps on short inputs
        bound = {sizes: GroupedLinearLoRA(x, weights, tables, rows, sizes) for sizes in LINEAR_SWEEP}
        sweep = {"L" + "x".join(map(str, s)): _graph_us(lambda s=s: bound[s](x)) for s in LINEAR_SWEEP}
        result |= {
            "linear_kernel_us": next(iter(sweep.values())),
            "linear_kernel_error": error(bound[LINEAR_SWEEP[0]](x)[1]),
            "sweep_us": sweep,
        }
    tolerance = TOLERANCE[torch.bfloat16]
    return result | {"ok": all(result[k] <= tolerance for k in result if k.endswith("_error"))}


def linear_site_times(device: torch.device) -> dict:
    """At both shapes' decode sites (batch 64, 64 distinct rank-16 experts, bf16), GPU µs under CUDA graphs
    of: the base linears alone (cuBLAS), the base linears then the update kernel, the linears-and-shrinks
    launch then the expand (what graphed one-token steps run, and eager ones on inputs from LONG_INPUT),
    and, on the short inputs, the base-and-update kernel (what eager one-token steps run there) at its
    built-in and swept sizes; each fused form's worst error against a float32 reference."""
    result = {}
    for shape, sites in SHAPES.items():
        for site, (n_in, n_outs) in sites.items():
            result[f"{shape}-{site}"] = _linear_site(*linear_site_inputs(device, n_in, n_outs))
    return result


def routed_autocast(base: torch.nn.Module, device: torch.device) -> dict:
    """A float32 routed model under bfloat16 autocast (as bf16-mixed training validates it): a prefill and
    a one-token step with the update kernels (autocast's bf16 inputs beside float32 tables) against the
    matmul path."""
    keys = [f"k{i}" for i in range(8)]
    routed, _ = build_routed(copy.deepcopy(base).float(), keys, (16,))
    per_sample = [keys[i % 8] for i in range(16)]
    errors = {}
    for tokens in (64, 1):
        ids = torch.randint(0, base.config.vocab_size, (16, tokens), device=device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), route(routed, per_sample):
            fused = routed.model(input_ids=ids).logits.float()
            with gathered_lora.disabled():
                plain = routed.model(input_ids=ids).logits.float()
        errors[f"tokens_{tokens}"] = ((fused - plain).abs().max() / plain.abs().max()).item()
    return errors | {"ok": max(errors.values()) <= 0.05}


def routed_decode_step(base: torch.nn.Module, device: torch.device) -> dict:
    """A one-token step of 64 samples, each routed to its own expert: the base-and-update kernels (eager)
    against the matmul path, and how far the experts move the logits off the base's."""
    keys = [f"k{i}" for i in range(BATCH)]
    routed, _ = build_routed(base, keys, (RANK,))
    ids = torch.randint(0, base.config.vocab_size, (BATCH, 1), device=device)
    with torch.no_grad(), route(routed, keys):
        fused = routed.model(input_ids=ids).logits.float()
        with gathered_lora.disabled():
            plain = routed.model(input_ids=ids).logits.float()
    with torch.no_grad():
        bare = base(input_ids=ids).logits.float()
    error = ((fused - plain).abs().max() / plain.abs().max()).item()
    return {
        "relative_error": error,
        "top1_agreement": (fused.argmax(-1) == plain.argmax(-1)).float().mean().item(),
        "experts_move_logits": ((plain - bare).abs().max() / plain.abs().max()).item(),
        "ok": error <= 0.05,
    }


def routed_logits(base: torch.nn.Module, device: torch.device) -> dict:
    keys = [f"k{i}" for i in range(8)]
    routed, _ = build_routed(base, keys, (16, 4))
    ids = torch.randint(0, base.config.vocab_size, (16, 64), device=device)
    per_sample = [keys[i % 8] for i in range(16)]
    with torch.no_grad(), route(routed, per_sample):
        fused = routed.model(input_ids=ids).logits.float()
        with gathered_lora.disabled():
            plain = routed.model(input_ids=ids).logits.float()
    error = (fused - plain).abs().max().item() / plain.abs().max().item()
    agree = (fused.argmax(-1) == plain.argmax(-1)).float().mean().item()
    return {"relative_error": error, "top1_agreement": agree, "ok": error <= 0.05}


def graphed_generation(base: torch.nn.Module, device: torch.device, new_tokens: int = 32) -> dict:
    """A routed batch of 64 (8 keys) decoded greedily over a static cache: every step a CUDA graph
    replay against the same steps run eagerly (equal tokens expected), and against generate()."""
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
    shape, out = Path(sys.argv[1]), sys.argv[2]
    device = torch.device("cuda")
    assert gathered_lora.available(torch.empty(1, device=device)), "Triton is not available"
    base = shaped_model(shape, None, torch.bfloat16).to(device).requires_grad_(False)
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cases": kernel_cases(device),
        "routed_model_bf16": routed_logits(base, device),
        "routed_decode_step_bf16": routed_decode_step(base, device),
        "routed_graphed_generation": graphed_generation(base, device),
        "decode_site_us": site_times(device),
        "linear_site_us": linear_site_times(device),
        "routed_autocast_bf16": routed_autocast(base, device),
    }
    result["ok"] = (
        all(c["ok"] for c in result["cases"])
        and all(s["ok"] for s in result["linear_site_us"].values())
        and result["routed_model_bf16"]["ok"]
        and result["routed_decode_step_bf16"]["ok"]
        and result["routed_graphed_generation"]["ok"]
        and result["routed_autocast_bf16"]["ok"]
    )
    report(result, out)


if __name__ == "__main__":
    main()
