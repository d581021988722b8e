"""A 4-bit or 8-bit base (bitsandbytes, on its CPU backend here) takes LoRA, MoSLoRA and routed experts
like a 16-bit one: equal to PEFT's LoRA on the same quantized model, saved adapters load on the 16-bit
base (same fingerprint) and export to PEFT; a merge into it is refused; bad input is one clear error."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import adaplex
from adaplex import LoRAConfig, MoSLoRAConfig
from adaplex.compose.route import route
from adaplex.core import quantize
from adaplex.core.fingerprint import fingerprint
from adaplex.errors import AdapterNameError, ConfigError
from adaplex.io.peft import export_peft
from adaplex.io.records import read_adapter_record
from adaplex.io.storage import load, save_adapter
from adaplex.methods import ExpertsConfig
from adaplex.train.config import TrainConfig
from adaplex.train.run import train

import tiny
from helpers import randomize, snapshot

QUANTIZATIONS = ["4bit", "8bit"]


def llama() -> LlamaForCausalLM:
    """The tiny Llama twice as wide: bitsandbytes' CPU kernels want inputs of at least one 64-value block."""
    torch.manual_seed(0)
    wider = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
    return LlamaForCausalLM(LlamaConfig(**(tiny.LLAMA_LIKE | wider))).eval()


def quantized(how: str, base: torch.nn.Module | None = None) -> torch.nn.Module:
    return quantize.quantize_linears(copy.deepcopy(base or llama()), how, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("how", QUANTIZATIONS)
def test_linear_layers_but_the_output_layer_are_quantized_and_keep_the_16_bit_fingerprint(how):
    base = llama()
    model = quantized(how, base)
    layers = quantize.quantized_layers(model)
    assert len(layers) == 2 * 7 and "lm_head" not in layers
    assert model.model.layers[0].mlp.up_proj.weight.dtype in (torch.uint8, torch.int8)
    assert fingerprint(model) == fingerprint(base)
    ids = tiny.tokens()
    assert (tiny.outputs(model, ids) - tiny.outputs(base, ids)).abs().max() > 0  # quantized: not the same weights


@pytest.mark.parametrize("how", QUANTIZATIONS)
@pytest.mark.parametrize("config", [LoRAConfig(r=4, alpha=8), MoSLoRAConfig(r=4)], ids=["lora", "moslora"])
def test_adapters_on_a_quantized_base_equal_peft_there(how, config, tmp_path):
    # in train mode (this model has no dropout): in eval mode bitsandbytes' CPU backend repacks 4-bit
    # weights for other kernels on the first call, whose rounding differs from the training path's
    model = quantized(how).train()
    handle = adaplex.attach(copy.deepcopy(model), "a", config)
    randomize(handle, "a")
    export_peft(handle, ["a"], tmp_path / "peft")
    ids = tiny.tokens(batch=3)
    plain = tiny.outputs(model, ids)
    peft = PeftModel.from_pretrained(model, tmp_path / "peft").train()  # adapts ``model`` in place
    ours, theirs = tiny.outputs(handle.model, ids), tiny.outputs(peft, ids)
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("how", QUANTIZATIONS)
def test_routed_experts_on_a_quantized_base_equal_each_expert_alone(how):
    handle = adaplex.Adapted.of(quantized(how))
    handle.add("experts", ExpertsConfig(keys=("x", "y"), r=4))
    randomize(handle, "experts")
    ids = tiny.tokens(batch=2)
    with route(handle, ["x", "y"]):
        both = tiny.outputs(handle.model, ids)
    for row, key in enumerate("xy"):
        with route(handle, [key]):
            torch.testing.assert_close(both[row : row + 1], tiny.outputs(handle.model, ids[row : row + 1]))


def test_training_on_a_4bit_base_reaches_the_adapter_and_its_file_loads_on_the_16_bit_base(tmp_path):
    base = llama()
    handle = adaplex.attach(quantized("4bit", base), "a", LoRAConfig(r=4, alpha=8))
    handle.model.train()
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    ids = tiny.tokens(batch=4, length=12)
    losses = []
    for _ in range(6):
        loss = handle.model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    frozen = [p for p in handle.model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)  # the quantized base is not trained
    save_adapter(handle, "a", tmp_path / "a")
    plain = load(copy.deepcopy(base), tmp_path / "a").model  # the fingerprint check passes on the 16-bit base
    torch.testing.assert_close(
        dict(plain.named_parameters())["model.layers.0.self_attn.q_proj.adapters.a.B"],
        dict(handle.model.named_parameters())["model.layers.0.self_attn.q_proj.adapters.a.B"],
    )
    export_peft(adaplex.Adapted.of(plain), ["a"], tmp_path / "peft")  # and exports as any adapter does
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(tiny.outputs(peft, ids), tiny.outputs(plain, ids), atol=1e-5, rtol=1e-5)


def test_merge_into_a_quantized_base_is_refused_and_changes_nothing():
    handle = adaplex.attach(quantized("4bit"), "a", LoRAConfig(r=4))
    randomize(handle, "a")
    before = snapshot(handle.model)
    for merge in (lambda: handle.merge("a"), handle.merged_model):
        with pytest.raises(AdapterNameError, match="cannot merge into a quantized base.*load the base unquantized"):
            merge()
    assert handle.stack.active == {"a": handle.stack.active["a"]}
    after = handle.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_quantization_requests_are_one_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match="quantize '4-bit': choose none, 4bit or 8bit"):
        quantized("4-bit")
    with pytest.raises(ConfigError, match="Conv1D layers, which bitsandbytes cannot quantize"):
        quantized("4bit", tiny.gpt2())

    def no_backend(*args):
        raise RuntimeError("no kernel registered for device 'cpu'\nmore detail")

    monkeypatch.setattr(quantize, "_quantized", no_backend)
    with pytest.raises(ConfigError, match=r"cannot quantize on cpu here \(no kernel registered for device 'cpu'\)"):
        quantized("8bit")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails: not installed
    with pytest.raises(ConfigError, match="quantize needs bitsandbytes, which is not installed: pip install"):
        quantized("4bit")


def test_adaplex_train_on_a_4bit_base_saves_an_adapter_for_the_16_bit_base(tmp_path):
    base = llama()
    base.save_pretrained(tmp_path / "base")
    tiny.word_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "train.txt").write_text(" ".join(f"w{3 + i % 7}" for i in range(600)))
    config = TrainConfig.model_validate(
        {
            "base": str(tmp_path / "base"),
            "quantize": "4bit",
            "output": str(tmp_path / "run"),
            "adapters": [{"name": "style", "config": {"method": "lora", "r": 4, "alpha": 8}}],
            "data": {"train": [str(tmp_path / "train.txt")], "eval": [str(tmp_path / "train.txt")], "block_size": 16},
            "optim": {"lr": 5e-3, "warmup_steps": 1, "max_steps": 6},
            "eval": {"every_n_steps": 6, "max_batches": 2},
            "trainer": {"accelerator": "cpu", "checkpoint_every_n_steps": 6},
        }
    )
    adapter = train(config)
    assert read_adapter_record(adapter).base_fingerprint == fingerprint(base)
    handle = load(copy.deepcopy(base), adapter)  # the 16-bit base takes it
    assert any(p.abs().max() > 0 for n, p in handle.model.named_parameters() if n.endswith(".B"))
