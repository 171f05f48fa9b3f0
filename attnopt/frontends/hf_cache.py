"""Pytree nodes for transformers' KV-cache classes, so torch.export can trace models that return
them (the default `use_cache=True` of every HF decoder and encoder-decoder: Whisper returns an
`EncoderDecoderCache`, Llama a `DynamicCache`, models configured for it a `StaticCache` or a
cache with sliding-window layers).

transformers offers export support for `DynamicCache` only
(`transformers.integrations.executorch.register_dynamic_cache_export_support`), which is used
when present. `EncoderDecoderCache` is a node over its two caches. Every other cache class (static,
quantized, hybrid, a DynamicCache subclass...) gets a generic node: its children are the tensors
its layers hold, its context the cache object itself as a template; unflattening copies the
template and its layers with the new tensors. Such a context is not JSON: a program holding one
runs in process (attnopt's module path needs nothing more) but cannot be saved with the cache in
its signature.
"""
from __future__ import annotations

import copy
from typing import Any

_DONE = False


def register_cache_pytrees() -> bool:
    """Register every transformers cache class not yet a pytree node; False if transformers is
    not installed."""
    global _DONE
    try:
        import torch.utils._pytree as pytree
        from transformers import cache_utils
    except ImportError:
        return False
    if _DONE:
        return True
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
        register_dynamic_cache_export_support()
    except Exception:  # noqa: BLE001 - older/newer transformers: the generic node below covers it
        pass
    base = getattr(cache_utils, "Cache", None)
    if base is None:
        return False
    for cls in _subclasses(base):
        if cls in pytree.SUPPORTED_NODES:
            continue
        name = f"{cls.__module__}.{cls.__name__}"
        if cls.__name__ == "EncoderDecoderCache":
            pytree.register_pytree_node(cls, _encdec_flatten, _encdec_unflatten(cls),
                                        serialized_type_name=name,
                                        flatten_with_keys_fn=_encdec_flatten_with_keys)
        else:
            pytree.register_pytree_node(cls, _layers_flatten, _layers_unflatten,
                                        serialized_type_name=name,
                                        flatten_with_keys_fn=_layers_flatten_with_keys)
    _DONE = True
    return True


def _subclasses(cls: type) -> list[type]:
    out, stack = [], [cls]
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(c.__subclasses__())
    return out


_ENCDEC_FIELDS = ("self_attention_cache", "cross_attention_cache")


def _encdec_flatten(cache: Any) -> tuple[list[Any], None]:
    return [getattr(cache, f) for f in _ENCDEC_FIELDS], None


def _encdec_flatten_with_keys(cache: Any):
    from torch.utils._pytree import GetAttrKey

    return [(GetAttrKey(f), getattr(cache, f)) for f in _ENCDEC_FIELDS], None


def _encdec_unflatten(cls: type):
    def unflatten(children: Any, _context: Any) -> Any:
        return cls(*children)
    return unflatten


class _Template:
    """A cache object and where its tensors sit ((layer index, attribute) per child)."""

    def __init__(self, cache: Any, slots: list[tuple[int, str]]) -> None:
        self.cache, self.slots = cache, slots

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Template) and other.slots == self.slots \
            and type(other.cache) is type(self.cache)

    def __hash__(self) -> int:
        return hash((type(self.cache), tuple(self.slots)))

    def __repr__(self) -> str:
        return f"{type(self.cache).__name__}({len(self.slots)} tensors)"

    def __deepcopy__(self, memo: dict) -> "_Template":
        return self  # never mutated: unflattening copies it


def _slots(cache: Any) -> list[tuple[int, str]]:
    import torch

    slots = []
    for i, layer in enumerate(getattr(cache, "layers", None) or []):
        for attr, value in sorted(vars(layer).items()):
            if isinstance(value, torch.Tensor):
                slots.append((i, attr))
    return slots


def _layers_flatten(cache: Any) -> tuple[list[Any], _Template]:
    slots = _slots(cache)
    children = [getattr(cache.layers[i], a) for i, a in slots]
    # the template holds no tensors (they may be fake ones of a trace, and would be kept alive)
    template = copy.copy(cache)
    if hasattr(cache, "layers"):
        template.layers = [copy.copy(layer) for layer in cache.layers]
        for i, a in slots:
            setattr(template.layers[i], a, None)
    return children, _Template(template, slots)


def _layers_flatten_with_keys(cache: Any):
    from torch.utils._pytree import MappingKey

    children, template = _layers_flatten(cache)
    return [(MappingKey(f"layers_{i}_{a}"), c) for (i, a), c in zip(template.slots, children)], template


def _layers_unflatten(children: Any, template: _Template) -> Any:
    cache = copy.copy(template.cache)
    layers = [copy.copy(layer) for layer in getattr(template.cache, "layers", None) or []]
    for (i, attr), value in zip(template.slots, children):
        setattr(layers[i], attr, value)
    if hasattr(template.cache, "layers"):
        cache.layers = layers
    return cache
