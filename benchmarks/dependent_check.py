"""CUDA check of the two-launch form's programmatic dependent launches: a routed model's one-token step
(a 2-layer Llama-3-8B shape, batch 64, 64 distinct rank-16 experts on all seven linears, bfloat16) gives
the same logits with dependent and independent launches, eagerly and as a CUDA graph, and logits within
bf16 rounding of the batched-matmul path's (0.05 of their largest, kernel_check.py's bound for a model's
logits), and the dependent graph gives the same logits replay after replay. Writes JSON; exits 1 on a mismatch.

    python benchmarks/dependent_check.py OUT.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from check_output import report

from adaplex.bench.route import build_routed
from adaplex.bench.shapes import shaped_model
from adaplex.compose.route import route
from adaplex.core.graphs import graphed_decode
from adaplex.kernels import gathered_lora

SHAPES = {"llama-3-8b": 2, "smollm2-135m": None}  # shape config in benchmarks/shapes -> layers (None: all)
BATCH, SEQ, ADAPTERS, BOUND, REPLAYS = 64, 128, 64, 0.05, 200


def _graph_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The logits of a graphed decode step's first replay, and whether ``REPLAYS`` more gave the same
    (a launch that read its inputs before they were written would differ from replay to replay)."""
    logits = {}

    def keep(_module, _args, output):
        logits["last"] = output.logits

    hook = model.register_forward_hook(keep)
    try:
        step = graphed_decode(model, ids)
    finally:
        hook.remove()
    step()
    first = logits["last"].float().clone()  # the graph's static output, written by each replay
    same = True
    for _ in range(REPLAYS):
        step()
        same &= torch.equal(logits["last"].float(), first)
    return first, same


def check(name: str, layers: int | None) -> dict:
    shape = Path(__file__).parent / "shapes" / f"{name}.json"
    base = shaped_model(shape, layers, torch.bfloat16).cuda().requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ), device="cuda")
    keys = [f"k{i}" for i in range(ADAPTERS)]
    routed, _ = build_routed(base, keys, (16,))
    model = routed.model
    out = {}
    with route(routed, [keys[b % ADAPTERS] for b in range(BATCH)]), torch.no_grad():
        out["eager_dependent"] = model(input_ids=ids[:, :1]).logits.float()
        with gathered_lora.independent_launches():
            out["eager_independent"] = model(input_ids=ids[:, :1]).logits.float()
        with gathered_lora.disabled():
            out["eager_bmm"] = model(input_ids=ids[:, :1]).logits.float()
        out["graph_dependent"], replays_same = _graph_logits(model, ids)
        with gathered_lora.independent_launches():
            out["graph_independent"], _ = _graph_logits(model, ids)
        with gathered_lora.disabled():
            out["graph_bmm"], _ = _graph_logits(model, ids)
    result = {"shape": name, "layers": base.config.num_hidden_layers, "dependent_replays_same": replays_same}
    for way in ("eager", "graph"):
        dependent, bmm = out[f"{way}_dependent"], out[f"{way}_bmm"]
        result[f"{way}_dependent_equals_independent"] = torch.equal(dependent, out[f"{way}_independent"])
        result[f"{way}_dependent_vs_bmm"] = ((dependent - bmm).abs().max() / bmm.abs().max()).item()
    same = all(result[f"{way}_dependent_equals_independent"] for way in ("eager", "graph"))
    close = all(result[f"{way}_dependent_vs_bmm"] <= BOUND for way in ("eager", "graph"))
    result["ok"] = bool(replays_same and same and close)
    print(result, flush=True)
    return result


def main(out: str) -> None:
    print(torch.cuda.get_device_name(0), torch.__version__, "dependent:", gathered_lora.dependent_launches(
        torch.empty(1, device="cuda")), flush=True)  # fmt: skip
    results = [check(name, layers) for name, layers in SHAPES.items()]
    report({"device": torch.cuda.get_device_name(0), "results": results, "ok": all(r["ok"] for r in results)}, out)


if __name__ == "__main__":
    main(sys.argv[1])
