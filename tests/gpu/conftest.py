"""Every test in tests/gpu runs on a real CUDA GPU with Triton compiling for it: without a GPU, or
under TRITON_INTERPRET=1 (which `make test` sets for the whole session, and which triton fixes at
import), each is skipped with the reason. One rule here instead of a module-level skip per file."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def _why_not() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: these tests compile for the GPU"
    return None


def pytest_collection_modifyitems(config, items):
    why = _why_not()
    if why is None:
        return
    for item in items:
        if _HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=why))
