"""The machine attnopt runs on, as torch sees it: which hardware profile to plan for."""
from __future__ import annotations

from attnopt.cost.hardware import profile_for_device


def local_target() -> str:
    """The profile name of this machine's accelerator (the first CUDA device, by its name), or
    "cpu" when there is none or its kind has no profile."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        name = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no usable CUDA: plan for the CPU
        return "cpu"
    return profile_for_device(name)
