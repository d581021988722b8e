"""PEFT interop both ways, checked against real PEFT on Llama-style, GPT-2 and BERT tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import adaplex
from adaplex import LoRAConfig, MoSLoRAConfig
from adaplex.errors import StorageError
from adaplex.io.peft import export_peft
from adaplex.io.storage import load

import tiny
from helpers import randomize

FAMILIES = ["llama", "gpt2", "bert"]
PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}


def peft_logits(family: str, directory) -> torch.Tensor:
    return tiny.outputs(PeftModel.from_pretrained(tiny.FAMILIES[family](), directory).eval(), tiny.tokens())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "config",
    [LoRAConfig(r=4, alpha=8), LoRAConfig(r=4, rslora=True, targets=("q", "v")), MoSLoRAConfig(r=3)],
    ids=["lora", "rslora-qv", "moslora"],
)
def test_export_gives_peft_the_same_logits(family, config, tmp_path):
    model = tiny.FAMILIES[family]()
    handle = adaplex.attach(model, "a", config)
    randomize(handle, "a")
    export_peft(handle, ["a"], tmp_path / "peft")
    torch.testing.assert_close(
        peft_logits(family, tmp_path / "peft"), tiny.outputs(model, tiny.tokens()), atol=1e-5, rtol=0
    )


def test_plain_lora_exports_as_is(tmp_path):
    handle = adaplex.attach(tiny.llama(), "a", LoRAConfig(r=4, alpha=12, rslora=True, targets=("q", "v")))
    export_peft(handle, ["a"], tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 12, True)
    assert not config["rank_pattern"]


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_exports_combined_by_rank_concatenation(family, tmp_path):
    model = tiny.FAMILIES[family]()
    handle = adaplex.attach(model, "style", LoRAConfig(r=2, targets=("q", "v")))
    handle.add("instruct", MoSLoRAConfig(r=3, alpha=6, targets=("v", "o")))
    randomize(handle, "style", seed=1)
    randomize(handle, "instruct", seed=2)
    handle.stack.set_weight("style", 0.7)
    export_peft(handle, ["style", "instruct"], tmp_path / "combined", weights=handle.stack.weights)
    torch.testing.assert_close(
        peft_logits(family, tmp_path / "combined"), tiny.outputs(model, tiny.tokens()), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_import_from_peft_gives_the_same_logits(family, rslora, tmp_path):
    torch.manual_seed(0)
    peft_config = PeftLoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=rslora,
        target_modules=PEFT_TARGETS[family],
        rank_pattern={PEFT_TARGETS[family][0]: 2},
        alpha_pattern={PEFT_TARGETS[family][1]: 5},
    )
    peft_model = get_peft_model(tiny.FAMILIES[family](), peft_config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "checkpoint-531")
    expected = tiny.outputs(peft_model.eval(), tiny.tokens())
    ours = tiny.FAMILIES[family]()
    handle = load(ours, tmp_path / "checkpoint-531")
    assert list(handle.configs) == ["checkpoint-531"]
    torch.testing.assert_close(tiny.outputs(ours, tiny.tokens()), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "extra, message",
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"bias": "all"}, "bias")],
)
def test_import_refuses_what_adaplex_cannot_represent(extra, message, tmp_path):
    peft_model = get_peft_model(tiny.llama(), PeftLoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | extra))
    model = tiny.llama()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(StorageError, match=message):
        load(model, tmp_path / "p")
    assert [n for n, _ in model.named_modules()] == names


def test_bundle_export_then_import_round_trips(tmp_path):
    """adaplex -> PEFT -> adaplex keeps logits, for a GPT-2 q/k/v split MoSLoRA."""
    model = tiny.gpt2()
    handle = adaplex.attach(model, "a", MoSLoRAConfig(r=2, targets=("q", "k", "v", "o")))
    randomize(handle, "a")
    export_peft(handle, ["a"], tmp_path / "peft")
    back = tiny.gpt2()
    load(back, tmp_path / "peft")
    torch.testing.assert_close(tiny.outputs(back, tiny.tokens()), tiny.outputs(model, tiny.tokens()), atol=1e-5, rtol=0)
