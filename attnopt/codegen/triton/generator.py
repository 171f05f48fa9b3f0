"""Emit, load and tune the generated Triton kernels; on-disk cache of sources and tuned configs.

Cache layout ($ATTNOPT_CACHE_DIR or ~/.cache/attnopt, then triton/):
  <family>_<kind>_<template hash>.py   the rendered kernel module, for tracebacks and the reader
  tune-<key hash>.json                 the chosen config for (spec, variant, device name, triton
                                       version), so a second process skips autotuning
The module is run from the text rendered in this process, never imported from the file: a file
under that predictable name (planted, stale, or a bytecode cache beside it) runs nothing. The file is
rewritten when it differs (attnopt.util.cache), and triton.jit reads the rendered text through
linecache, so the kernel compiled is the one rendered.
Under the interpreter (TRITON_INTERPRET=1) the first config of the "interpreter" tile table is used
without tuning and nothing but the source is written.
"""
from __future__ import annotations

import contextlib
import linecache
import os
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from attnopt.codegen.autotune import enabled as autotune_enabled
from attnopt.codegen.autotune import fastest
from attnopt.codegen.triton import template
from attnopt.cost.hardware import TILE_TABLES
from attnopt.util import cache
from attnopt.util.cache import cache_root


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def interpreter_usable() -> bool:
    """Whether triton's own language library was imported in interpreter mode: TRITON_INTERPRET set
    after `import triton` leaves its @jit helpers (tl.zeros, tl.max ...) compiled-mode objects."""
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def interpreter_stdlib():
    """Make triton's @jit standard library interpretable for the duration of a launch.

    triton decides compiled-vs-interpreted when `triton.language` is imported; a process that
    imported it before TRITON_INTERPRET=1 was set (e.g. a test session where other tests imported
    attnopt first) holds compiled-mode helpers (tl.zeros, tl.max, ...) that the interpreter refuses
    to call. Swap them for interpreted wrappers while the kernel runs, then restore them, so
    compiled kernels elsewhere in the process are untouched."""
    if not interpreter_active() or interpreter_usable():
        yield
        return
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    saved = []
    modules = [tl, tl.standard, tl.math]
    for mod in modules:
        for name, value in list(vars(mod).items()):
            if isinstance(value, JITFunction):
                saved.append((mod, name, value))
                setattr(mod, name, _wrapped(value))
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


_WRAPPED: dict = {}


def _wrapped(fn):
    from triton.runtime.interpreter import InterpretedFunction

    if fn not in _WRAPPED:
        _WRAPPED[fn] = InterpretedFunction(fn.fn)
    return _WRAPPED[fn]


def cache_dir() -> Path:
    return cache_root() / "triton"


_MODULES: dict[tuple[str, str, bool], Any] = {}


def kernel(family: str, kind: str) -> Callable:
    """The compiled-on-launch `<family>_fwd_kernel`, rendered, written to the cache directory and run
    from the rendered text."""
    interp = interpreter_active()
    key = (family, kind, interp)
    if key in _MODULES:
        return getattr(_MODULES[key], f"{family}_fwd_kernel")
    source = template.render(family, kind)
    stem = f"{family}_{kind}_{template.template_hash()}"
    path = cache.generated_file("triton", f"{stem}.py", source)  # None: the cache cannot hold it
    filename = str(path) if path is not None else f"<attnopt generated {stem}.py>"
    # triton.jit reads its function's source through inspect/linecache: give it the rendered text
    # (an entry without mtime is never re-read from disk), whatever the file holds by then.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    # The interpreter flag is read when @triton.jit runs, so each mode gets its own module object.
    mod_name = f"attnopt_generated.{stem}{'_interp' if interp else ''}"
    module = types.ModuleType(mod_name)
    module.__file__ = filename
    sys.modules[mod_name] = module  # inspect.getsource (used by triton.jit) needs it registered
    exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102  our own rendered text
    _MODULES[key] = module
    return getattr(module, f"{family}_fwd_kernel")


@dataclass(frozen=True)
class KernelConfig:
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 2

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "KernelConfig":
        return cls(tuple(d["q_tile"]), tuple(d["kv_tile"]), int(d["num_warps"]), int(d["num_stages"]))


def device_family(device) -> str:
    """TILE_TABLES key of a device: the interpreter, or the GPU generation."""
    if interpreter_active():
        return "interpreter"
    import torch

    major, _ = torch.cuda.get_device_capability(device)
    if major >= 10:
        return "blackwell"
    if major == 9:
        return "hopper"
    return "ampere"


def device_name(device) -> str:
    if interpreter_active():
        return "triton-interpreter"
    import torch

    return torch.cuda.get_device_name(device)


# Configs that compile but fault at run time, found by bench/gpu_config_probe.py (one process per
# config): on an H100 with triton 3.6.0 the non-causal 1-D kernel with 128x64 tiles, 8 warps and
# 3 stages raised "misaligned address" (every other config of every kernel kind ran and matched).
# A fault poisons the CUDA context, so the autotuner cannot survive trying it: never offer it.
KNOWN_FAULTS: dict[str, tuple[KernelConfig, ...]] = {
    "hopper": (KernelConfig((128,), (64,), 8, 3),),
}


def candidate_configs(family: str, ndim: int) -> list[KernelConfig]:
    """Configs of the literal tile table (1-D tiles for dense kernels, ndim-D boxes for GNA)."""
    table = TILE_TABLES[family]
    qs, kvs = table[f"q_{ndim}d"], table[f"kv_{ndim}d"]
    if family == "interpreter":
        return [KernelConfig(qs[0], kvs[0], 4, 1)]
    # Software-pipelining depth matters most for the 1-D kernels' streaming KV loop; GNA kernels
    # visit few, scattered tiles, so their tuning space keeps one depth (compile time is ~1 s
    # per config on a GPU host, and 3-D tables are already 16 tile pairs).
    stage_options = (2, 3) if ndim == 1 else (3,)
    out = []
    for qt in qs:
        for kt in kvs:
            for warps in (4, 8):
                for stages in stage_options:
                    out.append(KernelConfig(tuple(qt), tuple(kt), warps, stages))
    out = [c for c in out if c not in KNOWN_FAULTS.get(family, ())]
    if not autotune_enabled():
        return out[:1]  # tests that only check numbers: one compile per specialization
    return out


_TUNED: dict[str, KernelConfig] = {}


def tuned_config(key: dict, configs: Sequence[KernelConfig],
                 bench: Callable[[KernelConfig], float]) -> KernelConfig:
    """The fastest config for `key` (spec, variant, device, triton version): memory, then disk,
    then autotuning with `bench(config) -> seconds` (a config that fails to compile is skipped)."""
    if interpreter_active() or len(configs) == 1:
        return configs[0]
    return fastest(key, configs, bench, subdir="triton", encode=KernelConfig.to_json,
                   decode=KernelConfig.from_json, memo=_TUNED)


def mask_args(mask, q, shape4):
    """(mask expanded to [B, H, Sq, Skv], its strides with 0 on broadcast dims) for a kernel's
    mask pointer; q stands in as a dummy pointer when there is no mask (strides all 0)."""
    if mask is None:
        return q, (0, 0, 0, 0)
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(*shape4)
    return m, tuple(int(s) if sz > 1 else 0 for s, sz in zip(m.stride(), m.shape))
