"""Reading and writing `.pt2` archives (torch.export programs) without running code from them.

Why this module exists: `torch.export.load` unpickles parts of an archive with the full pickle
machinery: weights and constants whose config says `use_pickle`, custom and opaque objects,
legacy `.pt` weight files, sample inputs (it retries with `weights_only=False` when the safe
loader refuses), the pre-2.8 archive layout, and it dlopens AOTInductor libraries. Each of those
runs whatever a crafted file asks for. attnopt opens files people download, so:

1. `check_archive` reads the archive's manifest (file names and the JSON payload configs) and
   refuses, with one line naming what it found, any archive that stores pickled weights or
   constants, custom/opaque objects, legacy `.pt` payloads, native code (AOTInductor, ExecuTorch,
   MTIA payloads), an older archive layout, or sample inputs that the restricted
   (`weights_only=True`) unpickler does not accept.
2. The archive is read into memory once; the bytes that were checked are the bytes that are loaded
   (no second open of a path that may have changed in between).
3. `torch.export.load` then runs with torch's own switch that forces `weights_only=True` on every
   `torch.load`, and with the two raw unpicklers it calls for custom/opaque objects replaced by a
   refusal: a check that misses something still cannot execute it. Its `sympy.sympify` (which
   evaluates size expressions as Python) only sees expressions that pass pt2_checks.
4. The loaded program's guards and node targets are checked too (pt2_checks): both become code.

Users who trust a file can opt in with `trust_pickled_files()` (CLI: `--allow-unsafe-pickle`).
Writing: `program_bytes` serializes to memory, so a failing writer raises a Python error instead
of aborting inside torch's C++ writer (seen: SIGABRT on a full disk and on non-UTF-8 names).
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterator

from attnopt.errors import InputNotFound, UnreadableModel
from attnopt.frontends.pt2_checks import UnsafeProgram, check_program, check_sym_expr
from attnopt.frontends.pt2_types import register_placeholders, unregistered_type_names

# A .pt2 is a zip whose entries share one top-level folder (any name); inside it:
_WEIGHTS_DIR = "data/weights/"
_CONSTANTS_DIR = "data/constants/"
_SAMPLE_INPUTS_DIR = "data/sample_inputs/"
_NATIVE_CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia")
_CODE_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")  # constants unpickled by raw pickle
_MAX_CONFIG_BYTES = 64 << 20  # a payload config is a small JSON index; refuse absurd ones

_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("attnopt_trust_pickled_files", default=False)
_LOAD_LOCK = threading.Lock()  # the guard below changes process-wide state for the load's duration


@contextlib.contextmanager
def trust_pickled_files() -> Iterator[None]:
    """Within this block, `.pt2` archives are loaded as `torch.export.load` does on its own:
    pickled payloads are unpickled, which RUNS CODE FROM THE FILE. Only for files you made."""
    token = _TRUST.set(True)
    try:
        yield
    finally:
        _TRUST.reset(token)


def trusting() -> bool:
    return _TRUST.get()


def read_archive(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InputNotFound(f"no such file: {path}") from None
    except OSError as e:
        raise UnreadableModel(f"{path} cannot be read: {e.strerror or e}") from None


def check_archive(data: bytes, name: str) -> None:
    """Refuse (UnreadableModel, one line) an archive whose loading would unpickle or load code."""
    def refuse(what: str) -> UnreadableModel:
        return UnreadableModel(
            f"{name} {what}; loading it would run code from the file, so attnopt refuses it "
            "(re-export it with torch.export.save, or pass --allow-unsafe-pickle if you made it)")

    def invalid(why: str) -> UnreadableModel:
        return UnreadableModel(f"{name} could not be loaded as a torch.export program: {why}")

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise invalid(f"not a valid zip archive ({e})") from None
    if not names:
        raise invalid("an empty archive")
    if len(set(names)) != len(names):
        # torch's C++ reader and Python's zipfile may pick different copies of a duplicated name:
        # what was checked would not be what is loaded.
        raise invalid("duplicate entries in the archive")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise invalid("not a .pt2 archive (entries outside one root folder)")
    root = roots.pop() + "/"
    rel = [n[len(root):] for n in names]
    if "archive_format" not in rel:
        # the layout of torch <= 2.7 loads every payload through a pickle fallback
        raise refuse("uses the legacy (torch <= 2.7) archive layout")
    if not any(r.startswith("models/") and r.endswith(".json") for r in rel):
        raise invalid("no exported program in the archive (no models/*.json)")
    for r in rel:
        if any(r.startswith(d) for d in _NATIVE_CODE_DIRS):
            raise refuse(f"contains compiled native code ({r})")
        if r.startswith((_WEIGHTS_DIR, _CONSTANTS_DIR)) and r.endswith(".pt"):
            raise refuse(f"stores a legacy pickled payload ({r})")
    for r in rel:
        if r.startswith((_WEIGHTS_DIR, _CONSTANTS_DIR)) and r.endswith("_config.json"):
            _check_payload_config(zf, root + r, r, name, refuse)
    for r in rel:
        if r.startswith(_SAMPLE_INPUTS_DIR) and r.endswith(".pt"):
            _check_sample_inputs(zf.read(root + r), r, refuse)


def _check_payload_config(zf: zipfile.ZipFile, entry: str, rel: str, name: str, refuse) -> None:
    if zf.getinfo(entry).file_size > _MAX_CONFIG_BYTES:
        raise refuse(f"has an oversized payload index ({rel})")
    try:
        config = json.loads(zf.read(entry))
        items = config["config"].items()
        if not all(isinstance(m, dict) for _, m in items):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise UnreadableModel(f"{name} could not be loaded as a torch.export program: {rel} is not "
                              "a valid payload index") from None
    for fqn, meta in items:
        if meta.get("use_pickle"):
            raise refuse(f"stores {str(fqn)[:80]!r} as a pickle ({rel})")
        path_name = str(meta.get("path_name", ""))
        if path_name.startswith(_CODE_OBJECT_PREFIXES):
            raise refuse(f"stores {str(fqn)[:80]!r} as a custom or opaque object ({path_name})")


def _check_sample_inputs(blob: bytes, rel: str, refuse) -> None:
    """Sample inputs are a pickle that torch loads with a weights_only=False retry; accept them
    only if the restricted unpickler (which constructs tensors and containers, nothing else)
    reads them."""
    if not blob:
        return
    import torch

    try:
        torch.load(io.BytesIO(blob), weights_only=True)
    except Exception:  # noqa: BLE001 - whatever the restricted unpickler rejects is refused
        raise refuse(f"has sample inputs that need the unrestricted unpickler ({rel})") from None


class _RefusedUnpickle(Exception):
    pass


def _refuse_unpickle(*_a: Any, **_k: Any) -> Any:
    raise _RefusedUnpickle("attnopt refuses to unpickle objects from a .pt2 archive")


@contextlib.contextmanager
def _no_code_guard() -> Iterator[None]:
    """For the duration of a load: every torch.load is weights_only (torch's own switch), and the
    raw unpicklers torch.export uses for custom/opaque objects refuse."""
    import torch
    from torch.export.pt2_archive import _package

    saved_env = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                 "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    from torch._export.serde import serialize as _serde

    saved_pickle = getattr(_package, "pickle", None)
    saved_obj = getattr(torch._C, "_pickle_load_obj", None)
    saved_sympy = getattr(_serde, "sympy", None)
    with _LOAD_LOCK:
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        if saved_pickle is not None:
            _package.pickle = _RefusingPickleModule(saved_pickle)
        if saved_obj is not None:
            torch._C._pickle_load_obj = _refuse_unpickle
        if saved_sympy is not None:
            _serde.sympy = _CheckedSympy(saved_sympy)
        try:
            yield
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if saved_pickle is not None:
                _package.pickle = saved_pickle
            if saved_obj is not None:
                torch._C._pickle_load_obj = saved_obj
            if saved_sympy is not None:
                _serde.sympy = saved_sympy


class _RefusingPickleModule:
    """Stands in for the `pickle` module inside torch's archive reader: loading refuses,
    everything else (constants, dumps) is the real module's."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        if name in ("load", "loads", "Unpickler"):
            return _refuse_unpickle
        return getattr(self._real, name)


class _CheckedSympy:
    """Stands in for `sympy` inside torch's program deserializer: `sympify` (which evaluates its
    string as Python) only sees expressions that pass `check_sym_expr`."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def sympify(self, expr: Any, *a: Any, **k: Any) -> Any:
        if isinstance(expr, str):
            check_sym_expr(expr)
        return self._real.sympify(expr, *a, **k)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def load_program(path: Path):
    """The ExportedProgram in `path`, loaded without executing code from the file (see header)."""

    path = Path(path)
    data = read_archive(path)
    return load_program_bytes(data, str(path))


def load_program_bytes(data: bytes, name: str):
    import torch

    trusted = trusting()
    if not trusted:
        check_archive(data, name)
    # library dataclasses (transformers' ModelOutput, ...) in the inputs/outputs: placeholders
    register_placeholders(data)
    try:
        with _quiet_torch_logs():
            if trusted:
                ep = torch.export.load(io.BytesIO(data))
            else:
                with _no_code_guard():
                    ep = torch.export.load(io.BytesIO(data))
    except UnsafeProgram as e:
        raise UnreadableModel(
            f"{name} {e}; loading it would run code from the file, so attnopt refuses it "
            "(pass --allow-unsafe-pickle if you made it)") from None
    except Exception as e:  # noqa: BLE001 - any failure to load is the file's problem
        missing = unregistered_type_names(data)
        if missing:
            raise UnreadableModel(
                f"{name} could not be loaded as a torch.export program: its inputs or outputs use "
                f"{missing[0][:120]!r}, a type attnopt cannot stand in for (import its module "
                f"{missing[0].rpartition('.')[0][:120]!r} before loading)") from None
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UnreadableModel(f"{name} could not be loaded as a torch.export program: {msg}") from None
    if not isinstance(ep, torch.export.ExportedProgram):
        raise UnreadableModel(f"{name} does not hold a torch.export program")
    if not trusted:
        try:
            check_program(ep)
        except UnsafeProgram as e:
            raise UnreadableModel(
                f"{name} {e}; running it would run code the file chose, so attnopt refuses it "
                "(pass --allow-unsafe-pickle if you made it)") from None
    return ep


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export.load logs a warning and a traceback when it falls back on a failed safe load;
    the failure is reported as our one line instead."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch._export.serde.serialize",
                                              "torch.export.pt2_archive._package")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def program_bytes(ep) -> bytes:
    """`ep` serialized as a .pt2 archive in memory (see header: why not to a path)."""
    import torch

    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()
