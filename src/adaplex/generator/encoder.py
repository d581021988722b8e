"""The frozen text encoder: conditioning texts -> (P, E) sentence embeddings, one per line.

Each line is mean-pooled over its tokens and L2-normalised, as sentence-transformers does for
all-MiniLM-L6-v2 (the embedded default, ``minilm-l6``). A conditioning text is a task description on
its first line and sample inputs on the next ones; it becomes exactly ``lines`` embeddings: extra
lines are dropped, missing ones repeat the text's lines in turn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaplex.core.fingerprint import fingerprint
from adaplex.core.models import load_base
from adaplex.errors import ConfigError


def condition_lines(text: str, lines: int) -> list[str]:
    """The text's first ``lines`` non-empty lines, cycled to exactly ``lines``; an empty text is an error."""
    found = [line.strip() for line in text.splitlines() if line.strip()]
    if not found:
        raise ConfigError("a prompt is empty; describe the task (first line) and give sample inputs (next lines)")
    return [found[i % len(found)] for i in range(lines)]


class TextEncoder(nn.Module):
    """A frozen encoder model and its tokenizer; ``forward(texts)`` -> (N, lines, E)."""

    def __init__(self, spec: str, lines: int, max_length: int = 128) -> None:
        super().__init__()
        self.model, self.tokenizer = load_base(spec)
        self.model.requires_grad_(False)
        self.spec, self.lines, self.max_length = spec, lines, max_length
        self.width = int(self.model.config.hidden_size)

    def fingerprint(self) -> str:
        return fingerprint(self.model)

    @torch.no_grad()
    def embed(self, sentences: list[str], chunk: int = 16) -> torch.Tensor:
        """(N, E) mean-pooled, L2-normalised embeddings; sentences run in chunks of similar length, so
        that a batch pads little."""
        ids = self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        pooled = torch.empty(len(ids), self.width)
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            pooled[rows] = self._pool([ids[i] for i in rows])
        return F.normalize(pooled, dim=-1)

    def _pool(self, ids: list[list[int]]) -> torch.Tensor:
        """(n, E) mean over the tokens of each sequence of token ids."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, S, 1)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu()  # (n, E)

    def forward(self, texts: list[str]) -> torch.Tensor:
        sentences = [line for text in texts for line in condition_lines(text, self.lines)]
        return self.embed(sentences).view(len(texts), self.lines, -1)  # (N, lines, E)
