"""Whether the compiled CPU kernel can be expected on this machine, without building it or
importing torch: the cost model (a torch-free layer) and the kernel's loader share this answer.

ATTNOPT_CPU_NATIVE=0 switches the kernel off; the compiler is $CC, else `cc`, found on PATH.
"""
from __future__ import annotations

import os
import shutil


def native_enabled() -> bool:
    return os.environ.get("ATTNOPT_CPU_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def c_compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


def native_kernel_expected() -> bool:
    """Switched on and a compiler present: the kernel should build (a cost model's assumption)."""
    return native_enabled() and c_compiler() is not None
