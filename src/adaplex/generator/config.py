"""The generator's training config (YAML, validated: unknown or wrong fields name themselves)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adaplex.generator.model import GeneratorShape
from adaplex.generator.tokenizer import DEFAULT_WIDTH
from adaplex.util.yamlconfig import load_yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenOptim(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    max_steps: int = Field(1500, gt=0)
    batch_size: int = Field(16, gt=0)
    gradient_clip: float | None = Field(1.0, gt=0)


class GenLoss(Strict):
    """loss = mse · MSE + l1 · L1 over the grid's real positions (padding excluded), on normalised grids."""

    mse: float = Field(1.0, ge=0)
    l1: float = Field(0.1, ge=0)


class GenTrainer(Strict):
    precision: Literal["auto", "32-true", "bf16-mixed", "bf16-true"] = "auto"
    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = Field("auto", description="Lightning's strategy, e.g. ddp (batch_size is then per process)")
    checkpoint_every_n_steps: int = Field(250, gt=0)
    val_every_n_steps: int = Field(250, gt=0)
    swanlab: bool = Field(True, description="also log to SwanLab (offline) where swanlab is installed")


class GenConfig(Strict):
    zoo: Path
    output: Path
    encoder: str = Field("minilm-l6", description="frozen text encoder: embedded name or directory")
    width: int = Field(DEFAULT_WIDTH, gt=0, description="token width D of the grid")
    tokens: int | None = Field(None, gt=0, description="grid height T (default: what the layout needs)")
    normalize: bool = Field(True, description="train on grids normalised per position over the training zoo")
    lines: int = Field(5, gt=0, description="conditioning lines: a description and sample inputs")
    heldout: list[str] | None = Field(None, description="zoo subsets the generator never sees")
    heldout_every: int = Field(6, gt=1, description="without `heldout`: every n-th subset (by name) is held out")
    steps: list[int] | None = Field(None, description="the zoo checkpoints (by step) to learn from; default: all")
    model: GeneratorShape = GeneratorShape()
    optim: GenOptim = GenOptim()
    loss: GenLoss = GenLoss()
    trainer: GenTrainer = GenTrainer()
    seed: int = 0


def load_gen_config(path: Path) -> GenConfig:
    return load_yaml(path, GenConfig)
