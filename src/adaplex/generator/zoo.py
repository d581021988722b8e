"""The model zoo: one small LoRA trained per real data subset, several checkpoints kept along each run,
each paired with conditioning texts (a task description and sample inputs drawn from the subset).

Layout of a zoo directory::

    zoo.yaml                    the config it was built with (a resumed build must match it)
    index.jsonl                 one line per finished run: subset, description, conditions, checkpoints
    runs/<subset>/step-NNNNN/   ordinary adapter directories (provenance: the subset and step)
    runs/<subset>/heldout.txt   the subset's held-out texts (one per line), never trained on

Every run starts from the same initialisation (``init_seed``: the same A, B = 0), so that the zoo's
checkpoints share one parameter basis and means or interpolations of them are meaningful.
A build resumes after a kill: finished runs (in the index) are skipped, a run cut short is redone.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.errors import ConfigError, StorageError
from adaplex.io.atomic import write_text_atomic
from adaplex.io.records import AdapterRecord, read_adapter_record
from adaplex.io.storage import save_adapter
from adaplex.io.tensor_files import read_tensors
from adaplex.methods import LoRAConfig, method_config
from adaplex.train.config import DataConfig
from adaplex.train.corpora import fortunes, fortunes_collections, split, topic_paragraphs
from adaplex.train.data import CausalLMData, token_blocks
from adaplex.train.module import AdapterLM
from adaplex.train.run import resolve_precision
from adaplex.util.jsonl import read_lines
from adaplex.util.measure import device_name
from adaplex.util.progress import report
from adaplex.util.yamlconfig import load_yaml

INDEX = "index.jsonl"
SNAPSHOT = "zoo.yaml"
ZOO_ADAPTER = "zoo"

# What each Debian fortunes collection holds, in words: the task descriptions of its subset.
FORTUNES_TOPICS = {
    "art": "quotations about art, artists, music and creativity",
    "computers": "jokes and sayings about computers, programmers and software",
    "cookie": "fortune-cookie sayings, aphorisms and one-line jokes",
    "debian": "quotes from Debian developers and jokes about the Debian project",
    "definitions": "humorous dictionary definitions of everyday words",
    "disclaimer": "mock legal disclaimers and warnings",
    "drugs": "quotations about drugs, alcohol and getting high",
    "education": "quotations about schools, teachers, students and learning",
    "ethnic": "jokes and sayings about nationalities and places",
    "food": "quotations and jokes about food, cooking and eating",
    "fortunes": "classic fortunes: assorted wisecracks and sayings",
    "goedel": "jokes about logic, paradoxes and self-reference",
    "humorists": "quotations from famous humorists and wits",
    "kids": "quotations about children, parents and growing up",
    "knghtbrd": "quotes collected from IRC chats about Linux and programming",
    "law": "quotations and jokes about lawyers, courts and the law",
    "linux": "quotes from Linux developers and jokes about Linux",
    "linuxcookie": "Linux kernel comments and hacker one-liners",
    "literature": "quotations from and about books, writers and literature",
    "love": "quotations about love, romance and relationships",
    "magic": "quotations about magic and the supernatural",
    "medicine": "quotations and jokes about doctors, illness and medicine",
    "men-women": "jokes and sayings about men, women and marriage",
    "miscellaneous": "miscellaneous jokes, observations and sayings",
    "news": "odd newspaper headlines and news-related jokes",
    "paradoxum": "paradoxes and contradictory sayings",
    "people": "quotations from famous people about life",
    "perl": "quotes from Perl programmers and jokes about Perl",
    "pets": "quotations and jokes about cats, dogs and pets",
    "platitudes": "platitudes, proverbs and trite sayings",
    "politics": "quotations and jokes about politicians, government and power",
    "riddles": "riddles, puns and question-and-answer jokes",
    "science": "quotations about science, scientists and mathematics",
    "songs-poems": "lines from songs, poems and limericks",
    "sports": "quotations and jokes about sports and athletes",
    "startrek": "quotations from Star Trek episodes",
    "tao": "passages from the Tao of Programming",
    "wisdom": "wise sayings and philosophical quotations",
    "work": "quotations and jokes about work, jobs, bosses and offices",
    "zippy": "surreal non-sequiturs from Zippy the Pinhead comics",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZooSubsets(Strict):
    fortunes: Literal["all"] | list[str] = Field("all", description="fortunes collections, one run each")
    min_entries: int = Field(50, gt=0, description="skip collections with fewer usable fortunes")
    pydoc_groups: int = Field(6, ge=0, description="Python reference topics split into this many runs")


class ZooConfig(Strict):
    output: Path
    base: str = "smollm2-135m"
    adapter: dict[str, Any] = {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}
    init_seed: int = Field(0, description="every run starts from this initialisation")
    subsets: ZooSubsets = ZooSubsets()
    steps: int = Field(24, gt=0)
    checkpoints: list[int] = Field([8, 16, 24], min_length=1, description="steps at which a checkpoint is kept")
    batch_size: int = Field(4, gt=0)
    block_size: int = Field(64, gt=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(2, ge=0)
    gradient_clip: float | None = Field(None, gt=0, description="clip the gradient norm (none: no clipping)")
    heldout_every: int = Field(10, gt=1, description="every n-th text of a subset is held out")
    samples: int = Field(4, gt=0, description="sample inputs in each conditioning text")
    conditions: int = Field(8, gt=0, description="conditioning texts per run, each with other samples")
    seed: int = 0

    @model_validator(mode="after")
    def _checkpoints_in_run(self) -> ZooConfig:
        if sorted(set(self.checkpoints)) != self.checkpoints or self.checkpoints[-1] > self.steps:
            raise ValueError(f"checkpoints must increase and end by step {self.steps}: {self.checkpoints}")
        return self

    def lora(self) -> LoRAConfig:
        config = method_config(self.adapter, "zoo config: adapter")
        if not isinstance(config, LoRAConfig):
            raise ConfigError(f"zoo config: adapter: method {config.method!r}; a zoo holds LoRA adapters")
        return config


@dataclass(frozen=True)
class Subset:
    name: str
    description: str
    train: list[str]
    heldout: list[str]


def subsets(config: ZooConfig) -> list[Subset]:
    """The data subsets the config names: fortunes collections, then groups of pydoc topics."""
    found = []
    wanted = fortunes_collections() if config.subsets.fortunes == "all" else config.subsets.fortunes
    for topic in wanted:
        texts = fortunes(topic)
        if len(texts) >= config.subsets.min_entries:
            what = FORTUNES_TOPICS.get(topic, f"fortunes of the '{topic}' collection")
            found.append(_subset(f"fortunes-{topic}", f"Debian fortunes: {what}.", texts, config))
    topics = sorted(topic_paragraphs().items())
    groups = config.subsets.pydoc_groups
    for g in range(groups):
        chunk = topics[g * len(topics) // groups : (g + 1) * len(topics) // groups]
        names = ", ".join(name.replace("-", " ") for name, _ in chunk[:8])
        texts = [p for _, paragraphs in chunk for p in paragraphs]
        found.append(_subset(f"pydoc-{g:02d}", f"Python reference documentation on {names}.", texts, config))
    if not found:
        raise ConfigError("the zoo config names no data subset with enough texts; install fortunes or add pydoc_groups")
    return found


def _subset(name: str, description: str, texts: list[str], config: ZooConfig) -> Subset:
    train, heldout = split(texts, config.heldout_every)
    return Subset(name, description, train, heldout)


def conditioning(subset: Subset, count: int, samples: int, seed: str) -> list[str]:
    """``count`` conditioning texts: the description, then ``samples`` of the subset's training texts,
    one per line (never its held-out texts, which evaluation scores)."""
    rng = random.Random(seed)
    pool = subset.train
    return ["\n".join([subset.description, *rng.sample(pool, min(samples, len(pool)))]) for _ in range(count)]


class _KeepCheckpoints(L.Callback):
    """Save the zoo adapter as an adapter directory at the configured steps, with its mean train loss."""

    def __init__(self, handle: Adapted, run: Path, steps: list[int], subset: str) -> None:
        self.handle, self.run, self.steps, self.subset = handle, run, set(steps), subset
        self.kept: list[dict[str, Any]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        step = trainer.global_step
        if step in self.steps and not any(k["step"] == step for k in self.kept):
            path = self.run / f"step-{step:05d}"
            save_adapter(self.handle, ZOO_ADAPTER, path, role="zoo", provenance={"zoo": self.subset, "step": step})
            recent = self.losses[-8:]
            self.kept.append(
                {
                    "step": step,
                    "path": str(path.relative_to(self.run.parent.parent)),
                    "train_loss": sum(recent) / len(recent),
                }
            )


def train_run(
    handle: Adapted, tokenizer, subset: Subset, config: ZooConfig, run: Path
) -> tuple[list[dict[str, Any]], str]:
    """Train the zoo adapter on one subset from the shared initialisation: the checkpoints it kept, and
    the device it trained on."""
    torch.manual_seed(config.init_seed)
    handle.add(ZOO_ADAPTER, config.lora(), trainable=True)
    try:
        blocks = token_blocks(subset.train, tokenizer, config.block_size)
        if len(blocks) == 0:
            raise ConfigError(f"subset {subset.name} has less text than one block of {config.block_size} tokens")
        examples = [{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks]
        data = DataConfig(train=[], block_size=config.block_size, batch_size=config.batch_size)
        datamodule = CausalLMData(
            examples, [], data, config.steps * config.batch_size, config.seed, tokenizer.pad_token_id or 0
        )
        module = AdapterLM(handle, lr=config.lr, warmup=config.warmup_steps, total_steps=config.steps)
        keep = _KeepCheckpoints(handle, run, config.checkpoints, subset.name)
        trainer = L.Trainer(
            max_steps=config.steps,
            max_epochs=1,
            gradient_clip_val=config.gradient_clip,
            precision=resolve_precision("auto"),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[keep],
        )
        handle.model.train()
        trainer.fit(module, datamodule=datamodule)
        handle.model.eval()
        return keep.kept, device_name(trainer.strategy.root_device)
    finally:
        handle.remove(ZOO_ADAPTER)


def build_zoo(config: ZooConfig) -> dict[str, Any]:
    """Build (or resume) the zoo the config describes; a summary of what was trained and its cost."""
    out = config.output
    snapshot = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if (out / SNAPSHOT).is_file():
        if load_zoo_config(out / SNAPSHOT) != config:
            raise ConfigError(f"{out} holds a zoo built with another config ({out / SNAPSHOT}); choose another output")
    elif out.exists() and any(out.iterdir()):
        raise StorageError(f"{out} exists and is not a zoo; choose another output")
    todo = subsets(config)
    done = {entry["subset"]: entry for entry in (read_lines(out / INDEX) if (out / INDEX).is_file() else [])}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SNAPSHOT, snapshot)
    model, tokenizer = load_base(config.base)
    handle = Adapted.of(model)
    trained, started = [], time.perf_counter()
    for subset in todo:
        if subset.name in done:
            continue
        run = out / "runs" / subset.name
        shutil.rmtree(run, ignore_errors=True)  # a run cut short starts over
        run.mkdir(parents=True)
        (run / "heldout.txt").write_text("\n".join(subset.heldout) + "\n", encoding="utf-8")
        report(f"zoo: training {subset.name} ({len(done) + 1}/{len(todo)})")
        began = time.perf_counter()
        kept, device = train_run(handle, tokenizer, subset, config, run)
        done[subset.name] = {
            "subset": subset.name,
            "description": subset.description,
            "conditions": conditioning(subset, config.conditions, config.samples, f"{config.seed}-{subset.name}"),
            "eval_condition": conditioning(subset, 1, config.samples, f"{config.seed}-{subset.name}-eval")[0],
            "heldout": str((run / "heldout.txt").relative_to(out)),
            "train_texts": len(subset.train),
            "checkpoints": kept,
            "seconds": round(time.perf_counter() - began, 2),
            "device": device,
        }
        write_text_atomic(out / INDEX, "".join(json.dumps(e) + "\n" for e in done.values()))
        trained.append(subset.name)
    return {
        "zoo": str(out),
        "runs": len(done),
        "trained_now": len(trained),
        "checkpoints": sum(len(e["checkpoints"]) for e in done.values()),
        "seconds_now": round(time.perf_counter() - started, 1),
        "seconds_total": round(sum(e["seconds"] for e in done.values()), 1),
        "seconds_per_run": round(sum(e["seconds"] for e in done.values()) / max(1, len(done)), 2),
        "numbers_per_adapter": _adapter_size(config, handle),
        "devices": sorted({e.get("device", "unrecorded") for e in done.values()}),
    }


def _adapter_size(config: ZooConfig, handle: Adapted) -> int:
    handle.add(ZOO_ADAPTER, config.lora(), trainable=False)
    try:
        return sum(t.numel() for t in handle.state_dict(ZOO_ADAPTER).values())
    finally:
        handle.remove(ZOO_ADAPTER)


def load_zoo_config(path: Path) -> ZooConfig:
    return load_yaml(path, ZooConfig)


@dataclass(frozen=True)
class Member:
    """One checkpoint of the zoo: its run's subset, step, directory and record."""

    subset: str
    step: int
    path: Path
    record: AdapterRecord


@dataclass(frozen=True)
class Zoo:
    root: Path
    runs: list[dict[str, Any]]
    members: list[Member]

    def tensors(self, member: Member) -> dict[str, torch.Tensor]:
        return read_tensors(member.path, member.record)

    def run(self, subset: str) -> dict[str, Any]:
        for entry in self.runs:
            if entry["subset"] == subset:
                return entry
        raise ConfigError(f"subset {subset!r} is not in the zoo at {self.root}; it holds {self.names()}")

    def names(self) -> list[str]:
        return [e["subset"] for e in self.runs]

    def heldout(self, subset: str) -> list[str]:
        path = self.root / self.run(subset)["heldout"]
        if not path.is_file():
            raise StorageError(f"zoo member {path} is missing; rebuild that run (delete its line in {INDEX})")
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_zoo(root: Path) -> Zoo:
    """The zoo at ``root`` with every member checked to exist and hold a readable adapter record;
    a missing or corrupt member is an error naming it."""
    if not (root / INDEX).is_file():
        raise StorageError(f"{root} is not a zoo (no {INDEX}); build one with `adaplex gen zoo CONFIG`")
    runs = read_lines(root / INDEX)
    members = []
    for entry in runs:
        for kept in entry.get("checkpoints", []):
            path = root / kept["path"]
            if not path.is_dir():
                raise StorageError(f"zoo member {path} is missing ({INDEX} lists it); rebuild that run")
            try:
                record = read_adapter_record(path)
            except StorageError as err:
                raise StorageError(f"zoo member {path} is damaged: {err}") from None
            members.append(Member(entry["subset"], kept["step"], path, record))
    if not members:
        raise StorageError(f"the zoo at {root} holds no checkpoints; build it with `adaplex gen zoo CONFIG`")
    return Zoo(root, runs, members)
