"""Adapter methods: each a config (validated) and a plain nn.Module."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from adaplex.errors import ConfigError
from adaplex.methods.base import Adapter, MethodConfig, SiteAdapter
from adaplex.methods.bottleneck import Bottleneck, BottleneckConfig
from adaplex.methods.experts import ExpertBank, ExpertsConfig, Route
from adaplex.methods.lora import LoRA, LoRAConfig, MoSLoRAConfig
from adaplex.methods.prefix import Prefix, PrefixConfig
from adaplex.yamlconfig import validation_message

METHODS: dict[str, type[MethodConfig]] = {
    "lora": LoRAConfig,
    "moslora": MoSLoRAConfig,
    "bottleneck": BottleneckConfig,
    "prefix": PrefixConfig,
    "experts": ExpertsConfig,
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


__all__ = [
    "METHODS",
    "Adapter",
    "Bottleneck",
    "BottleneckConfig",
    "ExpertBank",
    "ExpertsConfig",
    "LoRA",
    "LoRAConfig",
    "MethodConfig",
    "MoSLoRAConfig",
    "Prefix",
    "PrefixConfig",
    "Route",
    "SiteAdapter",
    "method_config",
]
