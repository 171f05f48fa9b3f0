"""The ONNX Runtime target: com.microsoft.MultiHeadAttention, and the rules only it needs.

Measured on onnxruntime 1.32, CPU provider. MultiHeadAttention takes 3-D BSD inputs: query
[B, Sq, H*D], key [B, Skv, H*D], value [B, Skv, H*Dv] (4-D BNSH key/value only when key and value
have the same shape, Dv == D). It has no GQA (the key hidden size must equal the query's), so k/v
with fewer heads are expanded to H heads (Unsqueeze -> Expand -> Reshape). `unidirectional`
matches causal only for Sq == Skv (for Sq < Skv it is neither top-left nor bottom-right), so
other causal sites get an explicit additive mask (emit/onnx.py). `attention_bias` must be
[B|1, H|1, Sq, Skv] with Sq and Skv in full. No softcap and no sigmoid: such sites are skipped.

Rules applied to the emitted node (this target only):
  key-bias folding  A mask proven to depend on batch and key position only (a key-padding mask,
                    even one the exporter broadcast to [B, 1, Sq, Skv]: onnx_axes.py) is folded into
                    q and k instead: q' = [q, 1], k' = [k, mask / scale] per head, so
                    scale * q'.k' = scale * q.k + mask. ORT's CPU kernel takes its flash path only
                    without a mask or bias (1.1-1.2x faster than a [B, 1, Sq, Skv] bias: bench/
                    attention_layer.py); the extra head-dim column costs ~5%. fp32 only (the column
                    / scale must not overflow, and fp16 would round the mask), and only masks of 0
                    and exact fills (-inf or <= -1e30: onnx_axes.zero_or_masked).
  live-key trimming With such a key mask (and no causal flag), k and v are sliced at run time to
                    end at the last key any query attends: trailing padding is not computed (its
                    probabilities are exactly 0); not when a batch row masks every key (its softmax
                    is uniform over all of them).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from onnx import TensorProto

from attnopt.emit.onnx_axes import AxisFacts
from attnopt.emit.onnx_nodes import Block, SiteFacts, Skip, additive_mask, load
from attnopt.ir.vocab import EXACT_FILL
from attnopt.passes.lower import Attend, CombineMasks, Permute

MS_DOMAIN = "com.microsoft"
BSHD = (0, 2, 1, 3)  # BHSD <-> BSHD (its own inverse)


def key_bias(b: Block, step: CombineMasks, att: Attend, f: SiteFacts,
             axes_of: Callable[[], AxisFacts]) -> str | None:
    """The site's masks as one additive key bias [B|1, Skv] divided by the scale, when they
    provably vary along batch and key axes only (else None); see the module header."""
    if not step.inputs or f.dtype != np.float32 or not att.scale > 0 or f.low.merged_heads:
        return None
    if att.causal and not (f.sq == f.skv and f.sq is not None):
        return None  # an explicit causal mask would be needed anyway
    axes = axes_of()
    rb = f.low.batch_rank
    allowed = {rb + 1} | ({0} if rb >= 1 else set())
    for inp in step.inputs:
        t = inp.term
        if t.literal is not None or t.view is not None:
            return None
        if t.how in ("keep", "drop"):
            exact = t.fill is not None and t.fill <= EXACT_FILL
        else:
            exact = t.factor > 0 and axes.zero_or_masked(t.node)
        if not exact:
            return None  # a moderate fill: the model's rounding of score + fill is its result
        var = axes.varying(t.node)
        if var is None:
            return None
        pos = {a + t.rank for a in var}
        if {i for i, p in enumerate(t.perm) if p in pos} - allowed:
            return None
    m = additive_mask(b, step, f)
    if m is None:
        return None
    middle = list(range(1, rb + 1)) if rb >= 1 else [0]
    m = b.node("Slice", [m, b.ints([0] * len(middle), "kb_starts"), b.ints([1] * len(middle), "kb_ends"),
                         b.ints(middle, "kb_axes")], "key_bias_slice")
    m = b.reshape(m, [0 if rb >= 1 else 1, -1], "key_bias_2d")
    # mask / scale: a finite fill (finfo.min) would overflow to -inf, which turns the model's
    # mean-of-V rows (every key masked) into NaN: clamp those to the lowest float.
    scaled = b.node("Div", [m, b.const(np.asarray(att.scale, np.float32), "kb_scale")], "key_bias_scaled")
    lowest = b.const(np.asarray(np.finfo(np.float32).min, np.float32), "kb_lowest")
    clamped = b.node("Max", [scaled, lowest], "key_bias_clamped")
    return b.node("Where", [b.node("IsInf", [m], "key_bias_isinf", detect_positive=0), m, clamped],
                  "key_bias")


def live_keys(b: Block, key_bias: str, scale: float, hint: str) -> str:
    """bool, key_bias's shape: the keys the folded mask leaves live (they hold 0; masked ones hold
    <= EXACT_FILL / scale, or -inf, or the clamped lowest)."""
    below = np.asarray(EXACT_FILL / 10 / scale, np.float32)
    return b.node("Greater", [key_bias, b.const(below, f"{hint}_below")], hint)


def live_key_count(b: Block, key_bias: str, scale: float, f: SiteFacts) -> str:
    """[1] int64: 1 + the last key some query attends, so the keys after it (padding at the
    end of a fixed-length input) can be sliced off k and v: their probabilities are exactly 0
    (a fill <= -1e30 underflows exp). All keys when some batch row masks every key: the
    model's softmax is uniform over all of them there. key_bias: [B|1, Skv], fill / scale."""
    live_i = b.node("Cast", [live_keys(b, key_bias, scale, "kb_live")], "kb_live_int", to=TensorProto.INT64)
    kv_len = b.dim(key_bias, 1, f.skv, "kb_len")
    one = b.const(np.asarray(1, np.int64), "kb_one")
    pos = b.node("Range", [one, b.node("Add", [b.reshape(kv_len, [], "kb_len_scalar"), one], "kb_len_1"),
                           one], "kb_positions")
    last = b.reshape(b.node("ReduceMax", [b.node("Mul", [live_i, pos], "kb_live_pos")], "kb_last",
                            keepdims=1), [1], "kb_last_1")
    rows = b.reduce("ReduceMax", live_i, [1], "kb_row_live")
    every_row = b.node("Cast", [b.node("ReduceMin", [rows], "kb_rows_live", keepdims=1)], "kb_rows_ok",
                       to=TensorProto.BOOL)
    return b.node("Where", [b.reshape(every_row, [1], "kb_rows_ok_1"), last, kv_len], "kb_live_len")


def append_column(b: Block, x: str, bias: str | None, h: int, which: str) -> str:
    """BSHD x [B, S, H, D] -> [B, S, H, D + 1]: q gets a column of ones, k the key bias
    [B|1, S] (already divided by the scale) repeated over heads."""
    shape = b.node("Concat", [b.node("Slice", [b.node("Shape", [x], f"{which}_shape"),
                                               b.ints([0], f"{which}_s0"), b.ints([2], f"{which}_s2")],
                                     f"{which}_bs"),
                              b.ints([h, 1], f"{which}_h1")], f"{which}_col_shape", axis=0)
    src = b.const(np.ones((1, 1, 1, 1), np.float32), "ones") if bias is None \
        else b.unsqueeze(bias, [2, 3], "key_bias_4d")
    col = b.node("Expand", [src, shape], f"{which}_col")
    return b.node("Concat", [x, col], f"{which}_aug", axis=3)


def expand_heads(b: Block, x: str, h, kh, last, which: str) -> str:
    """[B, Hkv, S, D] -> [B, H, S, D] (GQA/MQA for ops without grouped heads)."""
    if not (isinstance(h, int) and isinstance(kh, int)) or h % kh:
        raise Skip(f"cannot expand {kh} kv heads to {h} query heads")
    rep = h // kh
    if kh == 1:
        return b.node("Expand", [x, b.ints([1, h, 1, 1], f"{which}_heads")], f"{which}_rep")
    if not isinstance(last, int):
        raise Skip("symbolic head dim with grouped kv heads")
    u = b.unsqueeze(x, [2], f"{which}_grp")
    e = b.node("Expand", [u, b.ints([1, 1, rep, 1, 1], f"{which}_reps")], f"{which}_rep")
    return b.reshape(e, [0, h, -1, last], f"{which}_heads")


def zero_dead_rows(b: Block, out: str, key_bias: str, scale: float) -> str:
    """Causal (Sq = Skv) with a folded key mask: query i keeps no key when no key j <= i is live
    (left padding). The op gives such rows 0 (SDPA's result for a fully masked row); MHA gives
    the mean over its causal keys, since the fold is a finite bias. out: BSHD [B, Sq, H, Dv]."""
    live = b.node("Cast", [live_keys(b, key_bias, scale, "dead_live")], "dead_live_int", to=TensorProto.INT64)
    seen = b.node("CumSum", [live, b.const(np.asarray(1, np.int64), "dead_axis")], "dead_seen")
    dead = b.node("Equal", [seen, b.const(np.asarray(0, np.int64), "dead_zero")], "dead_rows")
    zero = b.const(np.asarray(0.0, np.float32), "dead_fill")
    return b.node("Where", [b.unsqueeze(dead, [2, 3], "dead_rows_4d"), zero, out], "out_dead_zeroed")


def attend(b: Block, f: SiteFacts, att: Attend, mask4: Callable[[], str] | None, causal_flag: bool,
           bias: str | None, zero_dead: bool = False) -> tuple[str, str, tuple[int, ...]]:
    """The MultiHeadAttention node on the operands: (its output [B, Sq, H, Dv] viewed as BSHD,
    the node's name, the permutation that brings that output to BHSD). `mask4` makes the
    [B|1, H|1, Sq, Skv] attention_bias. `zero_dead`: rows with no key give 0 (zero_dead_rows)."""
    h, kh = f.heads
    if not isinstance(h, int):
        raise Skip("MultiHeadAttention needs a static number of heads")
    if not isinstance(f.dv, int):
        raise Skip("MultiHeadAttention needs a static value head dim")

    def to_bsd(which: str, expand: bool) -> str:
        step = getattr(f, which)
        if not expand and not step.factors and all(isinstance(v, Permute) for v in step.views):
            # One transpose straight from the operand's own layout to BSHD.
            perm = getattr(f, f"{which}_perm")
            x = b.transpose(step.node, tuple(perm[j] for j in BSHD), f"{which}_bshd")
        else:
            x4 = load(b, step, f)
            if expand:
                x4 = expand_heads(b, x4, h, kh, f.d if which == "k" else f.dv, which)
            x = b.transpose(x4, BSHD, f"{which}_bshd")
        if bias is not None and which in "qk":
            x = append_column(b, x, bias if which == "k" else None, h, which)
        return b.reshape(x, [0, 0, -1], f"{which}_bsd")

    expand = kh != h
    q3, k3, v3 = to_bsd("q", False), to_bsd("k", expand), to_bsd("v", expand)
    if bias is not None and not att.causal:
        n = live_key_count(b, bias, att.scale, f)
        k3, v3 = (b.node("Slice", [x, b.ints([0], f"{w}_trim_start"), n, b.ints([1], f"{w}_trim_axis")],
                         f"{w}_trimmed") for x, w in ((k3, "k"), (v3, "v")))
    ins = [q3, k3, v3] + (["", "", mask4()] if mask4 is not None else [])
    attrs = dict(num_heads=int(h), scale=float(att.scale))
    if causal_flag:
        attrs["unidirectional"] = 1
    out = b.node("MultiHeadAttention", ins, "mha", domain=MS_DOMAIN, **attrs)
    fused_name = b.nodes[-1].name
    out = b.reshape(out, [0, 0, h, f.dv], "out_bshd")
    if zero_dead and bias is not None and causal_flag:
        out = zero_dead_rows(b, out, bias, att.scale)
    return out, fused_name, BSHD

