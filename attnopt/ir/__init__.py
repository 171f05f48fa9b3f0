"""Neutral graph IR shared by every front end and the pattern library.

A front end (torch.fx, torch.export, ONNX) translates its native graph into a `Graph`: a
networkx DiGraph whose nodes carry one op from the small vocabulary below, the ordered list of
their input node ids, attributes, a static shape where known (ints, with symbolic dims kept as
strings) and a dtype name. Patterns match on this IR only, so there is one pattern library.

Vocabulary (`Node.op`):
  input      graph input. attrs: role = "user" | "param" (weights and buffers).
  const      a constant. `value` holds it as a numpy array when it is small enough to matter
             (scalars, masks); large weights may carry value=None.
  output     a graph output (one IR node per returned value).
  matmul     numpy/torch matmul semantics (bmm, mm and ONNX MatMul map here).
  baddbmm    inputs (bias, a, b); attrs: alpha, beta (beta * bias + alpha * a @ b).
  einsum     attrs: equation (two operands, explicit "->").
  transpose  attrs: perm (a full permutation of the input's axes).
  reshape    any view that keeps element order: view, reshape, flatten, (un)squeeze.
  expand     broadcast to a larger shape (attrs: none; see the output shape).
  repeat     attrs: dim, repeats, interleave (repeat_interleave of kv heads for GQA).
  identity   layout no-op: contiguous, clone, full slices, eval-mode dropout, Identity.
  mul div add sub       binary elementwise; scalar literals become const nodes.
  where      inputs (cond, a, b): cond ? a : b. masked_fill(x, m, v) becomes where(m, v, x).
  softmax    attrs: axis (non-negative).
  sigmoid tanh exp sqrt isnan logical_not cast(attrs: to = target dtype name)
  shape      a shape query (ONNX Shape and Size, fx sym_size): depends on its input's shape only.
  dropout    attrs: p, train (train=False is normalized to identity by front ends).
  sdpa       fused scaled dot-product attention. inputs (q, k, v[, mask]);
             attrs: is_causal, scale (None = 1/sqrt(D)), dropout_p, enable_gqa, layout ("BHSD"
             or "BSD" for fused ops whose heads are folded into the hidden dim), num_heads,
             num_kv_heads, flavor (which native op).
  other      anything else; attrs: native (the native op name; ONNX Tile also tiles=True).
             Blocks matching.

Canonical layouts named in this package: BHSD = [batch, heads, seq, head_dim].

Modules: graph.py (Graph, Evaluator), spec.py (AttentionSpec, MaskSpec, Site, Rejection, Variant),
layout.py (GNALayout), score_mods.py (typed score modifiers), vocab.py (op names, normalizers,
thresholds shared by every layer).
"""
from __future__ import annotations

from attnopt.ir.graph import (ELEMENTWISE_BINARY, LAYOUT_OPS, Dim, Evaluator, Graph, Shape,
                              topo_filter)
from attnopt.ir.layout import GNALayout
from attnopt.ir.spec import (AttentionSpec, MaskSpec, PatternDetails, Rejection, Site, TokenGrid,
                             Variant, as_json, dim_str)

__all__ = ["AttentionSpec", "Dim", "ELEMENTWISE_BINARY", "Evaluator", "GNALayout", "Graph",
           "LAYOUT_OPS", "MaskSpec", "PatternDetails", "Rejection", "Shape", "Site", "TokenGrid",
           "Variant", "as_json", "dim_str", "topo_filter"]
