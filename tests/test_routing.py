"""Routed experts: per-sample routing in one pass, bundles, three load modes, registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import adaplex
from adaplex import LoRAConfig
from adaplex.compose.registry import Registry, RegistryError, load_registry
from adaplex.compose.route import route
from adaplex.core.inject import wrappers
from adaplex.errors import AdapterNameError, ConfigError, StorageError
from adaplex.infer.batch import worker_device
from adaplex.io.describe import describe
from adaplex.io.storage import load, save_adapter, save_bundle
from adaplex.methods import ExpertsConfig

import tiny
from helpers import randomize

KEYS = ("v100", "a100", "i7")


def routed(family: str = "llama", mixer: str | None = None, key_ranks: dict | None = None):
    model = tiny.FAMILIES[family]()
    handle = adaplex.attach(model, "shared", LoRAConfig(r=2, alpha=16, targets=("q", "v", "up")))
    handle.add(
        "experts",
        ExpertsConfig(keys=KEYS, r=4, alpha=32, targets=("q", "v", "up"), mixer_init=mixer, key_ranks=key_ranks or {}),
    )
    randomize(handle, "shared", seed=1)
    randomize(handle, "experts", seed=2)
    return model, handle


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("mixer", [None, "orthogonal"])
def test_mixed_batch_equals_each_sample_alone(family, mixer):
    model, handle = routed(family, mixer, key_ranks={"i7": 2})
    keys = ["i7", "v100", None, "a100", "v100"]
    ids = tiny.tokens(batch=len(keys))
    with route(handle, keys):
        together = tiny.outputs(model, ids)
    for b, key in enumerate(keys):
        with route(handle, [key]):
            alone = tiny.outputs(model, ids[b : b + 1])
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=0)
    with handle.only("shared"):
        shared_only = tiny.outputs(model, ids[2:3])
    torch.testing.assert_close(together[2:3], shared_only, atol=1e-5, rtol=0)
    with route(handle, [None], unrouted="base"):
        torch.testing.assert_close(
            tiny.outputs(model, ids[2:3]), tiny.outputs(tiny.FAMILIES[family](), ids[2:3]), atol=1e-6, rtol=0
        )


def test_routed_gradients_reach_only_the_routed_experts():
    model, handle = routed()
    ids = tiny.tokens(batch=2)
    with route(handle, ["v100", "v100"]):
        model(input_ids=ids).logits.sum().backward()
    bank = handle.adapters("experts")["model.layers.0.self_attn.q_proj"]
    per_key = bank.A.grad.abs().sum(dim=(1, 2))
    assert per_key[0] > 0 and per_key[1] == 0 and per_key[2] == 0
    assert all(p.grad is not None for p in handle.parameters("shared"))


def test_bundle_on_disk_and_three_load_modes(tmp_path):
    model, handle = routed(key_ranks={"i7": 2})
    save_bundle(handle, tmp_path / "bundle", {"shared": "shared"}, roles={"shared": "shared"})
    info = describe(tmp_path / "bundle")
    assert [m["member"] for m in info["members"]] == ["shared", "experts/v100", "experts/a100", "experts/i7"]
    assert [m["role"] for m in info["members"]] == ["shared", "expert", "expert", "expert"]
    ids = tiny.tokens(batch=3)
    keys = ["a100", "i7", "v100"]
    with route(handle, keys):
        expected = tiny.outputs(model, ids)
    # (c) base + whole bundle, routed per sample
    whole = tiny.llama()
    loaded = load(whole, tmp_path / "bundle")
    with route(loaded, keys):
        torch.testing.assert_close(tiny.outputs(whole, ids), expected, atol=1e-5, rtol=0)
    for b, key in enumerate(keys):
        # (b) base + shared + one expert, as two plain adapters
        plain = tiny.llama()
        load(plain, tmp_path / "bundle" / "shared")
        two = load(plain, tmp_path / "bundle" / "experts" / key)
        torch.testing.assert_close(tiny.outputs(plain, ids[b : b + 1]), expected[b : b + 1], atol=1e-4, rtol=0)
        # (a) merged full model for one key
        merged = two.merged_model()
        torch.testing.assert_close(tiny.outputs(merged, ids[b : b + 1]), expected[b : b + 1], atol=1e-4, rtol=0)


def test_expert_that_does_not_fit_the_bundle_is_refused(tmp_path):
    model, handle = routed()
    save_bundle(handle, tmp_path / "bundle", {"shared": "shared"}, roles={"shared": "shared"})
    other = adaplex.attach(tiny.llama(), "odd", LoRAConfig(r=4, alpha=8, targets=("q", "v")))
    save_adapter(other, "odd", tmp_path / "odd")
    shutil.rmtree(tmp_path / "bundle" / "experts" / "i7")
    shutil.copytree(tmp_path / "odd", tmp_path / "bundle" / "experts" / "i7")
    fresh = tiny.llama()
    names = [n for n, _ in fresh.named_modules()]
    with pytest.raises(
        StorageError, match=r"expert 'i7' has targets=\('q', 'v'\) but expert 'v100' has \('q', 'v', 'up'\)"
    ):
        load(fresh, tmp_path / "bundle")
    assert [n for n, _ in fresh.named_modules()] == names


def test_unknown_key_is_an_error_and_banks_need_routes():
    model, handle = routed()
    with pytest.raises(AdapterNameError, match="unknown routing key 'h100'; known keys: a100, i7, v100"):
        with route(handle, ["h100"]):
            pass
    with pytest.raises(AdapterNameError, match="per-sample keys"):
        model(input_ids=tiny.tokens())


def test_registry_maps_free_form_targets(tmp_path, caplog):
    path = tmp_path / "registry.yaml"
    path.write_text(
        "default: i7\n"
        "keys:\n"
        "  v100: {keywords: ['-model=v100'], aliases: ['tesla-v100'], adapter: experts/v100}\n"
        "  a100: {keywords: ['-model=a100', 'sm_80']}\n"
        "  i7: {keywords: ['core-avx2']}\n"
    )
    registry = load_registry(path)
    assert registry.resolve("cuda -model=v100") == "v100"
    assert registry.resolve("llvm -mcpu=core-avx2") == "i7"
    assert registry.resolve("Tesla-V100") == "v100"
    assert registry.resolve(None) is None
    assert registry.keys["v100"].adapter == tmp_path / "experts" / "v100"
    with caplog.at_level("WARNING"):
        assert registry.resolve("riscv") == "i7"
    assert "matches no key" in caplog.text
    with pytest.raises(RegistryError, match="known keys: v100, a100, i7"):
        registry.resolve("riscv", strict=True)
    with pytest.raises(ValueError, match="belongs to both"):
        Registry.model_validate({"keys": {"a": {"keywords": ["x"]}, "b": {"keywords": ["X"]}}})
    path.write_text("keys:\n  a: {keywords: [x]}\n  b: {keywords: [x]}\n")
    with pytest.raises(ConfigError, match="belongs to both 'a' and 'b'"):
        load_registry(path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_key_exports_to_peft_with_equal_logits(family, tmp_path):
    from peft import PeftModel

    from adaplex.io.peft import export_key

    model, handle = routed(family, mixer="kaiming", key_ranks={"i7": 2})
    ids = tiny.tokens(batch=1)
    for key in KEYS:
        export_key(handle, key, tmp_path / key)
        with route(handle, [key]):
            expected = tiny.outputs(model, ids)
        peft_model = PeftModel.from_pretrained(tiny.FAMILIES[family](), tmp_path / key).eval()
        torch.testing.assert_close(tiny.outputs(peft_model, ids), expected, atol=1e-5, rtol=0)
    assert list(handle.configs) == ["shared", "experts"]  # the temporary plain expert is gone


def test_infer_with_workers_keeps_order_and_reports_a_crashed_shard(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from adaplex.core.models import load_base
    from adaplex.infer.generate import generate

    tiny.save_base("llama", tmp_path / "base")
    model, tokenizer = load_base(str(tmp_path / "base"))
    handle = adaplex.attach(model, "shared", LoRAConfig(r=2, targets=("q", "v")))
    handle.add("experts", ExpertsConfig(keys=KEYS, r=4, targets=("q", "v")))
    randomize(handle, "shared", seed=1, std=0.3)
    randomize(handle, "experts", seed=2, std=0.3)
    save_bundle(handle, tmp_path / "bundle", {"shared": "shared"}, roles={"shared": "shared"})
    (tmp_path / "registry.yaml").write_text(
        "default: i7\nkeys:\n  v100: {keywords: [-model=v100]}\n  a100: {}\n  i7: {}\n"
    )
    records = [
        {"target": "cuda -model=v100", "prompt": "w5 w6 w7"},
        {"key": "a100", "prompt": "w9 w10"},
        {"prompt": "w11 w12 w13"},
        {"key": "i7", "prompt": "w20"},
        {"target": "riscv", "prompt": "w30 w31"},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    command = [
        sys.executable,
        "-m",
        "adaplex",
        "infer",
        str(tmp_path / "in.jsonl"),
        str(tmp_path / "out.jsonl"),
        "--bundle",
        str(tmp_path / "bundle"),
        "--registry",
        str(tmp_path / "registry.yaml"),
        "--workers",
        "2",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in out] == [0, 1, 2, 3, 4]
    assert [r["key"] for r in out] == ["v100", "a100", None, "i7", "i7"]
    for r in out:
        with route(handle, [r["key"]]):
            assert r["completion"] == generate(handle, tokenizer, r["prompt"], max_new_tokens=4)
    crashed = subprocess.run(
        [*command[:5], str(tmp_path / "crash.jsonl"), *command[6:]],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"ADAPLEX_INFER_CRASH_SHARD": "1"},
    )
    assert crashed.returncode == 3
    assert "worker 1 crashed (exit code 3); records 3-5 have no completion" in crashed.stdout.replace("\n", " ")
    partial = [json.loads(line) for line in (tmp_path / "crash.jsonl").read_text().splitlines()]
    assert [r.get("completion") for r in partial[:2]] == [r["completion"] for r in out[:2]]
    assert all("crashed" in r["error"] for r in partial[2:])


def test_each_infer_worker_takes_its_own_gpu_where_there_are_several(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [worker_device("cuda", w) for w in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert [worker_device("cuda:2", w) for w in range(2)] == ["cuda:2", "cuda:2"]  # an explicit device: all there
    assert worker_device("cpu", 3) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [worker_device("cuda", w) for w in range(2)] == ["cuda", "cuda"]


def test_static_generation_equals_generate_for_a_routed_batch():
    """The static-cache decode loop that adaplex.core.graphs captures as CUDA graphs (run eagerly here;
    the captured replay is checked against it on CUDA by benchmarks/kernel_check.py)."""
    from adaplex.core.graphs import static_generate

    model, handle = routed("llama")
    ids = tiny.tokens(batch=3, length=7)
    with torch.no_grad(), route(handle, ["i7", None, "v100"]):
        ours = static_generate(model, ids, 6, graphed=False)
        reference = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, ids.shape[1] :]
    assert torch.equal(ours, reference)
    with torch.no_grad(), route(handle, ["a100", "a100", None]):  # another routing gives other tokens
        assert not torch.equal(static_generate(model, ids, 6, graphed=False), ours)
    with pytest.raises(ValueError, match="needs CUDA"):
        static_generate(model, ids, 6)  # graphed, on CPU tensors


def test_the_example_registry_loads_and_resolves():
    registry = load_registry(Path(__file__).parents[1] / "configs" / "registry.yaml")
    assert registry.resolve("nvcc -arch=sm_80") == "a100"
    assert registry.resolve("Tesla-V100") == "v100"
    assert registry.resolve("riscv64") == "i7"  # the default


def test_a_bank_larger_than_host_memory_is_refused_with_its_size(monkeypatch):
    model = tiny.llama()
    handle = adaplex.Adapted.of(model)
    config = ExpertsConfig(keys=("a", "b", "c"), r=2, key_ranks={"c": 4})
    need = handle.bank_bytes(config)
    monkeypatch.setattr("adaplex.core.adapted.available_host_bytes", lambda: need - 1)
    with pytest.raises(StorageError, match=r"bank of 3 experts needs 0\.0 GiB of host memory"):
        handle.add("experts", config)
    assert "experts" not in handle.configs and not wrappers(model)  # nothing was built or wrapped
    monkeypatch.setattr("adaplex.core.adapted.available_host_bytes", lambda: need)
    handle.add("experts", config)
    assert sum(p.numel() * 4 for p in handle.parameters("experts")) == need


@pytest.mark.parametrize("damage", ["missing", "truncated", "config"])
def test_a_missing_or_corrupt_expert_is_named_when_the_bundle_loads_before_any_batch(damage, tmp_path):
    _, handle = routed()
    save_bundle(handle, tmp_path / "bundle")
    victim = tmp_path / "bundle" / "experts" / "a100"
    if damage == "missing":
        shutil.rmtree(victim)
    elif damage == "truncated":
        weights = victim / "adapter.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        (victim / "adapter_config.json").write_text("{not json")
    model = tiny.llama()
    with pytest.raises(StorageError, match="experts/a100"):
        load(model, tmp_path / "bundle")
    assert not wrappers(model)  # nothing of the bundle was attached: no batch can run half-loaded


def test_a_paged_bank_routes_as_the_whole_bank_loading_only_what_each_batch_lacks(tmp_path):
    _, whole = routed()
    model, handle = routed()  # the same experts (same seeds)
    handle.set_trainable("experts", False)
    pager = handle.page("experts", slots=2)
    ids = tiny.tokens(batch=2)
    loads = []
    for keys in (["v100", "a100"], ["a100", "i7"], ["v100", None], ["i7", "v100"], ["i7", "i7"]):
        with route(handle, keys):
            paged = tiny.outputs(model, ids)
        with route(whole, keys):
            torch.testing.assert_close(paged, tiny.outputs(whole.model, ids), atol=0, rtol=0)
        loads.append(pager.loads)
    # v100, a100 | i7 replaces v100 (least recent) | v100 replaces a100 | both there | there
    assert loads == [2, 3, 4, 4, 4]
    assert handle.adapters("experts")["model.layers.0.self_attn.q_proj"].A.shape[0] == 2  # two slots on the device
    with pytest.raises(AdapterNameError, match="uses 3 keys of bank 'experts', which keeps 2 on the device"):
        with route(handle, ["v100", "a100", "i7"]):
            pass
    with route(handle, ["v100", None]):  # an active route holds its experts: a nested one cannot evict them
        with route(handle, ["a100", "a100"]):
            inner = tiny.outputs(model, ids)
        with pytest.raises(AdapterNameError, match=r"uses 2 keys .* \(1 held by other active routes\)"):
            with route(handle, ["i7", "a100"]):
                pass
        outer = tiny.outputs(model, ids)
    for paged_out, keys in ((inner, ["a100", "a100"]), (outer, ["v100", None])):
        with route(whole, keys):
            torch.testing.assert_close(paged_out, tiny.outputs(whole.model, ids), atol=0, rtol=0)
    assert not pager.held  # every route let go
    save_bundle(handle, tmp_path / "paged")  # every expert is saved, from host memory
    save_bundle(whole, tmp_path / "whole")
    for key in KEYS:
        for name in ("adapter.safetensors",):
            assert (tmp_path / "paged" / "experts" / key / name).read_bytes() == (
                tmp_path / "whole" / "experts" / key / name
            ).read_bytes()


def test_paging_refuses_what_it_cannot_do():
    _, handle = routed()
    with pytest.raises(AdapterNameError, match="bank 'experts' is trainable; freeze it"):
        handle.page("experts", 2)
    handle.set_trainable("experts", False)
    with pytest.raises(AdapterNameError, match="page it with 1 to 3 slots"):
        handle.page("experts", 4)
    with pytest.raises(AdapterNameError, match="'shared' is not an expert bank"):
        handle.page("shared", 1)
    handle.page("experts", 1)
    with pytest.raises(AdapterNameError, match="is paged .*train an unpaged bank"):
        handle.set_trainable("experts", True)
