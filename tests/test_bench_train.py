"""`adaplex bench train`: every variant trains its own model on the device asked for, to the end."""

from __future__ import annotations

import torch

from adaplex.bench import train as bench_train

import tiny


def test_every_variant_owns_its_model_on_the_device():
    found = bench_train.variants(tiny.llama(), rank=2, device=torch.device("cpu"))
    assert set(found) == {"adaplex-lora", "adaplex-moslora", "adaplex-lora-plain-loop", "peft-lora"}
    storages = [{p.data_ptr() for p in model.parameters()} for _, model in found.values()]
    for i, a in enumerate(storages):  # no tensor shared: a Lightning teardown cannot move another variant
        for b in storages[i + 1 :]:
            assert not a & b
    assert all(p.device.type == "cpu" for _, m in found.values() for p in m.parameters())


def test_bench_train_runs_every_variant_to_the_end(tmp_path):
    tiny.save_base("llama", tmp_path / "base")
    result = bench_train.run(str(tmp_path / "base"), batch=2, seq=8, rank=2, steps=3, rounds=1)
    assert result["variants"] == ["adaplex-lora", "adaplex-moslora", "adaplex-lora-plain-loop", "peft-lora"]
    assert all(t > 0 for t in result["step_s"].values()) and result["adaplex_vs_peft"]["step_time_x"] > 0
