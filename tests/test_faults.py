"""Bit-flip injection inside attention and its detection, on tiny Llama-style, GPT-2 and BERT models."""

from __future__ import annotations

import pytest
import torch

import adaplex
from adaplex import LoRAConfig, PrefixConfig
from adaplex.errors import ConfigError
from adaplex.faults import detect
from adaplex.faults.bits import flip_bit
from adaplex.faults.detect import Tensors, kv_tied
from adaplex.faults.experiment import logits_of, run_once
from adaplex.faults.fused import PAD
from adaplex.faults.hook import DetectorConfig, FaultPlan, detections_of
from adaplex.faults.session import armed

import tiny
from cli_process import run_cli
from helpers import randomize

FAMILIES = ["llama", "gpt2", "bert"]
OFF = DetectorConfig(softmax=False, output_bound=False, score_bound=False, abft=False)


def test_flip_bit_flips_exactly_one_bit():
    one = torch.tensor([1.0, 1.0])
    assert flip_bit(one, torch.tensor([1]), 31).tolist() == [1.0, -1.0]
    assert flip_bit(one, torch.tensor([0]), 23).tolist() == [0.5, 1.0]  # lowest exponent bit of 1.0 (2^0)
    assert flip_bit(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0]), 15).item() == -1.0
    assert flip_bit(torch.tensor([1.0], dtype=torch.float16), torch.tensor([0]), 0).item() == 1.0 + 2**-10
    with pytest.raises(ConfigError, match="bit 16 is out of range for bfloat16 .0-15."):
        flip_bit(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0]), 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_stepwise_attention_equals_the_fused_one_and_leaves_no_trace(family):
    model, ids = tiny.FAMILIES[family](), tiny.tokens(batch=3, length=9)
    reference = logits_of(model, {"input_ids": ids})

    def wrapped() -> list[str]:  # modules whose forward the q/k/v recorders wrap
        return [name for name, m in model.named_modules() if "forward" in m.__dict__]

    with armed(model, None, OFF):
        stepwise = logits_of(model, {"input_ids": ids})
        assert wrapped()
    torch.testing.assert_close(stepwise, reference, atol=1e-5, rtol=0)
    assert torch.equal(logits_of(model, {"input_ids": ids}), reference)  # disarmed: bitwise the base again
    assert not wrapped()
    assert model.config._attn_implementation != "adaplex"


CASES = [
    ("scores", 30, "abft_scores"),
    ("weights", 29, "softmax"),
    ("output", 30, "abft_output"),
    ("scores", 22, "abft_scores"),
    ("output", 27, "abft_output"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("location, bit, detector", CASES)
def test_flips_are_detected_and_located(family, location, bit, detector):
    model, ids = tiny.FAMILIES[family](), tiny.tokens(batch=2, length=8)
    element = [1, 2, 5, 3]  # (batch, head, query row, key column or feature)
    plan = FaultPlan(location=location, bit=bit, elements=[element], layers=[1])
    result = run_once(model, {"input_ids": ids}, plan, DetectorConfig())
    assert result.injected == [element]
    assert result.detected[detector.split("_")[0] if detector.startswith("abft") else detector]
    hit = next(d for d in result.detections if d["detector"] == detector)
    assert (hit["layer"], hit["head"], hit["location"][:2]) == (1, 2, (1, 5))
    if location != "weights":
        assert hit["location"] == (1, 5, 3)  # row and column checksums locate the element


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3"])
def test_no_false_positives_on_clean_runs(family):
    model = tiny.FAMILIES[family]()
    for seed in range(25):
        ids = tiny.tokens(batch=2, length=12, seed=seed)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0  # padding too
        with armed(model, None, DetectorConfig()) as hooks:
            logits_of(model, {"input_ids": ids, "attention_mask": mask})
        assert [d for h in hooks for d in h.detections] == []


def test_injection_with_adapters_attached_and_correction():
    model, ids = tiny.llama(), tiny.tokens(batch=2, length=8)
    handle = adaplex.attach(model, "lora", LoRAConfig(r=2))
    handle.add("prefix", PrefixConfig(length=2))
    randomize(handle, "lora")
    plan = FaultPlan(location="output", bit=30, elements=[[0, 1, 7, 0]], layers="all")
    baseline = logits_of(model, {"input_ids": ids})
    result = run_once(model, {"input_ids": ids}, plan, DetectorConfig(correct=True), baseline)
    assert result.corrected and result.detected["abft"]
    assert result.max_logit_diff < 1e-4  # corrected back to the clean output
    uncorrected = run_once(model, {"input_ids": ids}, plan, DetectorConfig(), baseline)
    assert uncorrected.significant and not uncorrected.corrected
    assert len(uncorrected.injected) == 2  # one flip in each of the two layers


def test_kv_tied_detector():
    k = torch.randn(1, 2, 4, 8)
    v = k.clone()
    scores = k @ k.transpose(-1, -2)
    t = Tensors(
        k, k, v, scores, scores.softmax(-1), scores.softmax(-1) @ v, torch.ones(1, 1, 4, 4, dtype=torch.bool), 1.0
    )
    assert [d for finding in kv_tied(0, t) for d in finding.resolve()] == []
    v = flip_bit(v, torch.tensor([9]), 20)
    t = Tensors(k, k, v, scores, scores.softmax(-1), scores.softmax(-1) @ v, t.visible, 1.0)
    assert [(d.head, d.location) for finding in kv_tied(0, t) for d in finding.resolve()] == [(0, (0, 1))]


def test_bad_fault_plans_are_errors():
    model = tiny.llama()
    with pytest.raises(ConfigError, match="bit 32 is out of range for float32 .0-31."):
        with armed(model, FaultPlan(location="q", bit=32), DetectorConfig()):
            pass
    with pytest.raises(ConfigError, match="layer 5 does not exist; this model has layers 0-1"):
        with armed(model, FaultPlan(location="q", bit=3, layers=[5]), DetectorConfig()):
            pass
    with pytest.raises(ValueError, match="location"):
        FaultPlan(location="keys", bit=3)
    with pytest.raises(ConfigError, match="outside the tensor"):
        run_once(
            model,
            {"input_ids": tiny.tokens()},
            FaultPlan(location="q", bit=3, elements=[[9, 0, 0, 0]]),
            DetectorConfig(),
        )


def test_sweep_resumes_after_a_kill_and_reports(tmp_path):
    import json

    from adaplex.faults.sweep import SweepConfig, report, sweep

    model = tiny.gpt2()
    batches = [tiny.tokens(batch=1, length=10, seed=s) for s in range(2)]
    config = SweepConfig(bits=[30, 3], locations=["scores", "output"], layers=[0, 1], seeds=[0, 1], clean_runs=3)
    out = tmp_path / "runs.jsonl"
    assert sweep(model, batches, config, out) == 2 * 2 * 2 * 2 + 3
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])  # killed while writing line 6
    assert sweep(model, batches, config, out) == 19 - 5
    ids = [
        json.loads(line)["id"]
        for line in out.read_text().splitlines()
        if line.startswith('{"id"') and line.endswith("}")
    ]
    assert len(ids) == len(set(ids)) == 19
    summary = report(out, tmp_path / "heatmap.png")
    assert summary["clean_runs"] == 3 and summary["false_positives"] == 0
    assert summary["per_location_bit"]["scores"]["30"]["detection_rate"] == 1.0
    assert summary["detected_of_significant"] == 1.0
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_faults_cli_errors_are_one_line(tmp_path):
    tiny.save_base("llama", tmp_path / "base")
    faults_run = ("faults", "run", "--base", tmp_path / "base")
    run = run_cli(*faults_run, "--location", "scores", "--bit", "40", "--seq", "8")
    assert run.returncode == 2 and run.stderr.strip() == "error: bit 40 is out of range for float32 (0-31)"
    run = run_cli(*faults_run, "--location", "keys", "--bit", "3")
    assert run.returncode == 2 and "location" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    run = run_cli("bench", "faults", "--base", tmp_path / "base", "--graphs")
    assert run.returncode == 2 and run.stderr.strip().startswith("error: graphed timing captures CUDA graphs")


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_checks_have_no_false_positives_and_match_sdpa(family):
    model = tiny.FAMILIES[family]()
    fused = DetectorConfig(fused=True)
    for seed in range(10):
        ids = tiny.tokens(batch=2, length=12, seed=seed)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        reference = logits_of(model, {"input_ids": ids, "attention_mask": mask})
        with armed(model, None, fused) as hooks:
            checked = logits_of(model, {"input_ids": ids, "attention_mask": mask})
        assert [d for h in hooks for d in h.detections] == []
        torch.testing.assert_close(checked, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "column, bit, detector",
    [(1, 27, "abft_output"), (1, 30, "output_bound"), (-PAD + 1, 27, "softmax")],  # -PAD + 1: the P·1 column
)
def test_fused_checks_catch_a_fault_inside_the_kernel(monkeypatch, column, bit, detector):
    """A bit flipped in the kernel's output O' = P V' (simulated by corrupting what SDPA returns)."""
    import adaplex.faults.fused as fused_module

    real = fused_module.sdpa_attention_forward

    def faulty_kernel(*args, **kwargs):
        out, weights = real(*args, **kwargs)  # (B, T, H, D + PAD)
        return flip_bit(out, torch.tensor([3 * out.shape[-1] + column % out.shape[-1]]), bit).view_as(out), weights

    monkeypatch.setattr(fused_module, "sdpa_attention_forward", faulty_kernel)
    model = tiny.llama()
    with armed(model, None, DetectorConfig(fused=True)) as hooks:
        logits_of(model, {"input_ids": tiny.tokens(batch=1, length=6)})
    found = {d.detector for h in hooks for d in h.detections}
    assert detector in found


def test_flips_reach_the_prefix_path():
    """k and v are flipped after the prefix is prepended: key index 0 is a prefix key."""
    model, ids = tiny.llama(), tiny.tokens(batch=1, length=6)
    handle = adaplex.attach(model, "prefix", PrefixConfig(length=2))
    randomize(handle, "prefix", std=0.5)
    plan = FaultPlan(location="v", bit=30, elements=[[0, 0, 0, 0]], layers=[0])
    hit = run_once(model, {"input_ids": ids}, plan, DetectorConfig())
    assert hit.significant  # every query sees the prefix, so the flipped prefix value moves the output
    with handle.disable("prefix"):
        plain = run_once(model, {"input_ids": ids}, plan, DetectorConfig())
    assert plain.max_logit_diff != hit.max_logit_diff  # without the prefix, index 0 is the first token


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2", "qwen3"])
@pytest.mark.parametrize("location", ["q", "k", "v"])
@pytest.mark.parametrize("bit", [30, 25, 22])
def test_qkv_flips_are_caught_by_projection_checksums(family, location, bit):
    model, ids = tiny.FAMILIES[family](), tiny.tokens(batch=2, length=8)
    handle = adaplex.attach(model, "lora", LoRAConfig(r=2))  # q, k, v include the LoRA deltas
    randomize(handle, "lora")
    element = [1, 1, 4, 2]  # (batch, head, token, feature); head 1 exists for every family's k and v
    result = run_once(
        model,
        {"input_ids": ids},
        FaultPlan(location=location, bit=bit, elements=[element], layers=[1]),
        DetectorConfig(),
    )
    assert result.detected["qkv"]
    hit = next(d for d in result.detections if d["detector"] == f"qkv_{location}")
    assert (hit["layer"], hit["head"], hit["location"]) == (1, 1, (1, 4))


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2", "qwen3"])
@pytest.mark.parametrize("location", ["q", "k", "v"])
def test_sign_flips_in_qkv_are_caught_by_the_rotated_sums(family, location):
    model, ids = tiny.FAMILIES[family](), tiny.tokens(batch=2, length=8)
    plan = FaultPlan(location=location, bit=31, elements=[[0, 1, 3, 5]], layers=[0])
    result = run_once(model, {"input_ids": ids}, plan, DetectorConfig())
    assert result.detected["qkv"]
    hit = next(d for d in result.detections if d["detector"] == f"qkv_{location}")
    assert (hit["layer"], hit["head"], hit["location"]) == (0, 1, (0, 3))


def test_a_model_armed_once_reports_each_forwards_detections_once(monkeypatch):
    """detections_of takes what one forward found, so a monitored model is armed once for many."""
    import adaplex.faults.fused as fused_module

    real = fused_module.sdpa_attention_forward
    faulty_calls = []

    def kernel(*args, **kwargs):
        out, weights = real(*args, **kwargs)  # (B, T, H, D + PAD)
        if faulty_calls:
            out = flip_bit(out, torch.tensor([3 * out.shape[-1] + 1]), 27).view_as(out)
        return out, weights

    monkeypatch.setattr(fused_module, "sdpa_attention_forward", kernel)
    model, inputs = tiny.llama(), {"input_ids": tiny.tokens(batch=1, length=6)}
    with armed(model, None, DetectorConfig(fused=True)) as hooks:
        logits_of(model, inputs)
        clean = detections_of(hooks)
        faulty_calls.append(True)
        logits_of(model, inputs)
        faulty = detections_of(hooks)
        faulty_calls.clear()
        logits_of(model, inputs)
        after = detections_of(hooks)
    assert clean == [] and after == []
    assert {d.detector for d in faulty} >= {"abft_output"}


def test_output_bound_in_row_blocks_equals_it_in_one_block(monkeypatch):
    """The stepwise hull check works through query rows in blocks that keep its temporary small (one
    (B, H, T, S, D) float32 tensor would be 72 GiB at 32 x 1024 for SmolLM2); the result is the same,
    a row that sees no key included."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=gen) for _ in "qkv")
    visible = torch.ones(7, 7, dtype=torch.bool).tril()
    visible[0] = False  # a row that sees nothing
    weights = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~visible, -torch.inf), -1).nan_to_num()
    output = weights @ v
    output[1, 2, 4, 5] += 10  # outside the hull
    tensors = Tensors(q, k, v, q @ k.transpose(-1, -2), weights, output, visible, 1.0)
    whole = detect.output_bound(0, tensors)[0].excess
    monkeypatch.setattr(detect, "CHUNK_BYTES", 4 * 2 * 3 * 7 * 8 * 2)  # two rows a block
    blocks = detect.output_bound(0, tensors)[0].excess
    assert torch.equal(whole, blocks)
    assert whole.shape == (2, 3, 7) and (whole > 0).nonzero().tolist() == [[1, 2, 4]]
