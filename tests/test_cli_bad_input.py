"""Every command, each of its options and arguments given a bad value: a one-line error, exit code 2,
no traceback, and no file changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import adaplex
from adaplex import LoRAConfig
from adaplex.compose.gate import UniPELTConfig, add_unipelt
from adaplex.core.models import load_base
from adaplex.io.bundle import build_bundle
from adaplex.io.peft import export_peft
from adaplex.io.storage import save_adapter
from adaplex.methods.head import ClassifierHead, HeadConfig
from adaplex.train.classify_run import save_classifier

import tiny
from cli_process import real_cli, run_cli
from helpers import randomize


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_files(tmp_path_factory.mktemp("bad"))


def make_files(root: Path) -> Path:
    """A tiny base, an adapter, a PEFT export of it, a bundle, and files that are wrong in one way each."""
    tiny.save_base("llama", root / "base")
    handle = adaplex.attach(tiny.llama(), "a", LoRAConfig(r=2, targets=("q", "v")))
    randomize(handle, "a")
    save_adapter(handle, "a", root / "adapter")
    export_peft(handle, ["a"], root / "peft")
    build_bundle(tiny.llama(), {"x": root / "adapter", "y": root / "peft"}, root / "bundle")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text("{not json")
    (root / "empty").mkdir()
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "garbage.bin").write_bytes(b"\x00not a pickle")
    (root / "text.txt").write_text("hello\n")
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("mine\n")
    (root / "prompts.jsonl").write_text('{"key": "a", "prompt": "hi"}\n')
    (root / "norows.jsonl").write_text('{"id": 1}\n')
    (root / "empty.jsonl").write_text("")
    (root / "bad.yaml").write_text("base: [unclosed\n")
    make_classification_files(root)
    (root / "unknown.yaml").write_text(
        "base: x\noutput: y\nadapters: [{name: a, config: {method: lora}}]\ndata: {train: [t.txt]}\nsurprise: 1\n"
    )
    return root


def make_classification_files(root: Path) -> None:
    """A gated classifier (UniPELT + head, untrained), labelled files and classification configs."""
    model, _ = load_base(str(root / "base"))
    handle = adaplex.Adapted.of(model)
    add_unipelt(handle, "u", UniPELTConfig())
    config = HeadConfig(labels=("a", "b"), pooling="last", hidden=32)
    save_classifier(handle, ClassifierHead(config), config, root / "classifier", None)
    (root / "zeta.jsonl").write_text('{"text": "w3 w4", "label": "zeta"}\n')
    (root / "one-class.jsonl").write_text("".join(f'{{"text": "w{i}", "label": "a"}}\n' for i in range(3, 9)))
    common = f"task: classification\nbase: {root}/base\noutput: {root}/cls-out\n"
    (root / "one-class.yaml").write_text(common + f"data: {{train: {root}/one-class.jsonl}}\n")
    (root / "no-parts.yaml").write_text(
        common
        + f"data: {{train: {root}/zeta.jsonl}}\n"
        + "adapters: [{name: u, config: {method: unipelt, lora: null, prefix: null, bottleneck: null}}]\n"
    )
    (root / "task.yaml").write_text("task: regression\n")


B = ["--base", "{root}/base"]
CASES = {
    "info missing": (["info", "{root}/missing"], "not a directory"),
    "info file": (["info", "{root}/text.txt"], "not a directory"),
    "info corrupt": (["info", "{root}/corrupt"], "corrupt"),
    "info empty dir": (["info", "{root}/empty"], "an adaplex adapter or bundle directory"),
    "info bad base": (["info", "--base", "{root}/missing"], "not found"),
    "export missing": (["export", "{root}/missing", "{root}/out"], "is not an adapter, bundle or PEFT"),
    "export format": (["export", "{root}/adapter", "{root}/out", "--to", "onnx"], "unknown export format"),
    "export taken": (["export", "{root}/adapter", "{root}/taken", *B], "already exists"),
    "export key": (["export", "{root}/adapter", "{root}/out", "--key", "x", *B], "routed bundle"),
    "export combined bundle": (["export", "{root}/bundle", "{root}/out", "--combined", *B], "does not apply"),
    "export unknown key": (["export", "{root}/bundle", "{root}/out", "--key", "z", *B], "unknown routing key"),
    "import not peft": (["import", "{root}/adapter", "{root}/out"], "is not a PEFT directory"),
    "import taken": (["import", "{root}/peft", "{root}/taken", *B], "already exists"),
    "bundle no expert": (["bundle", "--out", "{root}/out"], "Missing option '--expert'"),
    "bundle spec": (["bundle", "--expert", "a", "--out", "{root}/out"], "is not KEY=DIR"),
    "bundle corrupt": (["bundle", "--expert", "a={root}/corrupt", "--out", "{root}/out", *B], "corrupt"),
    "merge no paths": (["merge", "--out", "{root}/out"], "Missing argument"),
    "merge taken": (["merge", "{root}/adapter", "--out", "{root}/taken", *B], "already exists"),
    "merge missing": (["merge", "{root}/missing", "--out", "{root}/out"], "is not an adapter, bundle or PEFT"),
    "convert missing": (["convert", "{root}/missing.bin", "{root}/out.safetensors"], "is not a file"),
    "convert garbage": (["convert", "{root}/garbage.bin", "{root}/out.safetensors"], "not a readable PyTorch"),
    "convert taken": (["convert", "{root}/garbage.bin", "{root}/text.txt"], "already exists"),
    "train missing": (["train", "{root}/missing.yaml"], "cannot read config"),
    "train not yaml": (["train", "{root}/bad.yaml"], "not valid YAML"),
    "train not utf-8": (["train", "{root}/latin1.txt"], "not UTF-8"),
    "train unknown field": (["train", "{root}/unknown.yaml"], "surprise"),
    "generate empty prompt": (["generate", "--prompt", " ", *B], "empty"),
    "generate no prompt": (["generate", *B], "Missing option '--prompt'"),
    "generate tokens": (["generate", "--prompt", "x", "--max-new-tokens", "0", *B], "greater than or equal to"),
    "generate weight": (["generate", "--prompt", "x", "--adapter", "{root}/adapter:half", *B], "must be a number"),
    "generate adapter": (["generate", "--prompt", "x", "--adapter", "{root}/missing", *B], "not an adapter"),
    "compare empty prompt": (["compare", "--prompt", "", "--adapter", "{root}/adapter"], "empty"),
    "infer workers": (
        ["infer", "{root}/prompts.jsonl", "{root}/o.jsonl", "--bundle", "{root}/adapter", "--workers", "0"],
        "greater than or equal to",
    ),  # noqa: E501
    "infer batch": (
        ["infer", "{root}/prompts.jsonl", "{root}/o.jsonl", "--bundle", "{root}/adapter", "--batch-size", "-1"],
        "greater than or equal to",
    ),  # noqa: E501
    "infer not bundle": (
        ["infer", "{root}/prompts.jsonl", "{root}/o.jsonl", "--bundle", "{root}/adapter"],
        "not a routed bundle",
    ),  # noqa: E501
    "infer taken": (
        ["infer", "{root}/prompts.jsonl", "{root}/text.txt", "--bundle", "{root}/adapter"],
        "already exists",
    ),  # noqa: E501
    "infer device": (
        ["infer", "{root}/prompts.jsonl", "{root}/o.jsonl", "--bundle", "{root}/adapter", "--device", "tpu"],
        "not cpu",
    ),  # noqa: E501
    "infer no cuda": (
        ["infer", "{root}/prompts.jsonl", "{root}/o.jsonl", "--bundle", "{root}/adapter", "--device", "cuda:7"],
        "no such CUDA device",
    ),  # noqa: E501
    "demo steps": (["demo", "--steps", "0", "--out", "{root}/demo"], "greater than or equal to"),
    "data prepare file": (["data", "prepare", "{root}/text.txt"], "is a file"),
    "faults run bit": (["faults", "run", "--location", "q", "--bit", "-1"], "greater than or equal to"),
    "faults run count": (
        ["faults", "run", "--location", "q", "--bit", "3", "--count", "0"],
        "greater than or equal to",
    ),
    "faults run seq": (["faults", "run", "--location", "q", "--bit", "3", "--seq", "0"], "greater than or equal to"),
    "faults sweep missing": (
        ["faults", "sweep", "{root}/missing.yaml", "--out", "{root}/runs.jsonl"],
        "cannot read config",
    ),  # noqa: E501
    "faults report not utf-8": (["faults", "report", "{root}/latin1.txt"], "UTF-8"),
    "faults report not runs": (["faults", "report", "{root}/norows.jsonl"], "output of `adaplex faults sweep`"),
    "faults report empty": (["faults", "report", "{root}/empty.jsonl"], "holds no runs"),
    "bench overhead batch": (["bench", "overhead", "--batch", "0"], "greater than or equal to"),
    "bench overhead rounds": (["bench", "overhead", "--rounds", "0"], "greater than or equal to"),
    "bench overhead device": (["bench", "overhead", "--device", "gpu0"], "not cpu"),
    "bench train steps": (["bench", "train", "--steps", "1"], "greater than or equal to"),
    "bench route adapters": (["bench", "route", "--adapters", "0"], "greater than or equal to"),
    "bench route seq": (["bench", "route", "--seq", "0"], "greater than or equal to"),
    "bench route peers": (["bench", "route", "--peers", "vllm"], "give peft or none"),
    "bench route layers alone": (["bench", "route", "--layers", "2"], "give --shape CONFIG too"),
    "bench train quantize": (["bench", "train", "--quantize", "3bit"], "give none, 4bit or 8bit"),
    "bench route bad shape": (["bench", "route", "--shape", "{root}/latin1.txt", "--peers", "none"], "not a readable"),
    "bench faults repeats": (["bench", "faults", "--repeats", "0"], "greater than or equal to"),
    "predict unseen label": (
        ["predict", "{root}/classifier", "{root}/zeta.jsonl", "{root}/p.jsonl"],
        "label 'zeta' was never seen in training",
    ),
    "predict not a classifier": (["predict", "{root}/adapter", "{root}/zeta.jsonl", "{root}/p.jsonl"], "not a bundle"),
    "predict a bundle without head": (
        ["predict", "{root}/bundle", "{root}/zeta.jsonl", "{root}/p.jsonl"],
        "no head; is it a classification model?",
    ),
    "predict missing input": (["predict", "{root}/classifier", "{root}/nope.jsonl", "{root}/p.jsonl"], "not a file"),
    "predict existing output": (
        ["predict", "{root}/classifier", "{root}/zeta.jsonl", "{root}/text.txt"],
        "already exists",
    ),
    "export gated": (["export", "{root}/classifier", "{root}/new-peft"], "pass --lora-only"),
    "export lora-only plain": (
        ["export", "{root}/adapter", "{root}/new-peft", "--lora-only", *B],
        "applies to a gated",
    ),
    "train one class": (["train", "{root}/one-class.yaml"], "a classifier needs two classes"),
    "train empty gate": (["train", "{root}/no-parts.yaml"], "enable at least one of lora, prefix, bottleneck"),
    "train classification resume": (["train", "{root}/one-class.yaml", "--resume"], "--resume applies"),
    "train unknown task": (["train", "{root}/task.yaml"], "unknown task 'regression'"),
    "gen generate missing generator": (
        ["gen", "generate", "{root}/missing", "hi", "--out", "{root}/g"],
        "not a generator",
    ),
    "gen generate empty prompt": (["gen", "generate", "{root}/missing", " ", "--out", "{root}/g"], "prompt is empty"),
    "gen generate empty file": (
        ["gen", "generate", "{root}/missing", "--file", "{root}/empty.jsonl", "--out", "{root}/g"],
        "holds no prompts",
    ),
    "gen generate taken": (["gen", "generate", "{root}/missing", "hi", "--out", "{root}/taken"], "already exists"),
    "gen test-tokenization not a zoo": (["gen", "test-tokenization", "{root}/empty"], "is not a zoo"),
    "unknown command": (["frobnicate"], "No such command"),
    "unknown option": (["info", "--colour"], "No such option"),
}


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with its content's hash: what a bad command must not change."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# Commands whose error comes after the libraries they load are imported (PEFT with bitsandbytes, a model,
# Lightning), run in a fresh interpreter too: nothing printed while importing them may add a line.
FRESH = ("export missing", "info bad base", "train one class", "bench route peers", "gen generate empty prompt")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(root, case):
    assert_one_line_and_nothing_changed(root, case, run_cli)


@pytest.mark.parametrize("case", FRESH)
def test_bad_input_in_a_fresh_interpreter_is_one_line(root, case):
    assert_one_line_and_nothing_changed(root, case, real_cli)


def assert_one_line_and_nothing_changed(root: Path, case: str, cli) -> None:
    args, fragment = CASES[case]
    before = tree(root)
    result = cli(*[a.format(root=root) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert tree(root) == before
