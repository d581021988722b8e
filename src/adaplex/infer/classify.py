"""Predictions of a saved classification model (a bundle with a head): labels and probabilities."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from adaplex.core.adapted import Adapted
from adaplex.core.models import choose_base, load_base
from adaplex.errors import StorageError
from adaplex.io.atomic import write_text_atomic
from adaplex.io.describe import recorded_base
from adaplex.io.storage import find_part, load, read_part
from adaplex.methods.head import ClassifierHead, HeadConfig
from adaplex.train import labelled
from adaplex.train.classifier import classify, metric_set


@dataclass
class Classifier:
    handle: Adapted
    head: ClassifierHead
    config: HeadConfig
    tokenizer: PreTrainedTokenizerBase

    @torch.no_grad()
    def probabilities(self, records: list[labelled.Labelled], batch_size: int = 64) -> torch.Tensor:
        """(N, classes) softmax probabilities, in the order of ``config.labels``."""
        encoded = labelled.encode(records, self.tokenizer, self.config.labels, self.config.max_length)
        pad = self.tokenizer.pad_token_id or 0
        out = []
        for start in range(0, len(encoded), batch_size):
            batch = labelled.collate(encoded[start : start + batch_size], pad)
            out.append(torch.softmax(classify(self.handle, self.head, batch).float(), dim=-1))
        return torch.cat(out)


def load_classifier(
    path: Path, base: str | None = None, force: bool = False, dtype: torch.dtype = torch.float32
) -> Classifier:
    """The base (in ``dtype``) with the bundle's adapters attached and its head, each checked against the base."""
    member = find_part(path, "head")
    recorded, relative_to = recorded_base(path)
    model, tokenizer = load_base(choose_base(base, recorded), relative_to=relative_to, dtype=dtype)
    fields, tensors = read_part(model, member, force)
    config = HeadConfig.model_validate(fields)
    handle = load(model, path, force=force)
    head = ClassifierHead(config)
    try:
        head.load_state_dict(tensors)
    except RuntimeError as err:
        raise StorageError(f"{member} does not fit its config ({str(err).splitlines()[0]}); restore it") from None
    return Classifier(handle, head.eval(), config, tokenizer)


def predict_file(
    classifier: Classifier, source: Path, target: Path, label_field: str = "label", overwrite: bool = False
) -> dict[str, Any]:
    """Write each record of ``source`` with its predicted label and the probability of every class
    (JSONL, or CSV for a .csv target); where every record has ``label_field``, also score them."""
    if target.exists() and not overwrite:
        raise StorageError(f"{target} already exists; choose another path or pass --overwrite")
    records = labelled.read_records(source)
    labels = classifier.config.labels
    scored = all(r.get(label_field) not in (None, "") for _, r in records)
    items = labelled.as_labelled(records, classifier.config.text_fields, label_field if scored else None)
    if scored:
        labelled.check_labels(items, labels)
    probs = classifier.probabilities(items)  # (N, classes)
    predicted = probs.argmax(-1)
    rows = [
        {**record, "predicted": labels[int(k)], "probabilities": dict(zip(labels, p.tolist(), strict=True))}
        for (_, record), k, p in zip(records, predicted, probs, strict=True)
    ]
    write_text_atomic(target, _csv(rows, labels) if target.suffix.lower() == ".csv" else _jsonl(rows))
    summary: dict[str, Any] = {"records": len(rows), "output": str(target)}
    if scored:
        truth = torch.tensor([labels.index(i.label) for i in items])
        metrics = metric_set(len(labels))
        metrics.update(probs, truth)
        summary |= {k: float(v) for k, v in metrics.compute().items()}
    return summary


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _csv(rows: list[dict[str, Any]], labels: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    fields = [k for k in rows[0] if k != "probabilities"]
    writer = csv.writer(buffer)
    writer.writerow([*fields, *(f"p_{c}" for c in labels)])
    for r in rows:
        writer.writerow([*(r[f] for f in fields), *(f"{r['probabilities'][c]:.6f}" for c in labels)])
    return buffer.getvalue()
