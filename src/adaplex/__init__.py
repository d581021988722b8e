"""adaplex: stack, route and stress-test parameter-efficient adapters on transformers models.

The names below load on first use, so that importing a light part of the package (the command
line's help, ``adaplex info``) does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adaplex.util.version import VERSION

if TYPE_CHECKING:
    from adaplex.core.adapted import Adapted, attach
    from adaplex.errors import AdaplexError
    from adaplex.methods import BottleneckConfig, LoRAConfig, MethodConfig, MoSLoRAConfig, PrefixConfig, method_config

__version__ = VERSION

_HOMES = {
    "Adapted": "adaplex.core.adapted",
    "attach": "adaplex.core.adapted",
    "AdaplexError": "adaplex.errors",
    **dict.fromkeys(
        ("BottleneckConfig", "LoRAConfig", "MethodConfig", "MoSLoRAConfig", "PrefixConfig", "method_config"),
        "adaplex.methods",
    ),
}

__all__ = [
    "AdaplexError",
    "Adapted",
    "BottleneckConfig",
    "LoRAConfig",
    "MethodConfig",
    "MoSLoRAConfig",
    "PrefixConfig",
    "__version__",
    "attach",
    "method_config",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'adaplex' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
