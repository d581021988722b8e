"""`adaplex bench train`: every variant trains its own model on the device asked for, to the end; with a
profile of where a step's time goes, on a quantized base too; bad options are one clear error."""

from __future__ import annotations

import pytest
import torch

from adaplex.bench import train as bench_train
from adaplex.errors import ConfigError

import tiny


def test_every_variant_owns_its_model_on_the_device():
    found = bench_train.variants(tiny.llama(), rank=2, device=torch.device("cpu"))
    assert set(found) == {"adaplex-lora", "adaplex-moslora", "adaplex-lora-plain-loop", "peft-lora"}
    storages = [{p.data_ptr() for p in model.parameters()} for _, model in found.values()]
    for i, a in enumerate(storages):  # no tensor shared: a Lightning teardown cannot move another variant
        for b in storages[i + 1 :]:
            assert not a & b
    assert all(p.device.type == "cpu" for _, m in found.values() for p in m.parameters())
    with pytest.raises(ConfigError, match="--variant 'adaplex-fast': choose from adaplex-lora"):
        bench_train.variants(tiny.llama(), rank=2, device=torch.device("cpu"), names=("adaplex-fast",))


def test_bench_train_runs_every_variant_to_the_end_and_profiles_them(tmp_path):
    tiny.save_base("llama", tmp_path / "base")
    result = bench_train.run(str(tmp_path / "base"), batch=2, seq=8, rank=2, steps=3, rounds=1, profile=True)
    assert result["variants"] == ["adaplex-lora", "adaplex-moslora", "adaplex-lora-plain-loop", "peft-lora"]
    assert all(t > 0 for t in result["step_s"].values())
    assert set(result["vs_peft"]) == {"adaplex-lora", "adaplex-moslora", "adaplex-lora-plain-loop"}
    assert all(v["tokens_per_s_x"] > 0 for v in result["vs_peft"].values())
    for profile in result["profile"].values():
        assert profile["wall_ms"] > 0 and 0 < profile["busy_ms"]
        assert any(op["name"] == "aten::mm" and op["calls"] > 0 for op in profile["top"])


def test_bench_train_on_a_4bit_base_and_its_bad_options(tmp_path):
    shape = tiny.save_base("llama", tmp_path / "base") / "config.json"
    names = ("adaplex-lora", "peft-lora")
    result = bench_train.run(shape=shape, batch=2, seq=8, rank=2, steps=2, rounds=1, quantize="4bit", names=names)
    assert result["quantize"] == "4bit" and result["vs_peft"]["adaplex-lora"]["peak_memory_x"] > 0
    with pytest.raises(ConfigError, match="--precision 'fp8': choose one of auto"):
        bench_train.run(shape=shape, precision="fp8")
    with pytest.raises(ConfigError, match="--quantize 4bit trains under bf16-mixed or 32-true"):
        bench_train.run(shape=shape, precision="bf16-true", quantize="4bit")
