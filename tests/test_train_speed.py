"""The training step's fast paths: Liger's fused loss (run here by Triton's interpreter) equals the plain
loss and its gradients, compiled blocks equal eager ones, each chosen by a config field and never
skipped silently; the fused AdamW only on CUDA."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaplex
from adaplex import LoRAConfig, MoSLoRAConfig
from adaplex.errors import ConfigError
from adaplex.train import speed
from adaplex.train.config import TrainConfig
from adaplex.train.module import adamw

import tiny
from helpers import randomize

TESTS = Path(__file__).parent

FUSED_LOSS_CHECK = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import adaplex, tiny
from helpers import randomize
from adaplex.train.speed import next_token_loss, use_fused_loss
found = {{}}
for name, autocast in (("float32", False), ("float16-autocast", True)):
    handle = adaplex.attach(tiny.llama(), "a", adaplex.LoRAConfig(r=4, alpha=8))
    randomize(handle, "a")
    ids = tiny.tokens(batch=3, length=12)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt the loss skips
    batch = {{"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}}
    assert use_fused_loss("on", handle.model, ids)
    runs = []
    for fused in (True, False):
        handle.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = next_token_loss(handle.model, batch, fused)
        loss.backward()
        runs.append((loss.item(), [p.grad.clone() for p in handle.parameters("a")]))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = runs
    found[name] = {{
        "loss_diff": abs(fused_loss - plain_loss),
        "loss": plain_loss,
        "grad_relative": max(((a - b).norm() / b.norm()).item() for a, b in zip(fused_grads, plain_grads)),
    }}
print(json.dumps(found))
"""


def test_fused_loss_equals_the_plain_loss_and_its_gradients():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", FUSED_LOSS_CHECK.format(tests=str(TESTS))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["float32"]["loss"] > 1.0
    assert found["float32"]["loss_diff"] < 1e-5 and found["float32"]["grad_relative"] < 1e-4
    assert found["float16-autocast"]["loss_diff"] < 1e-2 and found["float16-autocast"]["grad_relative"] < 2e-2


def test_fused_loss_is_chosen_where_it_runs_and_asking_for_it_elsewhere_warns(caplog):
    model = adaplex.attach(tiny.llama(), "a", LoRAConfig(r=2)).model
    on_cpu = torch.zeros(1)  # no CUDA, no interpreter: the kernel cannot run here
    with caplog.at_level(logging.WARNING):
        assert not speed.use_fused_loss("auto", model, on_cpu)
        assert not caplog.text  # auto: silently the plain loss
        assert not speed.use_fused_loss("on", model, on_cpu)
    assert "fused_loss: on, but the fused loss runs on CUDA, and this batch is on cpu: training with the plain" in (
        caplog.text
    )
    assert not speed.use_fused_loss("off", model, on_cpu)
    with pytest.raises(ConfigError, match="fused_loss 'yes': choose one of auto, on, off"):
        speed.use_fused_loss("yes", model, on_cpu)
    adapted_head = adaplex.attach(tiny.llama(), "a", LoRAConfig(r=2, targets=("lm_head",))).model
    assert "output layer carries adapters" in speed.fused_loss_blocker(adapted_head, on_cpu)
    assert "may transform its logits" in speed.fused_loss_blocker(tiny.bert(), on_cpu)


@pytest.mark.parametrize("config", [LoRAConfig(r=4, alpha=8), MoSLoRAConfig(r=4)], ids=["lora", "moslora"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(config):
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        handle = adaplex.attach(tiny.llama(), "a", config)
        randomize(handle, "a")
        handle.model.train()
        if compiled:  # the graph capture and AOT autograd of inductor, without its code generation (minutes on CPU)
            assert speed.compile_blocks(handle.model, backend="aot_eager") == 2
        ids = tiny.tokens(batch=2, length=12)
        loss = speed.next_token_loss(handle.model, {"input_ids": ids, "labels": ids}, fused=False)
        loss.backward()
        runs.append((loss.item(), [p.grad for p in handle.parameters("a")]))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    for eager, compiled in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(compiled, eager)
    with pytest.raises(ConfigError, match="compile mode 'fast': choose one of default, reduce-overhead"):
        speed.compile_blocks(tiny.llama(), "fast")


def test_config_fields_of_the_fast_paths_are_validated():
    fields = {"output": "out", "adapters": [{"name": "a", "config": {"method": "lora"}}], "data": {"train": ["t"]}}
    config = TrainConfig.model_validate(fields | {"trainer": {"fused_loss": "on", "compile": "reduce-overhead"}})
    assert (config.trainer.fused_loss, config.trainer.compile, config.quantize) == ("on", "reduce-overhead", "none")
    for trainer in ({"compile": True}, {"fused_loss": "sometimes"}):
        with pytest.raises(ValueError, match="trainer"):
            TrainConfig.model_validate(fields | {"trainer": trainer})
    with pytest.raises(ValueError, match="quantize 4bit trains under precision auto, bf16-mixed or 32-true"):
        TrainConfig.model_validate(fields | {"quantize": "4bit", "trainer": {"precision": "bf16-true"}})


def test_adamw_is_fused_only_on_cuda():
    assert adamw([torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0).defaults["fused"] is None
