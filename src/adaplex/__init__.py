"""adaplex: compose, route, gate, generate and stress-test adapters on transformers models."""

from adaplex.adapted import Adapted, attach
from adaplex.errors import AdaplexError
from adaplex.methods import BottleneckConfig, LoRAConfig, MoSLoRAConfig, PrefixConfig, method_config

__version__ = "0.1.0"

__all__ = [
    "AdaplexError",
    "Adapted",
    "BottleneckConfig",
    "LoRAConfig",
    "MoSLoRAConfig",
    "PrefixConfig",
    "__version__",
    "attach",
    "method_config",
]
