"""The adapter engine: attach, stack, merge, detach on Llama-style, GPT-2 and BERT tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import adaplex
from adaplex import Adapted, BottleneckConfig, LoRAConfig, MoSLoRAConfig, PrefixConfig
from adaplex.core import stack as stack_module
from adaplex.core.layers import AdaptedLinear
from adaplex.core.stack import Stack
from adaplex.core.weights import Constant
from adaplex.errors import AdapterNameError, ConfigError, TargetError
from adaplex.methods import Adapter, method_config

import tiny
from helpers import assert_same_state, randomize, snapshot

FAMILIES = list(tiny.FAMILIES)
ZERO_INIT = [LoRAConfig(r=4), MoSLoRAConfig(r=4, mixer_init="orthogonal"), BottleneckConfig(width=8)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", ZERO_INIT, ids=lambda c: c.method)
def test_fresh_adapter_leaves_outputs_bitwise_equal(family, config):
    model, ids = tiny.FAMILIES[family](), tiny.tokens()
    reference = tiny.outputs(model, ids)
    adaplex.attach(model, "a", config)
    assert torch.equal(tiny.outputs(model, ids), reference)


@pytest.mark.parametrize("config", [LoRAConfig(r=4), BottleneckConfig(width=8)], ids=lambda c: c.method)
def test_a_no_grad_forward_under_autocast_equals_the_one_with_grad(config):
    """Without autograd an adapter adds into the base output in place, which autocast does not reach."""
    model, ids = tiny.llama(), tiny.tokens()
    handle = adaplex.attach(model, "a", config)
    randomize(handle, "a", seed=3)
    outputs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(model(input_ids=ids).logits.detach())
    assert outputs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_base_weights_unchanged_by_attach_train_step_and_detach(family):
    model, ids = tiny.FAMILIES[family](), tiny.tokens()
    before = snapshot(model)
    reference = tiny.outputs(model, ids)
    handle = adaplex.attach(model, "lora", LoRAConfig(r=4))
    handle.add("prefix", PrefixConfig(length=2))
    handle.add("bottleneck", BottleneckConfig(width=4))
    optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=0.1)
    model.train()
    out = model(input_ids=ids)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(tiny.outputs(model, ids), reference)  # the step changed the adapters
    handle.detach()
    assert_same_state(before, model)
    assert not any(isinstance(m, (Adapter, AdaptedLinear)) for m in model.modules())
    assert torch.equal(tiny.outputs(model, ids), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_adapter_parameters(family):
    model, ids = tiny.FAMILIES[family](), tiny.tokens()
    handle = adaplex.attach(model, "style", LoRAConfig(r=4))
    handle.add("instruct", MoSLoRAConfig(r=2, targets=("q", "v")))
    handle.add("prefix", PrefixConfig(length=2, reparam_hidden=8))
    handle.set_trainable("style", False)
    randomize(handle, "style")
    randomize(handle, "instruct")
    out = model(input_ids=ids)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).sum().backward()
    trainable = {id(p) for p in handle.parameters("instruct") + handle.parameters("prefix")}
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad == (id(p) in trainable), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "moslora"])
def test_merge_equals_unmerged_and_unmerge_restores_exactly(family, method):
    model, ids = tiny.FAMILIES[family](), tiny.tokens()
    before = snapshot(model)
    handle = adaplex.attach(model, "a", method_config({"method": method, "r": 4}))
    handle.add("b", LoRAConfig(r=2, targets=("q", "v"), rslora=True))
    randomize(handle, "a", seed=1)
    randomize(handle, "b", seed=2)
    handle.stack.set_weight("b", 0.5)
    unmerged = tiny.outputs(model, ids)
    handle.merge()
    torch.testing.assert_close(tiny.outputs(model, ids), unmerged, atol=1e-5, rtol=0)
    handle.unmerge()
    assert torch.equal(tiny.outputs(model, ids), unmerged)
    handle.detach()
    assert_same_state(before, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_is_plain_and_loads_without_adaplex(family, tmp_path):
    model, ids = tiny.FAMILIES[family](), tiny.tokens()
    handle = adaplex.attach(model, "a", MoSLoRAConfig(r=4))
    randomize(handle, "a")
    adapted = tiny.outputs(model, ids)
    merged = handle.merged_model()
    assert not any(isinstance(m, (Adapter, AdaptedLinear)) for m in merged.modules())
    merged.save_pretrained(tmp_path)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(tiny.outputs(reloaded, ids), adapted, atol=1e-5, rtol=0)
    assert torch.equal(tiny.outputs(model, ids), adapted)  # the adapted model itself is untouched


def test_merge_refuses_non_mergeable_adapters():
    model = tiny.llama()
    handle = adaplex.attach(model, "b", BottleneckConfig(width=4))
    with pytest.raises(AdapterNameError, match="cannot be merged"):
        handle.merge()
    with pytest.raises(AdapterNameError, match="cannot be merged"):
        handle.merged_model()


def test_gpt2_qkv_split_equals_one_lora_on_fused_c_attn():
    """LoRA on c_attn.q/k/v (ranks r each) equals one rank-3r LoRA on the fused c_attn whose
    A stacks the three A's and whose B is block-diagonal: the split changes no output."""
    model, ids = tiny.gpt2(), tiny.tokens()
    handle = adaplex.attach(model, "split", LoRAConfig(r=2, targets=("q", "k", "v")))
    randomize(handle, "split")
    split = tiny.outputs(model, ids)
    fused = {}
    for path, adapter in handle.adapters("split").items():
        parts = [adapter.parts[p] for p in "qkv"]
        fused[path] = (torch.cat([p.A for p in parts]), torch.block_diag(*[p.B for p in parts]), parts[0].scaling)
    handle.detach()
    hooks = [
        model.get_submodule(path).register_forward_hook(
            lambda m, inp, out, A=A, B=B, s=s: out + s * (inp[0] @ A.T @ B.T)
        )
        for path, (A, B, s) in fused.items()
    ]
    torch.testing.assert_close(tiny.outputs(model, ids), split, atol=1e-6, rtol=0)
    for hook in hooks:
        hook.remove()


def test_gpt2_targets_only_v_of_fused_projection():
    model = tiny.gpt2()
    handle = adaplex.attach(model, "v", LoRAConfig(r=2, targets=("v",)))
    randomize(handle, "v")
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(1, 3, 32)
    delta = layer(x) - layer.base(x)
    assert torch.equal(delta[..., :64], torch.zeros_like(delta[..., :64]))  # q and k untouched
    assert delta[..., 64:].abs().max() > 0


def test_stack_weights_scale_each_delta():
    model = tiny.llama()
    handle = adaplex.attach(model, "a", LoRAConfig(r=4, targets=("q", "v")))
    handle.add("b", LoRAConfig(r=4, targets=("o",)))
    randomize(handle, "a", seed=1)
    randomize(handle, "b", seed=2)
    handle.stack.set_weight("a", 2.0)
    with handle.only():
        base = model.model.layers[0].self_attn.q_proj(torch.ones(1, 32))
    with handle.only("a"):
        doubled = model.model.layers[0].self_attn.q_proj(torch.ones(1, 32))
        with handle.stack.weighted(a=1.0):
            single = model.model.layers[0].self_attn.q_proj(torch.ones(1, 32))
    torch.testing.assert_close(doubled - base, 2 * (single - base))


def test_context_managers_restore_state_even_when_the_body_raises():
    model, ids = tiny.llama(), tiny.tokens()
    handle = adaplex.attach(model, "a", LoRAConfig(r=4))
    handle.add("b", BottleneckConfig(width=4))
    randomize(handle, "a")
    randomize(handle, "b")
    both = tiny.outputs(model, ids)
    for manager in (handle.only("a"), handle.disable(), handle.disable("b"), handle.stack.weighted(a=3.0)):
        with pytest.raises(RuntimeError), manager:
            assert not torch.equal(tiny.outputs(model, ids), both)
            raise RuntimeError("boom")
        assert handle.stack.active == {"a": Constant(1.0), "b": Constant(1.0)}
        assert torch.equal(tiny.outputs(model, ids), both)
    with handle.disable():
        assert torch.equal(tiny.outputs(model, ids), tiny.outputs(tiny.llama(), ids))
        with handle.enable("b"):
            assert handle.stack.active == {"b": Constant(1.0)}


def test_unknown_adapter_names_are_errors():
    handle = adaplex.attach(tiny.llama(), "a", LoRAConfig(r=2))
    with pytest.raises(AdapterNameError, match="unknown adapter 'nope'; this model has: a"):
        with handle.only("nope"):
            pass
    with pytest.raises(AdapterNameError, match="already exists"):
        handle.add("a", LoRAConfig())
    with pytest.raises(AdapterNameError, match="may hold only"):
        handle.add("a.b", LoRAConfig())


def test_remove_unwraps_layers_it_alone_used():
    model, ids = tiny.llama(), tiny.tokens()
    reference = tiny.outputs(model, ids)
    handle = adaplex.attach(model, "a", LoRAConfig(r=2, targets=("q",)))
    handle.add("b", LoRAConfig(r=2, targets=("q", "v")))
    randomize(handle, "a")
    handle.remove("a")
    assert torch.equal(tiny.outputs(model, ids), reference)
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdaptedLinear)
    handle.remove("b")
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())


def test_parameter_report_counts_each_adapter():
    model = tiny.llama()  # hidden 32, intermediate 64, 2 layers, 2 kv heads of dim 8
    handle = adaplex.attach(model, "q", LoRAConfig(r=4, targets=("q",)))
    handle.add("p", PrefixConfig(length=3), trainable=False)
    rows = {r.name: r for r in handle.report()}
    assert rows["q"].parameters == 2 * 4 * (32 + 32)
    assert rows["q"].bytes == rows["q"].parameters * 4
    assert rows["p"].parameters == 2 * 2 * 2 * 3 * 8 and not rows["p"].trainable
    assert rows["q"].trainable


def test_only_adapter_parameters_are_trainable():
    model = tiny.llama()
    handle = adaplex.attach(model, "a", LoRAConfig(r=2))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in handle.parameters("a")}


def test_rslora_and_moslora_scaling():
    assert LoRAConfig(r=16, alpha=32).scaling == 2.0
    assert LoRAConfig(r=16, alpha=32, rslora=True).scaling == 8.0
    lora = adaplex.methods.LoRA(8, 8, MoSLoRAConfig(r=4, mixer_init="identity"))
    assert torch.equal(lora.mixer, torch.eye(4))


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown method 'dora'"):
        method_config({"method": "dora"})
    with pytest.raises(ConfigError, match="field 'rank'"):
        method_config({"method": "lora", "rank": 8})
    with pytest.raises(ConfigError, match="field 'r'"):
        method_config({"method": "lora", "r": "eight"})
    with pytest.raises(ConfigError, match="field 'r'"):
        method_config({"method": "lora", "r": 0})


def test_target_matching_nothing_lists_existing_modules():
    with pytest.raises(TargetError, match=r"'c_attn' matches no linear layer.*model\.layers\.\*\.self_attn\.q_proj"):
        adaplex.attach(tiny.llama(), "a", LoRAConfig(targets=("c_attn",)))
    with pytest.raises(TargetError, match="'gate' matches no"):
        adaplex.attach(tiny.gpt2(), "a", LoRAConfig(targets=("gate",)))


def test_targets_by_regex_and_last_name():
    handle = adaplex.attach(tiny.llama(), "a", LoRAConfig(targets=(r"model\.layers\.1\.mlp\..*", "q_proj")))
    assert sorted(handle.adapters("a")) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_failed_add_leaves_the_model_unchanged():
    model = tiny.llama()
    handle = adaplex.attach(model, "a", LoRAConfig(r=2, targets=("q",)))
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(TargetError):
        handle.add("b", LoRAConfig(targets=("v", "nothing_here")))
    assert [n for n, _ in model.named_modules()] == names
    assert list(handle.configs) == ["a"]


def test_unsupported_family_is_an_error():
    from transformers import T5Config, T5Model

    model = T5Model(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(TargetError, match="unsupported model family 't5'"):
        Adapted(model)


def test_detach_restores_attention_implementation():
    model = tiny.llama()
    before = model.config._attn_implementation
    handle = adaplex.attach(model, "p", PrefixConfig(length=2))
    assert model.config._attn_implementation == "adaplex"
    handle.detach()
    assert model.config._attn_implementation == before


def test_the_stack_memo_lasts_while_the_active_set_holds_and_stays_bounded(monkeypatch):
    stack = Stack()
    stack.add("a")
    stack.remember("plan", 1)
    with stack.weighted(a=0.5):  # another active set: nothing derived from the last one
        assert stack.memo == {}
        stack.remember("plan", 2)
    assert stack.memo == {}
    monkeypatch.setattr(stack_module, "MEMO_ENTRIES", 3)
    for step in range(4):
        stack.remember(("shape", step), step)
    assert stack.memo == {("shape", 3): 3}  # full at three: started afresh
