"""adaplex: compose, route, gate, generate and stress-test adapters on transformers models."""

from adaplex.core.adapted import Adapted, attach
from adaplex.errors import AdaplexError
from adaplex.methods import BottleneckConfig, LoRAConfig, MoSLoRAConfig, PrefixConfig, method_config
from adaplex.util.version import VERSION

__version__ = VERSION

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
