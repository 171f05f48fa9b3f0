"""Generated Triton attention kernels (FlashAttention-2 forward, block-sparse GNA).

Canonical layouts: q [B, H, Sq, D], k/v [B, Hkv, Skv, D/Dv], attn_mask broadcastable to
[B, H, Sq, Skv], out [B, H, Sq, Dv]; with a GNA layout the sequence is the row-major flattened grid.

  launch(q, k, v, attn_mask, params, layout=None, leading=0) -> Tensor | None   (None: no kernel fits;
      with leading > 0 only the grid rows are written)
  can_run(q, k, v, attn_mask, params, layout=None, leading=0) -> (ok, family or the reasons)

Importing this package registers `cuda_kernel` in attnopt.codegen.ops.CUDA_KERNELS, so the CUDA
implementation of attnopt::attention runs the generated kernels and falls back to the exact path
(reason logged once per distinct reason) when none fits, e.g. head dim 512.
"""
from __future__ import annotations

import logging

from torch import Tensor

from attnopt.codegen import ops
from attnopt.codegen.ops import AttentionParams
from attnopt.codegen.triton.generator import cache_dir, interpreter_active
from attnopt.codegen.triton.launcher import (
    CHECKS,
    can_run,
    can_run_block_sparse_gna,
    can_run_causal,
    can_run_dense,
    can_run_sigmoid,
    can_run_sliding_window,
    chosen_config,
    launch,
    select_family,
)

log = logging.getLogger("attnopt.codegen.triton")
_LOGGED: set[str] = set()


def log_fallback_once(reason: str) -> None:
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.warning("attnopt: Triton kernel declined, using the exact path: %s", reason)


def cuda_kernel(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: AttentionParams) -> Tensor | None:
    """The CUDA_KERNELS hook: the generated kernel, or None (reason logged once) to fall back."""
    ok, why = can_run(q, k, v, attn_mask, p)
    if not ok:
        log_fallback_once(why)
        return None
    return launch(q, k, v, attn_mask, p)


if cuda_kernel not in ops.CUDA_KERNELS:
    ops.register_cuda_kernel(cuda_kernel)

__all__ = [
    "launch", "chosen_config", "can_run", "select_family", "CHECKS", "cuda_kernel", "cache_dir", "interpreter_active",
    "can_run_block_sparse_gna", "can_run_sliding_window", "can_run_causal", "can_run_sigmoid",
    "can_run_dense", "log_fallback_once",
]
