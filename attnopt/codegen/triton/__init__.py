"""Generated Triton attention kernels (FlashAttention-2 forward, block-sparse GNA).

Canonical layouts: q [B, H, Sq, D], k/v [B, Hkv, Skv, D/Dv], attn_mask broadcastable to
[B, H, Sq, Skv], out [B, H, Sq, Dv]; with a TokenLayout (params.py) the sequence is `leading`
global tokens, the row-major flattened grid, then `trailing` global tokens.

  can_run_<family>(q, k, v, attn_mask, params, layout=None) -> (ok, reason)   (the kernel table's signature)
  launch(family, q, k, v, attn_mask, params, layout=None) -> Tensor            (with leading or
      trailing > 0 only the grid rows are written)

Which family runs, and in which order they are tried, is the kernel table's business
(codegen/select.py: one Triton row per family, then the CPU and exact rows). This package registers
nothing and imports nothing above it: importing it is slow (triton), so the table imports it
lazily, from inside its Triton rows, and only where they apply (CUDA, or the interpreter under
ATTNOPT_FORCE_TRITON=1 / backend="triton").
"""
from __future__ import annotations

from attnopt.codegen.triton.generator import cache_dir, interpreter_active
from attnopt.codegen.triton.launcher import (
    can_run_block_sparse_gna,
    can_run_causal,
    can_run_dense,
    can_run_sigmoid,
    can_run_sliding_window,
    chosen_config,
    launch,
)

__all__ = [
    "launch", "chosen_config", "cache_dir", "interpreter_active",
    "can_run_block_sparse_gna", "can_run_sliding_window", "can_run_causal", "can_run_sigmoid", "can_run_dense",
]
