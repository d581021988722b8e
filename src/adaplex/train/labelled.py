"""Labelled text for classification: CSV or JSONL records with one text field (or a pair) and a label.

Few-shot sampling takes exactly K records of each class (a class with fewer keeps all of them, with a
warning that names it); oversampling repeats each class's records up to the largest class; class
weights are N / (C · n_c). Every choice is made with a seeded ``random.Random``, so a seed gives the
same sample on every machine.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from adaplex.errors import ConfigError
from adaplex.train.config import ClassificationData
from adaplex.util.jsonl import read_lines

log = logging.getLogger(__name__)
PAIR = ("text_a", "text_b")


@dataclass(frozen=True)
class Labelled:
    texts: tuple[str, ...]  # one text, or a pair
    label: str
    where: str  # file:line, for messages


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file:line, record) of a CSV (header row) or JSONL file; a file without records is an error."""
    if not path.is_file():
        raise ConfigError(f"{path} is not a file; give a CSV or JSONL file of labelled texts")
    if path.suffix.lower() == ".csv":
        try:
            with path.open(encoding="utf-8", newline="") as f:
                records = [(f"{path}:{i + 2}", row) for i, row in enumerate(csv.DictReader(f))]
        except (UnicodeDecodeError, csv.Error) as err:
            raise ConfigError(f"{path} is not a readable UTF-8 CSV file ({err})") from None
    else:
        records = [(f"{path}:{i + 1}", r) for i, r in enumerate(read_lines(path))]
    if not records:
        raise ConfigError(f"{path} holds no records")
    return records


def text_fields(records: list[tuple[str, dict[str, Any]]], config: ClassificationData, path: Path) -> tuple[str, ...]:
    """The configured text fields, else "text", else the pair text_a/text_b, as the first record has them."""
    if config.text_fields:
        return tuple(config.text_fields)
    first = records[0][1]
    if "text" in first:
        return ("text",)
    if all(f in first for f in PAIR):
        return PAIR
    raise ConfigError(
        f"{path}: records have no 'text' field nor both 'text_a' and 'text_b' (fields: {', '.join(first)}); "
        "set data.text_fields"
    )


def read_labelled(
    path: Path, config: ClassificationData, fields: tuple[str, ...] | None = None
) -> tuple[list[Labelled], tuple[str, ...]]:
    """Every record of ``path`` as Labelled, and the text fields read (``fields``, else ``text_fields``);
    a missing or empty field is an error naming the line."""
    records = read_records(path)
    fields = fields or text_fields(records, config, path)
    return as_labelled(records, fields, config.label_field), fields


def as_labelled(
    records: list[tuple[str, dict[str, Any]]], fields: tuple[str, ...], label: str | None
) -> list[Labelled]:
    """Records as Labelled (label "" where ``label`` is None); a missing or empty field names its line."""
    out = []
    for where, record in records:
        missing = [f for f in (*fields, *([label] if label else [])) if record.get(f) in (None, "")]
        if missing:
            have = ", ".join(k for k, v in record.items() if v not in (None, ""))
            raise ConfigError(f"{where}: no {missing[0]!r} field (this record has: {have or 'nothing'})")
        out.append(Labelled(tuple(str(record[f]) for f in fields), str(record[label]) if label else "", where))
    return out


def label_set(train: list[Labelled], source: Path) -> tuple[str, ...]:
    labels = tuple(sorted({r.label for r in train}))
    if len(labels) < 2:
        raise ConfigError(f"{source}: every training record has label {labels[0]!r}; a classifier needs two classes")
    return labels


def check_labels(records: list[Labelled], labels: tuple[str, ...]) -> None:
    known = set(labels)
    for r in records:
        if r.label not in known:
            raise ConfigError(
                f"{r.where}: label {r.label!r} was never seen in training (labels: {', '.join(labels)}); "
                "drop those records or add training examples of that class"
            )


def by_class(records: list[Labelled]) -> dict[str, list[Labelled]]:
    classes: dict[str, list[Labelled]] = {}
    for r in records:
        classes.setdefault(r.label, []).append(r)
    return dict(sorted(classes.items()))


def few_shot(records: list[Labelled], k: int, seed: int) -> list[Labelled]:
    """Exactly ``k`` records of each class, drawn with ``seed`` (a smaller class: all of it, with a warning)."""
    rng = random.Random(seed)
    chosen = []
    for label, members in by_class(records).items():
        if len(members) < k:
            log.warning(
                "class %r has %d training records, fewer than K = %d: all of them are used", label, len(members), k
            )
            chosen += members
        else:
            chosen += rng.sample(members, k)
    rng.shuffle(chosen)
    return chosen


def oversample(records: list[Labelled], seed: int) -> list[Labelled]:
    """Every class repeated (whole copies, then a random remainder) up to the size of the largest."""
    rng = random.Random(seed)
    classes = by_class(records)
    largest = max(len(m) for m in classes.values())
    out = []
    for members in classes.values():
        copies, remainder = divmod(largest, len(members))
        out += members * copies + rng.sample(members, remainder)
    rng.shuffle(out)
    return out


def class_weights(records: list[Labelled], labels: tuple[str, ...]) -> torch.Tensor:
    """w_c = N / (C · n_c): each class weighs as much as the others in the loss."""
    counts = Counter(r.label for r in records)
    return torch.tensor([len(records) / (len(labels) * counts[c]) for c in labels], dtype=torch.float32)


def stratified_split(records: list[Labelled], share: float, seed: int) -> tuple[list[Labelled], list[Labelled]]:
    """(train, held out): ``share`` of each class (at least one record of a class of two or more) held out."""
    rng = random.Random(seed)
    train, held = [], []
    for members in by_class(records).values():
        members = members[:]
        rng.shuffle(members)
        n = min(len(members) - 1, max(1, round(share * len(members))))
        held += members[:n]
        train += members[n:]
    return train, held


def encode(
    records: list[Labelled], tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...], max_length: int
) -> list[dict[str, Any]]:
    """Token ids (a pair joined by the tokenizer's separator, or a newline where it has none) and label index."""
    index = {c: i for i, c in enumerate(labels)}
    out = []
    for r in records:
        if len(r.texts) == 2 and tokenizer.sep_token is not None:
            ids = tokenizer(r.texts[0], r.texts[1], truncation=True, max_length=max_length)["input_ids"]
        else:
            ids = tokenizer("\n".join(r.texts), truncation=True, max_length=max_length)["input_ids"]
        out.append({"input_ids": ids, "label": index.get(r.label, -1)})
    return out


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask (B, T), labels (B,)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}
