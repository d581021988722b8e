"""Training data: text, JSONL and chat JSONL into causal-LM examples, and a resumable data order.

- text:  plain text files, concatenated (EOS between files) and cut into blocks of block_size.
- jsonl: one JSON object per line with a text field; texts are packed into blocks the same way.
- chat:  one JSON object per line with "messages" ([{role, content}, ...], the last one the
         assistant's) or "prompt"/"response"; rendered with the model's chat template, loss on
         the response tokens only; longer than block_size: truncated, with a warning that counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from adaplex.compose.registry import load_registry
from adaplex.errors import ConfigError
from adaplex.train.config import DataConfig
from adaplex.util.jsonl import read_lines, read_text

log = logging.getLogger(__name__)
IGNORE = -100
Example = dict[str, Any]  # input_ids, labels (lists of ints) and, for routed data, key


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The texts' tokens, one after the other, each text followed by EOS."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    return stream


def token_blocks(texts: list[str], tokenizer: PreTrainedTokenizerBase, block: int) -> torch.Tensor:
    """Concatenate the texts (separated by EOS) and cut the token stream into (N, block) rows."""
    stream = token_stream(texts, tokenizer)
    rows = len(stream) // block
    return torch.tensor(stream[: rows * block], dtype=torch.long).view(rows, block)


def chat_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise ConfigError(f"{where}: a chat record needs 'messages' or 'prompt' and 'response'")
    if not messages or messages[-1].get("role") != "assistant":
        raise ConfigError(f"{where}: the last message must be the assistant's response")
    return messages


def chat_example(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Example:
    """Token ids of the rendered conversation; labels mask everything before the final response."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt, full = _ids(prompt), _ids(full)
    labels = [IGNORE] * len(prompt) + full[len(prompt) :]
    return {"input_ids": full, "labels": labels}


def _ids(rendered: Any) -> list[int]:
    return list(rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered)


def build_examples(
    paths: list[Path], config: DataConfig, tokenizer: PreTrainedTokenizerBase, what: str = "training"
) -> list[Example]:
    """Examples of the configured format from ``paths``; empty data is an error (saying ``what`` data).

    With ``key_field``, every example carries its routing key (mapped through the registry, if
    one is given), and text is packed into blocks per key so that no block mixes keys.
    """
    records = (
        [] if config.format == "text" else [(f"{p}:{i + 1}", r) for p in paths for i, r in enumerate(read_lines(p))]
    )
    keys = _keys(records, config)
    if config.format == "chat":
        if not tokenizer.chat_template:
            raise ConfigError("data format 'chat' needs a tokenizer with a chat template; this base model has none")
        examples = [
            chat_example(chat_messages(r, where), tokenizer) | _key(k)
            for (where, r), k in zip(records, keys, strict=True)
        ]
        examples = truncate(examples, config.block_size)
    elif config.format == "text":
        examples = _blocks([read_text(p) for p in paths], tokenizer, config.block_size, None)
    else:
        texts = [_field(r, config.text_field, where) for where, r in records]
        examples = [
            e
            for key in dict.fromkeys(keys)
            for e in _blocks(
                [t for t, k in zip(texts, keys, strict=True) if k == key], tokenizer, config.block_size, key
            )
        ]
    if not examples:
        names = ", ".join(str(p) for p in paths)
        raise ConfigError(f"no {what} examples in {names} (empty, or shorter than one block of {config.block_size})")
    return examples


def _key(key: str | None) -> dict[str, str]:
    return {} if key is None else {"key": key}


def _blocks(texts: list[str], tokenizer: PreTrainedTokenizerBase, block: int, key: str | None) -> list[Example]:
    blocks = token_blocks([t for t in texts if t.strip()], tokenizer, block)
    return [{"input_ids": b.tolist(), "labels": b.tolist()} | _key(key) for b in blocks]


def _keys(records: list[tuple[str, dict[str, Any]]], config: DataConfig) -> list[str | None]:
    """Each record's routing key (None without key_field)."""
    if config.key_field is None:
        return [None] * len(records)
    registry = None
    if config.registry is not None:
        registry = load_registry(config.registry)
    keys = []
    for where, record in records:
        if config.key_field not in record:
            raise ConfigError(f"{where}: no key field {config.key_field!r}; set data.key_field")
        raw = record[config.key_field]
        keys.append(registry.resolve(raw, strict=config.strict_keys) if registry else raw)
    return keys


def _field(record: dict[str, Any], field: str, where: str) -> str:
    if not isinstance(record.get(field), str):
        raise ConfigError(f"{where}: no text field {field!r}; set data.text_field")
    return record[field]


def truncate(examples: list[Example], block: int) -> list[Example]:
    """Cut examples to ``block`` tokens (warning with a count); drop those left with no response tokens."""
    longer = sum(len(e["input_ids"]) > block for e in examples)
    cut = [e | {"input_ids": e["input_ids"][:block], "labels": e["labels"][:block]} for e in examples]
    kept = [e for e in cut if any(label != IGNORE for label in e["labels"][1:])]
    if longer:
        log.warning(
            "%d of %d sequences are longer than block_size %d and were truncated; %d lost their whole response "
            "and were dropped",
            longer,
            len(examples),
            block,
            len(cut) - len(kept),
        )
    return kept


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor | list[str]]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (IGNORE on padding),
    and ``keys`` (one per example) when the examples carry routing keys."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    batch: dict[str, torch.Tensor | list[str]] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any("key" in e for e in examples):
        batch["keys"] = [e.get("key") for e in examples]
    return batch


class StepSampler(Sampler[int]):
    """Indices for a whole run: epoch e is permutation(seed + e) of the dataset, epochs back to back,
    ``total`` indices in all. Iteration begins after ``start`` of them, so a resumed run continues
    the same order; the length stays the whole run's so that Lightning's batch counts line up.

    Under DDP process ``rank`` of ``world`` takes the positions p ≡ rank (mod world) of that one order:
    a step's ``world`` batches of b together hold the samples one process's batch of world·b would, so
    the run equals a single process's with the same global batch, and ``start`` (samples consumed by
    all processes) resumes every process where it stopped."""

    def __init__(self, size: int, total: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.total, self.seed, self.start = size, total, seed, 0
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while position < self.total:
            epoch, offset = divmod(position, self.size)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            take = min(self.size - offset, self.total - position)
            first = (self.rank - position) % self.world  # this process's first position in the chunk
            yield from order[offset + first : offset + take : self.world].tolist()
            position += take

    def __len__(self) -> int:
        return self.total // self.world


class ResumableLoader(DataLoader):
    """A DataLoader over a StepSampler whose position Lightning saves in checkpoints and restores."""

    consumed: Callable[[], int] = staticmethod(lambda: 0)

    def state_dict(self) -> dict[str, int]:
        return {"samples_consumed": self.consumed()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.start = state["samples_consumed"]


class CausalLMData(L.LightningDataModule):
    """Train loader in a resumable run order, and the eval loader."""

    def __init__(
        self,
        train: list[Example],
        evaluation: list[Example],
        config: DataConfig,
        samples_per_process: int,
        seed: int,
        pad_id: int,
    ) -> None:
        super().__init__()
        self.train, self.evaluation, self.config = train, evaluation, config
        self.samples_per_process, self.seed, self.pad_id = samples_per_process, seed, pad_id

    def _collate(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_id)

    def train_dataloader(self) -> DataLoader:
        # under DDP the processes share one order (the Trainer runs with use_distributed_sampler=False)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = StepSampler(len(self.train), self.samples_per_process * world, self.seed, rank, world)
        loader = ResumableLoader(
            self.train,
            batch_size=self.config.batch_size,
            sampler=sampler,
            collate_fn=self._collate,
            num_workers=self.config.num_workers,
        )
        trainer = self.trainer
        loader.consumed = lambda: (
            trainer.global_step * trainer.accumulate_grad_batches * self.config.batch_size * trainer.world_size
        )
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.evaluation:
            return []
        return DataLoader(self.evaluation, batch_size=self.config.batch_size, collate_fn=self._collate)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor | list[Example], batch: int = 8, pad_id: int = 0) -> float:
    """exp(mean negative log-likelihood over the labelled tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples = [{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks] if torch.is_tensor(blocks) else blocks
    total, count = 0.0, 0
    for start in range(0, len(examples), batch):
        inputs = {k: v.to(device) for k, v in collate(examples[start : start + batch], pad_id).items() if k != "keys"}
        loss = model(**inputs).loss
        tokens = int((inputs["labels"][:, 1:] != IGNORE).sum())
        total += loss.item() * tokens
        count += tokens
    model.train(was_training)
    return float(torch.exp(torch.tensor(total / count)))
