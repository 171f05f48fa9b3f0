"""The kernel layer: the custom ops, the one kernel selection table, and the kernels.

Canonical layouts (BHSD, params.py): q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv],
attn_mask broadcastable to [B, H, Sq, Skv], out [B, H, Sq, Dv] in q.dtype.

Imports run one way inside this package (no cycles; tests/null/test_kernel_table.py checks):
  params, reference                      what every kernel is told; the math they must reproduce
  exact, gna_exact                       the exact dense path; GNA layouts as masks / rows / head splits
  cpu/ (native, tile_sdpa, tiles)        exact CPU tile kernels
  triton/ (template, generator, gna_tiles, launcher, aot)   generated kernels (imported lazily)
  select                                 the kernel table: which kernel runs, for every entry point
  ops, gna_op                            the custom ops (schemas fixed: saved .pt2 programs hold them)
Importing this package registers both ops (a saved .pt2 that contains them needs them).
"""
from attnopt.codegen import ops  # noqa: F401  registers torch.ops.attnopt.attention
from attnopt.codegen import gna_op  # noqa: F401  registers torch.ops.attnopt.gna_attention
from attnopt.codegen.ops import attention_op
from attnopt.codegen.reference import reference_attention

__all__ = ["attention_op", "gna_op", "reference_attention", "ops"]
