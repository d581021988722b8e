"""Finding where adapters go: model families, target patterns, and wrapping base layers.

A target is an alias of the model's family ("q", "k", "v", "o", "gate", "up", "down",
"all-linear", "ffn-out", "attention"), a module name or its last component ("q_proj"), or a
regular expression matched against full module names. GPT-2's fused c_attn is exposed as
three sites c_attn.q, c_attn.k and c_attn.v, so q/k/v can be adapted separately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from adaplex.core.attention import AttentionAdapters
from adaplex.core.layers import LINEAR_TYPES, AdaptedLinear, SharedInputGroup, linear_shape
from adaplex.core.stack import Stack
from adaplex.errors import TargetError
from adaplex.methods import Adapter
from adaplex.util.names import name_matches, names_hint

LINEAR_ALIASES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Family:
    """Where the parts of one transformer family live, as regexes over module names."""

    name: str
    model_types: tuple[str, ...]
    aliases: dict[str, str]
    attention: str
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    shared_input: tuple[tuple[str, ...], ...] = ()  # aliases the model calls in this order on one input

    def target_aliases(self) -> list[str]:
        """Every alias a target may name in this family."""
        return [*self.aliases, "all-linear", "attention"]

    def alias_patterns(self, target: str) -> list[str] | None:
        if target == "all-linear":
            return [self.aliases[a] for a in LINEAR_ALIASES if a in self.aliases]
        if target == "attention":
            return [self.attention]
        return [self.aliases[target]] if target in self.aliases else None


def _llama_like() -> dict[str, str]:
    attn = {a: rf".*\.self_attn\.{a}_proj" for a in "qkvo"}
    mlp = {a: rf".*\.mlp\.{a}_proj" for a in ("gate", "up", "down")}
    return {**attn, **mlp, "ffn-out": mlp["down"]}


FAMILIES = (
    Family(
        "llama",
        ("llama", "qwen2", "qwen3", "mistral"),
        _llama_like(),
        r".*\.layers\.\d+\.self_attn",
        shared_input=(("q", "k", "v"), ("gate", "up")),
    ),
    Family(
        "gpt2",
        ("gpt2",),
        {
            **{a: rf".*\.attn\.c_attn\.{a}" for a in "qkv"},
            "o": r".*\.attn\.c_proj",
            "up": r".*\.mlp\.c_fc",
            "down": r".*\.mlp\.c_proj",
            "ffn-out": r".*\.mlp\.c_proj",
        },
        r".*\.h\.\d+\.attn",
        fused={r".*\.attn\.c_attn": ("q", "k", "v")},
    ),
    Family(
        "bert",
        ("bert",),
        {
            "q": r".*\.attention\.self\.query",
            "k": r".*\.attention\.self\.key",
            "v": r".*\.attention\.self\.value",
            "o": r".*\.attention\.output\.dense",
            "up": r".*\.intermediate\.dense",
            "down": r".*\.layer\.\d+\.output\.dense",
            "ffn-out": r".*\.layer\.\d+\.output\.dense",
        },
        r".*\.attention\.self",
        shared_input=(("q", "k", "v"),),
    ),
)


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise TargetError(f"unsupported model family {model_type!r}; adaplex adapts: {supported}")


@dataclass(frozen=True)
class Site:
    """A place for a site adapter: a base linear layer, or one part of a fused one."""

    module: str
    part: str | None = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.part}" if self.part else self.module


def base_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Base linear layers by module path, looking through wrappers and skipping adapters."""
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, AdaptedLinear):
                found[path] = child.base
            elif isinstance(child, LINEAR_TYPES):
                found[path] = child
            elif not isinstance(child, (Adapter, AttentionAdapters)):
                walk(child, path + ".")

    walk(model, "")
    return found


def fused_parts(family: Family, module: str) -> tuple[str, ...]:
    return next((parts for pat, parts in family.fused.items() if re.fullmatch(pat, module)), ())


def all_sites(model: nn.Module, family: Family) -> list[Site]:
    sites = []
    for path in base_linears(model):
        sites.append(Site(path))
        sites.extend(Site(path, part) for part in fused_parts(family, path))
    return sites


def select(names: list[str], targets: tuple[str, ...], family: Family, what: str) -> list[str]:
    """Names matched by any target; a target that matches nothing is an error listing what exists."""
    chosen: dict[str, None] = {}
    for target in targets:
        patterns = family.alias_patterns(target)
        if patterns is None:
            matched = [n for n in names if name_matches(target, n)]
        else:
            matched = [n for n in names if any(re.fullmatch(p, n) for p in patterns)]
        if not matched:
            aliases = ", ".join(family.target_aliases())
            raise TargetError(
                f"target {target!r} matches no {what} of this {family.name} model; "
                f"use an alias ({aliases}) or one of: {names_hint(names)}"
            )
        chosen.update(dict.fromkeys(matched))
    return list(chosen)


def select_sites(model: nn.Module, family: Family, targets: tuple[str, ...]) -> dict[str, list[Site]]:
    """Chosen sites grouped by base module path; a fused layer cannot be targeted whole and in parts."""
    by_name = {s.name: s for s in all_sites(model, family)}
    grouped: dict[str, list[Site]] = {}
    for name in select(list(by_name), targets, family, "linear layer"):
        site = by_name[name]
        grouped.setdefault(site.module, []).append(site)
    for module, sites in grouped.items():
        if len(sites) > 1 and any(s.part is None for s in sites):
            raise TargetError(f"{module} is targeted both whole and by parts; target one or the other")
    return grouped


def select_attention(model: nn.Module, family: Family, targets: tuple[str, ...]) -> list[str]:
    names = [n for n, _ in model.named_modules() if re.fullmatch(family.attention, n)]
    return select(names, targets, family, "attention layer")


def site_shape(model: nn.Module, family: Family, site: Site) -> tuple[int, int]:
    """(in, out) features of a site; a fused part gets an equal share of the output."""
    in_features, out_features = linear_shape(base_linears(model)[site.module])
    if site.part is None:
        return in_features, out_features
    return in_features, out_features // len(fused_parts(family, site.module))


def wrap(model: nn.Module, path: str, stack: Stack) -> AdaptedLinear:
    """The AdaptedLinear at ``path``, replacing the base layer there on first use."""
    layer = model.get_submodule(path)
    if isinstance(layer, AdaptedLinear):
        return layer
    wrapper = AdaptedLinear(layer, stack, path)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, wrapper)
    return wrapper


def unwrap(model: nn.Module, path: str) -> None:
    """Put the base layer back at ``path``."""
    wrapper = model.get_submodule(path)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, wrapper.base)


def link_shared_inputs(model: nn.Module, family: Family) -> None:
    """Give the wrappers that one module calls on one input (``family.shared_input``) a common group, and
    every other wrapper a group of its own (which leads its own fused launch)."""
    found = wrappers(model)
    for wrapper in found.values():
        wrapper.group = None
    for aliases in family.shared_input:
        siblings: dict[str, list[AdaptedLinear]] = {}
        for alias in aliases:
            for path, wrapper in found.items():
                if re.fullmatch(family.aliases[alias], path):
                    siblings.setdefault(path.rpartition(".")[0], []).append(wrapper)
        for members in siblings.values():
            if len(members) > 1:
                group = SharedInputGroup(members)
                for wrapper in members:
                    wrapper.group = group
    for wrapper in found.values():
        if wrapper.group is None:
            wrapper.group = SharedInputGroup([wrapper])


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")  # FSDP, checkpoints, compile


def unwrapped_path(path: str) -> str:
    """A module path as the model names it unwrapped: without the segments that FSDP units, activation
    checkpointing and torch.compile insert (the names adapter files use, however the model was run)."""
    for segment in WRAPPER_SEGMENTS:
        path = path.replace(segment, "")
    return path


def wrappers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def attention_adapters(model: nn.Module) -> dict[str, AttentionAdapters]:
    """AttentionAdapters children keyed by their attention layer's path."""
    return {n.rpartition(".")[0]: m for n, m in model.named_modules() if isinstance(m, AttentionAdapters)}


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(key-value heads, head dim, hidden size) from a transformers config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.hidden_size


def rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's shared rotary-embedding module, if it has one (Llama-style families)."""
    return next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)


def qkv_sources(attention: nn.Module) -> dict[str, tuple[nn.Module, int | None]]:
    """Where q, k, v come from in one attention layer: (module, part of a fused q|k|v output or None)."""
    children = dict(attention.named_children())
    if "c_attn" in children:  # GPT-2: one fused projection
        return {loc: (children["c_attn"], i) for i, loc in enumerate("qkv")}
    if "query" in children:  # BERT
        return {"q": (children["query"], None), "k": (children["key"], None), "v": (children["value"], None)}
    q_src = children.get("q_norm", children["q_proj"])  # Qwen3 normalises each head after the projection
    k_src = children.get("k_norm", children["k_proj"])
    return {"q": (q_src, None), "k": (k_src, None), "v": (children["v_proj"], None)}
