"""Training configs (YAML, validated by pydantic: unknown or wrong fields name themselves), one per
task: ``task: causal-lm`` (the default) or ``task: classification``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adaplex.errors import ConfigError
from adaplex.util.yamlconfig import read_yaml, validate


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def distinct(values: list, what: str) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} repeat: {values}")


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
    fused_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger's fused linear cross-entropy (no logits tensor): auto where it runs (CUDA)"
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "off", description="torch.compile every decoder block in this mode (a one-off compile first)"
    )


class TrainConfig(Strict):
    task: Literal["causal-lm"] = "causal-lm"
    base: str | None = None
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="the base's linear layers in 4-bit NF4 or 8-bit (bitsandbytes), as QLoRA trains"
    )
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
        distinct([a.name for a in self.adapters], "adapter names")
        if not any(a.train for a in self.adapters):
            raise ValueError("no adapter has train: true; nothing would be trained")
        if self.quantize != "none" and self.trainer.precision in ("bf16-true", "16-mixed"):
            raise ValueError(
                f"quantize {self.quantize} trains under precision auto, bf16-mixed or 32-true, "
                f"not {self.trainer.precision}"
            )
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


class FewShot(Strict):
    k: int = Field(gt=0, description="training examples per class")
    seed: int | None = Field(None, description="sampling seed (default: each run's seed)")


class ClassificationData(Strict):
    train: Path
    eval: Path | None = Field(None, description="default: a stratified share of the training file")
    eval_share: float = Field(0.1, gt=0, lt=1, description="share of the training file held out without eval")
    text_fields: list[str] | None = Field(
        None, min_length=1, max_length=2, description="one field, or two for pairs (default: text, or text_a/text_b)"
    )
    label_field: str = "label"
    max_length: int = Field(128, gt=1)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    few_shot: FewShot | None = None
    balance: Literal["none", "class_weights", "oversample"] = "none"


class ClassifierOptions(Strict):
    pooling: Literal["auto", "cls", "mean", "last"] = Field("auto", description="auto: mean (encoders), last (LMs)")
    dropout: float = Field(0.1, ge=0, lt=1)


class ClassificationEval(Strict):
    metric: Literal["accuracy", "macro_f1", "loss"] = "macro_f1"
    early_stopping_patience: int | None = Field(None, gt=0, description="epochs without improvement")


class ClassificationConfig(Strict):
    """Adapters (none: a linear probe) and a head trained to classify; one run per seed."""

    task: Literal["classification"]
    base: str = "minilm-l6"
    output: Path
    seeds: list[int] = Field([0], min_length=1)
    adapters: list[AdapterSpec] = []
    data: ClassificationData
    classifier: ClassifierOptions = ClassifierOptions()
    optim: OptimConfig = OptimConfig(lr=1e-3, max_epochs=10, warmup_steps=10)
    eval: ClassificationEval = ClassificationEval()
    trainer: TrainerConfig = TrainerConfig()
    version: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> ClassificationConfig:
        distinct([a.name for a in self.adapters], "adapter names")
        distinct(self.seeds, "seeds")
        return self


TASKS: dict[str, type[TrainConfig] | type[ClassificationConfig]] = {
    "causal-lm": TrainConfig,
    "classification": ClassificationConfig,
}


def load_train_config(path: Path) -> TrainConfig | ClassificationConfig:
    """The config of a training YAML, of the class its ``task`` names."""
    data = read_yaml(path)
    task = data.get("task", "causal-lm")
    if task not in TASKS:
        raise ConfigError(f"{path}: field 'task': unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return validate(data, TASKS[task], str(path))
