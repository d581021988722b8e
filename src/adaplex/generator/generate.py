"""Prompts -> LoRA adapters through a trained generator: as adapter directories (``save``), or applied
per sample in one forward pass (``applying``) through a ``given-lora`` adapter: each sample its own A and
B, by the one functional LoRA that routing uses, never a loop over samples."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from adaplex.core.adapted import Adapted
from adaplex.core.fingerprint import fingerprint
from adaplex.errors import AdapterNameError, ConfigError, StorageError
from adaplex.generator.encoder import TextEncoder, condition_lines
from adaplex.generator.model import HyperConvGenerator
from adaplex.generator.store import load_generator
from adaplex.generator.tokenizer import denormalize, detokenize
from adaplex.io.atomic import atomic_directory
from adaplex.io.storage import base_fields_of, check_base
from adaplex.io.tensor_files import write_files
from adaplex.methods import GivenLoRAConfig, LoRAConfig, method_config

PROMPTS_FILE = "prompts.jsonl"


def check_prompts(prompts: list[str]) -> None:
    if not prompts:
        raise ConfigError("no prompts given; pass prompt texts or --file with one prompt per line")
    for prompt in prompts:
        condition_lines(prompt, 1)  # an empty prompt is an error


class PromptToLoRA:
    """A loaded generator with its encoder: ``tensors(prompts)`` -> one adapter's tensors per prompt."""

    def __init__(self, path: Path, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        self.record, network, self.layout = load_generator(self.path)
        self.device = torch.device(device)
        self.network: HyperConvGenerator = network.to(self.device)
        self.encoder = TextEncoder(self.record.encoder, self.record.lines).to(self.device)
        if self.encoder.fingerprint() != self.record.encoder_fingerprint:
            raise StorageError(
                f"{self.path} was trained with encoder {self.record.encoder!r} of another fingerprint than the "
                "one installed here; use the encoder it was trained with"
            )
        self.config: LoRAConfig = method_config(self.record.adapter, f"{self.path}: adapter")

    @torch.no_grad()
    def grids(self, prompts: list[str]) -> torch.Tensor:
        """(N, T, D) denormalised token grids, one per prompt, in one batch."""
        check_prompts(prompts)
        cond = self.encoder(prompts).to(self.device)  # (N, P, E)
        grid = self.network(cond).float()[:, : self.layout.tokens].cpu()  # (N, T, D)
        return denormalize(grid, self.layout)

    def tensors(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Each prompt's adapter tensors, keyed and typed as the zoo's adapters."""
        return [detokenize(grid, self.layout) for grid in self.grids(prompts)]

    def save(self, prompts: list[str], out: Path, overwrite: bool = False) -> list[Path]:
        """Write each prompt's adapter as an adapter directory under ``out`` (``NNN-<words>``), with its
        provenance (the generator and the prompt) in its record, and ``out/prompts.jsonl`` listing them;
        all at once: ``out`` appears whole or not at all."""
        adapters = self.tensors(prompts)
        names = [f"{i:03d}-{_slug(p)}" for i, p in enumerate(prompts)]
        with atomic_directory(out, overwrite) as staging:
            for name, prompt, tensors in zip(names, prompts, adapters, strict=True):
                (staging / name).mkdir()
                provenance = {"generator": str(self.path.resolve()), "prompt": prompt}
                write_files(
                    staging / name, name, "adapter", self.config, tensors, base_fields_of(self.record), provenance
                )
            lines = [json.dumps({"adapter": n, "prompt": p}) for n, p in zip(names, prompts, strict=True)]
            (staging / PROMPTS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return [out / n for n in names]

    def check_model(self, model: nn.Module) -> None:
        """The model must be the base this generator's adapters are for (fingerprint checked)."""
        check_base(model, fingerprint(model), self.record, self.path, force=False)

    @contextmanager
    def applying(self, handle: Adapted, prompts: list[str], name: str = "generated") -> Iterator[None]:
        """Inside the block, sample b of a batch runs with the adapter generated from ``prompts[b]``;
        adds a ``given-lora`` adapter ``name`` of the generator's rank and targets if the model has none."""
        self.check_model(handle.model)
        if name not in handle.configs:
            handle.add(name, self.given_config(), trainable=False)
        weights = self.given_weights(handle, name, self.tensors(prompts))
        with handle.given(name, weights):
            yield

    def given_config(self) -> GivenLoRAConfig:
        c = self.config
        return GivenLoRAConfig(r=c.r, alpha=c.alpha, rslora=c.rslora, targets=c.targets)

    def given_weights(
        self, handle: Adapted, name: str, adapters: list[dict[str, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """site -> (A (N, r, in), B (N, out, r)) stacked over the adapters, on the model's device."""
        device = next(handle.model.parameters()).device
        sites = handle.sites(name)
        keys = {k.rsplit(".", 1)[0] for k in adapters[0]}
        if keys != set(sites):
            odd = sorted(keys ^ set(sites))[0]
            raise AdapterNameError(
                f"the generator's layout does not fit adapter {name!r} of this model (site {odd!r}); "
                "use the base model and targets the generator was trained for"
            )
        return {
            site: tuple(torch.stack([a[f"{site}.{p}"] for a in adapters]).to(device) for p in ("A", "B"))
            for site in sites
        }


def _slug(prompt: str) -> str:
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:5]
    return "-".join(words) or "prompt"


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line (an empty file is an error); a literal '\\n' inside a line separates the
    description from its sample inputs."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read prompt file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; give one prompt per line") from None
    prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts; give one prompt per line")
    return prompts
