"""Triton backward of attnopt::gna_attention (the block-sparse GNA family): dQ, dK, dV and a
learned additive mask's gradient, walking the forward's tile plan, without S x S probabilities.

Canonical layouts (BHSD, as the forward op; the host makes q, k, v, grad_out contiguous):
  q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], grad_out [B, H, S, Dv],
  S = leading + N + trailing, N = prod(grid): leading global tokens, the grid row-major, trailing
  global tokens; attn_mask broadcastable to [B, H, S, S] (bool: True = attend; float: added),
  passed expanded (stride 0 on broadcast dims).
  lse, delta [B, H, S] fp32 (grid rows only; lse natural log, -inf on a row that sees no key);
  dq, dk, dv accumulate in fp32 [B, H(kv), S, D] and come back in the inputs' dtypes; dmask in
  attn_mask's shape (dS written densely [B, H, S, S] fp32, then summed over its broadcast dims).
  Slots and tiles: gna_tiles.py (a Q / KV tile is a box of the dilation-permuted grid; QIDX / KIDX
  map a slot to its grid token, -1 = padding).

Which pairs attend: gna_exact.py's header (the forward kernel plus fill_global_rows): grid queries
see the leading keys always, the trailing keys unless the layout is causal, and the grid keys
their layout allows; global queries see every key (causal layout: keys j <= i).

Kernels (gna_backward_kernels.py: one source, run from its text as backward.py's):
  gna_bwd_lse_kernel  per (Q tile, b*h): the forward again over the global key blocks and the
                      plan's KV tiles, writing lse and delta = rowsum(dO * o) of its grid rows.
  gna_bwd_dq_kernel   per (Q tile, b*h): dQ over the same KV tile list as the forward (full
                      tiles first, without the element mask).
  gna_bwd_dkdv_kernel per (KV tile, b*hkv): dK, dV over the TRANSPOSED plan (the Q tiles that
                      visit the tile, gna_tiles.transpose_plan), looping over the KV head's query
                      group: every (b, h, query, key) pair once, no atomics.
The global parts are small and dense, done in torch fp32 math from the kernels' lse / delta:
the global queries' rows ([G, S] scores) and the grid queries against the global keys ([N, G]).
Math (natural units, s = x * scale + mask, -inf where not attended, x = q . k):
  p = exp(s - lse); dP = dO v^T; dS = p * (dP - delta); dV = p^T dO, dK = scale dS^T q,
  dQ = scale dS k, dmask = dS. A row with no visible key (lse -inf, read as +inf) gets 0.
Takes what the forward Triton GNA kernel takes (1-/2-/3-D, strides, causal dims, dilation, leading
and trailing tokens, masks, GQA, fp16/bf16/fp32) with the softmax normalizer (the op runs no
other through its kernels) and head dims <= MAX_HEAD_DIM. A per-head selection (`heads`) splits:
the layout's heads here, the other heads' exact attention (the layout's full window) through
backward.py's dense kernels where that is plain dense or causal attention, else here on the full
window as a GNA layout; a mask gradient with a selection is the caller's to recompute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnopt.codegen.gna_exact import every_head, full_window
from attnopt.codegen.params import AttentionParams, TokenLayout
from attnopt.codegen.triton import backward, generator, launcher
from attnopt.codegen.triton.gna_backward_kernels import kernels
from attnopt.codegen.triton.gna_tiles import gna_tile_plan, gna_transposed_plan
from attnopt.codegen.triton.launcher import KernelCall

MAX_HEAD_DIM = backward.MAX_HEAD_DIM


@dataclass(frozen=True)
class Tiles:
    """q_tile x kv_tile: the plan the LSE forward and dQ walk; dkdv_q_tile x dkdv_kv_tile: the plan
    the dK/dV kernel walks transposed (it holds k, v, dk, dv for its whole loop, so its Q step is
    smaller on a GPU). Boxes of the permuted grid, one entry per grid dimension."""

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    dkdv_q_tile: tuple[int, ...]
    dkdv_kv_tile: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 1


# Tiles per (kind, grid dims), chosen by compiling for sm_90 (aot.py's rows); on a GPU `candidates`
# offers these rows to backward.tuned_tiles, which times them per case and remembers the fastest.
# "16bit": fp16/bf16, head dim <= 64 and no mask: 64-token boxes, 4 warps, a dK/dV Q step of 32
# (it holds k, v, dk, dv for its whole loop). "16bit_wide": head dim > 64 or a mask (its pointer
# and value tiles): 64-token Q boxes spilled up to 750 bytes with 64-token KV steps, so 32-token
# KV steps and 8 warps. "fp32" (ieee FMA dots): 16-token Q boxes, 8 warps (4 spilled 360 bytes at
# head dim 80). Interpreter: 16/32-token tiles, so the tests' small grids are cut into several
# tiles (each tile step costs milliseconds there).
_TILES = {
    "interpreter": {1: ((32,), (16,), (16,), (32,)), 2: ((4, 4), (4, 8), (4, 4), (4, 4)),
                    3: ((2, 2, 4), (2, 4, 2), (2, 2, 4), (2, 2, 4))},
    "16bit": {1: ((64,), (64,), (32,), (64,)), 2: ((8, 8), (8, 8), (4, 8), (8, 8)),
              3: ((4, 4, 4), (4, 4, 4), (2, 4, 4), (4, 4, 4))},
    "16bit_wide": {1: ((64,), (32,), (32,), (64,)), 2: ((8, 8), (4, 8), (4, 8), (8, 8)),
                   3: ((4, 4, 4), (2, 4, 4), (2, 4, 4), (4, 4, 4))},
    "fp32": {1: ((16,), (32,), (16,), (16,)), 2: ((4, 4), (4, 8), (4, 4), (4, 4)),
             3: ((2, 2, 4), (2, 4, 4), (2, 2, 4), (2, 2, 4))},
}


def tiles(q: Tensor, ndim: int, has_mask: bool = False) -> Tiles:
    """The first candidate (what aot.py compiles, and what runs untuned) for q's dtype and head
    dim, the grid's dimensions and whether a mask is read (module table above)."""
    return candidates(q, ndim, has_mask)[0]


def candidates(q: Tensor, ndim: int, has_mask: bool = False) -> list[Tiles]:
    """The tile configs tuned over on a GPU (backward.tuned_tiles), `tiles()` first: on fp16/bf16
    the "16bit_wide" row (32-token KV steps, 8 warps) with 2 and 3 pipeline stages, and before them,
    where it does not spill (head dim <= 64, no mask), the "16bit" row (64-token KV steps, 4 warps);
    on fp32 the table's row at 8 and 4 warps (4 spilled 360 bytes in dQ at head dim 80: the timing
    decides). Compiled for sm_90 by aot.py (TUNING_CANDIDATE_SPECS). One under the interpreter."""
    if generator.interpreter_active():
        return [Tiles(*_TILES["interpreter"][ndim], 4, 1)]
    if q.dtype == torch.float32:
        return [Tiles(*_TILES["fp32"][ndim], 8, 1), Tiles(*_TILES["fp32"][ndim], 4, 1)]
    wide = [Tiles(*_TILES["16bit_wide"][ndim], 8, 2), Tiles(*_TILES["16bit_wide"][ndim], 8, 3)]
    if q.shape[-1] > 64 or has_mask:  # the 16bit row spilled 750-1376 bytes here
        return wide
    return [Tiles(*_TILES["16bit"][ndim], 4, 2)] + wide


def _tune_key(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, layout: TokenLayout, needs) -> dict:
    """What the best tiles depend on: dtype, heads, head dims, the layout (grid, window, stride,
    dilation, causal dims, globals: it pins every length), which mask, which gradients, device."""
    g = layout.grid
    return {"kernel": "gna_attention_backward", "dtype": str(q.dtype).replace("torch.", ""), "batch": q.shape[0],
            "heads": q.shape[1], "kv_heads": k.shape[1], "head_dim": q.shape[3], "v_head_dim": v.shape[3],
            "grid": [list(g.shape), list(g.window), list(g.stride), list(g.dilation), list(g.causal)],
            "leading": int(layout.leading), "trailing": int(layout.trailing), "mask": backward.mask_key(attn_mask),
            "needs": [bool(n) for n in needs], "device": generator.device_name(q.device)}


def _pow2(x: int) -> int:
    return max(16, 1 << (int(x) - 1).bit_length())


def _rest(layout: TokenLayout, scale: float) -> AttentionParams | TokenLayout:
    """What the heads outside `layout.heads` run (gna_exact.exact_rest, the layout's full-window
    counterpart): plain dense attention, or plain causal for a 1-D causal layout (every earlier
    key, globals included), as AttentionParams for backward.py; for a causal multi-D layout its
    full window as a GNA layout for these kernels (valid wherever the layout is: every length is
    >= window >= 2)."""
    if not layout.causal:
        return AttentionParams(scale=float(scale))
    if len(layout.grid.shape) == 1:
        return AttentionParams(scale=float(scale), causal=True)
    return TokenLayout(full_window(layout.grid), layout.leading, trailing=layout.trailing)


def _head_split(H: int, Hkv: int, heads) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(layout heads, their KV heads, other heads, their KV heads) as gna_exact.split_heads makes
    them, or None where it would refuse (out of range, a KV group split)."""
    group = H // Hkv
    sel = sorted({int(h) for h in heads})
    if any(not 0 <= h < H for h in sel):
        return None
    kv_sel = sorted({h // group for h in sel})
    if len(sel) != len(kv_sel) * group:
        return None
    return sel, kv_sel, sorted(set(range(H)) - set(sel)), sorted(set(range(Hkv)) - set(kv_sel))


def _head_mask(attn_mask: Tensor | None, heads: list[int], H: int) -> Tensor | None:
    """attn_mask restricted to `heads` (as split_heads slices it)."""
    if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] == H and H > 1:
        return attn_mask[:, heads]
    return attn_mask


def can_run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, layout: TokenLayout,
            normalizer: str = "softmax", needs=(True, True, True, False)) -> tuple[bool, str]:
    """Whether these kernels compute this gna_attention call's gradients: what the forward Triton
    GNA kernel takes, softmax, head dims <= MAX_HEAD_DIM; with a per-head selection, the other
    heads' exact attention must be runnable too (`_rest`), and no mask gradient is asked."""
    if normalizer != "softmax":
        return False, f"normalizer {normalizer!r} (the GNA op's kernels run softmax only)"
    if layout is None or layout.grid is None:
        return False, "no GNA layout"
    params = AttentionParams(scale=float(scale))
    plain = TokenLayout(layout.grid, layout.leading, trailing=layout.trailing)
    ok, why = launcher.can_run_block_sparse_gna(q, k, v, attn_mask, params, plain)
    if not ok:
        return ok, why
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return False, f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM} (backward tiles)"
    if every_head(layout.heads, q.shape[1]):
        return True, ""
    split = _head_split(q.shape[1], k.shape[1], layout.heads)
    if split is None:
        return False, f"heads {list(layout.heads)} do not split into whole KV groups"
    needs = list(needs) + [False] * (4 - len(needs))
    if needs[3] and attn_mask is not None and attn_mask.is_floating_point():
        return False, "a mask gradient with a per-head selection"
    rest = _rest(layout, scale)
    _, _, others, kv_others = split
    args = (q[:, others], k[:, kv_others], v[:, kv_others], _head_mask(attn_mask, others, q.shape[1]))
    if isinstance(rest, TokenLayout):
        return can_run(*args, scale, rest)
    return backward.can_run(*args, rest)


_PLAN_TENSORS: dict = {}


def _plan_tensors(plan, device, transposed=None) -> dict[str, Tensor]:
    """The plan's index tables on `device` (slot maps keep -1 for padding: the kernels read it),
    with the transposed plan's (q_tiles, q_counts) when given."""
    key = (id(plan), id(transposed), str(device))
    if key not in _PLAN_TENSORS:
        t = lambda a: torch.as_tensor(a, dtype=torch.int32).to(device)
        d = dict(q_slot=t(plan.q_index), kv_slot=t(plan.kv_index), q_range=t(plan.q_range),
                 kv_coord=t(plan.kv_coord), tiles=t(plan.tiles), counts=t(plan.counts),
                 keep=(plan, transposed))  # keep them alive: their id()s stay unique
        if transposed is not None:
            d.update(q_tiles=t(transposed.q_tiles), q_counts=t(transposed.counts))
        _PLAN_TENSORS[key] = d
    return _PLAN_TENSORS[key]


def backward_calls(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                   layout: TokenLayout, needs=(True, True, True, False), cfg: Tiles | None = None
                   ) -> tuple[list[tuple[str, KernelCall]], dict[str, Tensor]]:
    """The launches, built but not run (aot.py compiles them), in order, and the buffers they
    write: lse, delta, and dq / dk / dv (fp32, zero where the kernels write nothing: the global
    tokens' rows) and ds (only when a float mask's gradient is needed). Inputs contiguous; every
    head runs the layout (the caller split any selection)."""
    mod = kernels()
    grid = layout.grid
    cfg = cfg or tiles(q, len(grid.shape), attn_mask is not None)
    B, H, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    leading, trailing = int(layout.leading), int(layout.trailing)
    trail = 0 if layout.causal else trailing  # grid queries see no trailing key under a causal layout
    plan = gna_tile_plan(grid, tuple(cfg.q_tile), tuple(cfg.kv_tile))
    tplan = gna_transposed_plan(grid, tuple(cfg.dkdv_q_tile), tuple(cfg.dkdv_kv_tile))
    pq, pk = _plan_tensors(plan, q.device), _plan_tensors(tplan.plan, q.device, tplan)
    m, ms = generator.mask_args(attn_mask, q, (B, H, S, S))
    flags = dict(GROUP=H // Hkv, HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
                 NDIM=len(grid.shape), LEADING=leading, HAS_MASK=attn_mask is not None,
                 MASK_IS_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
                 UPCAST=generator.interpreter_active() and q.dtype == torch.bfloat16,
                 INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    f32 = dict(dtype=torch.float32, device=q.device)
    bufs = dict(lse=torch.empty((B, H, S), **f32), delta=torch.empty((B, H, S), **f32))
    needs = list(needs) + [False] * (4 - len(needs))
    write_ds = bool(needs[3]) and attn_mask is not None and attn_mask.is_floating_point()
    calls: list[tuple[str, KernelCall]] = []

    def call(name, grid_, args, constexprs, out):
        calls.append((name, KernelCall(getattr(mod, name), grid_, args, constexprs, cfg.num_warps,
                                       cfg.num_stages, out)))

    def plan_args(p):
        return p["q_range"], p["kv_coord"], p["q_slot"], p["kv_slot"]

    grid_q = (plan.num_q_tiles, B * H)
    step = max(16, plan.block_n)  # global keys per step: as many as a KV tile (one 128-key block spilled)
    fwd = dict(flags, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, ELEMENT_MASK=plan.element_mask)
    call("gna_bwd_lse_kernel", grid_q,
         (q, k, v, m, grad_out, bufs["lse"], bufs["delta"], pq["tiles"], pq["counts"], *plan_args(pq), *ms,
          H, S, plan.tiles.shape[1], float(scale)),
         dict(fwd, BLOCK_L=min(_pow2(max(1, leading)), step), TRAIL0=leading + math.prod(grid.shape),
              TRAILING=trail, BLOCK_T=min(_pow2(max(1, trail)), step)), bufs["lse"])
    if needs[0]:
        bufs["dq"] = torch.zeros((B, H, S, D), **f32)
        call("gna_bwd_dq_kernel", grid_q,
             (q, k, v, m, grad_out, bufs["lse"], bufs["delta"], bufs["dq"], pq["tiles"], pq["counts"],
              *plan_args(pq), *ms, H, S, plan.tiles.shape[1], float(scale)), fwd, bufs["dq"])
    if needs[1] or needs[2] or write_ds:
        bufs["dk"], bufs["dv"] = torch.zeros((B, Hkv, S, D), **f32), torch.zeros((B, Hkv, S, Dv), **f32)
        if write_ds:
            bufs["ds"] = torch.zeros((B, H, S, S), **f32)
        tp = tplan.plan
        call("gna_bwd_dkdv_kernel", (tp.num_kv_tiles, B * Hkv),
             (q, k, v, m, grad_out, bufs["lse"], bufs["delta"], bufs["dk"], bufs["dv"], bufs.get("ds", bufs["lse"]),
              pk["q_tiles"], pk["q_counts"],
              *plan_args(pk), *ms, H, S, tplan.q_tiles.shape[1], float(scale)),
             dict(flags, BLOCK_M=tp.block_m, BLOCK_N=tp.block_n, ELEMENT_MASK=tp.element_mask, WRITE_DS=write_ds),
             bufs["dk"])
    return calls, bufs


def _masked(s: Tensor, mask: Tensor | None) -> Tensor:
    """Scores with the user's mask: bool False -> -inf, float added."""
    if mask is None:
        return s
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask, float("-inf"))
    return s + mask.float()


def _global_terms(q: Tensor, k: Tensor, v: Tensor, do: Tensor, attn_mask: Tensor | None, scale: float,
                  layout: TokenLayout, bufs: dict[str, Tensor]) -> None:
    """Add the global tokens' share to the fp32 buffers, in torch fp32 math: the global queries'
    rows (every key; causal layout: j <= i) and the grid queries against the global keys, whose
    probabilities come from the kernels' lse (the grid rows' full normalizer). Memory: O(globals x
    S) per head, K and V once in fp32."""
    B, H, S, _ = q.shape
    Hkv = k.shape[1]
    L, T = int(layout.leading), int(layout.trailing)
    if not L and not T:
        return
    dev, G = q.device, H // Hkv
    # Query heads as [B, Hkv, G, ...] against K / V as [B, Hkv, 1, ...]: no per-head K / V copies.
    k5, v5 = k.float().unsqueeze(2), v.float().unsqueeze(2)
    mfull = None if attn_mask is None else generator.mask_args(attn_mask, q, (B, H, S, S))[0]
    dq, dk, dv, ds = bufs.get("dq"), bufs.get("dk"), bufs.get("dv"), bufs.get("ds")

    def grouped(x: Tensor) -> Tensor:  # [B, H, ...] -> [B, Hkv, G, ...]
        return x.reshape(B, Hkv, G, *x.shape[2:])

    def flat(x: Tensor) -> Tensor:  # [B, Hkv, G, ...] -> [B, H, ...]
        return x.reshape(B, H, *x.shape[3:])

    def add(rows: Tensor, cols: Tensor, qr: Tensor, dor: Tensor, kc: Tensor, p: Tensor, dsr: Tensor) -> None:
        if dq is not None:
            dq[:, :, rows] += flat((dsr * scale) @ kc)
        if dk is not None:  # summed over the query group and rows in one contraction
            dk[:, :, cols] += torch.einsum("bhgrc,bhgrd->bhcd", dsr * scale, qr)
            dv[:, :, cols] += torch.einsum("bhgrc,bhgrd->bhcd", p, dor)
        if ds is not None:
            ds[:, :, rows[:, None], cols[None, :]] = flat(dsr)

    # Global queries: every key (causal: j <= i), a softmax of their own.
    rows = torch.cat([torch.arange(L, device=dev), torch.arange(S - T, S, device=dev)])
    cols = torch.arange(S, device=dev)
    qr, dor = grouped(q[:, :, rows].float()), grouped(do[:, :, rows].float())
    s = _masked(qr @ k5.transpose(-1, -2) * scale, None if mfull is None else grouped(mfull[:, :, rows]))
    if layout.causal:
        s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    mx = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(mx == float("-inf"), 0.0, mx))
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # a dead row: p = 0
    dp = dor @ v5.transpose(-1, -2)
    add(rows, cols, qr, dor, k5, p, p * (dp - (dor * (p @ v5)).sum(-1, keepdim=True)))
    # Grid queries against the global keys (no trailing key under a causal layout).
    cols = torch.cat([torch.arange(L, device=dev)] + ([] if layout.causal else [torch.arange(S - T, S, device=dev)]))
    if not len(cols):
        return
    rows = torch.arange(L, S - T, device=dev)
    qr, dor = grouped(q[:, :, rows].float()), grouped(do[:, :, rows].float())
    kc, vc = k5[:, :, :, cols], v5[:, :, :, cols]
    s = _masked(qr @ kc.transpose(-1, -2) * scale,
                None if mfull is None else grouped(mfull[:, :, rows[:, None], cols[None, :]]))
    lse = grouped(bufs["lse"][:, :, rows])
    p = torch.exp(s - torch.where(lse == float("-inf"), float("inf"), lse)[..., None])
    dsr = p * (dor @ vc.transpose(-1, -2) - grouped(bufs["delta"][:, :, rows])[..., None])
    add(rows, cols, qr, dor, kc, p, dsr)


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                       scale: float, layout: TokenLayout, needs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask) as autograd.gna_attention_backward returns them (empty where not
    needed; the caller checked `can_run`)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    needs = [bool(n) for n in needs] + [False] * (4 - len(needs))
    if not every_head(layout.heads, q.shape[1]):
        return _split_backward(grad_out, q, k, v, attn_mask, scale, layout, needs)

    def run(cfg):
        calls, bufs = backward_calls(grad_out, q, k, v, attn_mask, scale, layout, needs, cfg)
        for _, c in calls:
            c.run()
        return bufs

    cands = candidates(q, len(layout.grid.shape), attn_mask is not None)
    bufs = run(backward.tuned_tiles(_tune_key(q, k, v, attn_mask, layout, needs), cands, run))
    _global_terms(q, k, v, grad_out, attn_mask, float(scale), layout, bufs)
    out = {name: bufs[name].to(x.dtype) for name, x in (("dq", q), ("dk", k), ("dv", v)) if name in bufs}
    if "ds" in bufs:
        out["dmask"] = backward.reduce_to(bufs["ds"], attn_mask)
    # A custom op's outputs may not alias each other: one fresh empty tensor per gradient not needed.
    return tuple(out[name] if name in out and n else q.new_empty(0)
                 for name, n in zip(("dq", "dk", "dv", "dmask"), needs))


def _split_backward(grad_out, q, k, v, attn_mask, scale, layout: TokenLayout, needs):
    """A per-head selection: the layout's heads through these kernels, the others' exact attention
    through backward.py or, causal multi-D, these kernels on the full window (can_run checked
    both; no mask gradient here)."""
    H = q.shape[1]
    sel, kv_sel, others, kv_others = _head_split(H, k.shape[1], layout.heads)
    part_needs = needs[:3] + [False]
    grads = [torch.zeros_like(x) if n else q.new_empty(0) for x, n in zip((q, k, v), needs[:3])]
    plain = TokenLayout(layout.grid, layout.leading, trailing=layout.trailing)
    parts = [(sel, kv_sel, lambda *a: attention_backward(*a, float(scale), plain, part_needs))]
    rest = _rest(layout, scale)
    if isinstance(rest, TokenLayout):
        parts.append((others, kv_others, lambda *a: attention_backward(*a, float(scale), rest, part_needs)))
    else:
        parts.append((others, kv_others, lambda *a: backward.attention_backward(*a, rest, part_needs)))
    for qh, kh, run in parts:
        got = run(grad_out[:, qh], q[:, qh], k[:, kh], v[:, kh], _head_mask(attn_mask, qh, H))
        for g, part, idx, n in zip(grads, got, (qh, kh, kh), needs[:3]):
            if n:
                g[:, idx] = part
    return (*grads, q.new_empty(0))
