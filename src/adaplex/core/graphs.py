"""CUDA-graph capture (``capture``; faults.graphed uses it for monitored forwards), and decode steps
captured as CUDA graphs: the host launches a step's kernels once, at capture.

A small model's eager decode step is bound by the host launching its ~1,000 kernels (SmolLM2-135M,
batch 64 on an H100: 4.1 ms as a graph against 20-39 ms eager), so serving engines replay captured
steps. Both decode functions here use a static KV cache. Routing must be set before them and hold
while they run: the graph keeps the route's gathered expert weights (and a routed layer's fused
kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import StaticCache

from adaplex.kernels import gathered_lora


@dataclass(frozen=True)
class GraphedStep:
    """A captured CUDA graph and what it reads and writes by address, kept alive as long as it is."""

    graph: torch.cuda.CUDAGraph
    buffers: tuple

    def __call__(self) -> None:
        self.graph.replay()


def _prefilled(model: nn.Module, ids: torch.Tensor, max_len: int) -> tuple[StaticCache, torch.Tensor]:
    """A static cache holding ``ids`` (B, T) and the logits of their last position (B, V)."""
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    positions = torch.arange(ids.shape[1], device=ids.device)
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, cache_position=positions).logits[:, -1]
    return cache, logits


def capture(step: Callable[[], None], reset: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``step`` captured as a graph after three warm-up runs on a side stream (allocations, the
    route's gathered weights, Triton compilation); ``reset`` then undoes what the warm-up advanced.
    Routed layers run the kernels that serve graphs best (``gathered_lora.graph_kernels``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), gathered_lora.graph_kernels():
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph


def _write_counters(cache: StaticCache) -> list[torch.Tensor]:
    """The device counters of how many positions each cache layer holds (advanced by every step)."""
    return [layer.cumulative_length for layer in cache.layers]


def graphed_decode(model: nn.Module, ids: torch.Tensor) -> GraphedStep:
    """One decode step after ``ids`` (B, T), captured; every replay first resets the cache's write
    counters, so each replay is the same step over the same T cached tokens (for timing)."""
    seq = ids.shape[1]
    cache, _ = _prefilled(model, ids, seq + 1)
    last, position = ids[:, -1:].clone(), torch.tensor([seq], device=ids.device)
    counters = _write_counters(cache)
    start = [counter.clone() for counter in counters]

    def step() -> None:
        torch._foreach_copy_(counters, start)
        model(input_ids=last, past_key_values=cache, cache_position=position)

    graph = capture(step, reset=lambda: None)
    return GraphedStep(graph, (cache, last, position, start))


def static_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, graphed: bool = True) -> torch.Tensor:
    """Greedy continuation (B, new_tokens) of ``ids`` (B, T) over a static cache; with ``graphed``
    (CUDA), every decode step is one replay of a captured graph that also picks the next token and
    advances the position, so the host only replays. graphed=False runs the same step, with the same
    kernels (``gathered_lora.graph_kernels``), eagerly: the same tokens either way."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, not {new_tokens}")
    if graphed and not ids.is_cuda:
        raise ValueError("graphed decoding needs CUDA tensors; pass graphed=False to run the same loop eagerly")
    seq = ids.shape[1]
    cache, logits = _prefilled(model, ids, seq + new_tokens)
    token = logits.argmax(-1, keepdim=True)  # (B, 1)
    position = torch.tensor([seq], device=ids.device)

    def step() -> None:
        with gathered_lora.graph_kernels():
            logits = model(input_ids=token, past_key_values=cache, cache_position=position).logits[:, -1]
        token.copy_(logits.argmax(-1, keepdim=True))
        position.add_(1)

    if graphed:
        counters = _write_counters(cache)
        saved = [t.clone() for t in (token, position, *counters)]

        def reset() -> None:
            torch._foreach_copy_([token, position, *counters], saved)

        step = GraphedStep(capture(step, reset), (cache, token, position, saved))
    out = [token.clone()]
    with torch.no_grad():
        for _ in range(new_tokens - 1):
            step()
            out.append(token.clone())
    return torch.cat(out, dim=1)
