"""Placeholder pytree nodes for the library types a `.pt2` program's inputs and outputs name.

A program exported from a transformers or diffusers model with `return_dict=True` returns a
library dataclass (`BaseModelOutput`, `CausalLMOutputWithPast`, ...). The archive stores its
treespec with the type's name; `torch.export.load` can only rebuild the treespec if a pytree node
of that name is registered, which the library does when it is imported. attnopt does not import
modules a file names (that would run code the file chose, and the library may be absent):
`register_placeholders` reads the type names from the archive's models/*.json and registers, for
each name no pytree node has, a placeholder node of that name. The program then loads and runs
with a dict-like placeholder value in place of the dataclass (attnopt only needs the graph), and
the placeholder serializes under the same name with the same context, so a program written back
(the optimized .pt2) carries the original treespec: the user's loading code, which imports the
library, sees the original type.

A later registration of the real type under the same name (the library imported afterwards in the
same process) takes precedence for programs loaded after it; torch allows that.
"""
from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from typing import Any, Iterable

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_MAX_NAME = 200
_MAX_PLACEHOLDERS = 256  # per process: a file cannot grow the registry without bound
_LOCK = threading.Lock()
_PLACEHOLDERS: dict[str, type] = {}


class LibraryOutput(dict):
    """Stands in for a library dataclass whose pytree node is not registered in this process.
    Holds the children by key (the dataclass's field names when the context lists them) and the
    serialized context unchanged."""

    _attnopt_type_name = ""

    def __init__(self, children: Iterable[Any], context: str) -> None:
        children = list(children)
        super().__init__(zip(_keys(context, len(children)), children))
        self._attnopt_context = context

    def __repr__(self) -> str:
        return f"{self._attnopt_type_name}(placeholder)({dict.__repr__(self)})"


def _keys(context: str, n: int) -> list[Any]:
    try:
        keys = json.loads(context)
    except (TypeError, ValueError, RecursionError):
        keys = None
    if isinstance(keys, list) and len(keys) == n and all(isinstance(k, str) for k in keys) \
            and len(set(keys)) == n:
        return keys
    return list(range(n))


def _flatten(obj: LibraryOutput) -> tuple[list[Any], str]:
    return list(obj.values()), obj._attnopt_context


def _flatten_with_keys(obj: LibraryOutput):
    from torch.utils._pytree import MappingKey

    return [(MappingKey(k), v) for k, v in obj.items()], obj._attnopt_context


def _identity(context: Any) -> Any:
    return context


def placeholder_type(name: str) -> type:
    """The placeholder class registered for `name` (creating and registering it if needed)."""
    import torch.utils._pytree as pytree

    with _LOCK:
        cls = _PLACEHOLDERS.get(name)
        if cls is not None:
            return cls
        if len(_PLACEHOLDERS) >= _MAX_PLACEHOLDERS:
            raise ValueError(f"too many unregistered pytree types (at {name!r})")
        short = name.rsplit(".", 1)[-1]
        cls = type(short, (LibraryOutput,), {"_attnopt_type_name": name, "__module__": __name__,
                                             "__qualname__": f"LibraryOutput[{name}]"})

        def unflatten(children: Iterable[Any], context: str, _cls: type = cls) -> LibraryOutput:
            return _cls(children, context)

        pytree.register_pytree_node(cls, _flatten, unflatten, serialized_type_name=name,
                                    to_dumpable_context=_identity, from_dumpable_context=_identity,
                                    flatten_with_keys_fn=_flatten_with_keys)
        _PLACEHOLDERS[name] = cls
        return cls


def spec_type_names(data: bytes) -> set[str]:
    """Every pytree type name in the input and output treespecs of the archive's programs."""
    names: set[str] = set()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        entries = [n for n in zf.namelist() if "/models/" in n and n.endswith(".json")]
        for entry in entries:
            model = json.loads(zf.read(entry))
            graph_module = model.get("graph_module", {}) if isinstance(model, dict) else {}
            for call in graph_module.get("module_call_graph", None) or []:
                sig = call.get("signature") if isinstance(call, dict) else None
                if not isinstance(sig, dict):
                    continue
                for key in ("in_spec", "out_spec"):
                    if isinstance(sig.get(key), str):
                        _collect(json.loads(sig[key]), names)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError, AttributeError,
            RecursionError):
        return names  # the load itself reports what is wrong with the archive
    return names


def _collect(spec: Any, names: set[str]) -> None:
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            typ = node.get("type")
            if isinstance(typ, str):
                names.add(typ)
            children = node.get("children_spec")
            if isinstance(children, list):
                stack.extend(children)


def register_placeholders(data: bytes) -> list[str]:
    """Register a placeholder pytree node for each type name the archive's treespecs use that no
    node has in this process; the names that got one. Malformed names are left to the loader."""
    import torch.utils._pytree as pytree

    done = []
    for name in sorted(spec_type_names(data)):
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
            continue
        placeholder_type(name)
        done.append(name)
    return done


def unregistered_type_names(data: bytes) -> list[str]:
    """The archive's treespec type names that still have no pytree node (after placeholders)."""
    import torch.utils._pytree as pytree

    return sorted(n for n in spec_type_names(data) if n not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)
