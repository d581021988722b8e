"""The training config (YAML, validated by pydantic: unknown or wrong fields name themselves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterSpec(Strict):
    """One adapter of the run: created from ``config`` or loaded from ``path``; trained or frozen-and-active."""

    name: str
    config: dict[str, Any] | None = Field(None, description="method config, e.g. {method: lora, r: 8}")
    path: Path | None = Field(None, description="adapter, bundle or PEFT directory to load")
    train: bool = True
    weight: float = 1.0

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSpec:
        if (self.config is None) == (self.path is None):
            raise ValueError(f"adapter {self.name!r}: give exactly one of 'config' (create) or 'path' (load)")
        return self


class DataConfig(Strict):
    format: Literal["text", "jsonl", "chat"] = "text"
    train: list[Path]
    eval: list[Path] = []
    text_field: str = "text"
    key_field: str | None = Field(None, description="jsonl/chat: the record field naming each sample's routing key")
    registry: Path | None = Field(None, description="key registry mapping free-form key fields to keys")
    strict_keys: bool = Field(False, description="an unknown key is an error instead of the registry's default")
    block_size: int = Field(256, gt=1)
    batch_size: int = Field(4, gt=0)
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _keys_need_records(self) -> DataConfig:
        if self.key_field is not None and self.format == "text":
            raise ValueError("key_field needs format jsonl or chat (plain text files carry no keys)")
        return self


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    max_epochs: int | None = Field(None, gt=0)
    gradient_clip: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _a_length(self) -> OptimConfig:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("give max_steps or max_epochs")
        return self


class EvalConfig(Strict):
    every_n_steps: int = Field(50, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without improvement")
    max_batches: int | None = Field(None, gt=0)


class TrainerConfig(Strict):
    precision: Literal["auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "auto"
    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    checkpoint_every_n_steps: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)


class TrainConfig(Strict):
    base: str | None = None
    output: Path
    seed: int = 0
    adapters: list[AdapterSpec] = Field(min_length=1)
    data: DataConfig
    optim: OptimConfig = OptimConfig(max_steps=100)
    eval: EvalConfig = EvalConfig()
    trainer: TrainerConfig = TrainerConfig()
    version: str | None = None
    parent: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat: {names}")
        if not any(a.train for a in self.adapters):
            raise ValueError("no adapter has train: true; nothing would be trained")
        return self


def short_cpu_run(output: Path, adapters: list[dict], data: dict, steps: int, **fields: Any) -> TrainConfig:
    """A few-minute CPU run (demo, experiments): lr 2e-3 with a short warm-up, one evaluation and one
    checkpoint at the end."""
    return TrainConfig.model_validate(
        {
            "output": str(output),
            "adapters": adapters,
            "data": data,
            "optim": {"lr": 2e-3, "warmup_steps": min(5, steps), "max_steps": steps},
            "eval": {"every_n_steps": steps, "max_batches": 4},
            "trainer": {"checkpoint_every_n_steps": steps, "keep_checkpoints": 1, "accelerator": "cpu"},
            **fields,
        }
    )
