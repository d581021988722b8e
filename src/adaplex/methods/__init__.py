"""Adapter methods: each a config (validated) and a plain nn.Module."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from adaplex.errors import AdapterNameError, ConfigError
from adaplex.methods.base import Adapter, Factors, MethodConfig, Scale, Selection, SiteAdapter, SiteWeight
from adaplex.methods.bottleneck import Bottleneck, BottleneckConfig
from adaplex.methods.experts import ExpertBank, ExpertsConfig
from adaplex.methods.gate import GateConfig, LayerGate
from adaplex.methods.lora import (
    GivenLoRA,
    GivenLoRAConfig,
    LoRA,
    LoRAConfig,
    MoSLoRAConfig,
    PerSampleLoRA,
    per_sample_lora,
)
from adaplex.methods.prefix import Prefix, PrefixConfig
from adaplex.util.yamlconfig import validation_message

METHODS: dict[str, type[MethodConfig]] = {
    "lora": LoRAConfig,
    "moslora": MoSLoRAConfig,
    "bottleneck": BottleneckConfig,
    "prefix": PrefixConfig,
    "experts": ExpertsConfig,
    "given-lora": GivenLoRAConfig,
    "gate": GateConfig,
}


def method_config(fields: dict[str, Any], source: str = "config") -> MethodConfig:
    """Validate a dict such as {"method": "lora", "r": 8} into its method's config."""
    method = fields.get("method")
    if method not in METHODS:
        raise ConfigError(f"{source}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        return METHODS[method].model_validate(fields)
    except ValidationError as err:
        raise ConfigError(validation_message(err, source)) from None


def site_adapter(config: MethodConfig, in_features: int, out_features: int) -> SiteAdapter:
    """The module of ``config``'s method at one linear site of shape (in, out)."""
    for kind, module in SITE_MODULES.items():
        if isinstance(config, kind):
            return module(in_features, out_features, config)
    raise AdapterNameError(f"method {config.method!r} is not applied beside linear layers")


SITE_MODULES: dict[type[MethodConfig], Any] = {
    LoRAConfig: LoRA,
    BottleneckConfig: Bottleneck,
    ExpertsConfig: ExpertBank,
    GivenLoRAConfig: GivenLoRA,
}

__all__ = [
    "METHODS",
    "Adapter",
    "Bottleneck",
    "BottleneckConfig",
    "ExpertBank",
    "ExpertsConfig",
    "Factors",
    "GateConfig",
    "GivenLoRA",
    "GivenLoRAConfig",
    "LayerGate",
    "LoRA",
    "LoRAConfig",
    "MethodConfig",
    "MoSLoRAConfig",
    "PerSampleLoRA",
    "Prefix",
    "PrefixConfig",
    "Scale",
    "SiteAdapter",
    "Selection",
    "SiteWeight",
    "method_config",
    "per_sample_lora",
    "site_adapter",
]
