"""`adaplex compare-methods CONFIG`: a linear probe, LoRA, bottleneck, prefix and UniPELT trained on the
same classification task, data and seeds, at several training-set sizes (K examples per class, and the
full set).

Reported per method: accuracy and macro-F1 (mean ± std over the seeds) at every size, trainable
parameters, inference latency relative to the base (interleaved rounds, one batch) and the peak memory
of a training step; plots: the sample-size curve and the per-epoch evaluation curves of the full set.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from adaplex.core.adapted import Adapted
from adaplex.core.models import find_base, is_causal_lm, load_base
from adaplex.methods.head import ClassifierHead, HeadConfig
from adaplex.train.classifier import classify
from adaplex.train.classify_run import run_classification
from adaplex.train.config import (
    AdapterSpec,
    ClassificationConfig,
    ClassificationData,
    ClassificationEval,
    ClassifierOptions,
    OptimConfig,
    Strict,
    TrainerConfig,
)
from adaplex.train.run import model_with_adapters
from adaplex.util.measure import interleaved_times, median_ratio, peak_memory_mib
from adaplex.util.plots import axes, finish, save
from adaplex.util.progress import report

PROBE = "probe"
DEFAULT_METHODS: dict[str, dict[str, Any] | None] = {
    PROBE: None,  # frozen encoder + head
    "lora": {"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]},
    "bottleneck": {"method": "bottleneck", "reduction_factor": 16},
    "prefix": {"method": "prefix", "length": 10},
    "unipelt": {"method": "unipelt"},
}


class CompareConfig(Strict):
    """The shared training setup (as in a classification config, without few_shot), the methods and sizes."""

    base: str = "minilm-l6"
    output: Path
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    data: ClassificationData
    classifier: ClassifierOptions = ClassifierOptions()
    optim: OptimConfig = OptimConfig(lr=1e-3, max_epochs=10, warmup_steps=10)
    eval: ClassificationEval = ClassificationEval()
    trainer: TrainerConfig = TrainerConfig()
    methods: dict[str, dict[str, Any] | None] = Field(DEFAULT_METHODS, min_length=1)
    sample_sizes: list[int | Literal["full"]] = Field([8, 16, 32, 64, "full"], min_length=1)
    latency_batch: int = Field(16, gt=0)
    latency_seq: int = Field(128, gt=0)
    latency_rounds: int = Field(10, gt=0)
    jobs: int = Field(1, gt=0, description="training runs at once, each its own process (a GPU has room for many)")


def run_config(config: CompareConfig, method: str, size: int | str) -> ClassificationConfig:
    adapters = [] if config.methods[method] is None else [{"name": method, "config": config.methods[method]}]
    few_shot = None if size == "full" else {"k": size}
    return ClassificationConfig.model_validate(
        {
            "task": "classification",
            "base": config.base,
            "output": config.output / f"size-{size}" / method,
            "seeds": config.seeds,
            "adapters": adapters,
            "data": config.data.model_dump() | {"few_shot": few_shot},
            "classifier": config.classifier.model_dump(),
            "optim": config.optim.model_dump(),
            "eval": config.eval.model_dump(),
            "trainer": config.trainer.model_dump(),
        }
    )


def compare(config: CompareConfig, source: str = "config", device: str = "cpu") -> dict[str, Any]:
    """Train every method at every size (each with every seed), then measure latency and memory."""
    runs = [run_config(config, m, s) for s in config.sample_sizes for m in config.methods]  # all valid first
    scores: dict[str, dict[str, Any]] = {m: {} for m in config.methods}
    epochs: dict[str, list[list[dict[str, float]]]] = {}
    for run, summary in zip(runs, _run_all(runs, source, config.jobs), strict=True):
        method, size = run.output.name, run.output.parent.name.removeprefix("size-")
        scores[method][size] = {
            "accuracy": summary["accuracy"],
            "macro_f1": summary["macro_f1"],
            "train_examples": summary["runs"][0]["train_examples"],
        }
        scores[method]["trainable_parameters"] = summary["trainable_parameters"]
        if size == str(config.sample_sizes[-1]):
            epochs[method] = [r["history"] for r in summary["runs"]]
    costs = measure_costs(config, source, device)
    result = {
        "benchmark": "gate-compare",
        "base": config.base,
        "task": str(config.data.train),
        "seeds": config.seeds,
        "sample_sizes": [str(s) for s in config.sample_sizes],
        "methods": {m: scores[m] | costs[m] for m in config.methods},
        "epoch_curves": epochs,
    }
    return result


def _run_all(runs: list[ClassificationConfig], source: str, jobs: int) -> list[dict[str, Any]]:
    """Each run's summary, in order; with ``jobs`` > 1, that many runs at once in spawned processes."""
    if jobs == 1:
        summaries = []
        for i, run in enumerate(runs):
            report(f"run {i + 1}/{len(runs)}: {run.output.name}, {run.output.parent.name}")
            summaries.append(run_classification(run, source))
        return summaries
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_classification, runs, [source] * len(runs)))


def measure_costs(config: CompareConfig, source: str, device: str) -> dict[str, dict[str, float]]:
    """Each method's inference latency relative to the base (interleaved rounds) and training-step peak memory."""
    dev = torch.device(device)
    base, _ = load_base(config.base)
    base.to(dev)
    pooling = "last" if is_causal_lm(find_base(config.base)) else "mean"
    head_config = HeadConfig(labels=("a", "b"), pooling=pooling, hidden=base.config.hidden_size)
    low = min(1000, base.config.vocab_size // 2)  # past the special tokens
    ids = torch.randint(low, base.config.vocab_size, (config.latency_batch, config.latency_seq), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros_like(ids[:, 0])}
    models: dict[str, tuple[Adapted, ClassifierHead]] = {}
    for method, fields in {"base": None, **config.methods}.items():
        model = copy.deepcopy(base)
        specs = [] if fields is None else [AdapterSpec(name=method, config=fields)]
        handle, _ = model_with_adapters(model, specs, source)
        models[method] = (handle, ClassifierHead(head_config).to(dev))

    def infer(handle: Adapted, head: ClassifierHead):
        def step() -> None:
            with torch.no_grad():
                classify(handle, head, batch)

        return step

    def train_step(handle: Adapted, head: ClassifierHead):
        def step() -> None:
            torch.nn.functional.cross_entropy(classify(handle, head, batch), batch["labels"]).backward()
            for p in [*handle.trainable_parameters(), *head.parameters()]:
                p.grad = None

        return step

    times = interleaved_times({m: infer(*models[m]) for m in models}, config.latency_rounds, dev)
    return {
        m: {
            "latency_x_base": median_ratio(times, m, "base"),
            "latency_ms": 1e3 * statistics.median(times[m]),
            "peak_train_mib": peak_memory_mib(train_step(*models[m]), dev)[0],
        }
        for m in config.methods
    }


def plot_sample_sizes(result: dict[str, Any], path: Path) -> None:
    """Macro-F1 (mean ± std over seeds) against the training examples per class; the full set last."""
    sizes = result["sample_sizes"]
    fig, ax = axes(6, 3.6)
    for method, row in result["methods"].items():
        means = [row[s]["macro_f1"]["mean"] for s in sizes]
        stds = [row[s]["macro_f1"]["std"] for s in sizes]
        ax.errorbar(range(len(sizes)), means, yerr=stds, marker="o", markersize=3, capsize=2, label=method)
    ax.set_xticks(range(len(sizes)), [f"K={s}" if s != "full" else "full" for s in sizes])
    finish(ax, "training examples per class", "macro-F1", f"{Path(result['task']).parent.name}: by training-set size")
    save(fig, path)


def plot_epochs(result: dict[str, Any], path: Path) -> None:
    """Evaluation macro-F1 per epoch at the largest size, mean over seeds, one line per method."""
    fig, ax = axes(6, 3.6)
    for method, runs in result["epoch_curves"].items():
        length = min(len(h) for h in runs)
        means = [statistics.fmean(h[e]["val_macro_f1"] for h in runs) for e in range(length)]
        ax.plot(range(1, length + 1), means, marker="o", markersize=3, label=method)
    finish(ax, "epoch", "evaluation macro-F1", f"per-epoch evaluation, {result['sample_sizes'][-1]} training set")
    save(fig, path)


def write(result: dict[str, Any], json_path: Path, plots: Path) -> None:
    """The result as JSON, and its plots as ``<plots>-sample-size.png`` and ``<plots>-epochs.png``."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot_sample_sizes(result, plots.with_name(plots.name + "-sample-size.png"))
    plot_epochs(result, plots.with_name(plots.name + "-epochs.png"))
