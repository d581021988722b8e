"""Classification: labelled data, few-shot sampling, gated training on encoders and decoders, analytics,
saving and predicting, and the bad inputs of the workflow."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from adaplex.cli import app
from adaplex.compose.gate import UniPELTConfig, add_unipelt
from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.errors import ConfigError
from adaplex.infer.classify import Classifier, load_classifier, predict_file
from adaplex.io.storage import load
from adaplex.methods.head import ClassifierHead, HeadConfig
from adaplex.train import labelled
from adaplex.train.classify_run import run_classification, save_classifier
from adaplex.train.config import ClassificationConfig, ClassificationData

import tiny
from helpers import randomize

LABELS = ("alpha", "beta", "gamma")


def record(c: int, rng: random.Random) -> dict[str, str]:
    """A text whose class shows in three of its eight words."""
    words = [f"w{10 * (c + 1) + rng.randrange(5)}" for _ in range(3)] + [f"w{60 + rng.randrange(20)}" for _ in range(5)]
    rng.shuffle(words)
    return {"text": " ".join(words), "label": LABELS[c]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    rng = random.Random(0)
    for family in ("bert", "llama"):
        tiny.save_base(family, root / family)
    # imbalanced: alpha 60, beta 30, gamma 30
    write_jsonl(root / "train.jsonl", [record(0 if i % 2 else 1 + i % 4 // 2, rng) for i in range(120)])
    write_jsonl(root / "eval.jsonl", [record(i % 3, rng) for i in range(30)])
    return root


def config(root: Path, out: str, family: str = "bert", **overrides) -> ClassificationConfig:
    fields = {
        "task": "classification",
        "base": str(root / family),
        "output": str(root / out),
        "adapters": [{"name": "u", "config": {"method": "unipelt", "gate": {"l1": 0.01, "entropy": 0.01}}}],
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "batch_size": 8},
        "optim": {"lr": 1e-2, "max_epochs": 3, "warmup_steps": 2},
        "trainer": {"accelerator": "cpu"},
    }
    for key, value in overrides.items():
        fields[key] = fields[key] | value if isinstance(fields.get(key), dict) else value
    return ClassificationConfig.model_validate(fields)


def train_losses(run: Path) -> list[float]:
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]


@pytest.mark.parametrize(("family", "seeds"), [("bert", [0, 1]), ("llama", [0])])
def test_gated_classification_trains_and_writes_gate_analytics(data, family, seeds):
    summary = run_classification(config(data, f"run-{family}", family, seeds=seeds))
    out = data / f"run-{family}"
    for seed in seeds:
        losses = train_losses(out / f"seed-{seed}")
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the loss falls
        gates_dir = out / f"seed-{seed}" / "gates"
        for epoch in range(3):
            readout = json.loads((gates_dir / f"epoch-{epoch:03d}.json").read_text())
            cells = {(r["layer"], r["submodule"]) for r in readout["gates"]}
            assert cells == {(layer, s) for layer in (0, 1) for s in ("lora", "prefix", "bottleneck")}
            assert all(0 < r["mean"] < 1 and r["tokens"] > 0 for r in readout["gates"])
            for kind in ("heatmap", "histogram"):
                assert (gates_dir / f"epoch-{epoch:03d}-{kind}.png").read_bytes()[:4] == b"\x89PNG"
        assert (gates_dir / "trajectory.png").is_file()
        with open(gates_dir / "epoch-002.csv") as f:
            assert len(list(csv.DictReader(f))) == 6
    runs = summary["runs"]
    accuracies = [r["accuracy"] for r in runs]
    assert summary["accuracy"]["mean"] == pytest.approx(sum(accuracies) / len(seeds))
    spread = abs(accuracies[0] - accuracies[1]) / 2**0.5 if len(seeds) == 2 else 0.0  # sample std of two
    assert summary["accuracy"]["std"] == pytest.approx(spread)
    assert json.loads((out / "summary.json").read_text())["macro_f1"] == summary["macro_f1"]
    assert (out / "curves.png").is_file()
    # the saved model predicts what the best evaluation scored
    classifier = load_classifier(out / "seed-0" / "model")
    scored = predict_file(classifier, data / "eval.jsonl", data / f"pred-{family}.jsonl")
    assert scored["accuracy"] == pytest.approx(runs[0]["accuracy"], abs=1e-6)
    assert scored["macro_f1"] == pytest.approx(runs[0]["macro_f1"], abs=1e-6)
    rows = [json.loads(line) for line in (data / f"pred-{family}.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    assert all(r["predicted"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows)


def test_a_linear_probe_trains_only_the_head(data):
    summary = run_classification(config(data, "probe", adapters=[], optim={"max_epochs": 2}))
    assert summary["trainable_parameters"] == 32 * 3 + 3  # the head alone: hidden x classes + bias
    assert not (data / "probe" / "seed-0" / "gates").exists()


def test_few_shot_takes_exactly_k_per_class_the_same_for_a_seed(caplog):
    rng = random.Random(1)
    records = labelled.as_labelled(
        [(f"f:{i}", record(c, rng)) for i, c in enumerate([0] * 40 + [1] * 20 + [2] * 5)], ("text",), "label"
    )
    first = labelled.few_shot(records, 8, seed=3)
    assert first == labelled.few_shot(records, 8, seed=3)
    assert first != labelled.few_shot(records, 8, seed=4)
    with caplog.at_level(logging.WARNING):
        counts = Counter(r.label for r in first)
    assert counts == {"alpha": 8, "beta": 8, "gamma": 5}
    assert "'gamma' has 5 training records, fewer than K = 8" in caplog.text
    balanced = Counter(r.label for r in labelled.oversample(records, seed=0))
    assert balanced == {"alpha": 40, "beta": 40, "gamma": 40}
    weights = labelled.class_weights(records, LABELS)
    assert torch.allclose(weights, torch.tensor([65 / 120, 65 / 60, 65 / 15]))
    train, held = labelled.stratified_split(records, 0.1, seed=0)
    assert Counter(r.label for r in held) == {"alpha": 4, "beta": 2, "gamma": 1}
    assert len(train) + len(held) == len(records) and not set(map(id, train)) & set(map(id, held))


def test_sentence_pairs_from_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text_a", "text_b", "label"])
        writer.writerows([["w3 w4", "w5", "yes"], ["w6", "w7 w8", "no"]])
    records, _ = labelled.read_labelled(path, ClassificationData(train=path))
    assert records[0].texts == ("w3 w4", "w5") and records[1].label == "no"
    tokenizer = tiny.word_tokenizer()
    encoded = labelled.encode(records, tokenizer, ("no", "yes"), 16)
    assert encoded[0] == {"input_ids": [3, 4, 5], "label": 1}  # no separator token: joined by a newline


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_gives_identical_predictions(data, tmp_path, dtype):
    model, tokenizer = load_base(str(data / "llama"), dtype=dtype)
    handle = Adapted.of(model)
    for i, name in enumerate(add_unipelt(handle, "u", UniPELTConfig())):
        randomize(handle, name, std=0.1, seed=i)
    head_config = HeadConfig(labels=LABELS, pooling="last", hidden=32)
    head = ClassifierHead(head_config).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(head.out.weight)
    save_classifier(handle, head, head_config, tmp_path / "model", None)
    records, _ = labelled.read_labelled(data / "eval.jsonl", ClassificationData(train=data / "eval.jsonl"))
    from_memory = Classifier(handle, head, head_config, tokenizer)
    loaded = load_classifier(tmp_path / "model", dtype=dtype)
    assert torch.equal(loaded.probabilities(records), from_memory.probabilities(records))


def bad(root: Path, tmp_path: Path, name: str, rows: list[dict], **overrides) -> str:
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    data_fields = overrides.pop("data", {"train": str(path)})
    cfg = config(root, f"bad-{name}", data=data_fields, **overrides)
    with pytest.raises(ConfigError) as err:
        run_classification(cfg)
    assert not (root / f"bad-{name}").exists()  # nothing written
    return str(err.value)


def test_bad_classification_inputs_are_one_line_errors_that_write_nothing(data, tmp_path):
    rng = random.Random(2)
    one_class = [record(0, rng) for _ in range(10)]
    assert "a classifier needs two classes" in bad(data, tmp_path, "one-class", one_class)
    unseen = write_jsonl(tmp_path / "eval-unseen.jsonl", [record(0, rng), {"text": "w3", "label": "delta"}])
    message = bad(data, tmp_path, "unseen", [], data={"eval": str(unseen)})
    assert "label 'delta' was never seen in training" in message and "eval-unseen.jsonl:2" in message
    pairs = [{"text_a": "w3", "text_b": "w4", "label": LABELS[i % 2]} for i in range(6)]
    half = write_jsonl(tmp_path / "eval-half.jsonl", [{"text_a": "w3", "label": "alpha"}])
    paired = write_jsonl(tmp_path / "train-pairs.jsonl", pairs)
    message = bad(data, tmp_path, "half", [], data={"train": str(paired), "eval": str(half)})
    assert "eval-half.jsonl:1: no 'text_b' field" in message
    message = bad(data, tmp_path, "nofield", [{"sentence": "w3", "label": "alpha"}])
    assert "no 'text' field nor both 'text_a' and 'text_b'" in message
    message = bad(
        data,
        tmp_path,
        "empty-gate",
        one_class,
        adapters=[{"name": "u", "config": {"method": "unipelt", "lora": None, "prefix": None, "bottleneck": None}}],
    )
    assert "enable at least one of lora, prefix, bottleneck" in message


def test_cli_train_predict_info_and_export(data, tmp_path):
    runner = CliRunner()
    cfg = config(data, "cli-run", optim={"max_epochs": 1}).model_dump(mode="json")
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    result = runner.invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "macro-F1" in result.output
    model = data / "cli-run" / "seed-0" / "model"
    result = runner.invoke(app, ["info", str(model)])
    assert "final gates" in result.output and "lora" in result.output
    result = runner.invoke(app, ["predict", str(model), str(data / "eval.jsonl"), str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "p.csv") as f:
        header = next(csv.reader(f))
    assert header == ["text", "label", "predicted", "p_alpha", "p_beta", "p_gamma"]
    before = (tmp_path / "p.csv").read_bytes()
    result = runner.invoke(app, ["predict", str(model), str(data / "eval.jsonl"), str(tmp_path / "p.csv")])
    assert "already exists" in str(result.exception)  # the one-line errors: tests/test_cli_bad_input.py
    assert (tmp_path / "p.csv").read_bytes() == before
    # export: a gated model is not a PEFT LoRA, unless its LoRA part alone is asked for
    result = runner.invoke(app, ["export", str(model), str(tmp_path / "peft")])
    assert "--lora-only" in str(result.exception) and not (tmp_path / "peft").exists()
    result = runner.invoke(app, ["export", str(model), str(tmp_path / "peft"), "--lora-only"])
    assert result.exit_code == 0, result.output
    base, _ = load_base(str(data / "bert"))
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours, _ = load_base(str(data / "bert"))
    handle = load(ours, model)
    handle.remove("u-gate")
    ids = tiny.tokens()
    with handle.only("u-lora"):
        expected = ours(input_ids=ids).last_hidden_state
    torch.testing.assert_close(theirs(input_ids=ids).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_compare_methods_writes_the_table_data_and_plots(data, tmp_path):
    from adaplex.bench import compare_methods as cm

    config = cm.CompareConfig.model_validate(
        {
            "base": str(data / "bert"),
            "output": str(tmp_path / "cmp"),
            "seeds": [0],
            "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "batch_size": 8},
            "optim": {"lr": 1e-2, "max_steps": 6, "warmup_steps": 1},
            "trainer": {"accelerator": "cpu"},
            "methods": {"probe": None, "unipelt": {"method": "unipelt"}},
            "sample_sizes": [4, "full"],
            "latency_batch": 2,
            "latency_seq": 8,
            "latency_rounds": 2,
        }
    )
    result = cm.compare(config)
    cm.write(result, tmp_path / "gate-compare.json", tmp_path / "gate")
    probe, unipelt = result["methods"]["probe"], result["methods"]["unipelt"]
    assert probe["4"]["train_examples"] == 12 and probe["full"]["train_examples"] == 120  # K x 3 classes
    assert unipelt["trainable_parameters"] > probe["trainable_parameters"] == 99
    assert probe["latency_x_base"] > 0 and unipelt["peak_train_mib"] >= 0
    # a step budget of 6 ends inside the full set's first epoch (15 batches): evaluated there
    (curve,) = result["epoch_curves"]["unipelt"]
    assert [h["step"] for h in curve] == [6]
    assert json.loads((tmp_path / "gate-compare.json").read_text())["sample_sizes"] == ["4", "full"]
    for name in ("gate-sample-size.png", "gate-epochs.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_example_configs_validate():
    from adaplex.bench.compare_methods import CompareConfig
    from adaplex.train.config import load_train_config
    from adaplex.util.yamlconfig import load_yaml

    root = Path(__file__).parent.parent / "configs"
    for name in ("style", "instruct", "style-v2", "unipelt-style", "classify-topics", "classify-pairs"):
        load_train_config(root / f"{name}.yaml")
    assert load_yaml(root / "compare-methods.yaml", CompareConfig).sample_sizes[-1] == "full"
