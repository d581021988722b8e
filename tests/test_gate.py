"""UniPELT gates: a weight kind of the one forward path (compose.gate, methods.gate, core.gating)."""

from __future__ import annotations

import pytest
import torch

from adaplex import Adapted
from adaplex.compose.gate import UniPELTConfig, add_unipelt, forcing, reading, regularising
from adaplex.errors import AdaplexError, AdapterNameError, ConfigError
from adaplex.io.storage import load, save_bundle
from adaplex.methods import GateConfig, LoRAConfig

from helpers import randomize
from tiny import FAMILIES

DTYPES = [torch.float32, torch.bfloat16]
PARTS = ("lora", "prefix", "bottleneck")


def gated_model(family: str, dtype: torch.dtype, **config):
    model = FAMILIES[family]().to(dtype)
    handle = Adapted.of(model)
    names = add_unipelt(handle, "u", UniPELTConfig.model_validate(config))
    for i, name in enumerate(names):
        randomize(handle, name, std=0.2, seed=i)
    return model, handle, names


def output(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def ungated(handle, names):
    """Take the gate's kinds off its adapters (the gate stays in the model): they stack with constant
    weights. Returns the kinds, to put back."""
    kinds = {n: handle.stack.kinds[n] for n in names if n in handle.stack.kinds}
    for name in kinds:
        handle.stack.set_kind(name, None)
    return kinds


def regated(handle, kinds):
    for name, kind in kinds.items():
        handle.stack.set_kind(name, kind)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gates_forced_to_constants_equal_the_ungated_stack_with_those_weights(family, dtype):
    """Powers of two: the same arithmetic either way, so bitwise equal (batch 3, padding-free)."""
    model, handle, names = gated_model(family, dtype)
    ids = torch.randint(3, 90, (3, 9))
    values = {"lora": 0.5, "prefix": 0.25, "bottleneck": 2.0}
    with forcing(handle, "u-gate", **values):
        forced = output(model, ids)
    learned = output(model, ids)
    kinds = ungated(handle, names)
    with handle.stack.weighted(**{f"u-{k}": v for k, v in values.items()}):
        stacked = output(model, ids)
    with handle.stack.disable(*names):
        base = output(model, ids)
    regated(handle, kinds)
    assert torch.equal(forced, stacked)
    assert not torch.allclose(learned, stacked, atol=1e-3)  # the learned gates are not those constants
    assert not torch.allclose(stacked, base, atol=1e-3)  # and the adapters do something


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_gate_at_one_is_lora_prefix_and_bottleneck_stacked(dtype):
    model, handle, names = gated_model("llama", dtype)
    ids = torch.randint(3, 90, (2, 8))
    with forcing(handle, "u-gate", lora=1.0, prefix=1.0, bottleneck=1.0):
        forced = output(model, ids)
    ungated(handle, names)
    assert torch.equal(forced, output(model, ids))


def test_a_gate_computes_sigma_of_its_projection_from_the_hook_point():
    """The LoRA gate from the q/v input, the prefix gate its token mean, the bottleneck gate from the FFN output."""
    model, handle, names = gated_model("llama", torch.float32)
    captured = {}
    layer = model.model.layers[1]
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("attn_in", a[0])),
        layer.mlp.down_proj.base.register_forward_hook(lambda m, a, o: captured.__setitem__("ffn_out", o.clone())),
    ]
    ids = torch.randint(3, 90, (2, 6))
    with reading(handle) as readout:
        output(model, ids)
    for hook in hooks:
        hook.remove()
    gate = handle.adapters("u-gate")["model.layers.1.self_attn"]
    rows = {(r["layer"], r["submodule"]): r for r in readout.rows()}
    W, b = gate.proj.weight, gate.proj.bias
    lora = torch.sigmoid(captured["attn_in"] @ W[0] + b[0])
    bottleneck = torch.sigmoid(captured["ffn_out"] @ W[2] + b[2])
    assert rows[(1, "lora")]["mean"] == pytest.approx(lora.mean().item(), rel=1e-5)
    assert rows[(1, "lora")]["std"] == pytest.approx(lora.std(unbiased=False).item(), rel=1e-4)
    assert rows[(1, "bottleneck")]["mean"] == pytest.approx(bottleneck.mean().item(), rel=1e-5)
    assert rows[(1, "lora")]["tokens"] == 2 * 6  # q and v: one gate, computed once
    assert sum(rows[(1, "prefix")]["histogram"]) == 12


@pytest.mark.parametrize("subset", [("lora",), ("lora", "bottleneck"), ("prefix",), ("prefix", "bottleneck")])
def test_any_subset_of_submodules_can_be_gated(subset):
    config = {part: None for part in PARTS if part not in subset}
    model, handle, names = gated_model("bert", torch.float32, **config)
    assert names == [*(f"u-{p}" for p in subset), "u-gate"]
    assert handle.configs["u-gate"].gated == {p: f"u-{p}" for p in subset}
    ids = torch.randint(3, 90, (2, 5))
    with reading(handle) as readout:
        gated_out = output(model, ids)
    assert {r["submodule"] for r in readout.rows()} == set(subset)
    with forcing(handle, "u-gate", **dict.fromkeys(subset, 1.0)):
        forced = output(model, ids)
    assert not torch.allclose(gated_out, forced, atol=1e-4)


def test_softmax_gates_share_one_over_the_layer_and_follow_the_temperature():
    model, handle, names = gated_model("llama", torch.float32, gate={"variant": "softmax", "temperature": 0.5})
    ids = torch.randint(3, 90, (2, 6))
    seen, inputs = [], []

    def keep(layer, submodule, g):
        seen.append((layer, submodule, g.detach()))

    for gate in handle.adapters("u-gate").values():
        gate.tap = keep
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    output(model, ids)
    hook.remove()
    layer0 = {s: g for layer, s, g in seen if layer == "model.layers.0.self_attn"}
    total = layer0["lora"] + layer0["prefix"] + layer0["bottleneck"]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    gate = handle.adapters("u-gate")["model.layers.0.self_attn"]
    expected = torch.softmax(gate.proj(inputs[0]) / 0.5, dim=-1)[..., 2:3]
    assert torch.allclose(layer0["bottleneck"], expected, atol=1e-6)


def test_regularisation_terms_are_the_gates_l1_and_entropy():
    model, handle, names = gated_model("bert", torch.float32, gate={"l1": 0.1, "entropy": 0.01})
    ids = torch.randint(3, 90, (2, 5))
    with regularising(handle, "u-gate") as penalty:
        output(model, ids)
    values = dict(penalty.values)
    terms = penalty.terms()
    assert len(values) == 2 * 3  # two layers x three submodules
    means = torch.stack([g.mean() for g in values.values()])
    assert terms["l1"].item() == pytest.approx(means.mean().item(), rel=1e-6)
    p = torch.cat([g.flatten() for g in values.values()])
    binary = -(p * p.log() + (1 - p) * (1 - p).log())
    assert terms["entropy"].item() == pytest.approx(binary.mean().item(), rel=1e-4)  # equal-size gates
    terms["l1"].backward()
    gate = handle.adapters("u-gate")["encoder.layer.0.attention.self"]
    assert gate.proj.weight.grad is not None and gate.proj.weight.grad.abs().sum() > 0
    assert penalty.terms() == {}  # cleared


def test_frozen_gates_do_not_train_and_the_rest_does():
    model, handle, names = gated_model("bert", torch.float32, gate={"frozen": True})
    assert not any(p.requires_grad for p in handle.parameters("u-gate"))
    assert all(p.requires_grad for n in names[:3] for p in handle.parameters(n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_saved_gated_bundle_reloads_to_identical_outputs(tmp_path, dtype):
    model, handle, names = gated_model("llama", dtype)
    ids = torch.randint(3, 90, (3, 7))
    before = output(model, ids)
    save_bundle(handle, tmp_path / "b")
    fresh = FAMILIES["llama"]().to(dtype)
    loaded = load(fresh, tmp_path / "b")
    assert list(loaded.configs) == names
    assert torch.equal(output(fresh, ids), before)


def test_gated_adapters_refuse_merging_removal_and_a_second_gate():
    model, handle, names = gated_model("llama", torch.float32)
    with pytest.raises(AdapterNameError, match="gated by 'u-gate'"):
        handle.merge("u-lora")
    with pytest.raises(AdapterNameError, match="remove the gate first"):
        handle.remove("u-lora")
    with pytest.raises(AdapterNameError, match="gated by 'u-gate' already"):
        handle.add("g2", GateConfig(gated={"lora": "u-lora"}))
    handle.remove("u-gate")
    handle.merge("u-lora")  # ungated again: a plain LoRA
    handle.unmerge()


def test_bad_gate_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="enable at least one"):
        UniPELTConfig(lora=None, prefix=None, bottleneck=None)
    with pytest.raises(ValueError, match="always 1"):
        GateConfig(gated={"lora": "a"}, variant="softmax")
    with pytest.raises(ValueError, match="not gated"):
        GateConfig(gated={"lora": "a"}, forced={"prefix": 1.0})
    model = FAMILIES["llama"]()
    handle = Adapted.of(model)
    handle.add("l", LoRAConfig(targets=("q",)))
    with pytest.raises(AdapterNameError, match="a lora adapter"):
        handle.add("g", GateConfig(gated={"bottleneck": "l"}))
    with pytest.raises(AdapterNameError, match="unknown adapter"):
        handle.add("g", GateConfig(gated={"lora": "nope"}))
    with pytest.raises(ConfigError, match="always 1"):
        add_unipelt(handle, "u", UniPELTConfig(prefix=None, bottleneck=None, gate={"variant": "softmax"}))
    assert list(handle.configs) == ["l"]  # nothing half-added
    with pytest.raises(AdaplexError, match="no 'prefix' submodule"):
        add_unipelt(handle, "v", UniPELTConfig(prefix=None))
        with forcing(handle, "v-gate", prefix=1.0):
            pass


def test_gated_models_run_under_inference_mode():
    """Inference tensors have no version counter; a gate and a grouped site still tell inputs apart."""
    model, handle, names = gated_model("llama", torch.float32)
    ids = torch.randint(3, 90, (2, 6))
    with torch.no_grad():
        expected = output(model, ids)
    with torch.inference_mode():
        assert torch.equal(output(model, ids), expected)
