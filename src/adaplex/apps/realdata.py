"""Real text that installed packages ship, prepared as training files.

- fortunes: Debian's ``fortunes`` collections (/usr/share/games/fortunes), one topic per file,
  fortunes separated by '%' lines. Install with ``apt-get install fortunes`` (``make data``).
- pydoc:   Python's ``pydoc_data.topics`` (in every Python): reference documentation topics.

``adaplex data prepare OUT`` writes style/{train,heldout}.txt (fortunes), instruct/{train,heldout}.jsonl
(questions about Python topics answered by the reference's first paragraphs, in chat form), and
topics/<topic>/{train,heldout}.txt (one directory per fortunes topic) and topics/{train,heldout}.jsonl
(every topic's fortunes with a "key" field), for routing experiments; and two classification tasks:

- classify/topics/{train,eval}.jsonl: which fortunes collection a fortune comes from (8 topics,
  imbalanced as they come: 843 computers fortunes against 139 love ones);
- classify/pydoc-pairs/{train,eval}.jsonl: does this paragraph (text_b) answer this question about a
  Python topic (text_a)? "yes" for a paragraph of that topic, "no" for one of another topic, half each;
  split by topic, so the evaluation asks about topics never seen in training.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from adaplex.errors import ConfigError
from adaplex.train.corpora import FORTUNES_DIR, fortunes, pydoc_topics, split, topic_paragraphs

STYLE_TOPICS = ("computers", "science", "wisdom", "work", "food", "love", "politics", "literature")
QUESTIONS = ("What does the Python reference say about {}?", "Explain {} in Python.", "How does {} work in Python?")


def fortunes_available() -> bool:
    return all((FORTUNES_DIR / t).is_file() for t in STYLE_TOPICS)


def first_paragraph(text: str) -> str:
    """The first prose paragraph of a pydoc topic, without its title and grammar blocks."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text)]
    prose = [p for p in paragraphs if len(p) > 80 and not p.startswith(("*", "=")) and "::=" not in p]
    return " ".join(prose[0].split()) if prose else ""


def instruct_records(seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for name, text in pydoc_topics().items():
        answer = first_paragraph(text)
        if answer:
            subject = f"'{name.replace('-', ' ')}'"
            records.append({"prompt": rng.choice(QUESTIONS).format(subject), "response": answer[:600]})
    return records


def pair_records(topics: dict[str, list[str]], others: dict[str, list[str]], seed: int) -> list[dict[str, str]]:
    """For every paragraph of every topic: (question, that paragraph, yes) and (question, a paragraph of
    another topic, no)."""
    rng = random.Random(seed)
    pool = [(name, p) for name, ps in others.items() for p in ps]
    records = []
    for name, paragraphs in topics.items():
        subject = f"'{name.replace('-', ' ')}'"
        for paragraph in paragraphs:
            question = rng.choice(QUESTIONS).format(subject)
            records.append({"text_a": question, "text_b": paragraph, "label": "yes"})
            other = rng.choice([p for n, p in pool if n != name])
            records.append({"text_a": question, "text_b": other, "label": "no"})
    rng.shuffle(records)
    return records


def classification_sets(seed: int = 0) -> dict[str, dict[str, list[dict[str, str]]]]:
    """task -> {"train": records, "eval": records}; the topics task needs the fortunes collections."""
    sets = {}
    if fortunes_available():
        labelled = {"train": [], "eval": []}
        for topic in STYLE_TOPICS:
            train, held = split(fortunes(topic), heldout_every=5)
            labelled["train"] += [{"text": t, "label": topic} for t in train]
            labelled["eval"] += [{"text": t, "label": topic} for t in held]
        for part in labelled.values():
            random.Random(seed).shuffle(part)
        sets["topics"] = labelled
    topics = topic_paragraphs()
    names = sorted(topics)
    held_names = set(names[::5])
    train_topics = {n: topics[n] for n in names if n not in held_names}
    eval_topics = {n: topics[n] for n in names if n in held_names}
    sets["pydoc-pairs"] = {
        "train": pair_records(train_topics, train_topics, seed),
        "eval": pair_records(eval_topics, topics, seed + 1),
    }
    return sets


def prepare(out: Path, seed: int = 0) -> dict[str, int]:
    """Write the real-text training files under ``out``; returns counts per file."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a directory to write the data into")
    counts: dict[str, int] = {}

    def write(path: Path, lines: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[str(path.relative_to(out))] = len(lines)

    if fortunes_available():
        style = [f for t in STYLE_TOPICS for f in fortunes(t)]
        random.Random(seed).shuffle(style)
        keyed: dict[str, list[str]] = {"train": [], "heldout": []}
        for topic in STYLE_TOPICS:
            train, held = split(fortunes(topic))
            write(out / "topics" / topic / "train.txt", train)
            write(out / "topics" / topic / "heldout.txt", held)
            keyed["train"] += [json.dumps({"text": t, "key": topic}) for t in train]
            keyed["heldout"] += [json.dumps({"text": t, "key": topic}) for t in held]
        for part, lines in keyed.items():
            write(out / "topics" / f"{part}.jsonl", lines)
    else:  # documented fallback: Python's own docs as the "style" text
        style = [first_paragraph(t) for t in pydoc_topics().values() if first_paragraph(t)]
    train, held = split(style)
    write(out / "style" / "train.txt", train)
    write(out / "style" / "heldout.txt", held)
    train, held = split(instruct_records(seed))
    write(out / "instruct" / "train.jsonl", [json.dumps(r) for r in train])
    write(out / "instruct" / "heldout.jsonl", [json.dumps(r) for r in held])
    for task, parts in classification_sets(seed).items():
        for part, records in parts.items():
            write(out / "classify" / task / f"{part}.jsonl", [json.dumps(r) for r in records])
    return counts
