"""The shared vocabulary of attention: names and thresholds every layer agrees on, defined once.

Normalizers: what turns scores into weights. Causal alignments: where the diagonal sits when
Sq != Skv. Mask fills: the two thresholds that decide what a fill value means.
"""
from __future__ import annotations

# The IR's op vocabulary (ir/__init__.py's header says what each means): Graph.add refuses any
# other name, so a front end cannot invent an op the pattern library does not know.
OPS: frozenset[str] = frozenset({
    "input", "const", "output",
    "matmul", "baddbmm", "einsum",
    "transpose", "reshape", "expand", "repeat", "identity",
    "mul", "div", "add", "sub", "where",
    "softmax", "sigmoid", "tanh", "exp", "sqrt", "isnan", "logical_not", "cast",
    "shape", "dropout", "sdpa", "other",
})

# Normalizers the detector recognizes and the kernels run. ("softplus" and "linear" appear in an
# AttentionSpec only for reporting: no kernel runs them.)
NORMALIZERS: tuple[str, ...] = ("softmax", "sigmoid")
CAUSAL_ALIGNMENTS: tuple[str, ...] = ("top_left", "bottom_right")

# A fill at or below this value *masks* a score as far as detection and mask classification are
# concerned (HF masks use finfo.min, older code -1e4 or -1e9); whether the rewrite may treat it as
# exactly "absent" is the stricter rule below.
MASK_FILL_MAX = -1e4

# An additive mask value at or below this masks *exactly*: exp(score + fill - row max) underflows
# to 0 for any finite score when the row keeps some key, and all such scores are equal (the fill
# swallows the score) when it keeps none. HF's finfo(float32).min qualifies; BERT's old -10000
# does not (scores are unbounded, and the model's rounding of score + fill is part of its result).
EXACT_FILL = -1e30

# Constants up to this many elements are copied into the IR by the front ends (bigger ones stay
# in the native model and are read on demand).
SMALL_CONST_ELEMENTS = 4096

# Validation: relative error allowed between a rewrite and the original, by output precision.
TOLERANCE_FP32 = 1e-4
TOLERANCE_HALF = 1e-2
