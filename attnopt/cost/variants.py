"""Candidate variants of one attention site, each with its predicted cost on a target.

No torch, no graphs: an `AttentionSpec` in, a list of `Candidate`s out. Canonical layouts as in
roofline.py (q [B, H, Sq, D] ...); GNA layouts cover the grid tokens after `leading` global ones.

Exact candidates (change nothing numerically):
  * the site's own kernel: dense, causal, or gqa_decode (all run by `attnopt::attention`);
  * sparsity the mask already implies: a causal sliding window (left L, right 0, Sq = Skv) is the
    1-D causal GNA layout with window L+1 and stride 1 (same pairs); a block-diagonal mask of block
    b is the 1-D GNA layout with window = stride = b (same pairs, Sq % b == 0); a non-causal band
    is the `sliding_window` family (the op's window arguments).
Approximate candidates (policy "approx" only; the planner measures their error):
  * images / video: GNA neighborhood (stride 1) and the best-bound strided layout of the
    simulator's search over the site's token grid (inferred, or given: planner/layout.py), the
    tokens before and after it (class, register, text tokens) global;
  * text encoders: a 1-D GNA layout over the tokens after the first one ([CLS] global);
  * causal LMs: `SINKS` attention-sink tokens global (or a given layout's) plus a causal local window.
Windows are fractions `WINDOW_FRACTIONS` of each grid dimension.

On the local CPU (profile family "cpu", the compiled tile kernel expected) a GNA variant is priced
with that kernel's own work model (codegen/cpu/tiles.py `CpuTilePlan.cost(native=True)`), not with
static KV tiles: each Q box gathers one KV box covering its queries' keys (the simulator's bound for
dynamic KV tiling with 1-token KV tiles) plus the global keys, queries are padded to panels of 16,
each tile-head costs `CPU_TILE_OVERHEAD_ELEMS` more; the Q box is the one of least work among the
kernel's candidates. Time = the dense baseline's time per score element x (that work over batch and
heads / `CPU_TILE_EFFICIENCY` + the global queries' dense rows + `CPU_CALL_OVERHEAD_ELEMS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from attnopt.cost.hardware import TILE_TABLES, HardwareProfile
from attnopt.cost.roofline import dense_baseline, estimate, resolve_dims
from attnopt.cost.search import search
from attnopt.ir import AttentionSpec, GNALayout, MaskSpec, Variant
from attnopt.sparsity import gna
from attnopt.util import toolchain

WINDOW_FRACTIONS = (0.75, 0.5, 0.25)
SINKS = 4
MIN_APPROX_TOKENS = 32  # shorter sequences are not worth approximating

# The compiled CPU tile kernel's work model (codegen/cpu/tiles.py, native.py; the codegen layer
# is above this one, so the figures are repeated here): queries in panels of 16, a tile-head costs
# about 1200 score elements more.
CPU_Q_PAD = 16
CPU_TILE_OVERHEAD_ELEMS = 1200
# Score elements per second the compiled kernel's tiles reach relative to dense SDPA, both on one
# thread (measured 2026-12-02 on the shared 2-core EPYC, fp32, this thread's CPU time, medians of
# 7 interleaved rounds; the op's time less its global rows and call cost below, over SDPA's B*H*S^2):
# DiT-style 32x32 grid + 16 text, D 32, windows 8x8 / 16x16 / 24x24: 0.50 / 0.58 / 0.60;
# Flux-style 64x64 + 256 text, D 64, 16x16: 0.61; Wan-style 8x32x32, D 64, 2x8x8 / 4x16x16:
# 0.64 / 0.53. No trend with the token count (1K-8K) that the noise does not cover: the 16-query
# tiles' shortfall at ~1K tokens is the per-call cost. Wall-clock runs on the loaded machine
# scattered (0.34-0.74 before those corrections).
CPU_TILE_EFFICIENCY = 0.58
# Per call of the GNA op on CPU besides its tiles (plan lookup, gathers, the global rows), in dense
# SDPA score elements (all batches and heads): an 8x8 grid + 16 text tokens, 2 heads, D 32 takes
# 360-560 us of CPU time a call where SDPA takes 60 us, ~2 ns a score element at 1K tokens.
CPU_CALL_OVERHEAD_ELEMS = 200_000


@dataclass(frozen=True)
class Candidate:
    """One way to run a site, with its predicted cost on the target.

    leading: tokens before the GNA grid that attend and are attended globally.
    trailing: the same after the grid (joint text tokens: SD3, HunyuanVideo).
    window: (left, right) for the `sliding_window` family (the op's window arguments).
    heads: the query heads that run the layout (empty: every head); the others keep the exact
        kernel. Predicted time then interpolates between the two by the share of heads.
    """

    name: str
    variant: Variant
    leading: int = 0
    window: tuple[int | None, int | None] | None = None
    time_s: float = 0.0
    baseline_time_s: float = 0.0  # the site's exact kernel (dense / causal) on the target
    flops: float = 0.0
    bytes: float = 0.0
    bound: str = ""
    heads: tuple[int, ...] = ()
    trailing: int = 0

    @property
    def exact(self) -> bool:
        return self.variant.exact

    @property
    def speedup(self) -> float:
        return self.baseline_time_s / self.time_s if self.time_s else 1.0

    @property
    def saved_s(self) -> float:
        return self.baseline_time_s - self.time_s


def describe_layout(layout: GNALayout | None, leading: int = 0, trailing: int = 0) -> str:
    if layout is None:
        return ""
    x = lambda t: "x".join(str(int(v)) for v in t)  # noqa: E731
    s = f"grid {x(layout.shape)} window {x(layout.window)} stride {x(layout.stride)}"
    if any(d != 1 for d in layout.dilation):
        s += f" dilation {x(layout.dilation)}"
    if any(layout.causal):
        s += " causal"
    if leading:
        s += f" +{leading} global"
    if trailing:
        s += f" +{trailing} trailing global"
    return s


def static(spec: AttentionSpec) -> bool:
    try:
        resolve_dims(spec)
        return True
    except ValueError:
        return False


def _base_family(spec: AttentionSpec) -> str:
    d = resolve_dims(spec)
    if spec.mask.kind == "causal":
        return "causal"
    if d["q_len"] <= 16 and d["num_heads"] != d["num_kv_heads"]:
        return "gqa_decode"
    return "dense"


def _make(name: str, spec: AttentionSpec, variant: Variant, hw: HardwareProfile, baseline: float,
          leading: int = 0, window=None, trailing: int = 0) -> Candidate:
    t, flops, nbytes, bound = _cost(spec, variant, hw, leading, trailing)
    return Candidate(name, variant, leading, window, t, baseline if baseline else t, flops, nbytes, bound,
                     trailing=trailing)


def _cost(spec: AttentionSpec, variant: Variant, hw: HardwareProfile, leading: int, trailing: int = 0):
    """(time, flops, bytes, bound). A GNA variant with global tokens runs them in the same
    kernel: each Q tile visits ceil(leading / kv tile) + ceil(trailing / kv tile) more KV tiles
    (the global keys; no trailing ones under a causal layout), and the global queries add
    ceil(leading / q tile) + ceil(trailing / q tile) rows of dense tiles; time grows with the
    visited tiles."""
    if variant.layout is None:
        e = estimate(spec, variant, hw)
        return e.time_s, e.flops, e.bytes, e.bound
    if cpu_native_model(hw):
        return _cpu_cost(spec, variant.layout, hw, leading, trailing)
    d = resolve_dims(spec)
    n = math.prod(variant.layout.shape)
    e = estimate(replace(spec, q_len=n, kv_len=n, mask=MaskSpec()), variant, hw)
    if not leading and not trailing:
        return e.time_s, e.flops, e.bytes, e.bound
    tq, tk = math.prod(variant.q_tile), math.prod(variant.kv_tile)
    nq = -(-n // tq)
    seen = 0 if any(variant.layout.causal) else trailing
    extra = (nq * (-(-leading // tk) + -(-seen // tk))
             + (-(-leading // tq) + -(-trailing // tq)) * -(-d["kv_len"] // tk))
    f = (e.visited_tiles + extra) / max(e.visited_tiles, 1e-9)
    t = hw.launch_overhead_s + (e.time_s - hw.launch_overhead_s) * f
    return t, e.flops * f, e.bytes, e.bound


def cpu_native_model(hw: HardwareProfile) -> bool:
    """Whether GNA variants on hw are priced with the compiled CPU kernel's work model."""
    return hw.family == "cpu" and toolchain.native_kernel_expected()


def cpu_gna_work(layout: GNALayout, leading: int = 0, trailing: int = 0) -> tuple[int, tuple[int, ...]]:
    """(score elements per batch and head, Q box) of the compiled CPU kernel's tiles on `layout`
    with global tokens (the global queries' dense rows not included): the least-work Q box among the kernel's candidates (the CPU tile table, a
    small box, the stride box; codegen/cpu/tiles.py `tile_candidates`), each Q box gathering the
    widest box of its queries' keys plus the globals (`gna_plan`), queries padded to CPU_Q_PAD,
    CPU_TILE_OVERHEAD_ELEMS more per tile."""
    n = len(layout.shape)
    table = TILE_TABLES["cpu"][f"q_{n}d"] if n <= 3 else ()
    cands = [tuple(t) for t in table] + [(16,) if n == 1 else (4,) * n]
    st = tuple(min(s, L) for s, L in zip(layout.stride, layout.shape))
    if 16 <= math.prod(st) <= 1024:
        cands.append(st)
    cands = list(dict.fromkeys(tuple(min(t, L) for t, L in zip(c, layout.shape)) for c in cands))
    ranges = gna.permuted_key_ranges(layout)
    globals_ = leading + (0 if any(layout.causal) else trailing)  # no trailing keys under causal
    best = None
    for qt in cands:
        box, n_tiles = 1, 1
        for (ws, we), L, t in zip(ranges, layout.shape, qt):
            # the kernel's tiles: starts every t, the last shifted inward (no padding); its KV
            # extent: the widest span of one tile's keys, common to every tile
            starts = np.minimum(np.arange(0, L, t), L - t)
            box *= int((we[starts + t - 1] - ws[starts]).max())
            n_tiles *= len(starts)
        pad = -(-math.prod(qt) // CPU_Q_PAD) * CPU_Q_PAD
        work = n_tiles * (pad * (box + globals_) + CPU_TILE_OVERHEAD_ELEMS)
        if best is None or (work, -math.prod(qt)) < (best[0], -math.prod(best[1])):
            best = (work, qt)
    return best


def _cpu_cost(spec: AttentionSpec, layout: GNALayout, hw: HardwareProfile, leading: int, trailing: int):
    """(time, flops, bytes, bound) of a GNA variant on the compiled CPU kernel (module header)."""
    d = resolve_dims(spec)
    base = estimate(spec, dense_baseline(spec, hw), hw)
    work, _ = cpu_gna_work(layout, leading, trailing)
    rows = (leading + trailing) * d["kv_len"]  # the global queries: dense rows at SDPA's rate
    bh = d["batch"] * d["num_heads"]
    per_elem = (base.time_s - hw.launch_overhead_s) / (bh * d["q_len"] * d["kv_len"])
    t = hw.launch_overhead_s + per_elem * (bh * (work / CPU_TILE_EFFICIENCY + rows) + CPU_CALL_OVERHEAD_ELEMS)
    f = (work + rows) / (d["q_len"] * d["kv_len"])
    return t, base.flops * f, base.bytes, base.bound


def _tiles_for(layout: GNALayout, hw: HardwareProfile) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = len(layout.shape)
    r = search(layout.shape, layout.window, hw=hw, dilation=layout.dilation, causal=layout.causal,
               strides=[[s] for s in layout.stride])
    if r.best is None:
        return (64,) * 1 if n == 1 else (8,) * n, (64,) if n == 1 else (8,) * n
    return r.best.q_tile, r.best.kv_tile


def baseline(spec: AttentionSpec, hw: HardwareProfile) -> Candidate:
    """The site's exact kernel as it is (dense / causal / gqa_decode)."""
    fam = _base_family(spec)
    dv = dense_baseline(spec, hw)
    v = Variant(family=fam, q_tile=dv.q_tile, kv_tile=dv.kv_tile)
    c = _make(f"exact:{fam}", spec, v, hw, 0.0)
    return replace(c, baseline_time_s=c.time_s)


def implied_layout(spec: AttentionSpec) -> GNALayout | None:
    """The 1-D GNA layout the exact candidates give a softmax site: the one allowing exactly
    the pairs its mask allows, or None. Sizes must be static."""
    return _mask_layout(spec) if spec.normalizer == "softmax" else None


def _mask_layout(spec: AttentionSpec) -> GNALayout | None:
    """The 1-D GNA layout allowing exactly the pairs the site's mask allows (a causal sliding
    window, a block-diagonal mask), or None."""
    d = resolve_dims(spec)
    sq, skv = d["q_len"], d["kv_len"]
    m = spec.mask
    if m.kind == "sliding_window" and m.right == 0 and m.left is not None and sq == skv and sq > m.left + 1:
        return GNALayout((sq,), (m.left + 1,), (1,), (1,), (True,))
    if m.kind == "block" and m.block and sq == skv and sq % m.block == 0 and m.block >= 2 \
            and m.block < sq:
        return GNALayout((sq,), (m.block,), (m.block,), (1,), (False,))
    return None


def exact_candidates(spec: AttentionSpec, hw: HardwareProfile) -> list[Candidate]:
    """The site's own kernel first, then the sparse kernels its mask already implies."""
    if not static(spec):
        return []
    base = baseline(spec, hw)
    out = [base]
    m = spec.mask
    layout = _mask_layout(spec)
    if layout is not None and spec.normalizer == "softmax":
        qt, kt = _tiles_for(layout, hw)
        v = Variant(family="block_sparse_gna", q_tile=qt, kv_tile=kt, layout=layout, exact=True)
        out.append(_make(f"exact:gna({describe_layout(layout)})", spec, v, hw, base.time_s))
    if m.kind == "sliding_window" and layout is None and m.left is not None and m.right is not None:
        dv = dense_baseline(spec, hw)
        v = Variant(family="sliding_window", q_tile=dv.q_tile, kv_tile=dv.kv_tile, exact=True)
        out.append(_make(f"exact:sliding_window({m.left},{m.right})", spec, v, hw, base.time_s,
                         window=(m.left, m.right)))
    return out


def approx_grid(spec: AttentionSpec, given: bool = False
                ) -> tuple[tuple[int, ...], int, int, bool] | None:
    """(grid shape, leading global tokens, trailing global tokens, causal) an approximation may
    use, or None. `given`: the site's token grid is a user's (planner/layout.py); on a causal site
    only a given 1-D grid after the sinks replaces the `SINKS` default."""
    d = resolve_dims(spec)
    S = d["q_len"]
    if S != d["kv_len"] or S < MIN_APPROX_TOKENS:
        return None
    g = spec.token_grid
    trailing = int(getattr(g, "trailing", 0)) if g is not None else 0
    fits = g is not None and math.prod(g.shape) + g.leading + trailing == S
    if spec.mask.kind == "causal":
        if given and fits and len(g.shape) == 1 and not trailing:
            return tuple(g.shape), g.leading, 0, True
        return (S - SINKS,), SINKS, 0, True
    if spec.mask.kind not in ("none", "padding"):
        return None
    if fits:
        return tuple(g.shape), g.leading, trailing, False
    return (S - 1,), 1, 0, False


_MOD_WHY = {
    "bias": "a bias added to the scores (computed from the inputs, or a learned table) cannot yet "
            "be kept inside a window",
    "alibi": "an ALiBi bias cannot yet be kept inside a window",
    "softcap": "the GNA kernels have no softcap",
}


def approx_refusal(spec: AttentionSpec) -> str:
    """Why a site gets no approximate candidate at all ("" when it may get some)."""
    if not static(spec):
        return "no approximate candidates: symbolic sizes"
    if spec.normalizer != "softmax":
        return f"no approximate candidates: {spec.normalizer} normalizer (GNA layouts are softmax)"
    if spec.score_mods:
        why = "; ".join(dict.fromkeys(_MOD_WHY.get(str(m).split(":")[0], f"the GNA kernels do not "
                                                   f"apply {m}") for m in spec.score_mods))
        return f"no approximate candidates: the scores carry {', '.join(spec.score_mods)} ({why})"
    d = resolve_dims(spec)
    if d["q_len"] != d["kv_len"]:
        return "no approximate candidates: cross-attention (q and kv lengths differ)"
    if d["q_len"] < MIN_APPROX_TOKENS:
        return f"no approximate candidates: {d['q_len']} tokens (fewer than {MIN_APPROX_TOKENS})"
    if spec.mask.kind == "tensor":
        return ("no approximate candidates: a mask tensor with no structure attnopt recognizes (not "
                "causal, a window, blocks or key padding; computed from the inputs, or arbitrary): "
                "keeping it inside a window is not built yet")
    if spec.mask.kind not in ("none", "padding", "causal"):
        return (f"no approximate candidates: a {spec.mask.describe()} mask (approximations start "
                "from dense or causal attention; its exact sparse kernel, where one fits, is chosen)")
    return ""


def describe_grid(spec: AttentionSpec, given: bool = False) -> str:
    """The tokens an approximation would lay out, for reasons: "grid 16x16 +1 global"."""
    g = approx_grid(spec, given) if static(spec) else None
    if g is None:
        return "no grid"
    shape, leading, trailing, causal = g
    s = "grid " + "x".join(map(str, shape))
    s += f" +{leading} {'sink' if causal else 'global'}" if leading else ""
    return s + (f" +{trailing} trailing global" if trailing else "")


def approx_candidates(spec: AttentionSpec, hw: HardwareProfile,
                      fractions: tuple[float, ...] = WINDOW_FRACTIONS, given: bool = False
                      ) -> list[Candidate]:
    """Approximate GNA candidates cheaper than the site's exact kernel, most context first.
    `given`: the spec's token grid is a user's (approx_grid)."""
    if not static(spec) or spec.normalizer != "softmax" or spec.score_mods:
        return []
    g = approx_grid(spec, given)
    if g is None:
        return []
    shape, leading, trailing, causal = g
    n = len(shape)
    base = baseline(spec, hw)
    out: list[Candidate] = []
    seen = set()
    for f in fractions:
        window = tuple(max(2, min(L, int(round(L * f)))) for L in shape)
        if window == shape and not causal:
            continue
        caus = (causal,) * n
        r = search(shape, window, hw=hw, causal=caus)
        pts = [p for p in r.pareto if p.window == window]
        neigh = search(shape, window, hw=hw, causal=caus, strides=[[1]] * n).best
        chosen = [neigh] + ([max(pts, key=lambda p: p.speedup_upper_bound)] if pts else [])
        for p in chosen:
            if p is None:
                continue
            layout = GNALayout(shape, window, p.stride, (1,) * n, caus)
            if layout in seen:
                continue
            seen.add(layout)
            v = Variant(family="block_sparse_gna", q_tile=p.q_tile, kv_tile=p.kv_tile,
                        layout=layout, exact=False)
            c = _make(f"approx:gna({describe_layout(layout, leading, trailing)})", spec, v, hw, base.time_s,
                      leading=leading, trailing=trailing)
            if c.time_s < base.time_s:
                out.append(c)
    return out


def on_heads(c: Candidate, base: Candidate, heads: tuple[int, ...], num_heads: int) -> Candidate:
    """`c` applied to `heads` only, the others keeping `base` (the site's exact kernel): time,
    FLOPs and bytes interpolate by the share of heads (the head gathers are not modelled)."""
    f = len(heads) / num_heads
    mix = lambda a, b: a * f + b * (1.0 - f)  # noqa: E731
    return replace(c, name=f"{c.name} on heads {','.join(map(str, heads))} of {num_heads}",
                   heads=tuple(heads), time_s=mix(c.time_s, base.time_s),
                   flops=mix(c.flops, base.flops), bytes=mix(c.bytes, base.bytes))


def candidate_to_json(c: Candidate) -> dict[str, Any]:
    v = c.variant
    lay = v.layout
    return {
        "name": c.name,
        "family": v.family,
        "exact": v.exact,
        "q_tile": list(v.q_tile),
        "kv_tile": list(v.kv_tile),
        "layout": None if lay is None else {
            "shape": list(lay.shape), "window": list(lay.window), "stride": list(lay.stride),
            "dilation": list(lay.dilation), "causal": list(lay.causal)},
        "leading": c.leading,
        **({"trailing": c.trailing} if c.trailing else {}),
        "window": None if c.window is None else list(c.window),
        "heads": list(c.heads) or None,
        "predicted": {"time_s": c.time_s, "baseline_time_s": c.baseline_time_s,
                      "speedup": c.speedup, "flops": c.flops, "bytes": c.bytes, "bound": c.bound},
    }


def candidate_from_json(d: dict[str, Any]) -> Candidate:
    lay = d.get("layout")
    layout = None if lay is None else GNALayout(
        tuple(lay["shape"]), tuple(lay["window"]), tuple(lay["stride"]), tuple(lay["dilation"]),
        tuple(bool(c) for c in lay["causal"]))
    v = Variant(family=d["family"], q_tile=tuple(d["q_tile"]), kv_tile=tuple(d["kv_tile"]),
                layout=layout, exact=bool(d["exact"]))
    p = d.get("predicted") or {}
    w = d.get("window")
    return Candidate(d["name"], v, int(d.get("leading", 0)), None if w is None else tuple(w),
                     float(p.get("time_s", 0.0)), float(p.get("baseline_time_s", 0.0)),
                     float(p.get("flops", 0.0)), float(p.get("bytes", 0.0)), str(p.get("bound", "")),
                     tuple(int(h) for h in d.get("heads") or ()), int(d.get("trailing", 0)))
