"""Prompt-to-LoRA on tiny models: the zoo (checkpoints, resume), the generator (overfits a tiny zoo,
exact resume, dry run), generated adapters (load, run, export to PEFT with equal logits; per sample in
one batch = each alone, float32 and bfloat16), and bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel

import adaplex
from adaplex.core.models import load_base
from adaplex.errors import AdapterNameError, ConfigError, StorageError
from adaplex.generator.config import GenConfig
from adaplex.generator.dataset import analyze, round_trip, token_set
from adaplex.generator.evaluate import evaluate, row_losses
from adaplex.generator.generate import PromptToLoRA, read_prompt_file
from adaplex.generator.training import GeneratorModule, train_generator
from adaplex.generator.zoo import INDEX, ZooConfig, build_zoo, read_zoo
from adaplex.io.peft import export_peft
from adaplex.io.records import read_adapter_record
from adaplex.io.storage import load
from adaplex.train.data import token_blocks

import tiny


def zoo_config(root, name: str, **fields) -> ZooConfig:
    return ZooConfig.model_validate(
        {
            "output": str(root / name),
            "base": str(root / "base"),
            "subsets": {"fortunes": [], "pydoc_groups": 4},
            "steps": 4,
            "checkpoints": [4],
            "batch_size": 2,
            "block_size": 16,
            "lr": 0.05,
            "samples": 2,
            "conditions": 3,
        }
        | fields
    )


def distinct_conditions(zoo_dir) -> None:
    """The tiny tokenizer knows only the words w3..w95: give each run conditioning texts it can tell
    apart (the zoo's own are English, all <unk> to it)."""
    runs = [json.loads(line) for line in (zoo_dir / INDEX).read_text().splitlines()]
    for i, run in enumerate(runs):
        run["conditions"] = [f"w{10 + i} w{10 + i} w{40 + i}\nw{60 + i + v} w{70 + i}" for v in range(3)]
        run["eval_condition"] = f"w{10 + i} w{10 + i} w{40 + i}\nw{60 + i} w{70 + i}"
    (zoo_dir / INDEX).write_text("".join(json.dumps(r) + "\n" for r in runs))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tiny.save_base("llama", root / "base")
    tiny.save_base("bert", root / "encoder")
    build_zoo(zoo_config(root, "zoo"))
    distinct_conditions(root / "zoo")
    return root


def gen_config(root, out: str, **fields) -> GenConfig:
    return GenConfig.model_validate(
        {
            "zoo": str(root / "zoo"),
            "output": str(root / out),
            "encoder": str(root / "encoder"),
            "width": 16,
            "lines": 2,
            "heldout": [],
            "model": {"channels": 4, "latent_width": 8, "hidden": 32, "blocks": 1},
            "optim": {"lr": 3e-3, "warmup_steps": 5, "max_steps": 250, "batch_size": 6},
            "trainer": {"accelerator": "cpu", "checkpoint_every_n_steps": 50, "swanlab": False},
        }
        | fields
    )


@pytest.fixture(scope="module")
def trained(world):
    result = train_generator(gen_config(world, "run", heldout=["pydoc-03"]))
    return world, result


def test_zoo_keeps_checkpoints_with_provenance_and_resumes(world, tmp_path):
    (tmp_path / "base").symlink_to(world / "base")
    config = zoo_config(tmp_path, "zoo", subsets={"fortunes": [], "pydoc_groups": 2}, checkpoints=[2, 4])
    first = build_zoo(config)
    assert (first["runs"], first["checkpoints"], first["trained_now"]) == (2, 4, 2)
    zoo = read_zoo(tmp_path / "zoo")
    assert {(m.subset, m.step) for m in zoo.members} == {(s, n) for s in zoo.names() for n in (2, 4)}
    assert read_adapter_record(zoo.members[0].path).provenance == {"zoo": zoo.members[0].subset, "step": 2}
    assert all(c.startswith("Python reference documentation on") for c in zoo.runs[0]["conditions"])
    assert not torch.equal(*(zoo.tensors(m)["model.layers.0.self_attn.q_proj.B"] for m in zoo.members[:2]))
    assert build_zoo(config)["trained_now"] == 0  # finished runs are skipped
    lines = (tmp_path / "zoo" / INDEX).read_text().splitlines()
    (tmp_path / "zoo" / INDEX).write_text(lines[0] + "\n")  # the second run was cut short
    shutil.rmtree(tmp_path / "zoo" / "runs" / zoo.names()[1] / "step-00004")
    again = build_zoo(config)
    assert (again["trained_now"], again["checkpoints"]) == (1, 4)
    with pytest.raises(ConfigError, match="another config"):
        build_zoo(config.model_copy(update={"steps": 5, "checkpoints": [5]}))


def test_every_zoo_member_round_trips_bitwise(world):
    result = round_trip(read_zoo(world / "zoo"), width=16)
    assert result["bitwise_exact"] == result["members"] == 4
    assert result["layers"] == [2, result["tokens"] // 2]  # two layers of equal token counts


def test_missing_or_corrupt_zoo_members_are_named(world, tmp_path):
    shutil.copytree(world / "zoo", tmp_path / "zoo")
    zoo = read_zoo(tmp_path / "zoo")
    victim = zoo.members[1].path
    (victim / "adapter.safetensors").write_bytes(b"broken")
    with pytest.raises(StorageError, match=f"zoo member {victim}.*checksum"):
        token_set(read_zoo(tmp_path / "zoo"), 16)
    shutil.rmtree(victim)
    with pytest.raises(StorageError, match=f"zoo member {victim} is missing"):
        read_zoo(tmp_path / "zoo")


def test_generator_overfits_a_tiny_zoo(trained):
    root, result = trained
    rows = (root / "run" / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [
        float(r.split(",")[header.index("train_mse")]) for r in rows[1:] if r.split(",")[header.index("train_mse")]
    ]
    assert losses[-1] < 0.05 * losses[0]
    generator = PromptToLoRA(root / "run" / "generator")
    zoo = read_zoo(root / "zoo")
    assert result["heldout_subsets"] == ["pydoc-03"]
    for run, member in zip(zoo.runs[:3], zoo.members[:3], strict=True):
        want = zoo.tensors(member)
        got = generator.tensors([run["conditions"][0]])[0]
        for key in want:
            error = (got[key] - want[key]).norm() / want[key].norm()
            assert error < 0.1, (key, float(error))


def test_generated_adapter_dirs_load_run_and_export_to_peft(trained, tmp_path):
    root, _ = trained
    generator = PromptToLoRA(root / "run" / "generator")
    prompts = ["w10 w10 w40\nw60 w70", "w11 w11 w41\nw61 w71"]
    paths = generator.save(prompts, tmp_path / "out")
    assert [
        json.loads(line)["prompt"] for line in (tmp_path / "out" / "prompts.jsonl").read_text().splitlines()
    ] == prompts
    record = read_adapter_record(paths[0])
    assert record.provenance == {"generator": str((root / "run" / "generator").resolve()), "prompt": prompts[0]}
    model = tiny.llama()
    base = tiny.outputs(model, tiny.tokens())
    handle = load(model, paths[0])
    ours = tiny.outputs(model, tiny.tokens())
    assert not torch.allclose(ours, base, atol=1e-4)
    export_peft(handle, list(handle.configs), tmp_path / "peft")
    theirs = tiny.outputs(PeftModel.from_pretrained(tiny.llama(), tmp_path / "peft").eval(), tiny.tokens())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    with pytest.raises(StorageError, match="already exists"):
        generator.save(prompts, tmp_path / "out")


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_generated_per_sample_in_one_batch_equal_each_alone(trained, tmp_path, dtype, atol):
    root, _ = trained
    generator = PromptToLoRA(root / "run" / "generator")
    prompts = ["w10 w10 w40\nw60 w70", "w12 w12 w42\nw62 w72", "w13 w13 w43\nw63 w73"]
    paths = generator.save(prompts, tmp_path / "out")
    ids = tiny.tokens(batch=3)
    model = tiny.llama().to(dtype)
    with generator.applying(adaplex.Adapted.of(model), prompts):
        together = tiny.outputs(model, ids)
    for b, path in enumerate(paths):
        alone = tiny.llama().to(dtype)
        load(alone, path)
        torch.testing.assert_close(
            together[b : b + 1].float(), tiny.outputs(alone, ids[b : b + 1]).float(), atol=atol, rtol=0
        )
    assert not torch.allclose(together[0].float(), together[1].float(), atol=1e-3)


def test_generator_resume_is_exact(world, monkeypatch):
    steps = {"lr": 3e-3, "warmup_steps": 2, "max_steps": 6, "batch_size": 4}
    straight = train_generator(
        gen_config(
            world,
            "straight",
            optim=steps,
            trainer={"accelerator": "cpu", "checkpoint_every_n_steps": 3, "swanlab": False},
        )
    )
    config = gen_config(
        world, "killed", optim=steps, trainer={"accelerator": "cpu", "checkpoint_every_n_steps": 3, "swanlab": False}
    )
    step = GeneratorModule.training_step

    def dies_after_three(self, batch, batch_idx):
        if self.global_step == 4:
            raise KeyboardInterrupt  # as a kill: after the checkpoint of step 3
        return step(self, batch, batch_idx)

    monkeypatch.setattr(GeneratorModule, "training_step", dies_after_three)
    with pytest.raises(BaseException):  # noqa: B017 - Lightning re-raises the interrupt its own way
        train_generator(config)
    monkeypatch.setattr(GeneratorModule, "training_step", step)
    assert not (world / "killed" / "generator").exists()
    resumed = train_generator(config, resume=True)
    a = PromptToLoRA(straight["generator"]).network.state_dict()
    b = PromptToLoRA(resumed["generator"]).network.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0)


def test_generator_under_ddp_on_two_cpu_processes_equals_one_process_with_the_same_global_batch(world):
    steps = {"lr": 3e-3, "warmup_steps": 2, "max_steps": 6}
    one = train_generator(gen_config(world, "gen-one", optim=steps | {"batch_size": 6}))
    ddp = gen_config(
        world,
        "gen-ddp",
        optim=steps | {"batch_size": 3},
        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "swanlab": False},
    )
    path = world / "gen-ddp.yaml"
    path.write_text(yaml.safe_dump(ddp.model_dump(mode="json")))
    done = subprocess.run(
        [sys.executable, "-m", "adaplex", "gen", "train", str(path), "--json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 6  # printed once, by rank 0
    a = PromptToLoRA(one["generator"]).network.state_dict()
    b = PromptToLoRA(world / "gen-ddp" / "generator").network.state_dict()
    for key in a:  # float32 sums in another order, amplified by Adam where a gradient is near zero
        torch.testing.assert_close(b[key], a[key], atol=3e-4, rtol=0)


def test_eval_scores_each_candidate_as_if_it_ran_alone(trained):
    root, _ = trained
    result = evaluate(root / "run" / "generator", seen=2, block=8, max_blocks=2)
    assert [r["subset"] for r in result["heldout"]["subsets"]] == ["pydoc-03"]
    assert result["heldout"]["recovered_share"] is not None and result["seconds_per_adapter"] > 0
    zoo = read_zoo(root / "zoo")
    for row in result["seen"]["subsets"]:  # a seen subset's nearest zoo adapter is its own
        assert row["nearest_subset"] == row["subset"] and row["ppl"]["nearest"] == row["ppl"]["trained"]
    row = result["seen"]["subsets"][0]
    model, tokenizer = load_base(str(root / "base"))
    blocks = token_blocks(zoo.heldout(row["subset"]), tokenizer, 8)[:2]
    assert math.isclose(math.exp(float(row_losses(model, blocks).mean())), row["ppl"]["base"], rel_tol=1e-4)
    load(model, zoo.members[zoo.names().index(row["subset"])].path)
    assert math.isclose(math.exp(float(row_losses(model, blocks).mean())), row["ppl"]["trained"], rel_tol=1e-4)
    assert row["ppl"]["trained"] != row["ppl"]["base"]


def test_dry_run_checks_one_step_and_writes_nothing(world):
    result = train_generator(gen_config(world, "dry"), dry_run=True)
    assert result["dry_run"] and result["output"][1:] == [result["grid"][0], 16] and result["loss"] > 0
    assert not (world / "dry").exists()


def test_bad_input(trained, tmp_path):
    root, _ = trained
    generator = PromptToLoRA(root / "run" / "generator")
    with pytest.raises(ConfigError, match="prompt is empty"):
        generator.tensors(["  \n "])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(StorageError, match="was made for base"):
        with generator.applying(adaplex.Adapted.of(tiny.llama(seed=1)), ["w10"]):
            pass
    other = adaplex.attach(tiny.llama(), "generated", adaplex.methods.GivenLoRAConfig(r=4, targets=("q", "k")))
    with pytest.raises(AdapterNameError, match="layout does not fit"):
        with generator.applying(other, ["w10"]):
            pass
    with pytest.raises(ConfigError, match="too small for the layout"):
        train_generator(gen_config(root, "small", tokens=2), dry_run=True)
    shutil.copytree(root / "run" / "generator", tmp_path / "tampered")
    record = json.loads((tmp_path / "tampered" / "generator.json").read_text())
    record["rows"] += 1
    (tmp_path / "tampered" / "generator.json").write_text(json.dumps(record))
    with pytest.raises(StorageError, match="checksum"):
        PromptToLoRA(tmp_path / "tampered")
    with pytest.raises(StorageError, match="not a generator"):
        PromptToLoRA(tmp_path)
    with pytest.raises(ConfigError, match="is not in the zoo"):
        train_generator(gen_config(root, "x", heldout=["nope"]), dry_run=True)


def test_zoo_statistics(world):
    result = analyze(read_zoo(world / "zoo"), width=16)
    zoo = read_zoo(world / "zoo")
    kinds = {row["kind"]: row for row in result["kinds"]}
    assert set(kinds) == {"q_proj.A", "q_proj.B", "v_proj.A", "v_proj.B"} and len(result["layers"]) == 2
    tensors = [zoo.tensors(m) for m in zoo.members]
    norms = [torch.cat([t[k].reshape(-1) for k in sorted(t) if k.endswith("q_proj.B")]).norm() for t in tensors]
    assert math.isclose(kinds["q_proj.B"]["norm"], float(torch.stack(norms).mean()), rel_tol=1e-3)
    assert all(row["spread"] > 0 for row in result["kinds"])


def test_command_line_generates_adapters_every_command_loads(trained, tmp_path):
    root, _ = trained
    run = [sys.executable, "-m", "adaplex"]
    made = subprocess.run(
        [
            *run,
            "gen",
            "generate",
            str(root / "run" / "generator"),
            "w10 w10 w40\\nw60 w70",
            "--out",
            str(tmp_path / "g"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    (adapter,) = [p for p in (tmp_path / "g").iterdir() if p.is_dir()]
    info = subprocess.run([*run, "info", str(adapter)], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0 and "lora" in info.stdout, info.stderr[-2000:]
    alone = PromptToLoRA(root / "run" / "generator").tensors(["w10 w10 w40\nw60 w70"])[0]
    for key, tensor in load(tiny.llama(), adapter).state_dict("000-w10-w10-w40-w60-w70").items():
        torch.testing.assert_close(tensor, alone[key])
