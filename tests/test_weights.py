"""The weight channel: every weight kind resolved at the site, on every method, at batch > 1, in
float32 and bfloat16; routing with unrouted="base", prefixes and several banks; given per-sample
LoRAs; gates at their hook points."""

from __future__ import annotations

import pytest
import torch

import adaplex
from adaplex import BottleneckConfig, LoRAConfig, MoSLoRAConfig, PrefixConfig
from adaplex.compose.route import route
from adaplex.core.inject import wrappers
from adaplex.core.weights import Gated, PerSample, Routed
from adaplex.errors import AdapterNameError
from adaplex.methods import ExpertsConfig, GivenLoRAConfig
from adaplex.methods.experts import ExpertBank
from adaplex.methods.lora import per_sample_lora

import tiny
from helpers import randomize

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def same(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=0)


def routed_model(dtype: torch.dtype, shared: adaplex.MethodConfig | None = None, banks: int = 1):
    """A tiny Llama with a 'shared' adapter and ``banks`` banks: bank i holds keys k{i}a, k{i}b."""
    model = tiny.llama()
    handle = adaplex.attach(model, "shared", shared or LoRAConfig(r=2, targets=("q", "v", "up")))
    for i in range(banks):
        handle.add(f"bank{i}", ExpertsConfig(keys=(f"k{i}a", f"k{i}b"), r=4, targets=("q", "v", "up")))
        randomize(handle, f"bank{i}", seed=10 + i)
    randomize(handle, "shared", seed=1)
    return model.to(dtype), handle


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unrouted", ["shared", "base"])
def test_routed_mixed_batch_equals_each_sample_alone(dtype, unrouted):
    model, handle = routed_model(dtype)
    keys = ["k0b", None, "k0a", "k0b"]
    ids = tiny.tokens(batch=len(keys))
    with route(handle, keys, unrouted=unrouted):
        together = tiny.outputs(model, ids)
    assert together.dtype == dtype
    for b, key in enumerate(keys):
        with route(handle, [key], unrouted=unrouted):
            same(together[b : b + 1], tiny.outputs(model, ids[b : b + 1]), dtype)
    with handle.disable():
        base = tiny.outputs(model, ids[1:2])
    with handle.only("shared"):
        shared_only = tiny.outputs(model, ids[1:2])
    same(together[1:2], base if unrouted == "base" else shared_only, dtype)
    assert not torch.equal(base, shared_only)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [2, 3])  # 2 = the model's K/V heads, where a broadcasting bug stays silent
def test_unrouted_base_with_a_prefix_adapter(dtype, batch):
    model, handle = routed_model(dtype, shared=PrefixConfig(length=3))
    keys = ["k0a", None, "k0b"][:batch]
    ids = tiny.tokens(batch=batch)
    with route(handle, keys, unrouted="base"):
        together = tiny.outputs(model, ids)
    with handle.disable():
        base = tiny.outputs(model, ids)
    for b, key in enumerate(keys):
        if key is None:
            same(together[b : b + 1], base[b : b + 1], dtype)
            continue
        with route(handle, [key]):  # shared prefix + expert
            same(together[b : b + 1], tiny.outputs(model, ids[b : b + 1]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_banks_keep_the_shared_adapter_for_keys_of_either_bank(dtype):
    model, handle = routed_model(dtype, banks=2)
    keys = ["k1a", "k0b", None, "k1b"]
    ids = tiny.tokens(batch=len(keys))
    with route(handle, keys, unrouted="base"):
        together = tiny.outputs(model, ids)
    for b, key in enumerate(keys):
        bank = None if key is None else f"bank{key[1]}"
        with handle.only(*(["shared", bank] if bank else [])), route(handle, [key]):
            same(together[b : b + 1], tiny.outputs(model, ids[b : b + 1]), dtype)
    with handle.only("bank1"), route(handle, ["k1a"]):  # the expert alone differs: shared is in the batch
        assert not torch.allclose(tiny.outputs(model, ids[:1]).float(), together[:1].float(), atol=1e-3)


METHODS = {
    "lora": LoRAConfig(r=4, targets=("q", "v", "down")),
    "moslora": MoSLoRAConfig(r=4, targets=("q", "o"), mixer_init="orthogonal"),
    "bottleneck": BottleneckConfig(width=8),
    "prefix": PrefixConfig(length=3),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", [*METHODS, "experts"])
def test_per_sample_scale_equals_each_sample_at_its_constant_weight(dtype, method):
    model = tiny.llama()
    config = ExpertsConfig(keys=("x", "y"), r=4, targets=("q", "up")) if method == "experts" else METHODS[method]
    handle = adaplex.attach(model, "a", config)
    randomize(handle, "a", seed=4)
    model.to(dtype)
    scales = [0.5, 0.0, 2.0]
    ids = tiny.tokens(batch=3)
    per_sample = torch.tensor(scales)
    kind = Routed(torch.tensor([1, 0, 1]), per_sample) if method == "experts" else PerSample(per_sample)
    with handle.stack.overriding({"a": kind}):
        together = tiny.outputs(model, ids)
    for b, scale in enumerate(scales):
        alone = Routed(torch.tensor([[1, 0, 1][b]])) if method == "experts" else None
        with handle.stack.weighted(a=scale), handle.stack.overriding({"a": alone} if alone else {}):
            same(together[b : b + 1], tiny.outputs(model, ids[b : b + 1]), dtype)


def given_model(family: str, dtype: torch.dtype, targets: tuple[str, ...]):
    model = tiny.FAMILIES[family]()
    handle = adaplex.attach(model, "gen", GivenLoRAConfig(r=4, alpha=8, targets=targets))
    return model.to(dtype), handle


def random_loras(handle, count: int, r: int = 4) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``count`` random LoRAs as site -> (A (r, in), B (out, r))."""
    gen = torch.Generator().manual_seed(7)
    loras = [{} for _ in range(count)]
    for site, slot in handle.sites("gen").items():
        _, n_in, n_out = slot.shape
        for lora in loras:
            lora[site] = (torch.randn(r, n_in, generator=gen) * 0.2, torch.randn(n_out, r, generator=gen) * 0.2)
    return loras


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("family", "targets"), [("llama", ("q", "v", "down")), ("gpt2", ("q", "v", "o")), ("bert", ("q", "k", "up"))]
)
def test_given_per_sample_loras_equal_each_lora_applied_alone(family, targets, dtype):
    model, handle = given_model(family, dtype, targets)
    loras = random_loras(handle, 3)
    stacked = {
        site: tuple(torch.stack([lora[site][i] for lora in loras]).to(dtype) for i in (0, 1)) for site in loras[0]
    }
    ids = tiny.tokens(batch=3)
    with handle.given("gen", stacked):
        together = tiny.outputs(model, ids)
    assert together.dtype == dtype
    reference = tiny.FAMILIES[family]()
    plain = adaplex.attach(reference, "plain", LoRAConfig(r=4, alpha=8, targets=targets))
    reference.to(dtype)
    for b, lora in enumerate(loras):
        with torch.no_grad():
            for site, module in plain.sites("plain").items():
                module.A.copy_(lora[site][0])
                module.B.copy_(lora[site][1])
        same(together[b : b + 1], tiny.outputs(reference, ids[b : b + 1]), dtype)
    with handle.disable():
        assert not torch.allclose(tiny.outputs(model, ids).float(), together.float(), atol=1e-3)


def test_given_weights_are_checked():
    model, handle = given_model("llama", torch.float32, ("q", "v"))
    lora = random_loras(handle, 1)[0]
    good = {site: (a.unsqueeze(0), b.unsqueeze(0)) for site, (a, b) in lora.items()}
    ids = tiny.tokens(batch=1)
    with pytest.raises(AdapterNameError, match="needs each sample's A and B"):
        tiny.outputs(model, ids)
    with (
        pytest.raises(AdapterNameError, match="does not target"),
        handle.given("gen", {**good, "nowhere": good["model.layers.0.self_attn.q_proj"]}),
    ):
        pass
    missing = dict(list(good.items())[1:])
    with pytest.raises(AdapterNameError, match="no given weights for site 'model.layers.0.self_attn.q_proj'"):
        with handle.given("gen", missing):
            tiny.outputs(model, ids)
    wrong = {
        **good,
        "model.layers.0.self_attn.q_proj": (
            good["model.layers.0.self_attn.v_proj"][0].mT,
            good["model.layers.0.self_attn.q_proj"][1],
        ),
    }
    with pytest.raises(AdapterNameError, match="expected"):
        with handle.given("gen", wrong):
            tiny.outputs(model, ids)
    plain = adaplex.attach(model, "plain", LoRAConfig(r=2))
    with pytest.raises(AdapterNameError, match="per-sample weights go to a given-lora adapter"):
        plain.given("plain", good)


class ConstantGate:
    """A hand-written gate: c everywhere, recording the hidden states it was given per site."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.seen: dict[str, torch.Tensor] = {}

    def __call__(self, site: str, hidden: torch.Tensor) -> torch.Tensor:
        self.seen[site] = hidden
        return torch.full((*hidden.shape[:2], 1), self.value, dtype=hidden.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_constant_gate_at_each_hook_point_equals_that_stack_weight(dtype):
    model = tiny.llama()
    handle = adaplex.attach(model, "lora", LoRAConfig(r=4, targets=("q", "v")))
    handle.add("prefix", PrefixConfig(length=3))
    handle.add("bottleneck", BottleneckConfig(width=8))
    for name in handle.configs:
        randomize(handle, name, seed=5)
    model.to(dtype)
    ids = tiny.tokens(batch=2)
    gates = {"lora": ConstantGate(0.3), "prefix": ConstantGate(0.6), "bottleneck": ConstantGate(1.7)}
    kinds = {
        "lora": Gated(gates["lora"]),  # the attention input, as q and v see it
        "prefix": Gated(gates["prefix"]),  # the attention input, for the prefix share of attention
        "bottleneck": Gated(gates["bottleneck"], source="output"),  # the FFN output
    }
    ffn_out = {}
    down = model.model.layers[0].mlp.down_proj.base
    hook = down.register_forward_hook(lambda module, args, out: ffn_out.update(out=out))
    with handle.stack.overriding(kinds):
        gated = tiny.outputs(model, ids)
    hook.remove()
    with handle.stack.weighted(lora=0.3, prefix=0.6, bottleneck=1.7):
        same(gated, tiny.outputs(model, ids), dtype)
    with handle.stack.weighted(lora=0.3, prefix=0.6, bottleneck=1.0):  # the gates did act
        assert not torch.allclose(tiny.outputs(model, ids).float(), gated.float(), atol=1e-3)
    layer = "model.layers.0"
    attention_input = gates["lora"].seen[f"{layer}.self_attn.q_proj"]
    assert gates["lora"].seen[f"{layer}.self_attn.v_proj"] is attention_input
    assert torch.equal(gates["prefix"].seen[f"{layer}.self_attn"], attention_input)
    assert gates["bottleneck"].seen[f"{layer}.mlp.down_proj"] is ffn_out["out"]


def test_gate_from_the_output_needs_a_linear_site():
    model = tiny.llama()
    handle = adaplex.attach(model, "prefix", PrefixConfig(length=2))
    with pytest.raises(AdapterNameError, match="no base output to gate from"):
        with handle.stack.overriding({"prefix": Gated(ConstantGate(1.0), source="output")}):
            tiny.outputs(model, tiny.tokens())


def test_layers_know_their_site():
    model = tiny.gpt2()
    handle = adaplex.attach(model, "a", LoRAConfig(r=2, targets=("q", "v", "o")))
    assert {path: w.site for path, w in wrappers(model).items()} == {path: path for path in wrappers(model)}
    assert sorted(handle.sites("a"))[:3] == [
        "transformer.h.0.attn.c_attn.q",
        "transformer.h.0.attn.c_attn.v",
        "transformer.h.0.attn.c_proj",
    ]


def test_route_with_another_number_of_keys_than_samples():
    model, handle = routed_model(torch.float32)
    with pytest.raises(AdapterNameError, match="3 routing keys for a batch of 2 samples"):
        with route(handle, ["k0a", "k0b", None]):
            tiny.outputs(model, tiny.tokens(batch=2))
    with pytest.raises(AdapterNameError, match="1 weights for a batch of 2 samples"):
        with handle.stack.overriding({"shared": PerSample(torch.ones(1))}):
            tiny.outputs(model, tiny.tokens(batch=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_table_of_distinct_experts_equals_one_row_per_sample(dtype):
    """What the fused kernel reads (each distinct expert once, rows, gains, ranks) gives, through the
    batched matmuls, the same update as each sample's own folded expert (MoSLoRA mixers, mixed ranks)."""
    config = ExpertsConfig(keys=("a", "b", "c"), r=4, key_ranks={"b": 2}, key_alphas={"c": 3.0}, mixer_init="kaiming")
    bank = ExpertBank(12, 10, config)
    torch.nn.init.normal_(bank.B)
    index = torch.tensor([2, 1, -1, 2, 0])
    weight = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0])
    x, out = torch.randn(5, 3, 12, dtype=dtype), torch.randn(5, 3, 10, dtype=dtype)
    with torch.no_grad():
        per_row = bank.gather(index, weight, dtype)
        table = bank.gather(index, weight, dtype, Routed(index).selection())
        assert table.down.shape[0] == 3 and table.ranks.tolist() == [4, 2, 0, 4, 4]
        expected, got = per_sample_lora(out, x, per_row).float(), per_sample_lora(out, x, table).float()
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.1)
    assert not torch.allclose(got, out.float(), atol=1e-3)  # the update is not nothing
