"""Roofline cost model for attention variants on a `HardwareProfile`.

Conventions: q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], o [B, H, Sq, Dv];
times in seconds, FLOPs counted as 2 per multiply-add. Only tiles a kernel visits are counted
(a padded partial tile costs a whole tile), because that is what the tensor cores execute.

Model (each term is stated so it can be checked against measurements):
  * GEMMs: 2*(D + Dv) FLOPs per visited score at peak * mma_efficiency.
  * Softmax: one exp per score on the special-function units, plus bookkeeping on the FP32
    CUDA cores (running max, rescale, row sum: ~4 ops; sigmoid: ~2 ops); element-masked tiles
    add ~2 ops per score (compare, select). A fraction `sfu_overlap` of it hides under GEMMs.
  * Memory: q and o once; k and v once per (batch, kv head), assuming L2 reuse across Q
    tiles; at spec bandwidth * mem_efficiency.
  * Waves: CTAs = batch*heads*q_tiles run in ceil(CTAs/SMs) waves; the last partial wave and,
    for block-sparse layouts, the slowest Q tile of a wave stretch the compute time.
  * Sparse kernels (block-sparse GNA, sliding window) realize `sparse_efficiency_for(class)` of
    the dense rate on their visited tiles, per layout class (hardware.SPARSE_CLASSES: measured on
    H100; 1.0 where unmeasured; the CPU's SDPA-on-tiles kernels: 0.55); a visited tile that needs
    an element mask costs 1 + `masked_tile_cost` tile steps.
  * Every program (CTA: one Q tile, or one decode split) pays `q_tile_overhead_s` x (D + Dv)/256
    on its SM besides its KV tiles (Q load, pipeline fill, normalizing and storing O, all moving
    D-sized rows; measured at D = Dv = 128): many small Q tiles
    cost more than their tiles' work, which is why a block-sparse kernel visiting 4-16 KV tiles
    per Q tile realizes less of its tile bound than the dense kernel amortizing it over 128.
  * time = max(compute, memory) + launch overhead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

from attnopt.cost.hardware import HardwareProfile, sparse_class
from attnopt.sparsity.simulator import simulate
from attnopt.ir import AttentionSpec, Variant

_DTYPE = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
          "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32"}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_ALU_PER_SCORE = {"softmax": 4.0, "sigmoid": 2.0, "softplus": 3.0, "linear": 0.0}
_MASK_ALU_PER_SCORE = 2.0
FAMILIES = ("dense", "causal", "gqa_decode", "block_sparse_gna", "sliding_window", "sigmoid",
            "linear_chunked", "cpu_reference")
_DIM_FIELDS = ("batch", "num_heads", "num_kv_heads", "q_len", "kv_len", "head_dim", "v_head_dim")


@dataclass(frozen=True)
class Estimate:
    time_s: float
    flops: float          # executed (visited tiles), GEMMs only
    bytes: float
    bound: str            # "compute" | "memory"
    speedup_vs_dense: float
    compute_s: float
    memory_s: float
    mma_s: float
    softmax_s: float
    ctas: int
    waves: int
    visited_tiles: float  # (Q tile, KV tile) pairs per (batch, head)
    family: str

    @property
    def tflops(self) -> float:
        return self.flops / self.time_s / 1e12

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def resolve_dims(spec: AttentionSpec, dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """Concrete ints for every size field; symbolic ones come from `dims` keyed by field name
    (e.g. "q_len") or by the symbol itself (e.g. "s0")."""
    dims = dict(dims or {})
    out = {}
    for f in _DIM_FIELDS:
        v = getattr(spec, f)
        if f in dims:
            v = dims[f]
        elif isinstance(v, str) and v in dims:
            v = dims[v]
        if isinstance(v, str) or v is None:
            raise ValueError(f"spec.{f} is symbolic ({v!r}); pass dims={{'{f}': N}} or "
                             f"dims={{'{v}': N}} to estimate()")
        out[f] = int(v)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tokens(tile: tuple[int, ...]) -> int:
    return int(math.prod(tile))


def _band_tiles(sq: int, skv: int, tq: int, tk: int, left: int | None, right: int | None,
                offset: int) -> tuple[int, int]:
    """(visited, q_tiles) for key j allowed iff -left <= j - i - offset <= right."""
    total = 0
    nq = _cdiv(sq, tq)
    for t in range(nq):
        i0, i1 = t * tq, min(sq, t * tq + tq) - 1
        lo = 0 if left is None else max(0, i0 + offset - left)
        hi = skv - 1 if right is None else min(skv - 1, i1 + offset + right)
        if hi >= lo:
            total += hi // tk - lo // tk + 1
    return total, nq


def estimate(spec: AttentionSpec, variant: Variant, hw: HardwareProfile, *,
             dims: Mapping[str, int] | None = None, _baseline: bool = True) -> Estimate:
    """Predicted time of running `spec` as `variant` on `hw`, with its speedup over dense."""
    if variant.family not in FAMILIES:
        raise ValueError(f"unknown variant family {variant.family!r}; known: {FAMILIES}")
    d = resolve_dims(spec, dims)
    B, H, Hkv = d["batch"], d["num_heads"], d["num_kv_heads"]
    sq, skv, D, Dv = d["q_len"], d["kv_len"], d["head_dim"], d["v_head_dim"]
    dt = _DTYPE.get(str(spec.dtype or "bf16").lower())
    if dt is None:
        raise ValueError(f"unsupported dtype {spec.dtype!r}")
    nbytes = _BYTES[dt]
    fam = variant.family
    normalizer = "sigmoid" if fam == "sigmoid" else spec.normalizer
    tq, tk = _tokens(variant.q_tile), _tokens(variant.kv_tile)
    io_bytes = (B * H * sq * (D + Dv) + B * Hkv * skv * (D + Dv)) * nbytes
    masked = 0.0
    imbalance = 1.0
    ctas = None
    offset = skv - sq if spec.mask.alignment == "bottom_right" else 0

    if fam in ("dense", "sigmoid", "cpu_reference"):
        nq = _cdiv(sq, tq)
        visited = nq * _cdiv(skv, tk)
        if spec.mask.kind not in ("none", "padding"):
            masked = visited  # a dense kernel applies the mask everywhere
        tile_area = tq * tk
    elif fam == "causal":
        visited, nq = _band_tiles(sq, skv, tq, tk, None, 0, offset)
        masked = nq  # the diagonal tile of each Q tile
        tile_area = tq * tk
    elif fam == "sliding_window":
        m = spec.mask
        if m.kind not in ("sliding_window", "causal"):
            raise ValueError("sliding_window variant needs a sliding_window or causal mask")
        right = 0 if m.kind == "causal" else m.right
        visited, nq = _band_tiles(sq, skv, tq, tk, m.left, right, offset)
        masked = 2 * nq
        tile_area = tq * tk
    elif fam == "gqa_decode":
        # Flash-decoding: the GQA group's queries pack into one tile's rows; KV is split so
        # that batch*kv_heads*splits CTAs fill the SMs.
        group = max(1, H // max(Hkv, 1))
        rows = sq * group
        kv_tiles = _cdiv(skv, tk)
        splits = max(1, min(kv_tiles, _cdiv(hw.num_sms, B * Hkv)))
        ctas = B * Hkv * splits
        visited = kv_tiles * _cdiv(rows, max(rows, 16))  # per (batch, kv head)
        tile_area = max(rows, 16) * tk
        nq = 1
        # per (batch, kv head) instead of per head: rescale below by Hkv/H
        visited = visited * Hkv / H
    elif fam == "block_sparse_gna":
        layout = variant.layout
        if layout is None:
            raise ValueError("block_sparse_gna needs variant.layout (a GNALayout)")
        n_tok = math.prod(layout.shape)
        if n_tok != sq or n_tok != skv:
            raise ValueError(f"GNA layout {layout.shape} has {n_tok} tokens but q_len={sq}, "
                             f"kv_len={skv}")
        sim = simulate(layout, variant.q_tile, variant.kv_tile, dynamic=variant.dynamic_kv_tiling)
        visited, nq, masked = sim.total_kv_tiles, sim.num_q_tiles, sim.masked_tiles
        imbalance = sim.max_kv_tiles / sim.mean_kv_tiles
        tile_area = tq * tk
    elif fam == "linear_chunked":
        C = variant.q_tile[0]
        nchunks = _cdiv(sq, C)
        # intra-chunk C x C scores and values + inter-chunk state (q @ S and k^T v updates)
        gemm = B * H * (nchunks * C * C * 2 * (D + Dv) + 2 * 2 * sq * D * Dv)
        state_bytes = 2 * B * H * nchunks * D * Dv * 4  # fp32 chunk states written and read
        return _finish(spec, variant, hw, dims, dt, gemm, 0.0, 0.0, io_bytes + state_bytes,
                       B * H * nchunks, 1.0, float(nchunks), fam, _baseline)
    else:  # pragma: no cover - FAMILIES guards
        raise AssertionError(fam)

    scores = B * H * visited * tile_area
    gemm = scores * 2 * (D + Dv)
    alu = scores * _ALU_PER_SCORE.get(normalizer, 4.0) + \
        B * H * masked * tile_area * _MASK_ALU_PER_SCORE
    sfu = 0.0 if normalizer == "linear" else scores
    if ctas is None:
        ctas = B * H * nq
    return _finish(spec, variant, hw, dims, dt, gemm, sfu, alu, io_bytes, ctas, imbalance,
                   float(visited), fam, _baseline, masked_frac=min(1.0, masked / visited))


def _finish(spec, variant, hw, dims, dt, gemm, sfu, alu, nbytes, ctas, imbalance, visited,
            fam, baseline, masked_frac: float = 0.0) -> Estimate:
    t_mma = gemm / (hw.peak_flops[dt] * hw.mma_efficiency)
    t_soft = sfu / hw.sfu_exp_per_s + alu / hw.alu_flops
    compute = max(t_mma, t_soft) + (1.0 - hw.sfu_overlap) * min(t_mma, t_soft)
    if fam in ("block_sparse_gna", "sliding_window"):
        if masked_frac:  # element-masked tiles cost more than the ALU term counts
            compute *= 1.0 + masked_frac * hw.masked_tile_cost
        ndim = len(variant.layout.shape) if variant.layout is not None else 1
        compute /= hw.sparse_efficiency_for(sparse_class(fam, ndim))
    # every program pays its fixed cost on one SM, whatever its KV tiles; it moves Q, O and the
    # first K/V tiles, so it scales with the head dims (measured at D = Dv = 128)
    d = resolve_dims(spec, dims)
    compute += ctas * hw.q_tile_overhead_s * (d["head_dim"] + d["v_head_dim"]) / 256 / hw.num_sms
    waves = _cdiv(int(ctas), hw.num_sms)
    compute *= waves * hw.num_sms / ctas  # the last wave leaves SMs idle
    # in a wave, the slowest CTA decides; more waves average the imbalance out
    compute *= 1.0 + (imbalance - 1.0) / waves
    memory = nbytes / (hw.mem_bw * hw.mem_efficiency)
    time_s = max(compute, memory) + hw.launch_overhead_s
    est = Estimate(time_s=time_s, flops=gemm, bytes=nbytes,
                   bound="compute" if compute >= memory else "memory", speedup_vs_dense=1.0,
                   compute_s=compute, memory_s=memory, mma_s=t_mma, softmax_s=t_soft,
                   ctas=int(ctas), waves=waves, visited_tiles=visited, family=fam)
    if baseline and fam != "dense":
        base = estimate(spec, dense_baseline(spec, hw), hw, dims=dims, _baseline=False)
        est = replace(est, speedup_vs_dense=base.time_s / time_s)
    return est


def dense_baseline(spec: AttentionSpec, hw: HardwareProfile) -> Variant:
    """The dense kernel a variant is compared with: the largest 1-D tiles of the hardware."""
    t = hw.tiles
    return Variant(family="dense", q_tile=max(t["q_1d"]), kv_tile=max(t["kv_1d"]))


def dense_throughput(spec: AttentionSpec, hw: HardwareProfile, *,
                     dims: Mapping[str, int] | None = None) -> float:
    """Predicted FLOP/s of dense attention with the usual 4*B*H*Sq*Skv*D count (FA papers)."""
    d = resolve_dims(spec, dims)
    est = estimate(spec, dense_baseline(spec, hw), hw, dims=dims)
    useful = 2.0 * d["batch"] * d["num_heads"] * d["q_len"] * d["kv_len"] * (d["head_dim"] +
                                                                              d["v_head_dim"])
    return useful / est.time_s
