"""The command line on tiny local models: processes of their own, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaplex.core.models import load_base
from adaplex.io.records import CONFIG_FILE, WEIGHTS_FILE
from adaplex.io.storage import load, save_adapter, save_bundle

import tiny
from cli_process import run_cli
from helpers import randomize


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama base on disk and a saved stack bundle for it."""
    root = tmp_path_factory.mktemp("cli")
    tiny.save_base("llama", root / "base")
    model, _ = load_base(str(root / "base"))
    from adaplex import Adapted, LoRAConfig, MoSLoRAConfig

    handle = Adapted.of(model)
    handle.add("style", LoRAConfig(r=2, targets=("q", "v")))
    handle.add("instruct", MoSLoRAConfig(r=2, targets=("o", "up")))
    randomize(handle, "style", seed=1)
    randomize(handle, "instruct", seed=2)
    save_bundle(handle, root / "stack", version="v1")
    save_adapter(handle, "style", root / "style")
    return root, model, handle


def test_info_shows_bundle_members_and_base(work):
    root, _, handle = work
    result = run_cli("info", str(root / "stack"))
    assert result.returncode == 0, result.stderr
    for text in ("bundle", "style", "instruct", "moslora", str(root / "base")):
        assert text in result.stdout


def test_merge_writes_a_plain_model_that_loads_without_adaplex(work):
    root, model, handle = work
    result = run_cli("merge", str(root / "stack"), "--out", str(root / "merged"))
    assert result.returncode == 0, result.stderr
    plain = AutoModelForCausalLM.from_pretrained(root / "merged").eval()
    ids = tiny.tokens()
    torch.testing.assert_close(tiny.outputs(plain, ids), tiny.outputs(model, ids), atol=1e-4, rtol=0)
    again = run_cli("merge", str(root / "stack"), "--out", str(root / "merged"))
    assert_clean_error(again, "already exists", "--overwrite")


def test_export_then_import_through_the_cli(work):
    root, model, handle = work
    exported = run_cli("export", str(root / "stack"), str(root / "peft"))
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in (root / "peft").iterdir()) == ["instruct", "style"]
    combined = run_cli("export", str(root / "stack"), str(root / "combined"), "--combined")
    assert combined.returncode == 0, combined.stderr
    imported = run_cli("import", str(root / "combined"), str(root / "imported"))
    assert imported.returncode == 0, imported.stderr
    assert sorted(p.name for p in (root / "imported").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    fresh, _ = load_base(str(root / "base"))
    load(fresh, root / "imported")
    ids = tiny.tokens()
    torch.testing.assert_close(tiny.outputs(fresh, ids), tiny.outputs(model, ids), atol=1e-5, rtol=0)


def test_bad_input_gives_one_line_errors(work, tmp_path):
    root, _, _ = work
    assert_clean_error(run_cli("info", str(tmp_path / "missing")), "is not a directory")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text((root / "style" / CONFIG_FILE).read_text())
    data = (root / "style" / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("merge", str(broken), "--out", str(tmp_path / "m")), "checksum")
    assert not (tmp_path / "m").exists()
    assert_clean_error(
        run_cli("merge", str(root / "style"), "--out", str(tmp_path / "m"), "--base", "nowhere"),
        "base model 'nowhere' not found",
        "tried",
    )
    assert_clean_error(run_cli("export", str(root / "style"), str(tmp_path / "x"), "--to", "onnx"), "onnx")


def test_recorded_base_that_moved_lists_the_places_tried(work, tmp_path):
    root, _, _ = work
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        (moved / file).write_bytes((root / "style" / file).read_bytes())
    record = (moved / CONFIG_FILE).read_text()
    assert str(root / "base") in record
    (root / "base").rename(root / "base-moved")
    try:
        result = run_cli("merge", str(moved), "--out", str(tmp_path / "m"))
        assert_clean_error(result, "not found; tried", "embedded models", f"directory {root / 'base'}")
    finally:
        (root / "base-moved").rename(root / "base")


@pytest.mark.parametrize("args", [["--help"], ["info", "--help"], ["info", "{stack}"], ["bench", "route", "--help"]])
def test_the_command_line_starts_without_torch(work, args):
    root = work[0]
    argv = [a.format(stack=root / "stack") for a in args]
    script = (
        "import sys\nimport adaplex.cli as cli\nsys.argv = ['adaplex', *sys.argv[1:]]\n"
        "try:\n    cli.main()\nexcept SystemExit as done:\n    code = done.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, code, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "False False 0", result.stderr


def test_training_output_is_clean(work, tmp_path):
    root = work[0]
    (tmp_path / "t.txt").write_text(
        "\n".join(f"w{3 + i % 90} w{3 + (i * 7) % 90} w{3 + (i * 3) % 90}" for i in range(120))
    )
    (tmp_path / "run.yaml").write_text(
        f"base: {root / 'base'}\noutput: {tmp_path / 'out'}\n"
        "adapters: [{name: style, config: {method: lora, r: 2}}]\n"
        f"data: {{format: text, train: [{tmp_path / 't.txt'}], block_size: 8, batch_size: 4}}\n"
        "optim: {max_steps: 2, warmup_steps: 1}\ntrainer: {accelerator: cpu, checkpoint_every_n_steps: 2}\n"
    )
    result = run_cli("train", str(tmp_path / "run.yaml"))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("GPU available") == 1  # Lightning's INFO lines once, not twice
    assert "Tip" not in output and "litlogger" not in output  # no adverts
    assert "deprecated" not in output
    assert "trained adapter saved to" in result.stdout
