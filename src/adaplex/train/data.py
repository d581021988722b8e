"""Text sources and causal-LM batches.

Real text comes from what installed packages ship: Python's ``pydoc_data.topics`` (always
present) and, where installed, Debian's ``fortunes`` collections.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def pydoc_topics() -> dict[str, str]:
    """Python's reference documentation topics, name -> text."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def token_blocks(texts: list[str], tokenizer: PreTrainedTokenizerBase, block: int) -> torch.Tensor:
    """Concatenate the texts (separated by EOS) and cut the token stream into (N, block) rows."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    rows = len(stream) // block
    return torch.tensor(stream[: rows * block], dtype=torch.long).view(rows, block)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 8) -> float:
    """exp(mean token negative log-likelihood) over the blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch].to(next(model.parameters()).device)
        loss = model(input_ids=ids, labels=ids).loss
        tokens = ids.numel() - ids.shape[0]
        total += loss.item() * tokens
        count += tokens
    model.train(was_training)
    return float(torch.exp(torch.tensor(total / count)))
