"""A routed bundle from adapters that already exist (adaplex and PEFT LoRA directories)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import adaplex
from adaplex import LoRAConfig, MoSLoRAConfig
from adaplex.compose.route import route
from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.errors import StorageError
from adaplex.io.bundle import build_bundle
from adaplex.io.describe import describe
from adaplex.io.storage import load, save_adapter

import tiny
from cli_process import run_cli
from helpers import assert_same_state, randomize, snapshot


def peft_dir(directory, r: int, alpha: float, targets: list[str], seed: int):
    """A PEFT LoRA directory with random (non-zero) A and B, saved by PEFT itself."""
    model = get_peft_model(tiny.llama(), PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(directory)
    return directory


def adaplex_dir(directory, config, seed: int):
    handle = adaplex.attach(tiny.llama(), "a", config)
    randomize(handle, "a", seed=seed)
    return save_adapter(handle, "a", directory)


@pytest.fixture
def experts(tmp_path):
    """Three task adapters on q and v: two from PEFT (ranks 2 and 4, alphas 16 and 4), one adaplex LoRA."""
    return {
        "sql": peft_dir(tmp_path / "sql", 2, 16, ["q_proj", "v_proj"], seed=1),
        "poetry": peft_dir(tmp_path / "poetry", 4, 4, ["q_proj", "v_proj"], seed=2),
        "chat": adaplex_dir(tmp_path / "chat", LoRAConfig(r=3, alpha=6, targets=("q", "v")), seed=3),
    }


def test_routed_outputs_equal_each_adapter_alone_and_peft(experts, tmp_path):
    model = tiny.llama()
    before = snapshot(model)
    build_bundle(model, experts, tmp_path / "bundle")
    assert_same_state(before, model)
    assert Adapted.find(model) is None
    assert [m["member"] for m in describe(tmp_path / "bundle")["members"]] == [
        "experts/sql",
        "experts/poetry",
        "experts/chat",
    ]
    served = tiny.llama()
    handle = load(served, tmp_path / "bundle")
    keys = ["poetry", "chat", "sql", "poetry"]
    ids = tiny.tokens(batch=len(keys))
    with route(handle, keys):
        together = tiny.outputs(served, ids)
    for b, key in enumerate(keys):
        if key == "chat":
            alone = tiny.outputs(load(tiny.llama(), experts[key]).model, ids[b : b + 1])
        else:
            alone = tiny.outputs(PeftModel.from_pretrained(tiny.llama(), experts[key]).eval(), ids[b : b + 1])
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=0)


def test_a_shared_adapter_joins_every_key(experts, tmp_path):
    shared = adaplex_dir(tmp_path / "shared", MoSLoRAConfig(r=2, targets=("o", "up")), seed=4)
    experts.pop("chat")
    build_bundle(tiny.llama(), experts, tmp_path / "bundle", shared=shared, version="v1")
    info = describe(tmp_path / "bundle")
    assert [(m["member"], m["role"]) for m in info["members"]] == [
        ("shared", "shared"),
        ("experts/sql", "expert"),
        ("experts/poetry", "expert"),
    ]
    assert info["version"] == "v1" and info["base_fingerprint"]
    served = tiny.llama()
    handle = load(served, tmp_path / "bundle")
    ids = tiny.tokens(batch=2)
    with route(handle, ["sql", "poetry"]):
        together = tiny.outputs(served, ids)
    for b, key in enumerate(["sql", "poetry"]):
        stacked = tiny.llama()
        load(stacked, shared)
        load(stacked, experts[key])
        torch.testing.assert_close(together[b : b + 1], tiny.outputs(stacked, ids[b : b + 1]), atol=1e-5, rtol=0)


def test_experts_on_different_layers_are_refused_and_nothing_is_written(experts, tmp_path):
    experts["odd"] = adaplex_dir(tmp_path / "odd", LoRAConfig(r=2, targets=("q", "o")), seed=5)
    model = tiny.llama()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(
        StorageError, match=r"experts 'sql' and 'odd' adapt different sites \(model.layers.0.self_attn.o_proj"
    ):
        build_bundle(model, experts, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert [n for n, _ in model.named_modules()] == names
    with pytest.raises(StorageError, match="is a bottleneck adapter; an expert must be LoRA or MoSLoRA"):
        build_bundle(
            model, {"x": adaplex_dir(tmp_path / "b", adaplex.BottleneckConfig(width=4), seed=6)}, tmp_path / "b2"
        )
    mixed = {"sql": experts["sql"], "m": adaplex_dir(tmp_path / "m", MoSLoRAConfig(r=2, targets=("q", "v")), seed=7)}
    with pytest.raises(StorageError, match="has method='moslora' but expert 'sql' has 'lora'"):
        build_bundle(model, mixed, tmp_path / "bundle")


def test_bundle_command(experts, tmp_path):
    tiny.save_base("llama", tmp_path / "base")
    options = [f"--expert={k}={d}" for k, d in experts.items()]
    done = run_cli("bundle", *options, "--out", str(tmp_path / "bundle"), "--base", str(tmp_path / "base"))
    assert done.returncode == 0, done.stderr
    assert "keys sql, poetry, chat" in done.stdout
    model, _ = load_base(str(tmp_path / "base"))
    assert list(load(model, tmp_path / "bundle").banks()["experts"].keys) == ["sql", "poetry", "chat"]
    for args, message in [
        ([*options, "--out", str(tmp_path / "bundle")], "already exists"),
        (["--expert", "sql", "--out", str(tmp_path / "x")], "is not KEY=DIR"),
        (
            ["--expert", f"a={experts['sql']}", "--expert", f"a={experts['chat']}", "--out", str(tmp_path / "x")],
            "twice",
        ),
        (["--expert", f"a={tmp_path / 'missing'}", "--out", str(tmp_path / "x")], "missing"),
        (["--expert", f"a/b={experts['sql']}", "--out", str(tmp_path / "x")], "may hold only letters"),
    ]:
        result = run_cli("bundle", *args, "--base", str(tmp_path / "base"))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()
