"""Probe of the epilogue form at the SmolLM2-135M decode sites under CUDA graphs (results/linear-epilogue-cuda-rejected.json)."""

import json, os, sys, time

sys.path.insert(0, "benchmarks")
import torch
from kernel_check import SHAPES, BATCH, RANK, _table, _graph_us, _reference, TOLERANCE
from adaplex.kernels import gathered_lora
from adaplex.kernels.gathered_lora import EpilogueSizes, GroupedLinearLoRA

device = torch.device("cuda")
out = open(os.environ["OUT"] + "/epi.jsonl", "w")
t0 = time.time()
CONFIGS = [
    (16, 32, 64, 128, 4, 4),
    (64, 32, 64, 128, 4, 4),
    (16, 64, 64, 128, 4, 4),
    (32, 32, 64, 128, 4, 4),
    (16, 16, 64, 128, 4, 4),
    (16, 32, 128, 128, 4, 4),
    (16, 32, 64, 256, 4, 4),
    (16, 32, 64, 128, 2, 2),
]
for site, (n_in, n_outs) in SHAPES["135m"].items():
    gen = torch.Generator(device=device).manual_seed(n_in)
    x, parts, rows = _table(device, torch.bfloat16, BATCH, 1, BATCH, n_in, n_outs, RANK, gen)
    tables = [(d, u, g, torch.full_like(r, RANK)) for _, d, u, g, r in parts]
    weights = [
        (torch.randn(u.shape[2], n_in, generator=gen, device=device) * n_in**-0.5).bfloat16() for _, u, _, _ in tables
    ]
    linears = lambda: [torch.nn.functional.linear(x, w) for w in weights]

    def then_update():
        gathered_lora.grouped_lora_add(x, [(b, *t) for b, t in zip(linears(), tables)], rows)

    row = {"site": site, "linears_us": _graph_us(linears), "then_update_us": _graph_us(then_update)}
    bases = [(x.float() @ w.float().T).bfloat16() for w in weights]
    refs = [_reference(x, b, *t, rows) for b, t in zip(bases, tables)]
    for c in CONFIGS:
        s = EpilogueSizes(*c)
        bound = GroupedLinearLoRA(x, weights, tables, rows, s)
        _, outs = bound(x)
        err = max(((o.float() - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, refs))
        row["E" + "x".join(map(str, c))] = (
            round(_graph_us(lambda: bound(x), launches=20, replays=10), 2),
            round(err, 5),
        )
        print(site, c, row["E" + "x".join(map(str, c))], f"{time.time() - t0:.0f}s", flush=True)
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
    out.flush()
