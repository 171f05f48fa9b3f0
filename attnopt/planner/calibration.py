"""Calibration inputs: the batches approximations are chosen and checked on.

Generated ones (the example batch plus redrawn ones like it), or the user's (`calibration=`, a
.npz file or batches). The user's are input: a file is data (no pickles, ranks checked), and a
batch the model cannot run on is a bad argument (exit 2), said before any planning.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Sequence

import numpy as np
import torch

from attnopt.errors import BadArgument, InputNotFound
from attnopt.pipeline.validate import run_captured

# Generated calibration: the example batch plus redrawn ones. The last batch is held out: the
# walk never sees it, and the final plan must stay within max_error on it.
CALIBRATION_BATCHES = 4


def generated_inputs(example: Sequence[Any], n: int, seed: int = 0) -> list[list[Any]]:
    """n batches like `example`: float tensors redrawn with the example's mean and std, integer
    ids redrawn in the example's range; 0/1 masks and bool tensors are kept."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = []
        for x in example:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 1:
                std = float(x.float().std()) or 1.0
                y = torch.randn(x.shape, generator=g, dtype=torch.float32) * std + float(x.float().mean())
                batch.append(y.to(x.device, x.dtype))
            elif isinstance(x, torch.Tensor) and x.dtype in (torch.int64, torch.int32) and x.numel() > 1 \
                    and int(x.max()) > 1:
                lo, hi = int(x.min()), int(x.max())
                batch.append(torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype).to(x.device))
            else:
                batch.append(x)
        out.append(batch)
    return out


def load_npz(path: str | os.PathLike, example: Sequence[Any]) -> list[list[Any]]:
    """Calibration batches from a .npz: arrays in stored order are the model's flat inputs; keys
    "b<i>_<anything>" group several batches (one batch per prefix). The file is data: no pickled
    objects, and every array must match its input's rank (else BadArgument, exit 2)."""
    if not os.path.exists(path):
        raise InputNotFound(f"no such file: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError("not an .npz archive of named arrays")
        arrays_by_key = [(key, data[key]) for key in data.files]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadArgument(f"--calibration {path}: not a usable .npz of arrays ({first})") from None
    groups: dict[str, list] = {}
    for key, arr in arrays_by_key:
        if arr.dtype.kind not in "biuf":
            raise BadArgument(f"--calibration {path}: array {key!r} has dtype {arr.dtype}; "
                              "calibration inputs are numbers")
        prefix = key.split("_", 1)[0] if key.startswith("b") and "_" in key else ""
        groups.setdefault(prefix, []).append((key, torch.from_numpy(np.ascontiguousarray(arr))))
    if not groups:
        raise BadArgument(f"--calibration {path}: holds no arrays")
    batches = []
    for arrays in groups.values():
        if len(arrays) != len(example):
            raise BadArgument(f"--calibration {path}: {len(arrays)} arrays for a model with "
                              f"{len(example)} inputs")
        for (key, a), e in zip(arrays, example):
            if isinstance(e, torch.Tensor) and a.dim() != e.dim():
                raise BadArgument(f"--calibration {path}: array {key!r} has {a.dim()} dimensions, "
                                  f"its input has {e.dim()}")
        batches.append([a.to(e.dtype) if isinstance(e, torch.Tensor) else a for (_, a), e in zip(arrays, example)])
    return batches


def calibration_batches(example: Sequence[Any], calibration: Any = None, seed: int = 0) -> list[list[Any]]:
    """The batches to plan on: generated ones when `calibration` is None, else a .npz path's or
    the given batches (each a list of flat inputs, or one tensor)."""
    if calibration is None:
        return [list(example)] + generated_inputs(example, CALIBRATION_BATCHES - 1, seed)
    if isinstance(calibration, (str, os.PathLike)):
        return load_npz(calibration, example)
    return [list(b) if isinstance(b, (list, tuple)) else [b] for b in calibration]


def check_runs(gm, batches) -> None:
    """The user's calibration batches are input: one that the model cannot run on (a guarded
    shape, a token id past the vocabulary) is a bad argument, said before any planning."""
    for i, b in enumerate(batches):
        try:
            with torch.no_grad():
                run_captured(gm, b, set())
        except Exception as e:  # noqa: BLE001 - whatever the model raises on this batch
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise BadArgument(f"calibration batch {i}: the model cannot run on it ({first})") from None
