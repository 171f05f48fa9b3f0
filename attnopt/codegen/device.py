"""The machine attnopt runs on, as torch sees it: which hardware profile to plan for.

The cost layer does not import torch: this module reads the CUDA device's properties into a plain
dict (`device_properties`) and hands it down to `cost.hardware.profile_from_properties`.
"""
from __future__ import annotations

from typing import Any

from attnopt.cost.hardware import (CUDA_TARGET, profile_for_device, profile_from_properties,
                                   register_profile)

_PROPERTY_FIELDS = ("name", "major", "minor", "multi_processor_count", "clock_rate",
                    "memory_clock_rate", "memory_bus_width", "total_memory", "L2_cache_size")


def device_properties(index: int = 0) -> dict[str, Any] | None:
    """The CUDA device's properties as a plain dict (fields torch lacks are None), or None when
    there is no usable CUDA device (or it is a ROCm one: the per-SM rates are NVIDIA's)."""
    try:
        import torch

        if not torch.cuda.is_available() or getattr(torch.version, "hip", None):
            return None
        p = torch.cuda.get_device_properties(index)
    except Exception:  # noqa: BLE001 - no usable CUDA: no properties
        return None
    return {k: getattr(p, k, None) for k in _PROPERTY_FIELDS}


def local_target() -> str:
    """The profile name of this machine's accelerator (the first CUDA device): a known kind's by
    its name; another CUDA GPU's profile derived from its properties, registered as "cuda";
    "cpu" when there is none or it cannot be described (ROCm, before sm_70)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        name = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no usable CUDA: plan for the CPU
        return "cpu"
    key = profile_for_device(name)
    if key != "cpu":
        return key
    props = device_properties(0)
    prof = None if props is None else profile_from_properties(props)
    return "cpu" if prof is None else register_profile(CUDA_TARGET, prof)
