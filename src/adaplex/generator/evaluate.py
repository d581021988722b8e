"""`adaplex gen eval`: is a generated adapter worth anything? Perplexity on each subset's held-out text of

- the base model, the generated adapter (from the subset's evaluation prompt: its description and
  samples of its training texts, drawn apart from the generator's conditioning texts), and the adapter
  trained on it;
- two baselines: the mean of the zoo's adapters, and the zoo adapter whose conditioning text is
  nearest (cosine of the encoder's embeddings) to the prompt.

On subsets the generator never saw (``heldout``), and on subsets it was trained on, with new prompts
(``seen``). ``recovered_share`` = (loss_base - loss_generated) / (loss_base - loss_trained), in nats, per
subset; group figures are means over subsets. All four adapters of a subset run as per-sample adapters
of one batch (a ``given-lora`` adapter), so the scoring is also the per-sample path users run.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adaplex.core.adapted import Adapted
from adaplex.core.models import load_base
from adaplex.errors import ConfigError
from adaplex.generator.dataset import condition_embeddings
from adaplex.generator.generate import PromptToLoRA
from adaplex.generator.zoo import Zoo, read_zoo
from adaplex.train.data import token_blocks
from adaplex.util.measure import device_name

CANDIDATES = ("generated", "trained", "zoo_mean", "nearest")
EVAL_ADAPTER = "scored"


@torch.no_grad()
def row_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(N,) mean next-token loss of each row of ids (N, S)."""
    logits = model(input_ids=ids).logits[:, :-1].float()  # (N, S-1, V)
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def final_tensors(zoo: Zoo, subset: str) -> dict[str, torch.Tensor]:
    last = max((m for m in zoo.members if m.subset == subset), key=lambda m: m.step)
    return zoo.tensors(last)


def mean_adapter(adapters: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([a[k].float() for a in adapters]).mean(0).to(adapters[0][k].dtype) for k in adapters[0]}


class Scorer:
    """Losses of the base and of several adapters on the same blocks, the adapters as per-sample
    adapters of one batch."""

    def __init__(self, generator: PromptToLoRA, handle: Adapted, batch: int = 16) -> None:
        self.generator, self.handle, self.batch = generator, handle, batch
        if EVAL_ADAPTER not in handle.configs:
            handle.add(EVAL_ADAPTER, generator.given_config(), trainable=False)
        self.device = next(handle.model.parameters()).device

    def losses(self, blocks: torch.Tensor, adapters: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
        """Mean loss (nats per token) over ``blocks`` (n, S) of the base and of each adapter."""
        blocks = blocks.to(self.device)
        with self.handle.disable(EVAL_ADAPTER):
            found = {
                "base": float(torch.cat([row_losses(self.handle.model, c) for c in blocks.split(self.batch)]).mean())
            }
        names = list(adapters)
        per_chunk = max(1, self.batch // len(names))
        weights = self.generator.given_weights(self.handle, EVAL_ADAPTER, [adapters[n] for n in names])
        totals = torch.zeros(len(names))
        for chunk in blocks.split(per_chunk):
            m = len(chunk)
            ids = chunk.repeat(len(names), 1)  # (K·m, S): adapter k on rows k·m .. (k+1)·m
            given = {s: (a.repeat_interleave(m, 0), b.repeat_interleave(m, 0)) for s, (a, b) in weights.items()}
            with self.handle.given(EVAL_ADAPTER, given):
                totals += row_losses(self.handle.model, ids).view(len(names), m).sum(1).cpu()
        found |= {n: float(t) / len(blocks) for n, t in zip(names, totals, strict=True)}
        return found


def _nearest(prompt: torch.Tensor, runs: dict[str, torch.Tensor]) -> str:
    """The subset whose conditioning texts' mean embedding is nearest (cosine) to the prompt's, all
    embedded by the generator's encoder: prompt (1, P, E), runs subset -> (V, P, E)."""
    names = list(runs)
    means = torch.stack([runs[n].mean((0, 1)) for n in names])  # (S, E)
    return names[int(F.cosine_similarity(prompt.mean((0, 1))[None], means, dim=-1).argmax())]


def score_subset(
    scorer: Scorer, zoo: Zoo, subset: str, baselines: dict[str, Any], tokenizer, block: int, max_blocks: int
) -> dict[str, Any]:
    prompt = zoo.run(subset)["eval_condition"]  # its samples come from the training split, never scored
    blocks = token_blocks(zoo.heldout(subset), tokenizer, block)[:max_blocks]
    if len(blocks) == 0:
        raise ConfigError(
            f"subset {subset}'s held-out text is shorter than one block of {block} tokens; pass a smaller --block"
        )
    embedded = baselines["embeddings"]
    nearest = _nearest(embedded[f"{subset}:eval"], {s: embedded[s] for s in baselines["finals"]})
    adapters = {
        "generated": scorer.generator.tensors([prompt])[0],
        "trained": final_tensors(zoo, subset),
        "zoo_mean": baselines["mean"],
        "nearest": baselines["finals"][nearest],
    }
    losses = scorer.losses(blocks, adapters)
    gain = losses["base"] - losses["trained"]
    return {
        "subset": subset,
        "blocks": len(blocks),
        "ppl": {k: round(math.exp(v), 4) for k, v in losses.items()},
        "recovered_share": round((losses["base"] - losses["generated"]) / gain, 4) if gain > 0 else None,
        "nearest_subset": nearest,
    }


def _group(rows: list[dict[str, Any]]) -> dict[str, Any]:
    shares = [r["recovered_share"] for r in rows if r["recovered_share"] is not None]
    ppl = {k: round(statistics.fmean(r["ppl"][k] for r in rows), 4) for k in ("base", *CANDIDATES)}
    return {
        "recovered_share": round(statistics.fmean(shares), 4) if shares else None,
        "ppl": ppl,
        "beats_zoo_mean": ppl["generated"] < ppl["zoo_mean"],
        "beats_nearest": ppl["generated"] < ppl["nearest"],
        "subsets": rows,
    }


def evaluate(
    generator_path, zoo_path=None, seen: int = 6, block: int = 64, max_blocks: int = 8, device: str = "cpu"
) -> dict[str, Any]:
    """The figures of the module docstring, plus the time to generate an adapter (one prompt at a
    time, and all held-out prompts in one batch) against the time the zoo took to train one."""
    generator = PromptToLoRA(generator_path, device)
    zoo = read_zoo(Path(zoo_path or generator.record.zoo))
    model, tokenizer = load_base(generator.record.base)
    model.to(device)
    generator.check_model(model)
    scorer = Scorer(generator, Adapted.of(model))
    train = generator.record.train_subsets
    finals = {s: final_tensors(zoo, s) for s in train}
    baselines = {
        "finals": finals,
        "mean": mean_adapter(list(finals.values())),
        "embeddings": condition_embeddings(zoo, generator.encoder),  # cached beside the zoo
    }
    groups = {"heldout": generator.record.heldout_subsets, "seen": sorted(train)[:seen]}
    result: dict[str, Any] = {
        name: _group([score_subset(scorer, zoo, s, baselines, tokenizer, block, max_blocks) for s in subsets])
        for name, subsets in groups.items()
        if subsets
    }
    prompts = [zoo.run(s)["eval_condition"] for s in groups["heldout"] or groups["seen"]]
    single = []
    for prompt in prompts:
        began = time.perf_counter()
        generator.tensors([prompt])
        single.append(time.perf_counter() - began)
    began = time.perf_counter()
    generator.tensors(prompts)
    batched = (time.perf_counter() - began) / len(prompts)
    train_seconds = statistics.fmean(zoo.run(s)["seconds"] for s in train)
    return result | {
        "seconds_per_adapter": round(statistics.median(single), 4),
        "seconds_per_adapter_batched": round(batched, 4),
        "seconds_to_train_one": round(train_seconds, 2),
        "device": device_name(torch.device(device)),
        "generator": str(generator_path),
        "blocks_per_subset": max_blocks,
        "block_size": block,
    }
