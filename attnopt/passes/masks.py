"""Classify what a site's mask and bias operands do, by evaluating them.

A mask-building subgraph (tril/triu, arange comparisons, slices of a buffer, HF's masking
utilities, ONNX Range/Less/Where chains...) is not matched op by op: it is *computed* with the
front end's evaluator on probe inputs, and the resulting [q, k] pattern is classified:
none, causal, sliding_window(left, right), block(b), or an arbitrary tensor. Operands that
depend on user inputs are probed twice, with an all-ones key mask and with padded rows, to
prove they are key padding on top of a structural pattern (HF's attention_mask).

Canonical layout here: every operand is broadcast to the score rank and its (query, key) axes
moved last, giving arrays [..., Sq, Skv].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnopt.ir import Graph, MaskSpec
from attnopt.ir.score_mods import Alibi, Bias, ScoreMod, Softcap
from attnopt.patterns.match import Match
from attnopt.patterns.values import user_inputs_reached
from attnopt.ir.vocab import MASK_FILL_MAX as MASKED_AT_OR_BELOW



@dataclass(frozen=True)
class MaskAnalysis:
    mask: MaskSpec
    score_mods: tuple[ScoreMod, ...]
    reason: str = ""  # why a mask came out as "tensor"


def analyze_masks(graph: Graph, m: Match) -> MaskAnalysis:
    mods: list[ScoreMod] = []
    if m.softcap:
        mods.append(Softcap(m.softcap))
    padding_input = m.key_padding_input
    if not m.mask_operands and not m.structural_causal and m.window is None:
        kind = MaskSpec(kind="padding", padding=True) if padding_input else MaskSpec()
        return MaskAnalysis(kind, tuple(mods))
    try:
        sq, skv = _probe_lengths(graph, m)
    except Exception as e:  # noqa: BLE001 - unknown shapes: report the mask as a tensor
        return MaskAnalysis(MaskSpec(kind="tensor"), tuple(mods), f"cannot size the scores: {e}")
    structural = _structural(m, sq, skv)
    if not m.mask_operands:
        spec = classify_pattern(structural, sq, skv)
        if padding_input and spec.kind == "none":
            spec = MaskSpec(kind="padding", padding=True)
        elif padding_input:
            spec = _with(spec, padding=True)
        return MaskAnalysis(spec, tuple(mods))

    ops = m.mask_operands
    deps = sorted({d for op in ops for d in user_inputs_reached(graph, op.node)})
    ones_feeds, pad_feeds, expected_keys = _padding_probes(graph, deps, skv)
    if deps and ones_feeds is None:
        return MaskAnalysis(MaskSpec(kind="tensor", source=ops[0].node), tuple(mods),
                            f"the mask depends on input(s) {deps} that are not [batch, keys] "
                            "padding masks")
    allowed0, bias0 = _combine(graph, m, ops, ones_feeds, sq, skv)
    if structural is not None:
        allowed0 = allowed0 & structural
    if np.any(bias0 != 0):  # reported whatever the mask turns out to be
        mods.append(_bias_kind(bias0, allowed0))
    padding = bool(padding_input)
    if deps:
        allowed1, _ = _combine(graph, m, ops, pad_feeds, sq, skv)
        if structural is not None:
            allowed1 = allowed1 & structural
        if not _is_key_padding(allowed0, allowed1, expected_keys):
            return MaskAnalysis(MaskSpec(kind="tensor", source=ops[0].node), tuple(mods),
                                f"the mask depends on {deps} in a way that is not key padding")
        padding = True
    spec = classify_pattern(allowed0, sq, skv, source=ops[0].node)
    if padding:
        spec = MaskSpec(kind="padding", padding=True, source=spec.source) if spec.kind == "none" \
            else _with(spec, padding=True)
    return MaskAnalysis(spec, tuple(mods))


def _with(spec: MaskSpec, **kw) -> MaskSpec:
    d = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    d.update(kw)
    return MaskSpec(**d)


# ---- probing ----------------------------------------------------------------------------------

def _probe_lengths(graph: Graph, m: Match) -> tuple[int, int]:
    ev = graph.evaluator
    if m.score_axes is not None:
        shape = ev.probe_shape(m.score_node)
        return int(shape[m.score_axes[0]]), int(shape[m.score_axes[1]])
    qs, ks = ev.probe_shape(m.q), ev.probe_shape(m.k)
    if m.layout == "BHSD":
        return int(qs[-2]), int(ks[-2])
    if m.layout == "SBD":  # torch's multi_head_attention_forward: [S, B, E]
        return int(qs[0]), int(ks[0])
    return int(qs[1]), int(ks[-2] if len(ks) == 4 else ks[1])


def _padding_probes(graph: Graph, deps: list[str], skv: int):
    """Feeds with all keys present, and with padded rows; None if deps are not [B, S] masks."""
    if not deps:
        return {}, {}, None
    ev = graph.evaluator
    ones, padded, keys = {}, {}, None
    for d in deps:
        shape = ev.probe_shape(d)
        dtype = graph.dtype(d) or "float32"
        if len(shape) != 2 or shape[1] != skv:
            return None, None, None
        b, s = shape
        key_ok = np.ones((b, s), dtype=bool)
        key_ok[0, max(1, s - 3):] = False  # right padding on row 0
        if b > 1:
            key_ok[1, : min(2, s - 1)] = False  # left padding on row 1
        np_dtype = np.dtype("bool" if dtype == "bool" else dtype)
        ones[d] = np.ones((b, s), dtype=np_dtype)
        padded[d] = key_ok.astype(np_dtype)
        keys = key_ok if keys is None else keys & key_ok
    return ones, padded, keys


def _combine(graph: Graph, m: Match, ops, feeds, sq: int, skv: int):
    values = graph.evaluator.evaluate([op.node for op in ops], feeds or None)
    rank = len(m.score_shape) if m.score_shape is not None else 4
    axes = m.score_axes or (rank - 2, rank - 1)
    allowed = np.ones((1, 1), dtype=bool)
    bias = np.zeros((1, 1), dtype=np.float64)
    for op in ops:
        arr = np.asarray(values[op.node])
        if op.view is not None:  # added in a view of the scores: broadcast to it, merge back
            v = op.view
            arr = arr.reshape((1,) * (len(v.inner_probe) - arr.ndim) + arr.shape)
            arr = np.broadcast_to(arr, v.inner_probe).reshape(v.outer_probe)
        if op.merged_heads:  # [B*H, Sq, Skv] layout: view it as the [B, H, Sq, Skv] scores
            arr = arr.reshape((1,) * (3 - arr.ndim) + arr.shape)
            arr = arr[None] if arr.shape[0] == 1 else arr.reshape((-1, op.merged_heads) + arr.shape[1:])
        arr = _to_qk(arr, rank, axes)
        if op.how == "add":
            v = arr.astype(np.float64) * op.scale
            masked = v <= MASKED_AT_OR_BELOW
            allowed = allowed & ~masked
            bias = bias + np.where(masked, 0.0, v)
        elif op.how == "keep":
            allowed = allowed & arr.astype(bool)
        else:
            allowed = allowed & ~arr.astype(bool)
    allowed = np.broadcast_to(allowed, allowed.shape[:-2] + (sq, skv))
    bias = np.broadcast_to(bias, bias.shape[:-2] + (sq, skv))
    return allowed, bias


def _to_qk(arr: np.ndarray, rank: int, axes: tuple[int, int]) -> np.ndarray:
    if arr.ndim > rank:
        arr = arr.reshape(arr.shape[arr.ndim - rank:]) if np.prod(arr.shape[:arr.ndim - rank]) == 1 \
            else arr
    arr = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
    return np.moveaxis(arr, list(axes), [-2, -1])


def _structural(m: Match, sq: int, skv: int) -> np.ndarray | None:
    if not m.structural_causal and m.window is None:
        return None
    i = np.arange(sq)[:, None]
    j = np.arange(skv)[None, :]
    offset = (skv - sq) if m.causal_alignment == "bottom_right" else 0
    d = j - i - offset
    allowed = np.ones((sq, skv), dtype=bool)
    if m.structural_causal:
        allowed &= d <= 0
    if m.window is not None:
        left, right = m.window
        allowed &= (d >= -left) & (d <= right)
    return allowed


def _is_key_padding(allowed0: np.ndarray, allowed1: np.ndarray, key_ok: np.ndarray) -> bool:
    a0 = np.broadcast_to(allowed0, np.broadcast_shapes(allowed0.shape, allowed1.shape))
    b = key_ok.shape[0]
    lead = a0.shape[:-2]
    if lead and lead[0] not in (1, b):
        return False
    # expected[b, ..., i, j] = allowed0 & key_ok[b, j]
    kshape = (b,) + (1,) * (len(lead) - 1 if lead else 0) + (1, key_ok.shape[1])
    if not lead:
        a0 = a0[None]
        allowed1 = np.broadcast_to(allowed1, (1,) + allowed1.shape) if allowed1.ndim == 2 else allowed1
    expected = a0 & key_ok.reshape(kshape)
    got = np.broadcast_to(allowed1, expected.shape)
    # Rows with no allowed key are undefined (HF may unmask them to avoid NaN): skip them.
    live = expected.any(axis=-1, keepdims=True)
    return bool(np.all((got == expected) | ~live))


# ---- classification ------------------------------------------------------------------------

def classify_pattern(allowed: np.ndarray | None, sq: int, skv: int, source: str | None = None
                     ) -> MaskSpec:
    """Name the [Sq, Skv] pattern of allowed pairs (identical over all leading axes)."""
    if allowed is None:
        return MaskSpec()
    a = np.asarray(allowed)
    if a.ndim > 2:
        flat = a.reshape(-1, a.shape[-2], a.shape[-1])
        if not all(np.array_equal(flat[0], f) for f in flat[1:]):
            return MaskSpec(kind="tensor", source=source)
        a = flat[0]
    a = np.broadcast_to(a, (sq, skv))
    if a.all():
        return MaskSpec(source=source)
    if not a.any(axis=1).all():
        return MaskSpec(kind="tensor", source=source)
    i = np.arange(sq)[:, None]
    j = np.arange(skv)[None, :]
    d = j - i
    lo, hi = int(d[a].min()), int(d[a].max())
    if np.array_equal(a, (d >= lo) & (d <= hi)):
        offset = skv - sq
        unbounded_left = lo <= -(sq - 1)
        if hi == offset or (hi == 0 and offset != 0):
            align = "bottom_right" if hi == offset else "top_left"
            base = offset if align == "bottom_right" else 0
            if unbounded_left:
                return MaskSpec(kind="causal", left=None, right=0, alignment=align, source=source)
            return MaskSpec(kind="sliding_window", left=base - lo, right=0, alignment=align,
                            source=source)
        offset = skv - sq
        return MaskSpec(kind="sliding_window", left=None if unbounded_left else offset - lo,
                        right=hi - offset, source=source)
    if sq == skv:
        b = int(a[0].sum())
        if b > 0 and sq % b == 0 and np.array_equal(a, (i // b) == (j // b)):
            return MaskSpec(kind="block", block=b, source=source)
    return MaskSpec(kind="tensor", source=source)


def _bias_kind(bias: np.ndarray, allowed: np.ndarray) -> ScoreMod:
    """Alibi when bias = slope_h * (j - i) up to a per-row constant, else Bias."""
    b = np.asarray(bias, dtype=np.float64)
    if b.shape[-1] < 3:
        return Bias()
    shape = np.broadcast_shapes(b.shape, np.shape(allowed))  # a per-batch mask, a shared bias
    b, a = np.broadcast_to(b, shape), np.broadcast_to(allowed, shape)
    diff = b[..., 1:] - b[..., :-1]
    both = a[..., 1:] & a[..., :-1]
    flat_d = diff.reshape(-1, diff.shape[-2], diff.shape[-1])
    flat_m = both.reshape(flat_d.shape)
    for dd, mm in zip(flat_d, flat_m):
        vals = dd[mm]
        if vals.size == 0 or np.ptp(vals) > 1e-4 * max(1.0, float(np.abs(vals).max())):
            return Bias()
        if abs(float(vals.mean())) < 1e-12:
            return Bias()
    return Alibi()


# ---- key padding as its own operand (the lengths form) ----------------------------------------

def exact_key_padding(graph: Graph, spec: MaskSpec, terms, sq: int, skv: int) -> str | None:
    """The user input [B, Skv] whose nonzero entries are exactly the keys each batch row attends,
    when the site's mask terms (recipe MaskTerms, canonical [batch..., Sq, Skv] after rank and perm)
    are exactly `spec`'s structural pattern AND that input, *every row included*: the analysis
    skips rows with no key left (HF may unmask them), so a rewrite that passes the structure as
    flags and the input as a [B, 1, 1, Skv] mask is only the same function when such rows are
    fully masked in the model too. Pure masks only: selects with a -inf fill, adds of 0 / -inf;
    None otherwise."""
    if spec.kind not in ("causal", "sliding_window") or not spec.padding or not terms:
        return None
    deps = sorted({d for t in terms if t.literal is None for d in user_inputs_reached(graph, t.node)})
    if len(deps) != 1 or any(t.literal is not None or t.view is not None or t.merged_heads for t in terms):
        return None
    if any(t.how != "add" and t.fill != -np.inf for t in terms):
        return None
    ones, padded, key_ok = _padding_probes(graph, deps, skv)
    if not ones:
        return None
    structural = _pattern(spec, sq, skv)
    for feeds, keys in ((ones, np.ones_like(key_ok)), (padded, key_ok)):
        allowed = _allowed(graph, terms, feeds)
        if allowed is None:
            return None
        b = keys.shape[0]
        expected = structural[None, None] & keys[:, None, None, :]
        lead = allowed.shape[:-2]
        if len(lead) != 2 or lead[0] not in (1, b):
            return None
        if not np.array_equal(np.broadcast_to(allowed, np.broadcast_shapes(allowed.shape, expected.shape)),
                              np.broadcast_to(expected, np.broadcast_shapes(allowed.shape, expected.shape))):
            return None
    return deps[0]


def _pattern(spec: MaskSpec, sq: int, skv: int) -> np.ndarray:
    """spec's causal / sliding-window pairs as a bool [Sq, Skv] array (MaskSpec's definition)."""
    offset = skv - sq if spec.alignment == "bottom_right" else 0
    d = np.arange(skv)[None, :] - np.arange(sq)[:, None] - offset
    allowed = np.ones((sq, skv), dtype=bool)
    if spec.right is not None:
        allowed &= d <= spec.right
    if spec.left is not None:
        allowed &= d >= -spec.left
    return allowed


def _allowed(graph: Graph, terms, feeds) -> np.ndarray | None:
    """The pairs the terms leave attending, as a 4-D [B|1, H|1, Sq, Skv] array (rank-3 terms get a
    head axis), or None when a term is not a pure mask (an add with values other than 0 / -inf)."""
    values = graph.evaluator.evaluate([t.node for t in terms], feeds)
    allowed = None
    for t in terms:
        arr = np.asarray(values[t.node])
        if arr.ndim > t.rank:
            return None
        arr = np.transpose(arr.reshape((1,) * (t.rank - arr.ndim) + arr.shape), t.perm)
        if t.how == "add":
            v = arr.astype(np.float64) * t.factor
            if not np.all((v == 0) | (v == -np.inf)):
                return None
            ok = v == 0
        else:
            ok = arr.astype(bool) if t.how == "keep" else ~arr.astype(bool)
        if ok.ndim == 3:
            ok = ok[:, None]
        elif ok.ndim != 4:
            return None
        allowed = ok if allowed is None else allowed & ok
    return allowed
