"""Front ends: native model formats -> neutral IR. `load` picks one by the model's type."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from attnopt.errors import InputNotFound, UnreadableModel, UnsupportedModel
from attnopt.ir import Graph


def load(model: Any, example_inputs: Any = None) -> Graph:
    if isinstance(model, (str, os.PathLike)):
        return load_path(Path(model))
    mod = type(model).__module__
    if mod.startswith("onnx"):
        from attnopt.frontends.onnx import load_onnx

        return load_onnx(model)
    import torch

    from attnopt.frontends import fx

    if isinstance(model, torch.export.ExportedProgram):
        return fx.from_exported_program(model)
    if isinstance(model, torch.fx.GraphModule) and example_inputs is not None:
        return fx.from_graph_module(model, list(example_inputs), source="fx")
    if isinstance(model, torch.nn.Module):
        # inspect describes the model at the example inputs: sizes are the example's
        return fx.from_exported_program(fx.export_module(model, example_inputs, dynamic=False),
                                        name=type(model).__name__)
    raise UnsupportedModel(f"cannot inspect an object of type {type(model).__name__}")


def check_input(path: Path) -> None:
    """One-line errors for a model path that cannot be a model at all."""
    try:
        if not path.exists():
            raise InputNotFound(f"no such file: {path}")
        if path.is_dir():
            raise UnreadableModel(f"{path} is a directory, not a model file")
        if not os.access(path, os.R_OK):
            raise UnreadableModel(f"{path} is not readable")
        if path.stat().st_size == 0:
            raise UnreadableModel(f"{path} is empty")
    except OSError as e:  # a name too long, a loop of links, an I/O error
        shown = str(path) if len(str(path)) <= 120 else str(path)[:60] + "..." + str(path)[-40:]
        raise UnreadableModel(f"{shown} cannot be opened: {e.strerror or e}") from None


def load_path(path: Path) -> Graph:
    check_input(path)
    if zipfile.is_zipfile(path):
        return _load_pt2(path)
    if path.suffix == ".pt2":
        raise UnreadableModel(f"{path} is not a valid .pt2 archive (not a zip file)")
    from attnopt.frontends.onnx import load_onnx

    try:
        return load_onnx(path)
    except UnreadableModel:
        if path.suffix != ".onnx":
            raise UnreadableModel(f"{path} is neither an ONNX model nor a .pt2 program") from None
        raise


def _load_pt2(path: Path) -> Graph:
    from attnopt.frontends import fx

    return fx.from_exported_program(load_pt2_program(path), name=path.stem)


def load_pt2_program(path: Path):
    """The program in a .pt2 file, loaded without running code from it (frontends/pt2.py)."""
    from attnopt.frontends.pt2 import load_program

    return load_program(path)
