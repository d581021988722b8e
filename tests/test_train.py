"""Lightning training on tiny models: stage-wise stacking, checkpoints, exact resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import adaplex
import adaplex.train.module as module
from adaplex.core.models import load_base
from adaplex.errors import ConfigError, StorageError
from adaplex.io.describe import describe
from adaplex.io.records import CONFIG_FILE, WEIGHTS_FILE, read_adapter_record
from adaplex.io.storage import load
from adaplex.io.tensor_files import read_tensors
from adaplex.methods import LoRAConfig
from adaplex.train.config import TrainConfig
from adaplex.train.data import StepSampler
from adaplex.train.module import TrainingDiverged
from adaplex.train.run import train
from adaplex.train.strategy import AdapterFSDP, decoder_blocks, strategy_for
from adaplex.util.yamlconfig import load_yaml

import tiny
from helpers import randomize

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def cyclic_text(n_words: int, start: int = 3, period: int = 7) -> str:
    """A learnable pattern: w3 w4 ... w9 w3 w4 ..."""
    return " ".join(f"w{start + i % period}" for i in range(n_words))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tiny.save_base("llama", root / "base")
    tokenizer = tiny.word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "base")
    (root / "style.txt").write_text(cyclic_text(1200))
    (root / "style-eval.txt").write_text(cyclic_text(200))
    chats = [{"prompt": f"w{20 + i % 5} w{30 + i % 3}", "response": f"w{40 + i % 5} w{50 + i % 5}"} for i in range(40)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    return root


def config(root: Path, out: str, **overrides) -> TrainConfig:
    fields = {
        "base": str(root / "base"),
        "output": str(root / out),
        "adapters": [{"name": "style", "config": {"method": "lora", "r": 4, "alpha": 8}}],
        "data": {
            "format": "text",
            "train": [str(root / "style.txt")],
            "eval": [str(root / "style-eval.txt")],
            "block_size": 16,
            "batch_size": 4,
        },
        "optim": {"lr": 5e-3, "warmup_steps": 2, "max_steps": 12},
        "eval": {"every_n_steps": 4},
        "trainer": {"checkpoint_every_n_steps": 4, "accelerator": "cpu"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(fields.get(key), dict):
            fields[key] = fields[key] | value
        else:
            fields[key] = value
    return TrainConfig.model_validate(fields)


def losses(run: Path, column: str) -> list[float]:
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


def test_stage_wise_stacking(workspace):
    root = workspace
    style_dir = train(config(root, "stage1"))
    assert (root / "stage1" / "config.yaml").is_file()
    assert read_adapter_record(style_dir).role == "style"
    val = losses(root / "stage1", "val_loss")
    assert len(val) == 3 and val[-1] < val[0]  # evaluated every 4 steps, and it learned

    style_bytes = (style_dir / WEIGHTS_FILE).read_bytes()
    stage2 = config(
        root,
        "stage2",
        adapters=[
            {"name": "style", "path": str(style_dir), "train": False},
            {"name": "instruct", "config": {"method": "moslora", "r": 4}},
        ],
        data={"format": "chat", "train": [str(root / "chat.jsonl")], "eval": [], "block_size": 32, "batch_size": 4},
    )
    instruct_dir = train(stage2)
    assert (style_dir / WEIGHTS_FILE).read_bytes() == style_bytes  # the frozen stage stays untouched

    model, _ = load_base(str(root / "base"))
    handle = load(model, style_dir)
    style_alone = {k: v.clone() for k, v in handle.state_dict("style").items()}
    load(model, instruct_dir)
    ids = tiny.tokens()
    with handle.only():
        base = tiny.outputs(model, ids)
    with handle.only("style"):
        style = tiny.outputs(model, ids)
    both = tiny.outputs(model, ids)
    assert not torch.equal(style, base) and not torch.equal(both, style)
    assert all(torch.equal(style_alone[k], v) for k, v in handle.state_dict("style").items())
    merged = handle.merged_model()  # W = W0 + dW_style + dW_instruct
    torch.testing.assert_close(tiny.outputs(merged, ids), both, atol=1e-5, rtol=0)


def test_checkpoints_hold_only_adapter_tensors(workspace):
    root = workspace
    train(config(root, "ckpt", optim={"max_steps": 8}))
    checkpoints = sorted((root / "ckpt" / "checkpoints").glob("*.ckpt"))
    assert {c.name for c in checkpoints} >= {"last.ckpt", "step-step=8.ckpt"}
    state = torch.load(checkpoints[0], weights_only=True)["state_dict"]
    assert state and all(".adapters.style." in k for k in state)


TRAIN_SCRIPT = "import sys; from adaplex.cli import main; sys.argv = ['adaplex', 'train', *sys.argv[1:]]; main()"


def test_sigkill_then_resume_equals_an_uninterrupted_run(workspace):
    root = workspace
    steps = {"max_steps": 24}
    straight = train(
        config(root, "straight", optim=steps, trainer={"checkpoint_every_n_steps": 2, "accelerator": "cpu"})
    )
    killed_cfg = config(root, "killed", optim=steps, trainer={"checkpoint_every_n_steps": 2, "accelerator": "cpu"})
    path = root / "killed.yaml"
    path.write_text(yaml.safe_dump(killed_cfg.model_dump(mode="json")))
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(path)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not list((root / "killed" / "checkpoints").glob("step-step=6.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "killed" / "adapter").exists()  # it really died mid-run
    resumed = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(path), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (
        load(load_base(str(root / "base"))[0], d).state_dict("style") for d in (straight, root / "killed" / "adapter")
    )
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_the_run_order_splits_across_processes_and_resumes_in_each():
    size, total, batch = 10, 36, 3  # 36 positions span four epochs of 10 samples
    whole = list(StepSampler(size, total, seed=5))
    ranks = [list(StepSampler(size, total, seed=5, rank=r, world=2)) for r in range(2)]
    assert [len(StepSampler(size, total, 5, r, 2)) for r in range(2)] == [18, 18] == [len(r) for r in ranks]
    for step in range(total // (2 * batch)):  # a step's two batches hold what one batch of 6 would
        together = ranks[0][step * batch : (step + 1) * batch] + ranks[1][step * batch : (step + 1) * batch]
        assert sorted(together) == sorted(whole[step * 2 * batch : (step + 1) * 2 * batch])
    resumed = StepSampler(size, total, seed=5, rank=1, world=2)
    resumed.start = 12  # two steps of both processes done
    assert list(resumed) == ranks[1][6:]


def test_ddp_on_two_cpu_processes_killed_and_resumed_equals_one_process_with_the_same_global_batch(workspace):
    """A gated (UniPELT) run: LoRA, prefix, bottleneck and their gates all train under DDP."""
    root = workspace
    gated = [{"name": "u", "config": {"method": "unipelt", "gate": {"l1": 0.01, "entropy": 0.01}}}]
    common = {"adapters": gated, "optim": {"lr": 5e-3, "warmup_steps": 2, "max_steps": 12}}
    one = train(config(root, "one-process", data={"batch_size": 8}, **common))
    ddp = config(
        root,
        "ddp",
        data={"batch_size": 4},
        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "checkpoint_every_n_steps": 2},
        **common,
    )
    path = root / "ddp.yaml"
    path.write_text(yaml.safe_dump(ddp.model_dump(mode="json")))
    command = [sys.executable, "-m", "adaplex", "train", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not list((root / "ddp" / "checkpoints").glob("step-step=4.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the process it started for rank 1
    proc.wait()
    assert not (root / "ddp" / "adapter").exists()  # it really died mid-run
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("trained adapter saved") == 1  # rank 1 says nothing
    assert list((root / "ddp" / "gates").glob("epoch-*.json"))  # the gate read-outs, written by rank 0
    a, b = (load(load_base(str(root / "base"))[0], d) for d in (one, root / "ddp" / "adapter"))
    assert set(a.configs) == set(b.configs) == {"u-lora", "u-prefix", "u-bottleneck", "u-gate"}
    for name in a.configs:  # 2 processes x 4 samples = 1 x 8, the order resumed where it stopped
        for key, tensor in a.state_dict(name).items():
            torch.testing.assert_close(b.state_dict(name)[key], tensor, atol=1e-5, rtol=0)


def test_fsdp_units_are_the_models_decoder_blocks():
    model = tiny.llama()
    assert decoder_blocks(model) == {type(model.model.layers[0])}
    strategy = strategy_for("fsdp", model, on_gpu=True)
    assert isinstance(strategy, AdapterFSDP) and strategy.kwargs["use_orig_params"]
    assert strategy._state_dict_type == "full"  # checkpoints hold whole tensors, whatever the process count
    assert strategy_for("ddp", model, on_gpu=False) == "ddp"
    with pytest.raises(ConfigError, match="names no decoder blocks to shard by"):
        strategy_for("fsdp", torch.nn.Sequential(torch.nn.Linear(2, 2)), on_gpu=True)
    with pytest.raises(ConfigError, match="needs them; on CPUs use ddp"):
        strategy_for("fsdp", model, on_gpu=False)


def test_adapter_tensors_keep_their_names_inside_wrapped_blocks():
    """FSDP units (like activation checkpointing, which runs on CPU) wrap each decoder block in a module
    that adds a segment to every path; adapter files name the tensors as the unwrapped model does."""
    model = tiny.llama()
    handle = adaplex.attach(model, "style", LoRAConfig(r=2, alpha=4, targets=("all-linear",)))
    randomize(handle, "style", seed=3)
    plain = {k: v.clone() for k, v in handle.state_dict("style").items()}
    ids = tiny.tokens(batch=2, length=5)
    expected = model(input_ids=ids).logits
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(layer)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    wrapped = handle.state_dict("style")
    assert list(wrapped) == list(plain) and all(torch.equal(wrapped[k], plain[k]) for k in plain)
    handle.load_state_dict("style", {k: v + 1 for k, v in plain.items()}, "test")  # loads by the same names
    assert all(torch.equal(handle.state_dict("style")[k], plain[k] + 1) for k in plain)
    handle.load_state_dict("style", plain, "test")
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_continue_into_a_new_version_leaves_the_old_one(workspace):
    root = workspace
    v1 = train(config(root, "v1", optim={"max_steps": 4}, version="v1"))
    old = {f: (v1 / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)}
    v2 = train(
        config(
            root,
            "v2",
            version="v2",
            parent="v1",
            optim={"max_steps": 4, "lr": 1e-3},
            adapters=[{"name": "style", "path": str(v1), "train": True}],
        )
    )
    assert {f: (v1 / f).read_bytes() for f in old} == old
    record = read_adapter_record(v2)
    assert (record.version, record.parent) == ("v2", "v1")
    assert (v2 / WEIGHTS_FILE).read_bytes() != old[WEIGHTS_FILE]


def test_a_fused_optimizer_under_bf16_mixed_trains_with_its_gradients_clipped(workspace, monkeypatch):
    """A fused AdamW (what CUDA parameters get) under bf16-mixed with gradient clipping on: Lightning's own
    clipping refuses that optimizer; the module clips, to the configured norm."""
    fused = []
    monkeypatch.setattr(module, "adamw", lambda params, lr, wd, scaled: fused.append(torch.optim.AdamW(
        params, lr=lr, weight_decay=wd, fused=True)) or fused[-1])  # fmt: skip
    norms = []
    clip = module.AdapterModule.configure_gradient_clipping

    def clipped(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    monkeypatch.setattr(module.AdapterModule, "configure_gradient_clipping", clipped)
    run = config(workspace, "fused-bf16", optim={"lr": 5e-3, "warmup_steps": 2, "max_steps": 4, "gradient_clip": 1e-3},
                 trainer={"accelerator": "cpu", "precision": "bf16-mixed"})  # fmt: skip
    train(run)
    assert fused and fused[0].defaults["fused"]
    assert len(norms) == 4 and max(norms) == pytest.approx(1e-3, rel=1e-3)  # every step's gradients clipped to 1e-3


def test_nan_loss_stops_with_a_message_and_keeps_checkpoints(workspace):
    root = workspace
    bad = config(
        root,
        "nan",
        optim={"lr": 1e30, "warmup_steps": 0, "max_steps": 12, "gradient_clip": None},
        trainer={"checkpoint_every_n_steps": 1, "accelerator": "cpu"},
    )
    with pytest.raises(TrainingDiverged, match="the loss became nan.*--resume"):
        train(bad)
    assert (root / "nan" / "checkpoints" / "last.ckpt").is_file()


def test_bad_data_and_config_errors(workspace, tmp_path, caplog):
    root = workspace
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="no training examples"):
        train(config(root, "e1", data={"train": [str(tmp_path / "empty.txt")], "eval": []}))
    with pytest.raises(ConfigError, match="not found"):
        train(config(root, "e2", data={"train": [str(tmp_path / "missing.txt")], "eval": []}))
    no_template = tmp_path / "plain-base"
    tiny.save_base("llama", no_template)
    with pytest.raises(ConfigError, match="chat template"):
        train(
            config(
                root,
                "e3",
                base=str(no_template),
                data={"format": "chat", "train": [str(root / "chat.jsonl")], "eval": []},
            )
        )
    with caplog.at_level("WARNING"):
        train(
            config(
                root,
                "e4",
                optim={"max_steps": 1},
                data={"format": "chat", "train": [str(root / "chat.jsonl")], "eval": [], "block_size": 9},
            )
        )
    assert "40 of 40 sequences are longer than block_size 9 and were truncated; 0 lost" in caplog.text
    chat_only = {"format": "chat", "train": [str(root / "chat.jsonl")], "eval": [], "block_size": 4}
    with pytest.raises(ConfigError, match="no training examples"), caplog.at_level("WARNING"):
        train(config(root, "e6", data=chat_only))
    assert "40 lost their whole response and were dropped" in caplog.text
    with pytest.raises(StorageError, match="already holds a run"):
        train(config(root, "e4"))
    with pytest.raises(ConfigError, match="trainer: .*gpu"):  # fails after the output directory was made
        train(config(root, "e7", trainer={"accelerator": "gpu"}))
    assert not (root / "e7").exists()  # a run that failed before its first step leaves nothing behind
    with pytest.raises(ConfigError, match="trainer.strategy fsdp shards the base across GPUs"):
        train(config(root, "e8", trainer={"accelerator": "cpu", "devices": 2, "strategy": "fsdp"}))
    assert not (root / "e8").exists()
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text(yaml.safe_dump(config(root, "e5").model_dump(mode="json") | {"learning_rate": 1}))
    with pytest.raises(ConfigError, match=f"{yaml_path}: field 'learning_rate'"):
        load_yaml(yaml_path, TrainConfig)


def keyed_records(keys: dict[str, int], per_key: int = 60) -> str:
    """JSONL with a free-form target per record; each key's text follows its own cyclic pattern."""
    lines = []
    for target, start in keys.items():
        for i in range(per_key):
            lines.append(json.dumps({"text": cyclic_text(12, start=start + i % 2, period=5), "target": target}))
    return "\n".join(lines)


def test_joint_routed_training_then_a_new_key(workspace, tmp_path):
    root = workspace
    (tmp_path / "registry.yaml").write_text(
        "keys:\n  v100: {keywords: ['-model=v100']}\n  i7: {keywords: ['core-avx2']}\n  a100: {keywords: ['sm_80']}\n"
    )
    (tmp_path / "joint.jsonl").write_text(keyed_records({"cuda -model=v100": 10, "llvm -mcpu=core-avx2": 30}))
    (tmp_path / "new.jsonl").write_text(keyed_records({"cuda sm_80": 50}))
    data = {
        "format": "jsonl",
        "train": [str(tmp_path / "joint.jsonl")],
        "eval": [],
        "key_field": "target",
        "registry": str(tmp_path / "registry.yaml"),
        "block_size": 8,
        "batch_size": 4,
    }
    bundle = train(
        config(
            root,
            "joint",
            version="v1",
            data=data,
            adapters=[
                {"name": "shared", "config": {"method": "lora", "r": 2, "alpha": 16, "targets": ["q", "v"]}},
                {
                    "name": "experts",
                    "config": {
                        "method": "experts",
                        "keys": ["v100", "i7"],
                        "r": 4,
                        "alpha": 32,
                        "targets": ["q", "v"],
                        "mixer_init": "identity",
                    },
                },
            ],
        )
    )
    info = describe(bundle)
    assert [m["member"] for m in info["members"]] == ["shared", "experts/v100", "experts/i7"]
    with open(root / "joint" / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train_loss/v100", "train_loss/i7"} <= set(rows[0])
    per_key = {k: {r["step"] for r in rows if r[f"train_loss/{k}"]} for k in ("v100", "i7")}
    steps = {r["step"] for r in rows if r["train_loss"]}
    assert per_key["v100"] | per_key["i7"] >= steps - {"0"}  # every step logs the keys it saw
    assert per_key["v100"] < per_key["v100"] | per_key["i7"]  # and a step without v100 logs nothing for it
    old = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}

    grown = train(
        config(
            root,
            "grown",
            version="v2",
            parent="v1",
            data=data | {"train": [str(tmp_path / "new.jsonl")]},
            adapters=[
                {"name": "bundle", "path": str(bundle), "train": False},
                {
                    "name": "new",
                    "config": {
                        "method": "experts",
                        "keys": ["a100"],
                        "r": 4,
                        "alpha": 32,
                        "targets": ["q", "v"],
                        "mixer_init": "identity",
                    },
                },
            ],
        )
    )
    assert {p: p.read_bytes() for p in old} == old  # v1 untouched
    assert [m["member"] for m in describe(grown)["members"]] == ["shared", "experts/v100", "experts/i7", "experts/a100"]
    for member in ("shared", "experts/v100", "experts/i7"):
        assert (
            read_tensors(grown / member, read_adapter_record(grown / member)).keys()
            == read_tensors(bundle / member, read_adapter_record(bundle / member)).keys()
        )
        before = read_tensors(bundle / member, read_adapter_record(bundle / member))
        after = read_tensors(grown / member, read_adapter_record(grown / member))
        assert all(torch.equal(before[k], after[k]) for k in before)  # frozen experts and shared unchanged
    model, _ = load_base(str(root / "base"))
    handle = load(model, grown)
    from adaplex.compose.route import route

    with route(handle, ["a100", "v100", None]):
        assert tiny.outputs(model, tiny.tokens(batch=3)).shape[0] == 3


def test_gated_causal_lm_training_logs_gates_and_saves_a_bundle(workspace):
    root = workspace
    gated = {"method": "unipelt", "gate": {"l1": 0.01, "entropy": 0.01}}
    result = train(config(root, "gated", adapters=[{"name": "u", "config": gated}]))
    run = root / "gated"
    val = losses(run, "val_loss")
    assert len(val) == 3 and val[-1] < val[0]
    assert losses(run, "gate_l1/u-gate") and losses(run, "gate_entropy/u-gate")  # in the loss logs
    assert sorted(p.name for p in (run / "gates").glob("*.json")) == [f"epoch-00{i}.json" for i in range(3)]
    info = describe(result)
    assert [m["method"] for m in info["members"]] == ["lora", "prefix", "bottleneck", "gate"]
    assert {(g["layer"], g["submodule"]) for g in info["gates"]} == {
        (layer, s) for layer in (0, 1) for s in ("lora", "prefix", "bottleneck")
    }
    model, _ = load_base(str(root / "base"))
    handle = load(model, result)
    assert handle.configs["u-gate"].l1 == 0.01 and "u-lora" in handle.stack.kinds
