"""``Adapted``: named adapters attached to one transformers model.

The model keeps its class (generation, caching, saving keep working): base linear layers are
wrapped by ``AdaptedLinear``, attention layers gain an ``AttentionAdapters`` child, and the
model's ``attn_implementation`` becomes "adaplex". ``detach()`` undoes all of it exactly.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from adaplex.core import attention
from adaplex.core.gating import gate_kinds
from adaplex.core.inject import (
    attention_adapters,
    attention_shape,
    family_of,
    fused_parts,
    link_shared_inputs,
    select_attention,
    select_sites,
    site_shape,
    unwrap,
    unwrapped_path,
    wrap,
    wrappers,
)
from adaplex.core.layers import FusedParts
from adaplex.core.paging import ExpertPager
from adaplex.core.quantize import is_quantized
from adaplex.core.stack import Stack
from adaplex.core.weights import Gated, Given
from adaplex.errors import AdaplexError, AdapterNameError, StorageError
from adaplex.methods import (
    Adapter,
    ExpertBank,
    ExpertsConfig,
    GateConfig,
    GivenLoRAConfig,
    LayerGate,
    MethodConfig,
    Prefix,
    PrefixConfig,
    site_adapter,
)
from adaplex.methods.gate import SUBMODULE_METHODS
from adaplex.util.measure import available_host_bytes

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
_HANDLES: weakref.WeakKeyDictionary[nn.Module, Adapted] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ParameterReport:
    name: str
    method: str
    parameters: int
    bytes: int
    trainable: bool


class Adapted:
    """Adapters attached to a model; stacking controls are on ``self.stack``."""

    def __init__(self, model: nn.Module) -> None:
        self.family = family_of(model)
        self.model = model
        self.stack = Stack()
        self.configs: dict[str, MethodConfig] = {}
        self.pagers: dict[str, ExpertPager] = {}  # paged expert banks by adapter name
        self._attn_implementation = model.config._attn_implementation
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        attention.register()
        model.set_attn_implementation(attention.ATTENTION_NAME)
        model.requires_grad_(False)
        _HANDLES[model] = self

    @classmethod
    def of(cls, model: nn.Module) -> Adapted:
        """The handle of a model, attaching one on first use."""
        return _HANDLES.get(model) or cls(model)

    @staticmethod
    def find(model: nn.Module) -> Adapted | None:
        """The handle of a model that has one, else None."""
        return _HANDLES.get(model)

    # ---- adding and removing -------------------------------------------------------------

    def add(self, name: str, config: MethodConfig, trainable: bool = True, weight: float = 1.0) -> None:
        """Create adapter ``name`` at every site its config targets; nothing changes on error."""
        if not NAME_PATTERN.fullmatch(name):
            raise AdapterNameError(f"adapter name {name!r} may hold only letters, digits, '_' and '-'")
        if name in self.configs:
            raise AdapterNameError(f"adapter {name!r} already exists; remove it or choose another name")
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        kinds: dict[str, Gated] = {}
        if isinstance(config, GateConfig):
            placements, kinds = self._build_gates(config)
        else:
            if isinstance(config, ExpertsConfig):
                self._check_bank_fits(config)
            placements = self._build(config)
        for place, module in placements:
            place[name] = module.to(device=device, dtype=dtype)
        self.configs[name] = config
        self.stack.add(name, weight)
        for gated, kind in kinds.items():
            self.stack.set_kind(gated, kind)
        self.set_trainable(name, trainable)

    def add_loaded(
        self, name: str, config: MethodConfig, tensors: dict[str, torch.Tensor], source: str, trainable: bool = False
    ) -> None:
        """Add adapter ``name`` filled from ``tensors``; if they do not fit, it is removed again."""
        self.add(name, config, trainable=trainable)
        try:
            self.load_state_dict(name, tensors, source)
        except AdaplexError:
            self.remove(name)
            raise

    def bank_bytes(self, config: ExpertsConfig) -> int:
        """Bytes of the expert bank ``config`` describes, in float32 as it is built: every expert at the
        bank's largest rank, Σ_sites (in + out) · r_max · K · 4."""
        r = max(config.rank(k) for k in config.keys)
        sites = [s for group in select_sites(self.model, self.family, config.targets).values() for s in group]
        return sum(sum(site_shape(self.model, self.family, s)) for s in sites) * r * len(config.keys) * 4

    def _check_bank_fits(self, config: ExpertsConfig) -> None:
        """A bank is built in host memory: one larger than the memory available is refused, with its size."""
        need, available = self.bank_bytes(config), available_host_bytes()
        if available is not None and need > available:
            raise StorageError(
                f"an expert bank of {len(config.keys)} experts needs {need / 2**30:.1f} GiB of host memory to "
                f"build, and {available / 2**30:.1f} GiB are available; use fewer keys or a lower rank"
            )

    def _build(self, config: MethodConfig) -> list[tuple[nn.ModuleDict, Adapter]]:
        if isinstance(config, PrefixConfig):
            heads, head_dim, hidden = attention_shape(self.model)
            placements = []
            for path in select_attention(self.model, self.family, config.targets):
                layer = self.model.get_submodule(path)
                placements.append(
                    (
                        attention.attention_child(layer, self.stack, path).prefixes,
                        Prefix(heads, head_dim, hidden, config),
                    )
                )
                attention.record_input(layer, True)
            return placements
        built = []
        for module, sites in select_sites(self.model, self.family, config.targets).items():
            adapters = {
                s.part: site_adapter(config.at_site(s.name), *site_shape(self.model, self.family, s)) for s in sites
            }
            if None in adapters:
                adapter = adapters[None]
            else:
                out = site_shape(self.model, self.family, sites[0])[1]
                adapter = FusedParts(dict.fromkeys(fused_parts(self.family, module), out), adapters)
            built.append((module, adapter))
        placements = [(wrap(self.model, module, self.stack).adapters, adapter) for module, adapter in built]
        link_shared_inputs(self.model, self.family)
        return placements

    def _build_gates(self, config: GateConfig) -> tuple[list[tuple[nn.ModuleDict, Adapter]], dict[str, Gated]]:
        """A LayerGate at each targeted attention layer and the Gated kind of each gated adapter,
        checked before anything is placed: the adapters exist, have the submodule's method, are not
        gated already, and every site of theirs lies in a gated layer."""
        for submodule, adapter in config.gated.items():
            self.stack.check(adapter)
            method = self.configs[adapter].method
            if method not in SUBMODULE_METHODS[submodule]:
                raise AdapterNameError(f"gate's {submodule} is adapter {adapter!r}, a {method} adapter")
            other = self.gate_of(adapter)
            if other is not None:
                raise AdapterNameError(f"adapter {adapter!r} is gated by {other!r} already; remove that gate first")
        hidden = attention_shape(self.model)[2]
        gates = {path: LayerGate(hidden, config) for path in select_attention(self.model, self.family, config.targets)}
        kinds = gate_kinds(config, gates, {a: list(self.sites(a)) for a in config.gated.values()})
        placements = []
        for path, gate in gates.items():
            gate.site = path
            placements.append((attention.attention_child(self.model.get_submodule(path), self.stack, path).gates, gate))
        return placements, kinds

    def gate_of(self, name: str) -> str | None:
        """The gate adapter whose gates weight adapter ``name``, if any."""
        return next(
            (g for g, c in self.configs.items() if isinstance(c, GateConfig) and name in c.gated.values()), None
        )

    def remove(self, name: str) -> None:
        gate = self.gate_of(name)
        if gate is not None:
            raise AdapterNameError(f"adapter {name!r} is gated by {gate!r}; remove the gate first")
        self.stack.remove(name)
        config = self.configs[name]
        for gated in config.gated.values() if isinstance(config, GateConfig) else ():
            self.stack.set_kind(gated, None)
        for place in self._places(name):
            del place[name]
        for path, wrapper in wrappers(self.model).items():
            if not len(wrapper.adapters):
                unwrap(self.model, path)
        for path, child in attention_adapters(self.model).items():
            attention.record_input(self.model.get_submodule(path), len(child.prefixes) > 0)
        link_shared_inputs(self.model, self.family)
        del self.configs[name]
        self.pagers.pop(name, None)

    def detach(self) -> nn.Module:
        """Remove every adapter and return the model exactly as it was before attaching."""
        self.unmerge()
        _strip(self.model, self._attn_implementation, self._requires_grad)
        _HANDLES.pop(self.model, None)
        return self.model

    # ---- stacking --------------------------------------------------------------------------

    def only(self, *names: str) -> AbstractContextManager[None]:
        return self.stack.only(*names)

    def enable(self, *names: str) -> AbstractContextManager[None]:
        return self.stack.enable(*names)

    def disable(self, *names: str) -> AbstractContextManager[None]:
        return self.stack.disable(*names)

    def given(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> AbstractContextManager[None]:
        """Inside the block the given-lora adapter ``name`` applies sample b's own LoRA at each site:
        ``weights`` maps every site it targets (the keys of ``sites(name)``) to (A (B, r, in), B (B, out, r))."""
        config = self.configs.get(name)
        if not isinstance(config, GivenLoRAConfig):
            self.stack.check(name)
            raise AdapterNameError(
                f"adapter {name!r} is {config.method}; per-sample weights go to a given-lora adapter"
            )
        unknown = sorted(set(weights) - set(self.sites(name)))
        if unknown:
            raise AdapterNameError(f"given weights for {unknown[0]!r}, which adapter {name!r} does not target")
        return self.stack.overriding({name: Given(weights)})

    def banks(self) -> dict[str, ExpertsConfig]:
        """The expert banks' configs by adapter name."""
        return {n: c for n, c in self.configs.items() if isinstance(c, ExpertsConfig)}

    def page(self, name: str, slots: int) -> ExpertPager:
        """Keep bank ``name``'s experts in host memory and at most ``slots`` of them on the model's device;
        a route loads the experts its batch uses that are not there (``adaplex.core.paging``)."""
        config = self.banks().get(name)
        if config is None:
            raise AdapterNameError(f"{name!r} is not an expert bank of this model; banks: {', '.join(self.banks())}")
        if name in self.pagers:
            raise AdapterNameError(f"bank {name!r} is paged already")
        if any(p.requires_grad for p in self.parameters(name)):
            raise AdapterNameError(f"bank {name!r} is trainable; freeze it (set_trainable({name!r}, False)) to page it")
        self.pagers[name] = ExpertPager(name, list(self.bank_modules(name).values()), config.keys, slots)
        return self.pagers[name]

    def bank_modules(self, name: str) -> dict[str, ExpertBank]:
        """ExpertBank modules of bank ``name`` keyed by their state-dict prefix ('<site>.' or '<site>.parts.q.')."""
        found = {}
        for path, adapter in self.adapters(name).items():
            for sub, module in adapter.named_modules():
                if isinstance(module, ExpertBank):
                    found[f"{path}.{sub}." if sub else f"{path}."] = module
        return found

    # ---- parameters ------------------------------------------------------------------------

    def adapters(self, name: str) -> dict[str, Adapter]:
        """Adapter modules of ``name`` keyed by the path of the base layer or attention layer, as the
        unwrapped model names it (``unwrapped_path``: the same keys under FSDP)."""
        self.stack.check(name)
        found = {p: w.adapters[name] for p, w in wrappers(self.model).items() if name in w.adapters}
        for path, child in attention_adapters(self.model).items():
            for place in (child.prefixes, child.gates):
                if name in place:
                    found[path] = place[name]
        return {unwrapped_path(path): adapter for path, adapter in found.items()}

    def sites(self, name: str) -> dict[str, Adapter]:
        """Adapter ``name``'s module at each site: by module path, a fused layer's part as '<module>.<part>'."""
        found: dict[str, Adapter] = {}
        for path, adapter in self.adapters(name).items():
            if isinstance(adapter, FusedParts):
                found.update({f"{path}.{part}": module for part, module in adapter.parts.items()})
            else:
                found[path] = adapter
        return found

    def _places(self, name: str) -> Iterator[nn.ModuleDict]:
        for wrapper in wrappers(self.model).values():
            if name in wrapper.adapters:
                yield wrapper.adapters
        for child in attention_adapters(self.model).values():
            for place in (child.prefixes, child.gates):
                if name in place:
                    yield place

    def parameters(self, name: str | None = None) -> list[nn.Parameter]:
        names = [name] if name else list(self.configs)
        return [p for n in names for a in self.adapters(n).values() for p in a.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        if trainable and name in self.pagers:
            raise AdapterNameError(
                f"bank {name!r} is paged (its device slots hold whichever experts were used "
                "last); train an unpaged bank"
            )
        for p in self.parameters(name):
            p.requires_grad_(trainable)

    def report(self) -> list[ParameterReport]:
        rows = []
        for name, config in self.configs.items():
            params = self.parameters(name)
            rows.append(
                ParameterReport(
                    name,
                    config.method,
                    sum(p.numel() for p in params),
                    sum(p.numel() * p.element_size() for p in params),
                    any(p.requires_grad for p in params),
                )
            )
        return rows

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter ``name`` keyed '<site path>.<parameter>'."""
        return {
            f"{path}.{key}": tensor.detach()
            for path, adapter in self.adapters(name).items()
            for key, tensor in adapter.state_dict().items()
        }

    def load_state_dict(self, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy ``tensors`` into adapter ``name``; every key, shape and dtype is checked first."""
        own = self.state_dict(name)
        missing = sorted(own.keys() - tensors.keys())
        extra = sorted(tensors.keys() - own.keys())
        if missing or extra:
            which, key = ("missing", missing[0]) if missing else ("unexpected", extra[0])
            raise StorageError(f"{source}: {which} tensor {key!r}; the file does not fit adapter {name!r}")
        for key, tensor in tensors.items():
            if tensor.shape != own[key].shape:
                raise StorageError(
                    f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}"
                )
            if not tensor.dtype.is_floating_point:
                raise StorageError(f"{source}: tensor {key!r} has dtype {tensor.dtype}, expected floating point")
        with torch.no_grad():
            for key, tensor in tensors.items():
                own[key].copy_(tensor)

    # ---- merging ---------------------------------------------------------------------------

    def _mergeable(self, names: list[str]) -> None:
        quantized = [path for path, w in wrappers(self.model).items() if is_quantized(w.base)]
        if quantized:
            raise AdapterNameError(
                f"cannot merge into a quantized base ({quantized[0]} holds bitsandbytes weights); load the base "
                "unquantized (quantize: none) with the adapter and merge there, e.g. adaplex merge ADAPTER --out DIR"
            )
        gated = [n for n in names if self.gate_of(n) is not None]
        if gated:
            raise AdapterNameError(
                f"adapter {gated[0]!r} is gated by {self.gate_of(gated[0])!r}; a gate computed per token "
                "cannot be folded into weights"
            )
        blocked = [n for n in names if not all(a.mergeable for a in self.adapters(n).values())]
        if blocked:
            method = self.configs[blocked[0]].method
            raise AdapterNameError(
                f"adapter {blocked[0]!r} ({method}) cannot be merged into weights; only LoRA and MoSLoRA can"
            )

    def merge(self, *names: str) -> None:
        """Fold the named (default: all active) adapters into the base weights, W += w·ΔW."""
        names = names or tuple(self.stack.active)
        self.stack.check(*names)
        self._mergeable(list(names))
        weights = {n: self.stack.weights[n] for n in names if n in self.stack.active}
        for wrapper in wrappers(self.model).values():
            wrapper.merge(weights)
        self.stack.mark_merged(weights)

    def unmerge(self) -> None:
        """Restore the exact base weights."""
        for wrapper in wrappers(self.model).values():
            wrapper.unmerge()
        self.stack.clear_merged()

    def merged_model(self) -> nn.Module:
        """A plain transformers model (a copy) with the active adapters merged into its weights."""
        self._mergeable(list(self.stack.active))
        clone = copy.deepcopy(self.model)
        weights = {n: self.stack.weights[n] for n in self.stack.active}
        for wrapper in wrappers(clone).values():
            wrapper.merge(weights)
            wrapper._original_weight = None
        _strip(clone, self._attn_implementation, self._requires_grad)
        return clone


def _strip(model: nn.Module, attn_implementation: str, requires_grad: dict[str, bool]) -> None:
    """Unwrap every layer, drop attention adapters, restore attention and requires_grad flags."""
    for path in wrappers(model):
        unwrap(model, path)
    for path in attention_adapters(model):
        attention.remove_child(model.get_submodule(path))
    model.set_attn_implementation(attn_implementation)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad[n])


def attach(model: nn.Module, name: str, config: MethodConfig, trainable: bool = True) -> Adapted:
    """Add adapter ``name`` to ``model`` and return the model's handle."""
    handle = Adapted.of(model)
    handle.add(name, config, trainable=trainable)
    return handle
