"""The fused routing kernel (Triton) against the batched-matmul path it replaces.

Triton's interpreter (TRITON_INTERPRET=1, read when triton is imported) runs the kernel on CPU
tensors, so each check runs in a fresh interpreter with the variable set. The interpreter has no
bfloat16 matmul, so float32 and float16 are checked here; bfloat16 is checked on CUDA by
benchmarks/device_run.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaplex
from adaplex.core.layers import _linear_weights
from adaplex.kernels import checked_attention, gathered_lora
from adaplex.kernels.gathered_lora import (
    DECODE,
    GRAPH_LINEAR_LONG,
    GRAPH_LINEAR_SHORT,
    LINEAR_DECODE,
    PREFILL,
    GroupedLoRAAdd,
    built_in_sizes,
    graph_kernels,
    linear_sizes,
)
from adaplex.methods import ExpertsConfig

import tiny

TESTS = Path(__file__).parent

KERNEL_CHECK = """
import json, torch
from adaplex.kernels.gathered_lora import SplitSizes, TileSizes, available, gathered_lora_add, grouped_lora_add
def reference(base, x, down, up, rows, gain, ranks):  # float32, sample by sample, rows past a rank dropped
    out = base.float().clone()
    for b in range(x.shape[0]):
        n = b if rows is None else rows[b].item()
        r = down.shape[1] if ranks is None else ranks[b].item()
        g = 1.0 if gain is None else gain[b].item()
        out[b] += g * (x[b].float() @ down[n, :r].float().T) @ up[n, :r].float()
    return out
errors = []
for batch, tokens, n_in, rank, n_out, dtype, tiles in [
    (4, 1, 64, 16, 96, torch.float32, None),   # a decode step
    (4, 1, 300, 8, 130, torch.float32, SplitSizes(64, 32, 2, 4)),  # two launches: ragged input, chunks of columns
    (4, 1, 300, 8, 130, torch.float32, SplitSizes(16, 64, 1, 4)),  # 19 partial shrinks (a block of 32)
    (4, 1, 64, 16, 64, torch.float16, SplitSizes(64, 64, 1, 4)),  # one split
    (3, 20, 300, 8, 130, torch.float32, TileSizes(16, 32, 8, 4)),  # tiles: shrink not unrolled
    (3, 37, 70, 8, 130, torch.float32, None),  # ragged sizes, rank below the kernel's minimum tile of 16
    (2, 80, 48, 24, 40, torch.float32, None),  # several token blocks, rank padded to 32
    (2, 5, 64, 16, 64, torch.float16, None),
    (3, 1, 64, 16, 64, torch.float16, None),
]:
    gen = torch.Generator().manual_seed(batch * tokens)
    for table in (False, True):  # each sample its own row; or rows of a table of 2, with gains and ranks
        rows_of = 2 if table else batch
        x, base = (torch.randn(s, generator=gen).to(dtype) for s in [(batch, tokens, n_in), (batch, tokens, n_out)])
        tables = [(rows_of, rank, n_in), (rows_of, rank, n_out)]
        down, up = ((torch.randn(s, generator=gen) * 0.1).to(dtype) for s in tables)
        rows = gain = ranks = None
        if table:
            rows = torch.arange(batch) % 2
            gain = torch.linspace(0.5, 1.5, batch)
            ranks = torch.tensor([rank, rank // 2, 0, 1][:batch], dtype=torch.int32)
            past = torch.arange(rank).view(1, -1) >= ranks.view(-1, 1)  # rows a sample's rank excludes: NaN,
            for b in range(batch):  # so reading one would show in the output (rows shared: only where all exclude)
                shared = [i for i in range(batch) if rows[i] == rows[b]]
                drop = past[shared].all(0)
                down[rows[b], drop] = float("nan")
                up[rows[b], drop] = float("nan")
        assert available(x)
        ref = reference(base, x, down, up, rows, gain, ranks)
        if tiles is None:
            got = gathered_lora_add(base, x, down, up, rows, gain, ranks).float()
        else:
            got = grouped_lora_add(x, [(base, down, up, gain, ranks)], rows, tiles)[0].float()
        errors.append((str(dtype), table, (got - ref).abs().max().item() / ref.abs().max().item()))
gen = torch.Generator().manual_seed(7)  # three parts of one input (q/k/v-like out sizes) in one launch per form
x = torch.randn(4, 1, 100, generator=gen)
rows, gain = torch.tensor([1, 0, 1, 2]), torch.linspace(0.5, 1.5, 4)
ranks = torch.tensor([8, 3, 5, 0], dtype=torch.int32)
parts = [(torch.randn(4, 1, n, generator=gen), torch.randn(3, 8, 100, generator=gen) * 0.1,
          torch.randn(3, 8, n, generator=gen) * 0.1, gain, ranks) for n in (40, 24, 70)]
for sizes in (SplitSizes(32, 16, 2, 4), TileSizes(16, 32, 32, 4)):
    outs = grouped_lora_add(x, parts, rows, sizes)
    refs = [reference(b, x, d, u, rows, g, r) for b, d, u, g, r in parts]
    worst = max(((o - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, refs))
    errors.append((str(x.dtype), True, worst))
print(json.dumps(errors))
"""

ROUTED_CHECK = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import adaplex.kernels.gathered_lora as kernel
from adaplex.compose.route import route
from test_routing import routed
import tiny
model, handle = routed("llama", "orthogonal", key_ranks={{"i7": 2}})
keys = ["i7", "v100", None, "a100", "v100"]
ids = tiny.tokens(batch=len(keys))
with torch.no_grad(), route(handle, keys):
    fused = model(input_ids=ids).logits
assert kernel.available(ids.float())
with torch.no_grad(), route(handle, keys), kernel.disabled():
    plain = model(input_ids=ids).logits
print(json.dumps({{"max_diff": (fused - plain).abs().max().item(), "scale": plain.abs().max().item()}}))
"""

GROUPED_CHECK = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import adaplex
import adaplex.kernels.gathered_lora as kernel
from adaplex import LoRAConfig
from adaplex.methods import ExpertsConfig
from adaplex.compose.route import route
from helpers import randomize
import tiny
model = tiny.llama()
handle = adaplex.attach(model, "shared", LoRAConfig(r=2, alpha=16, targets=("all-linear",)))
handle.add("experts", ExpertsConfig(keys=("a", "b", "c"), r=4, alpha=32, targets=("all-linear",)))
randomize(handle, "shared", seed=1)
randomize(handle, "experts", seed=2)
keys = ["a", "c", None, "b"]
ids = tiny.tokens(batch=len(keys))
launches = []
launch = kernel.GroupedLoRAAdd.__call__
kernel.GroupedLoRAAdd.__call__ = lambda self, x, bases: launches.append(len(bases)) or launch(self, x, bases)
with torch.no_grad(), route(handle, keys):
    grouped = model(input_ids=ids).logits
    forward_launches = list(launches)
    plans = len(handle.stack.memo)
    again = model(input_ids=ids).logits  # from the plans the first forward made
with torch.no_grad(), route(handle, keys), kernel.disabled():
    plain = model(input_ids=ids).logits
other_keys = ["b", None, "a", "a"]  # another route: plans of its own, none of the last one's
with torch.no_grad(), route(handle, other_keys):
    other_route = model(input_ids=ids).logits
with torch.no_grad(), route(handle, other_keys), kernel.disabled():
    other_plain = model(input_ids=ids).logits
attention = model.model.layers[0].self_attn
other = torch.randn(2, 5, 32)  # k_proj on another input than q_proj's: k leaves the group, computes alone
with torch.no_grad(), route(handle, ["a", "b"]):
    attention.q_proj(torch.randn(2, 5, 32))
    k_in_group = attention.k_proj(other)
with torch.no_grad(), route(handle, ["a", "b"]), kernel.disabled():
    k_alone = attention.k_proj(other)
print(json.dumps({{
    "max_diff": (grouped - plain).abs().max().item(), "scale": plain.abs().max().item(), "launches": forward_launches,
    "plans": plans, "plans_after": len(handle.stack.memo), "again_diff": (again - grouped).abs().max().item(),
    "other_diff": (other_route - other_plain).abs().max().item(),
    "routes_differ": (other_plain - plain).abs().max().item(),
    "k_diff": (k_in_group - k_alone).abs().max().item(),
    "members": [len(layer.self_attn.q_proj.group.members) for layer in model.model.layers],
}}))
"""

LINEAR_KERNEL_CHECK = """
import itertools, json, torch
from adaplex.kernels.gathered_lora import GroupedLinearLoRA, LinearSizes, SplitLinearSizes, SplitSizes
gen = torch.Generator().manual_seed(11)
errors = []
one_launch = LinearSizes(16, 16, 2, 32, 32, 4)
then_expand = SplitLinearSizes(16, 16, 32, 4, 2, SplitSizes(32, 32, 2, 4))  # 4 partial shrinks, a ragged last
# table: a route's table (rows, gains, mixed ranks), or each sample its own update
for sizes, dtype, table in itertools.product((one_launch, then_expand), (torch.float32, torch.float16), (True, False)):
    batch, n_in, outs = 20, 100, (40, 24, 70)  # ragged: 2 blocks of 16 samples, tiles past every out size
    x = torch.randn(batch, 1, n_in, generator=gen).to(dtype)
    rows_of = 3 if table else batch
    rows = torch.arange(batch) % 3 if table else None
    gain = torch.linspace(0.5, 1.5, batch) if table else None
    ranks = torch.tensor([8, 3, 5, 0] * 5, dtype=torch.int32) if table else None
    weights = [(torch.randn(n, n_in, generator=gen) * 0.1).to(dtype) for n in outs]
    tables = [((torch.randn(rows_of, 8, n_in, generator=gen) * 0.1).to(dtype),
               (torch.randn(rows_of, 8, n, generator=gen) * 0.1).to(dtype), gain, ranks) for n in outs]
    bases, got = GroupedLinearLoRA(x, weights, tables, rows, sizes)(x)
    for w, (down, up, _, _), base, out in zip(weights, tables, bases, got):
        ref_base = x[:, 0].float() @ w.float().T
        picked = torch.arange(batch) if rows is None else rows
        keep = torch.ones(batch, 8) if ranks is None else (torch.arange(8) < ranks.view(-1, 1)).float()
        scale = torch.ones(batch, 1) if gain is None else gain.view(-1, 1)
        h = torch.einsum("bk,brk->br", x[:, 0].float(), down[picked].float()) * keep * scale
        ref = ref_base.to(dtype).float() + torch.einsum("br,bro->bo", h.to(dtype).float(), up[picked].float())
        base_error = (base[:, 0].float() - ref_base).abs().max() / ref_base.abs().max()
        out_error = (out[:, 0].float() - ref).abs().max() / ref.abs().max()
        errors.append([type(sizes).__name__, str(dtype), table, base_error.item(), out_error.item()])
print(json.dumps(errors))
"""

LINEAR_CHECK = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import adaplex
import adaplex.kernels.gathered_lora as kernel
from adaplex import LoRAConfig
from adaplex.methods import ExpertsConfig
from adaplex.compose.route import route
from helpers import randomize
import tiny
result = {{}}
calls = []
launch = kernel.GroupedLinearLoRA.__call__
def counted(self, x):
    calls.append([len(self.tables), len(self.plan.launches)])
    return launch(self, x)
kernel.GroupedLinearLoRA.__call__ = counted
for dtype in (torch.float32, torch.float16):
    model = tiny.llama().to(dtype)
    handle = adaplex.attach(model, "shared", LoRAConfig(r=2, alpha=16, targets=("all-linear",)))
    handle.add("experts", ExpertsConfig(keys=("a", "b", "c"), r=4, alpha=32, key_ranks={{"c": 2}},
                                        targets=("all-linear",)))
    randomize(handle, "shared", seed=1)
    randomize(handle, "experts", seed=2)
    keys = ["a", "c", None, "b", "a"]
    ids = tiny.tokens(batch=len(keys), length=1)  # a one-token step: each group's bases and updates in one launch
    calls.clear()
    with torch.no_grad(), route(handle, keys):
        fused = model(input_ids=ids).logits.float()
        first = list(calls)
        again = model(input_ids=ids).logits.float()
        with kernel.graph_kernels():  # as CUDA graphs run it: the linears and the shrinks, then the expand
            as_graphs = model(input_ids=ids).logits.float()
        after_graphs = list(calls)
    with torch.no_grad(), route(handle, keys), kernel.disabled():
        plain = model(input_ids=ids).logits.float()
    with torch.no_grad(), route(handle, [None] * len(keys)), kernel.disabled():
        shared_only = model(input_ids=ids).logits.float()
    q = model.model.layers[0].self_attn.q_proj.base
    with torch.no_grad(), route(handle, keys):
        model(input_ids=ids)  # the fused plans kept for this route
        seen = []
        hook = q.register_forward_hook(lambda *_: seen.append(1))  # added while the plans are kept
        hooked = model(input_ids=ids).logits.float()
        hook.remove()
        v = model.model.layers[0].self_attn.v_proj.base  # (q does not matter to a one-token step)
        original = v.weight
        v.weight = torch.nn.Parameter(original * 2, requires_grad=False)  # replaced, not changed in place
        replaced = model(input_ids=ids).logits.float()
        with kernel.disabled():
            replaced_plain = model(input_ids=ids).logits.float()
        v.weight = original
    result[str(dtype)] = {{"diff": (fused - plain).abs().max().item(), "scale": plain.abs().max().item(),
                          "calls": first, "again": (again - fused).abs().max().item(),
                          "graph_calls": after_graphs[len(first) * 2:],
                          "graph_diff": (as_graphs - plain).abs().max().item(),
                          "experts_matter": (plain - shared_only).abs().max().item(),
                          "hook_calls": len(seen), "hooked_diff": (hooked - plain).abs().max().item(),
                          "replaced_diff": (replaced - replaced_plain).abs().max().item(),
                          "replacing_matters": (replaced_plain - plain).abs().max().item()}}
print(json.dumps(result))
"""

CHECKED_ATTENTION = """
import itertools, json, sys, torch
sys.path.insert(0, {tests!r})
import adaplex.kernels.checked_attention as checked
from adaplex.faults.bits import flip_bit
from adaplex.faults.experiment import logits_of
from adaplex.faults.hook import DetectorConfig, detections_of
from adaplex.faults.session import armed
import tiny
from adaplex.faults import qkv
def rotate(x, cos, sin):  # (B, H, T, D): x·cos + rotate_half(x)·sin, as rotary embeddings do
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]
def recorded(heads, weights=None):  # (B, H, T, D) as the projection's (B, T, H·D) output
    return qkv.Recorded(heads.transpose(1, 2).flatten(2), weights, 2)
direct = {{}}  # the kernel alone against SDPA: head dims with and without padding, cached keys, GQA, rotary
for dim in (16, 24):
    for causal, keys in ((True, 9), (False, 5)):
        gen = torch.Generator().manual_seed(dim + keys)
        angles = torch.rand(1, 5, dim // 2, generator=gen).repeat(1, 1, 2) * 6
        cos, sin = angles.cos(), angles.sin()
        q, k_new, v_new = torch.randn(2, 4, 5, dim, generator=gen), *torch.randn(2, 2, 2, 5, dim, generator=gen)
        cached_k, cached_v = (torch.randn(2, 2, keys - 5, dim, generator=gen) for _ in "kv")
        k, v = torch.cat([cached_k, rotate(k_new, cos, sin)], 2), torch.cat([cached_v, v_new], 2)
        weights = qkv.rotated_sum_weights(cos, sin)
        sources = {{"q": recorded(q, weights), "k": recorded(k_new, weights), "v": recorded(v_new)}}
        mask = torch.ones(5, keys, dtype=torch.bool).tril(keys - 5) if causal else None
        expected = torch.nn.functional.scaled_dot_product_attention(
            rotate(q, cos, sin), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask, scale=dim**-0.5
        ).transpose(1, 2)
        excess = {{}}
        for folded in (False, True):
            out, found = checked.checked_attention(
                rotate(q, cos, sin), k, v, dim**-0.5, causal, (True, True, True), sources, folded=folded
            )
            diff = (out - expected).abs().max().item()
            excess[folded] = found.excess()
            case = f"{{dim}}-{{int(causal)}}-{{int(folded)}}"
            direct[case] = [diff, found.peak().max().item(), sorted(excess[folded])]
        # the same checks either way; the hull (output_bound's slack and abft's) is the keys' each program saw
        agree = [name for name in excess[False] if causal and name in ("abft_output", "output_bound")
                 or torch.allclose(excess[False][name], excess[True][name], rtol=1e-5, atol=1e-6)]
        direct[f"{{dim}}-{{int(causal)}}-agree"] = sorted(agree)
result = {{}}
calls = []
launch = checked.checked_attention
checked.checked_attention = lambda *a, **k: calls.append(1) or launch(*a, **k)
fold_work = checked.FOLD_WORK  # tiny models fold; 0: none does
for family in ("llama", "qwen3", "gpt2", "bert"):  # qwen3: q and k recorded after a per-head norm
    model = tiny.FAMILIES[family]()
    for checked.FOLD_WORK in (fold_work, 0):
        worst, found = 0.0, []
        for seed in range(3):
            inputs = {{"input_ids": tiny.tokens(batch=2, length=12, seed=seed)}}
            plain = logits_of(model, inputs)
            with armed(model, None, DetectorConfig(fused=True)) as hooks:
                checked_logits = logits_of(model, inputs)
            worst = max(worst, (checked_logits - plain).abs().max().item())
            found += [d.detector for h in hooks for d in h.detections]
        result[f"{{family}}-{{int(checked.FOLD_WORK > 0)}}"] = {{"max_diff": worst, "false_positives": found}}
checked.FOLD_WORK = fold_work
kernel_calls = len(calls)
from transformers import LlamaConfig, LlamaForCausalLM  # heads above MAX_HEAD_DIM keep the padded path
wide = LlamaForCausalLM(LlamaConfig(**{{**tiny.LLAMA_LIKE, "head_dim": 2 * checked.MAX_HEAD_DIM}})).eval()
inputs = {{"input_ids": tiny.tokens(batch=1, length=6)}}
with armed(wide, None, DetectorConfig(fused=True)) as hooks:
    logits_of(wide, inputs)
result["wide_heads"] = {{"kernel_calls": len(calls) - kernel_calls, "detections": len(detections_of(hooks))}}
model = tiny.llama()  # q, k or v corrupted between its projection and the attention kernel, folded or not
qkv_flips = [("q", 0, 30), ("k", 1, 30), ("v", 2, 29)]
for (location, index, bit), checked.FOLD_WORK in itertools.product(qkv_flips, (0, fold_work)):
    def faulty(query, key, value, *args, location=location, index=index, bit=bit, **options):
        tensors = dict(q=query, k=key, v=value)
        if not faulty.done:  # layer 0 only: sample 0, head index % heads, token 3, feature 2
            t = tensors[location]
            flat = torch.arange(t.numel()).view(t.shape)[0, index % t.shape[1], 3, 2].reshape(1)
            tensors[location] = flip_bit(t, flat, bit).view_as(t)
            faulty.done = True
        return launch(tensors["q"], tensors["k"], tensors["v"], *args, **options)
    faulty.done = False
    checked.checked_attention = faulty
    with armed(model, None, DetectorConfig(fused=True)) as hooks:
        logits_of(model, {{"input_ids": tiny.tokens(batch=1, length=6)}})
    result[f"{{location}}-{{int(checked.FOLD_WORK > 0)}}"] = [
        [d.layer, d.head, d.detector, list(d.location)] for h in hooks for d in h.detections
    ]
checked.checked_attention = launch
checked.FOLD_WORK = 0  # the row pass's outputs corrupted: calls with a pass
row_pass = checked.row_pass
shift = torch.tensor([0.0, 4.0] + [0.0] * 14)  # added to V·1 in aux = [1, V·1, 0…]
def shrunk(key, value, checks, *args):  # the hull [-min; max] shrunk to a quarter
    aux = row_pass(key, value, checks, *args)
    checks.hull().mul_(0.25)
    return aux
corruptions = {{"abft_output": lambda *args: row_pass(*args) + shift, "output_bound": shrunk}}
for name, corrupt in corruptions.items():
    checked.row_pass = corrupt  # faulty checksum inputs
    with armed(model, None, DetectorConfig(fused=True)) as hooks:
        logits_of(model, {{"input_ids": tiny.tokens(batch=1, length=6)}})
    result[name] = sorted({{d.detector for h in hooks for d in h.detections}})
checked.row_pass = row_pass
flips = {{k: result.pop(k) for k in list(result) if not k.split("-")[0] in tiny.FAMILIES}}
found = {{"families": result, "kernel_calls": kernel_calls, "direct": direct}}
print(json.dumps({{**found, **flips}}))
"""


HALF_PRECISION_TOLERANCES = """
import json, torch
import adaplex.kernels.checked_attention as checked
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, t, 32, generator=gen).half() for h, t in ((2, 64), (1, 512), (1, 512)))
row_pass = checked.row_pass
def corrupted(column, change):  # aux = [1, V·1 (two parts), 0…] changed in one column
    def run(*args):
        aux = row_pass(*args).clone()
        aux[..., column] = change(aux[..., column].float()).to(aux.dtype)
        return aux
    return run
def shrunk(key, value, checks, *args):  # the hull shrunk to 0
    aux = row_pass(key, value, checks, *args)
    checks.hull().zero_()
    return aux
cases = {
    "clean": row_pass,
    "abft_output": corrupted(1, lambda c: c + 0.05 * v.abs().max()),  # V·1 off by 5% of max |V|
    "softmax": corrupted(0, lambda c: c * 1.02),  # P·1 off by 2%
    "output_bound": shrunk,
}
expected = torch.nn.functional.scaled_dot_product_attention(
    q.float(), k.float().expand(1, 2, 512, 32), v.float().expand(1, 2, 512, 32), scale=32**-0.5
).transpose(1, 2)
result = {}
for name, run in cases.items():
    checked.row_pass = run
    out, found = checked.checked_attention(q, k, v, 32**-0.5, False, (True, True, True), {}, folded=False)
    result[name] = {c: e.max().item() for c, e in found.excess().items()}
    result[name]["diff"] = (out.float() - expected).abs().max().item()
print(json.dumps(result))
"""


REUSED_BUFFERS = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import adaplex.kernels.checked_attention as checked
from adaplex.faults.bits import flip_bit
from adaplex.faults.experiment import logits_of
from adaplex.faults.hook import DetectorConfig, detections_of
from adaplex.faults.session import armed
import tiny
model = tiny.llama()
inputs = {{"input_ids": tiny.tokens(batch=2, length=6)}}
launch, flips, calls = checked.checked_attention, [], [0]
def faulty(query, key, value, *args, **options):  # k of layer 0 (sample 1, head 1, token 3) while flips holds one
    if flips and calls[0] % model.config.num_hidden_layers == 0:
        flat = torch.arange(key.numel()).view(key.shape)[1, 1, 3, 2].reshape(1)
        key = flip_bit(key, flat, 30).view_as(key)
    calls[0] += 1
    return launch(query, key, value, *args, **options)
checked.checked_attention = faulty
def forward():
    logits_of(model, inputs)
    return [h.kernel_checks.state.data_ptr() for h in hooks]
def found():
    return sorted({{(d.layer, d.detector) for d in detections_of(hooks)}})
result = {{}}
with armed(model, None, DetectorConfig(fused=True)) as hooks:
    first = forward(); result["clean"] = found()
    flips.append(1); faulty_run = forward(); result["flipped"] = found()
    flips.clear(); again = forward(); result["clean_again"] = found()
    result["reused"] = first == faulty_run == again
    flips.append(1); forward(); flips.clear()  # two forwards, their findings not yet resolved
    unresolved = forward(); result["two_forwards"] = found()
    result["fresh_while_unresolved"] = all(a != b for a, b in zip(again, unresolved))
print(json.dumps(result))
"""


def _interpreted(code: str) -> object:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_equals_batched_matmuls():
    errors = _interpreted(KERNEL_CHECK)
    assert len(errors) == 20
    for dtype, table, relative in errors:  # finite: no row past a sample's rank was read
        assert relative < (1e-6 if dtype == "torch.float32" else 5e-3), (dtype, table, relative)


def test_routed_model_with_the_kernel_equals_the_matmul_path():
    result = _interpreted(ROUTED_CHECK.format(tests=str(TESTS)))
    assert result["scale"] > 0.1
    assert result["max_diff"] < 1e-5


def test_siblings_share_one_launch_planned_once_per_route_and_equal_the_matmul_path():
    result = _interpreted(GROUPED_CHECK.format(tests=str(TESTS)))
    assert result["scale"] > 0.1
    assert result["max_diff"] < 1e-5
    assert result["launches"] == [3, 1, 2, 1] * 2  # per layer: q/k/v, o, gate/up, down
    assert result["plans"] == 4 * 2  # one per group; a later forward of the route reuses them
    assert result["again_diff"] == 0
    assert result["routes_differ"] > 0.01 and result["other_diff"] < 1e-5
    assert result["plans_after"] == 0  # the route ended and took its plans with it
    assert result["k_diff"] < 1e-6
    assert result["members"] == [2, 3]  # layer 0's k_proj left its group; layer 1's group is whole


def test_one_token_steps_take_the_two_launch_form_with_chunks_that_keep_the_partial_shrinks_at_most_1024():
    def chunk(batch: int, n_in: int, parts: int) -> int:
        return built_in_sizes(batch, 1, n_in, parts).block_k

    assert chunk(64, 4096, 3) == 1024  # an 8B layer's q/k/v: 768 partial shrinks
    assert chunk(64, 14336, 1) == 1024  # its down projection: 896
    assert chunk(64, 4096, 2) == chunk(64, 4096, 1) == chunk(8, 4096, 3) == 512  # gate/up, o, a small batch
    assert chunk(512, 14336, 1) == 2048  # at most four times the built-in chunk
    assert chunk(64, 576, 3) == 512  # a short input too (a graphed 135M step: 1.17x the base against 1.25x tiled)
    assert built_in_sizes(64, 4, 576, 3) == DECODE  # a few tokens a sample: the tile kernel
    assert built_in_sizes(64, 300, 4096, 1) == PREFILL


def test_one_token_steps_compute_their_base_linears_with_the_updates_in_the_form_their_runner_wants():
    step = torch.zeros(64, 1, 576)
    assert linear_sizes(step, 3) == LINEAR_DECODE  # eager on a short input: one launch a group
    long_step = torch.zeros(64, 1, 4096)  # eager on a long input: the linears and the shrinks, then the expand
    assert linear_sizes(long_step, 3) == GRAPH_LINEAR_LONG._replace(update=built_in_sizes(64, 1, 4096, 3))
    assert linear_sizes(torch.zeros(64, 2, 576), 3) is None  # more than one token a sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_sizes(step, 3) is None
    with graph_kernels():  # the linears and the shrinks, then the expand, with the update's built-in sizes
        assert linear_sizes(step, 3) == GRAPH_LINEAR_SHORT._replace(update=built_in_sizes(64, 1, 576, 3))
        for n_in, parts in ((4096, 3), (14336, 1)):
            found = linear_sizes(torch.zeros(64, 1, n_in), parts)
            assert found == GRAPH_LINEAR_LONG._replace(update=built_in_sizes(64, 1, n_in, parts))
        assert found.update.block_k == 1024 and GRAPH_LINEAR_LONG != GRAPH_LINEAR_SHORT
        assert linear_sizes(torch.zeros(64, 3, 576), 3) is None


@pytest.mark.parametrize("dependent", [False, True])
def test_only_the_two_launch_forms_launches_are_dependent_and_only_when_asked(dependent):
    def launch_options(tokens: int) -> list[set]:
        forms = ((torch.Size((4, 16, 576)), torch.Size((4, 16, 1024)), True, True),)
        plan = gathered_lora._plan(torch.Size((64, tokens, 576)), torch.bfloat16, forms, False, None, dependent)
        return [{(k, v) for k, v in constants if k in ("DEPENDENT", "launch_pdl")} for *_, constants in plan.launches]

    split = {("DEPENDENT", dependent), ("launch_pdl", dependent)}
    assert launch_options(1) == [split, split]  # shrink, expand
    assert launch_options(4) == [set()]  # the tile kernel: never dependent


def test_the_base_and_update_kernel_equals_float32_references():
    cases = _interpreted(LINEAR_KERNEL_CHECK.format())
    assert len(cases) == 2 * 2 * 2 * 3  # forms x dtypes x tables x parts
    for _, dtype, _, base_error, out_error in cases:
        tolerance = 1e-6 if dtype == "torch.float32" else 2e-3
        assert base_error < tolerance and out_error < tolerance, (dtype, base_error, out_error)


def test_a_one_token_step_computes_each_groups_bases_with_its_updates_in_one_launch_while_its_bases_hold():
    result = _interpreted(LINEAR_CHECK.format(tests=str(TESTS)))
    for dtype, tolerance in (("torch.float32", 1e-5), ("torch.float16", 2e-3)):
        case = result[dtype]
        groups = [3, 1, 2, 1] * 2  # per layer: q/k/v, o, gate/up, down
        assert case["calls"] == [[parts, 1] for parts in groups]  # one launch a group
        assert case["scale"] > 0.1 and case["experts_matter"] > 0.01
        assert case["diff"] < tolerance * case["scale"]  # against the base linears and the matmul path
        assert case["again"] == 0
        assert case["graph_calls"] == [[parts, 2] for parts in groups]  # the linears and the shrinks, the expand
        assert case["graph_diff"] < tolerance * case["scale"]
        # a hook added, or a weight replaced, while the route's plans are kept: seen by the next step
        assert case["hook_calls"] == 1 and case["hooked_diff"] < tolerance * case["scale"]
        assert case["replacing_matters"] > 0.01 and case["replaced_diff"] < tolerance * case["scale"]


def test_only_plain_linears_outside_autocast_give_their_weights_to_the_base_and_update_kernel():
    model = tiny.llama()
    adaplex.attach(model, "experts", ExpertsConfig(keys=("a", "b"), r=4, targets=("all-linear",)))
    members = model.model.layers[0].self_attn.q_proj.group.members  # q, k, v
    step, prefill = torch.zeros(2, 1, 32), torch.zeros(2, 3, 32)
    assert [w.data_ptr() for w in _linear_weights(members, step)] == [m.base.weight.data_ptr() for m in members]
    assert _linear_weights(members, prefill) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _linear_weights(members, step) is None
    with graph_kernels():  # the linears-and-shrinks launch takes them on short inputs
        assert [w.data_ptr() for w in _linear_weights(members, step)] == [m.base.weight.data_ptr() for m in members]
    hook = members[1].base.register_forward_hook(lambda *_: None)
    assert _linear_weights(members, step) is None
    hook.remove()
    assert _linear_weights(members, step.half()) is None  # weights of another dtype


def test_a_bound_add_refuses_inputs_of_another_shape_or_dtype():
    x, rows = torch.zeros(2, 1, 32), torch.zeros(2, dtype=torch.long)
    add = GroupedLoRAAdd(x, [(torch.zeros(3, 4, 32), torch.zeros(3, 4, 16), None, None)], rows)
    for other in (torch.zeros(2, 2, 32), torch.zeros(2, 1, 32, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"bound for inputs \(2, 1, 32\) torch.float32"):
            add(other, [torch.zeros(*other.shape[:2], 16, dtype=other.dtype)])


def test_checked_attention_kernel_matches_sdpa_and_catches_corrupted_qkv():
    """With a row pass and folded (the attention kernel computing V's summary and hull and checking k
    and v itself): outputs equal SDPA's, clean calls pass, and the checks compute the same excess."""
    result = _interpreted(CHECKED_ATTENTION.format(tests=str(TESTS)))
    direct = {case: found for case, found in result["direct"].items() if not case.endswith("agree")}
    assert len(direct) == 8
    for case, (diff, peak, checks) in direct.items():
        assert diff < 1e-5 and peak <= 0, case
        assert checks == ["abft_output", "output_bound", "qkv_k", "qkv_q", "qkv_v", "softmax"], case
    for case, agree in result["direct"].items():
        if case.endswith("agree"):
            assert agree == ["abft_output", "output_bound", "qkv_k", "qkv_q", "qkv_v", "softmax"], case
    assert result["kernel_calls"] == 4 * 2 * 3 * 2  # families x modes x seeds x layers: every call ran the kernel
    assert len(result["families"]) == 8
    for family, found in result["families"].items():
        assert found["max_diff"] < 1e-5, family
        assert found["false_positives"] == [], family
    for folded in "01":
        assert [0, 0, "qkv_q", [0, 3]] in result[f"q-{folded}"]
        assert [0, 1, "qkv_k", [0, 3]] in result[f"k-{folded}"]
        assert [0, 0, "qkv_v", [0, 3]] in result[f"v-{folded}"]
    assert result["abft_output"] == ["abft_output"]  # checksums that disagree with V·1
    assert result["output_bound"] == ["output_bound"]  # a hull that does not hold the output
    assert result["wide_heads"] == {"kernel_calls": 0, "detections": 0}


def test_checked_attention_tolerances_in_float16_are_tight_enough_to_catch_small_errors():
    """512 keys in float16: a clean call passes every check, and each corruption is caught by its own
    check. The former bounds, which assumed every sum rounded in float16, were 4·(S + D)·eps·D·max|V|
    (68·max|V| here, beyond any |O·1|) and 4·S·eps (2 for P·1 / l): they missed all three."""
    result = _interpreted(HALF_PRECISION_TOLERANCES)
    clean = result.pop("clean")
    assert clean["diff"] < 2e-3
    assert max(clean[c] for c in ("abft_output", "softmax", "output_bound")) <= 0
    for check in ("abft_output", "softmax", "output_bound"):
        assert result[check][check] > 0, check
        others = [c for c in ("softmax", "output_bound") if c != check]  # (a hull of 0 also zeroes abft's slack)
        assert all(result[check][c] <= 0 for c in others), (check, result[check])


def test_a_monitored_layer_reuses_its_buffers_once_its_findings_are_resolved():
    """Armed once, forward after forward: each layer's kernel writes the buffers of its last call when
    that call's findings were resolved, and fresh ones while they are pending, so a flip is reported
    in the forward it happened in, never lost or repeated."""
    result = _interpreted(REUSED_BUFFERS.format(tests=str(TESTS)))
    assert result["clean"] == [] and result["clean_again"] == []
    assert result["flipped"] == [[0, "qkv_k"]]
    assert result["reused"]
    assert [0, "qkv_k"] in result["two_forwards"]  # the first forward's flip, read after the second
    assert result["fresh_while_unresolved"]


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("tiles", [None, (128, 32, 8, 3, 96)])
def test_a_plan_launches_each_kernel_with_its_own_tiles(folded, tiles):
    """The attention kernel gets the chosen tiles (the built-in ones, or those asked for) and the row
    pass its own: neither's warps may leak into the other's launch."""
    recorded = ((2, True), (2, True), (2, False))
    plan = checked_attention._plan(
        torch.Size((2, 9, 64, 64)), torch.Size((2, 3, 64, 64)), torch.bfloat16, torch.device("cpu"), 0.125, True,
        (True, True, True), recorded, tiles, folded,
    )  # fmt: skip
    block_m, block_n, warps, stages, registers = tiles or (
        checked_attention.FOLDED_TILES if folded else checked_attention.CHECKED_TILES
    )
    constants = dict(plan.attention.constants)
    assert (constants["BLOCK_M"], constants["BLOCK_N"], constants["num_warps"], constants["num_stages"]) == (
        block_m, block_n, warps, stages,
    )  # fmt: skip
    assert constants.get("maxnreg") == registers and constants["FOLDED"] == folded
    assert plan.attention.grid == (-(-64 // block_m), 2 * 9)
    if folded:
        assert plan.row_pass is None and plan.layout.programs == plan.attention.grid[0] * plan.attention.grid[1]
    else:
        assert (
            dict(plan.row_pass.constants)["num_warps"] == checked_attention.PASS_TILES[1] and plan.layout.programs == 0
        )
