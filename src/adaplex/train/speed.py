"""The training step's fast paths, each chosen by a config field and never silently skipped.

- Fused loss (``trainer.fused_loss``): the next-token loss computed from the last hidden states by
  Liger's fused linear cross-entropy (``adaplex.kernels.fused_loss``) instead of materialising the
  (B, T, vocab) logits and their float32 copy. "auto" uses it wherever it can run; "on" asks for it
  and falls back to the plain loss with a one-line warning where it cannot; "off" never uses it.
- Compiled blocks (``trainer.compile``): every decoder block compiled with torch.compile (as torchtune
  compiles its layers), adapters included, in a torch.compile mode ("reduce-overhead": replayed as CUDA
  graphs, for steps bound by the host launching kernels); the loss and the optimizer stay eager.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from adaplex.core.layers import AdaptedLinear
from adaplex.errors import ConfigError
from adaplex.kernels import fused_loss
from adaplex.train.data import IGNORE

log = logging.getLogger(__name__)

PLAIN_HEAD_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt2")  # logits = lm_head(h), nothing after it
FUSED_LOSS_SETTINGS = ("auto", "on", "off")


def fused_loss_blocker(model: nn.Module, batch_tensor: torch.Tensor) -> str | None:
    """Why the fused loss cannot compute this model's loss on this batch's device (None: it can)."""
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return f"model type {model.config.model_type!r} may transform its logits after the output layer"
    head = model.get_output_embeddings()
    if isinstance(head, AdaptedLinear) or type(head) is not nn.Linear:
        return "the output layer carries adapters or is not a plain linear layer"
    return fused_loss.unavailable_reason(batch_tensor)


def use_fused_loss(setting: str, model: nn.Module, batch_tensor: torch.Tensor) -> bool:
    """Whether to train with the fused loss under ``setting`` (auto | on | off); "on" where it cannot run
    warns once and falls back."""
    if setting not in FUSED_LOSS_SETTINGS:
        raise ConfigError(f"fused_loss {setting!r}: choose one of {', '.join(FUSED_LOSS_SETTINGS)}")
    if setting == "off":
        return False
    blocker = fused_loss_blocker(model, batch_tensor)
    if blocker is not None and setting == "on":
        log.warning("fused_loss: on, but %s: training with the plain loss", blocker)
    return blocker is None


def next_token_loss(model: nn.Module, batch: dict[str, Any], fused: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM over labels ≠ -100 (what ``model(**batch).loss``
    gives), from the fused kernel when ``fused``; no KV cache is built (training reads none)."""
    if not fused:
        return model(**batch, use_cache=False).loss
    body = getattr(model, model.base_model_prefix)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(T-1), H)
    targets = batch["labels"][:, 1:].reshape(-1)  # (B·(T-1),)
    return fused_loss.linear_cross_entropy(hidden, head.weight, targets, IGNORE)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (the ModuleList holding num_hidden_layers modules)."""
    count = model.config.num_hidden_layers
    found = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not found:
        raise ConfigError(f"compile: no list of {count} decoder blocks found in {type(model).__name__}")
    return found[0]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def compile_blocks(model: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """Compile every decoder block in place (``nn.Module.compile``) in ``mode`` ("reduce-overhead" also
    replays each block's kernels as a CUDA graph); returns how many."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(backend=backend, mode=mode if backend == "inductor" else None)
    return len(blocks)
