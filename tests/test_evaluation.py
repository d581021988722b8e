"""Held-out evaluation: files shorter than a block, a token limit, and phases reported as they run."""

from __future__ import annotations

import pytest

import adaplex
from adaplex import LoRAConfig
from adaplex.errors import ConfigError
from adaplex.infer.generate import compare, eval_examples
from adaplex.util.progress import reporting

import tiny
from helpers import randomize

TEXT = " ".join(f"w{3 + i % 90}" for i in range(50))


def test_a_file_shorter_than_one_block_is_evaluated_and_tokens_can_be_capped(tmp_path):
    tokenizer = tiny.word_tokenizer()
    (tmp_path / "short.txt").write_text(TEXT)
    whole = eval_examples(tmp_path / "short.txt", tokenizer, block=256)
    assert [len(e["input_ids"]) for e in whole] == [51]  # 50 words and EOS, one shorter block
    capped = eval_examples(tmp_path / "short.txt", tokenizer, block=16, max_tokens=40)
    assert [len(e["input_ids"]) for e in capped] == [16, 16, 8]
    (tmp_path / "chat.jsonl").write_text('{"prompt": "w5 w6", "response": "w7 w8"}\n' * 3)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="has no text to evaluate"):
        eval_examples(tmp_path / "empty.txt", tokenizer)
    (tmp_path / "tiny.jsonl").write_text('{"text": "w5"}\n')
    with pytest.raises(ConfigError, match="no eval examples in"):
        eval_examples(tmp_path / "tiny.jsonl", tokenizer, block=4)


def test_compare_reports_each_phase(tmp_path):
    model = tiny.llama()
    handle = adaplex.attach(model, "style", LoRAConfig(r=2, targets=("q", "v")))
    randomize(handle, "style")
    (tmp_path / "held.txt").write_text(TEXT)
    phases: list[str] = []
    with reporting(phases.append):
        rows = compare(handle, tiny.word_tokenizer(), ["style"], ["w5 w6"], [tmp_path / "held.txt"], False, 3)
    assert [r["stage"] for r in rows] == ["base", "style"]
    assert rows[0]["perplexity"] != rows[1]["perplexity"]
    held = str(tmp_path / "held.txt")
    assert phases == [
        f"base: perplexity on {held} (51 tokens)",
        "base: 1 completions",
        f"style: perplexity on {held} (51 tokens)",
        "style: 1 completions",
    ]
