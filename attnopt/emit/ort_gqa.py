"""ONNX Runtime target: causal self-attention with a padding mask takes GroupQueryAttention
when a run-time check on the model's own mask allows it, else the MultiHeadAttention node.

Why: MultiHeadAttention's CPU kernel scores every (query, key) pair and takes exp() of each
masked one; exp() of a score near the fill (-3.4e38) goes through MLAS's slow path (denormal
intermediates), so the masked half of a causal [B, 1, S, S] mask cost as much as the whole
call without it (bench/ort_masked_exp.py: 577 ms against 312 ms with a bias of zeros, batch 4,
8 heads, S 2048, D 64). com.microsoft.GroupQueryAttention scores each query row only
up to its causal limit and each batch row's key count (`seqlens_k`), writes 0 past it without
exp(), and reads grouped K/V without expanding them.

When: a site whose mask, at run time, is exactly causal (Sq = Skv) AND one run of live keys
per batch row [first_b, first_b + len_b) (right padding, left padding, or none), with every
masked entry holding one fill value <= -1e30 (HF's finfo.min, or -inf). `check` builds that
test from the site's additive mask as one bool (symbolic lengths: the dense mask is all there
is); `check_keys` from the key bias that emit/ort.py folded into q and k (static lengths: the
causal part is the unidirectional flag, proven when the model was optimized). An If node runs
GroupQueryAttention when it holds and the site's MultiHeadAttention node otherwise, so the
rewrite is exact for whatever attention_mask the user feeds. The test is built once per
distinct mask and shared by the sites reading it (a decoder's layers share one).

GroupQueryAttention assumes the run starts at key 0: rows are rotated by first_b
(GatherND, batch_dims=1) before it and back after it. Rows past the run (right padding)
attend the whole run in the model and in the op. Rows before first_b (left padding) keep no
key: the model's softmax over S equal scores fl(s + fill) is uniform there (|s| < 1e22), so
they get the mean of V over all S keys, or NaN for a -inf fill (emitted here, not by the op).

Layouts: mask m4 [B|1, H|1, S, S] additive; q BSD [B, S, H*D]; k, v BSD [B, S, Hkv*D]; the
output BSHD [B, S, H, D] like emit/ort.attend's. fp32 only (the MHA path's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from attnopt.emit.onnx_nodes import Block, SiteFacts, load
from attnopt.emit.ort import live_keys
from attnopt.ir.vocab import EXACT_FILL
from attnopt.passes.lower import Attend

MS_DOMAIN = "com.microsoft"
BSHD = (0, 2, 1, 3)


@dataclass(frozen=True)
class Guard:
    """Values of the run-time check, shared by every site reading the same mask."""
    cond: str  # bool [1]: the mask is causal AND one key run per row, one fill <= -1e30
    first: str  # int64 [B|1]: each batch row's first live key
    length: str  # int64 [B|1]: its number of live keys
    fill: str | None  # dense check: the fill value (a scalar); key check: None (rows with no key give 0)


def check_keys(b: Block, key_bias: str, scale: float, zero_dead: bool) -> Guard:
    """The run-time test for a causal site whose key mask was folded into q and k (emit/ort.py:
    static lengths, MultiHeadAttention's unidirectional flag): the key bias [B|1, Skv] (0 live,
    an exact fill / scale masked) holds one run of live keys per row, each row has one. Rows
    with no key then give 0 (`zero_dead`, the model's guard); without it, the check also asks
    that no row lacks a key (no left padding), whose value the op would not reproduce."""
    live_b = live_keys(b, key_bias, scale, "gqa_kb_live_b")  # [B|1, Skv]
    first, length = _run(b, b.node("Cast", [live_b], "gqa_kb_live", to=TensorProto.FLOAT))
    s_scalar = b.reshape(b.node("Gather", [b.node("Shape", [key_bias], "gqa_kb_shape"), b.ints([1], "gqa_kb_ax")],
                                "gqa_kb_s", axis=0), [], "gqa_kb_s_scalar")
    run = _run_mask(b, first, length, _positions(b, s_scalar, "gqa_kb_pos"))
    same = b.node("Equal", [live_b, run], "gqa_kb_same")
    ok = b.node("Cast", [b.reduce("ReduceMin", b.node("Cast", [same], "gqa_kb_same_u8", to=TensorProto.UINT8),
                                  [0, 1], "gqa_kb_all_same")], "gqa_kb_all_same_b", to=TensorProto.BOOL)
    cond = b.node("And", [ok, _has_keys(b, length)], "gqa_kb_ok")
    if not zero_dead:
        no_dead = b.node("Equal", [b.reduce("ReduceMax", first, [0], "gqa_kb_max_first"),
                                   b.const(np.asarray(0, np.int64), "gqa_kb_zero")], "gqa_kb_no_dead")
        cond = b.node("And", [cond, no_dead], "gqa_kb_ok_no_dead")
    return Guard(b.reshape(cond, [1], "gqa_cond"), first, length, None)


def _run(b: Block, live: str) -> tuple[str, str]:
    """first live key and number of live keys per row of live (float 0/1, [R, S]), int64 [R]."""
    length = b.node("Cast", [b.reduce("ReduceSum", live, [1], "gqa_len_f")], "gqa_len", to=TensorProto.INT64)
    first = b.node("ArgMax", [live], "gqa_first", axis=1, keepdims=0)  # the first live key
    return first, length


def _positions(b: Block, s_scalar: str, hint: str) -> str:
    """int64 [S]: 0 .. S - 1."""
    return b.node("Range", [b.const(np.asarray(0, np.int64), f"{hint}_0"), s_scalar,
                            b.const(np.asarray(1, np.int64), f"{hint}_1")], hint)


def _run_mask(b: Block, first: str, length: str, j: str) -> str:
    """bool [R, S]: key j (positions [S]) in [first, first + length) of each row."""
    first2, end2 = (b.unsqueeze(x, [1], f"gqa_{n}_col") for x, n in
                    ((first, "first"), (b.node("Add", [first, length], "gqa_end"), "end")))
    return b.node("And", [b.node("GreaterOrEqual", [j, first2], "gqa_after_first"),
                          b.node("Less", [j, end2], "gqa_before_end")], "gqa_run")


def _has_keys(b: Block, length: str) -> str:
    """bool: every row has a live key (GroupQueryAttention needs seqlens_k >= 0)."""
    return b.node("GreaterOrEqual", [b.reduce("ReduceMin", length, [0], "gqa_min_len"),
                                     b.const(np.asarray(1, np.int64), "gqa_len1")], "gqa_len_ok")


def applies(att: Attend, f: SiteFacts) -> str | None:
    """None when the guarded GroupQueryAttention form can serve the site, else why not."""
    h, kh = f.heads
    if att.normalizer != "softmax" or att.softcap is not None or att.window is not None:
        return "softmax without softcap or window only"
    if f.dtype != np.float32:
        return "fp32 only"
    if not (isinstance(h, int) and isinstance(kh, int) and kh and h % kh == 0):
        return "query heads must be a static multiple of kv heads"
    if not (isinstance(f.d, int) and f.d == f.dv):
        return "q/k and v head dims must be equal and static"
    if f.sq is None or f.sq != f.skv or f.low.batch_rank != 2 or f.low.merged_heads:
        return "self-attention with [B, H, S, D] operands only"
    return None


def check(b: Block, m4: str) -> Guard:
    """The run-time test on m4 [B|1, H|1, S, S] (see the module header)."""
    zero = b.const(np.asarray(0, np.float32), "gqa_zero")
    shape = b.node("Shape", [m4], "gqa_mask_shape")
    s = b.node("Gather", [shape, b.ints([3], "gqa_s_axis")], "gqa_s", axis=0)  # [1]
    s_scalar = b.reshape(s, [], "gqa_s_scalar")
    # The last query row sees every key of its batch row's run (causal): read the run there.
    last = b.node("Gather", [m4, b.node("Sub", [s_scalar, b.const(np.asarray(1, np.int64), "gqa_one")],
                                       "gqa_last_index")], "gqa_last_row", axis=2)  # [B|1, H|1, S]
    last = b.node("Gather", [last, b.const(np.asarray(0, np.int64), "gqa_head0")], "gqa_last_row_h0",
                  axis=1)  # [B|1, S]
    live = b.node("Cast", [b.node("Equal", [last, zero], "gqa_last_live")], "gqa_last_live_f",
                  to=TensorProto.FLOAT)  # (float: ArgMax and ReduceSum take it in every opset)
    first, length = _run(b, live)  # [B|1]
    j = _positions(b, s_scalar, "gqa_pos")
    run = _run_mask(b, first, length, j)  # [B|1, S]
    causal = b.node("GreaterOrEqual", [b.unsqueeze(j, [1], "gqa_rows"), j], "gqa_causal")  # [S, S]
    expected = b.node("And", [b.unsqueeze(causal, [0, 1], "gqa_causal_4d"),
                              b.unsqueeze(run, [1, 2], "gqa_run_4d")], "gqa_expected")
    fill = b.reduce("ReduceMin", m4, [0, 1, 2, 3], "gqa_fill")  # scalar (keepdims=0)
    want = b.node("Where", [expected, zero, fill], "gqa_want")
    same = b.node("Cast", [b.node("Equal", [m4, want], "gqa_same")], "gqa_same_u8", to=TensorProto.UINT8)
    all_same = b.node("Cast", [b.reduce("ReduceMin", same, [0, 1, 2, 3], "gqa_all_same")], "gqa_all_same_b",
                      to=TensorProto.BOOL)
    fill_ok = b.node("LessOrEqual", [fill, b.const(np.asarray(EXACT_FILL, np.float32), "gqa_exact")],
                     "gqa_fill_ok")
    cond = b.node("And", [b.node("And", [all_same, fill_ok], "gqa_ok2"), _has_keys(b, length)], "gqa_ok")
    return Guard(b.reshape(cond, [1], "gqa_cond"), first, length, fill)


def _bsd(b: Block, f: SiteFacts, which: str) -> str:
    """q, k or v as BSD [B, S, heads*D] (no kv head expansion)."""
    x = b.transpose(load(b, getattr(f, which), f), BSHD, f"gqa_{which}_bshd")
    return b.reshape(x, [0, 0, -1], f"gqa_{which}_bsd")


def attend(b: Block, f: SiteFacts, att: Attend, g: Guard) -> str:
    """The GroupQueryAttention branch: its output BSHD [B, S, H, D] (exact when g.cond holds)."""
    h, kh = f.heads
    q3, k3, v3 = (_bsd(b, f, w) for w in ("q", "k", "v"))
    shape = b.node("Shape", [q3], "gqa_q_shape")
    batch = b.node("Slice", [shape, b.ints([0], "gqa_b0"), b.ints([1], "gqa_b1")], "gqa_batch")
    s = b.node("Slice", [shape, b.ints([1], "gqa_s1"), b.ints([2], "gqa_s2")], "gqa_len_s")
    s_scalar = b.reshape(s, [], "gqa_len_s_scalar")
    first = b.node("Expand", [g.first, batch], "gqa_first_b")  # a mask broadcast over batch
    length = b.node("Expand", [g.length, batch], "gqa_len_b")
    pos = b.unsqueeze(_positions(b, s_scalar, "gqa_p"), [0], "gqa_p_row")
    first_col = b.unsqueeze(first, [1], "gqa_first_bcol")

    def rotate(x: str, idx: str, hint: str) -> str:
        return b.node("GatherND", [x, b.unsqueeze(idx, [2], f"{hint}_idx3")], hint, batch_dims=1)

    fwd = b.node("Mod", [b.node("Add", [pos, first_col], "gqa_fwd_raw"), s], "gqa_fwd")  # [B, S]
    back = b.node("Mod", [b.node("Add", [b.node("Sub", [pos, first_col], "gqa_back_raw"), s], "gqa_back_pos"), s],
                  "gqa_back")
    qr, kr, vr = (rotate(x, fwd, f"gqa_{w}_rot") for x, w in ((q3, "q"), (k3, "k"), (v3, "v")))
    seqlens = b.node("Cast", [b.node("Sub", [length, b.const(np.asarray(1, np.int64), "gqa_m1")], "gqa_seqlens64")],
                     "gqa_seqlens", to=TensorProto.INT32)
    total = b.node("Cast", [s_scalar], "gqa_total", to=TensorProto.INT32)
    out = b.fresh("gqa_out")
    b.nodes.append(helper.make_node(
        "GroupQueryAttention", [qr, kr, vr, "", "", seqlens, total],
        [out, b.fresh("gqa_present_k"), b.fresh("gqa_present_v")], name=b.fresh("GroupQueryAttention_node"),
        domain=MS_DOMAIN, num_heads=int(h), kv_num_heads=int(kh), scale=float(att.scale)))
    out = rotate(out, back, "gqa_out_unrot")  # [B, S, H*D]
    # Rows before the run keep no key (see the module header): mean of V, NaN for -inf fills;
    # 0 under the key check (check_keys).
    if g.fill is None:
        dead_val = b.const(np.asarray(0.0, np.float32), "gqa_dead_zero")
    else:
        mean_v = b.reduce("ReduceMean", v3, [1], "gqa_mean_v", keepdims=1)  # [B, 1, Hkv*D]
        if kh != h:
            mean_v = b.reshape(b.node("Expand", [b.reshape(mean_v, [0, 1, kh, 1, f.d], "gqa_mean_v5"),
                                                 b.ints([1, 1, 1, h // kh, 1], "gqa_mean_rep")], "gqa_mean_v_rep"),
                               [0, 1, -1], "gqa_mean_v_h")
        nan = b.const(np.asarray(np.nan, np.float32), "gqa_nan")
        dead_val = b.node("Where", [b.node("IsInf", [g.fill], "gqa_fill_inf"), nan, mean_v], "gqa_dead_val")
    dead = b.unsqueeze(b.node("Less", [pos, first_col], "gqa_dead"), [2], "gqa_dead3")
    out = b.node("Where", [dead, dead_val, out], "gqa_out_dead")
    return b.reshape(out, [0, 0, h, f.d], "gqa_out_bshd")


def branch(nodes: list[onnx.NodeProto], out: str, name: str) -> onnx.GraphProto:
    """An If branch computing `out` (float, BSHD) from outer-scope values."""
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def guarded(b: Block, g: Guard, gqa: tuple[list[onnx.NodeProto], str],
            mha: tuple[list[onnx.NodeProto], str]) -> str:
    """If(g.cond) then the GroupQueryAttention nodes else the MultiHeadAttention ones."""
    return b.node("If", [g.cond], "attend", then_branch=branch(*gqa, b.fresh("gqa_branch")),
                  else_branch=branch(*mha, b.fresh("mha_branch")))
