"""Host launchers of the generated Triton attention kernels, and what each kernel family takes.

Canonical layouts (as attnopt::attention):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], attn_mask broadcastable to
  [B, H, Sq, Skv] (bool: True = attend; float: added), out [B, H, Sq, Dv] in q.dtype.
  With a TokenLayout (params.py), Sq = Skv = leading + prod(grid.shape) + trailing: `leading` global
  tokens ([CLS], sinks), the row-major flattened grid, then `trailing` global tokens (joint text).

Each family has a check with the kernel table's signature,
`can_run_<family>(q, k, v, attn_mask, params, layout) -> (ok, reason)`; the order in which they
are tried is the kernel table's (codegen/select.py), not this module's. Everything a family does not
decide (head dim, GQA, mask kind, softcap, sigmoid, causal alignment) is a constexpr specialization
of that family's kernel. `launch(family, ...)` runs one family, tuned per case; the `decode` family
(split-KV flash-decoding, decode.py) also has `launch_decode`, which takes per-batch KV lengths.

Tuning keys see sequence lengths bucketed (autotune.bucket, next power of two), and so does the
per-case memo: a KV cache growing one token per step tunes once per doubling, and the memo gains
one entry per bucket, not per step.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from attnopt.codegen import autotune
from attnopt.codegen.params import AttentionParams, TokenLayout, gna_call_fits
from attnopt.codegen.reference import alignment_offset
from attnopt.codegen.triton import decode, generator
from attnopt.codegen.triton.generator import KernelConfig
from attnopt.codegen.triton.gna_tiles import gna_tile_plan
from attnopt.ir import AttentionSpec, GNALayout, MaskSpec, Variant
from attnopt.ir.score_mods import Bias, BoolMask, ScoreMod, Softcap
from attnopt.ir.vocab import NORMALIZERS

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- checks ------------------------------------------------------------------------------------

def _common(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, params: AttentionParams) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton ships with torch on Linux
        return False, "triton is not installed"
    if not (q.is_cuda or generator.interpreter_active()):
        return False, f"tensors on {q.device} and TRITON_INTERPRET is not set"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False, "q, k, v must be 4-D [B, H, S, D]"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (need one of fp16, bf16, fp32)"
    if not (q.device == k.device == v.device):
        return False, "q, k, v on different devices"
    d, dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != d:
        return False, "q and k head dims differ"
    if max(d, dv) > MAX_HEAD_DIM:
        return False, f"head dim {max(d, dv)} > {MAX_HEAD_DIM}"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        return False, f"heads {q.shape[1]} / kv heads {k.shape[1]} / v {tuple(v.shape)} do not group"
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) == 0:
        return False, "empty input"
    if mask is not None:
        if not (mask.dtype == torch.bool or mask.dtype in DTYPES):
            return False, f"mask dtype {mask.dtype}"
        if mask.device != q.device:
            return False, "mask on another device"
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return False, f"mask {tuple(mask.shape)} does not broadcast to [B, H, Sq, Skv]"
        if mask.dim() > 4:
            return False, "mask has more than 4 dims"
    if params.normalizer not in NORMALIZERS:
        return False, f"normalizer {params.normalizer!r}"
    return True, ""


def can_run_block_sparse_gna(q, k, v, attn_mask, params: AttentionParams,
                             layout: TokenLayout | None = None) -> tuple[bool, str]:
    ok, why = gna_call_fits(q.shape[2], k.shape[2], params, layout)
    if ok:
        ok, why = _common(q, k, v, attn_mask, params)
    if not ok:
        return ok, why
    try:
        from attnopt.sparsity import gna

        gna.validate(layout.grid)
    except ValueError as e:
        return False, f"invalid layout: {e}"
    return True, ""


def _no_layout(layout: TokenLayout | None) -> tuple[bool, str]:
    """The dense families take no token layout (global tokens are a GNA kernel feature)."""
    if layout is not None and layout.leading:
        return False, "leading global tokens need the block_sparse_gna kernel"
    if layout is not None and layout.trailing:
        return False, "trailing global tokens need the block_sparse_gna kernel"
    if layout is not None and layout.grid is not None:
        return False, "a GNA layout needs the block_sparse_gna kernel"
    return True, ""


def can_run_sliding_window(q, k, v, attn_mask, params: AttentionParams, layout=None) -> tuple[bool, str]:
    ok, why = _no_layout(layout)
    if ok and params.window is None:
        ok, why = False, "no window"
    return _common(q, k, v, attn_mask, params) if ok else (ok, why)


def can_run_causal(q, k, v, attn_mask, params: AttentionParams, layout=None) -> tuple[bool, str]:
    ok, why = _no_layout(layout)
    if ok and not params.causal:
        ok, why = False, "not causal"
    return _common(q, k, v, attn_mask, params) if ok else (ok, why)


def can_run_sigmoid(q, k, v, attn_mask, params: AttentionParams, layout=None) -> tuple[bool, str]:
    ok, why = _no_layout(layout)
    if ok and params.normalizer != "sigmoid":
        ok, why = False, "normalizer is not sigmoid"
    return _common(q, k, v, attn_mask, params) if ok else (ok, why)


def can_run_dense(q, k, v, attn_mask, params: AttentionParams, layout=None) -> tuple[bool, str]:
    ok, why = _no_layout(layout)
    return _common(q, k, v, attn_mask, params) if ok else (ok, why)


def can_run_decode(q, k, v, attn_mask, params: AttentionParams, layout=None, kv_lens: Tensor | None = None,
                   padding_side: str = "right", sinks: int = 0) -> tuple[bool, str]:
    """A decode step (q_len <= decode.MAX_Q_LEN) without a token layout; kv_lens / padding_side /
    sinks as `launch_decode` takes them."""
    ok, why = _no_layout(layout)
    if ok:
        ok, why = decode.can_run(q, k, v, attn_mask, params, kv_lens, padding_side, sinks)
    return _common(q, k, v, attn_mask, params) if ok else (ok, why)


# ---- spec / variant ------------------------------------------------------------------------

def spec_of(q, k, v, mask, params: AttentionParams, layout: GNALayout | None) -> AttentionSpec:
    """The AttentionSpec of one call (what the tuned config is keyed on)."""
    if layout is not None:
        mspec = MaskSpec(kind="tensor" if mask is not None else "none")
    elif params.window is not None:
        mspec = MaskSpec(kind="sliding_window", left=params.window[0],
                         right=0 if params.causal and params.window[1] is None else params.window[1],
                         alignment=params.causal_alignment, padding=mask is not None)
    elif params.causal:
        mspec = MaskSpec(kind="causal", left=None, right=0, alignment=params.causal_alignment,
                         padding=mask is not None)
    else:
        mspec = MaskSpec(kind="tensor" if mask is not None else "none")
    mods: list[ScoreMod] = []
    if params.softcap is not None:
        mods.append(Softcap(params.softcap))
    if mask is not None:
        mods.append(BoolMask() if mask.dtype == torch.bool else Bias())
    return AttentionSpec(
        normalizer=params.normalizer, batch=q.shape[0], num_heads=q.shape[1], num_kv_heads=k.shape[1],
        q_len=q.shape[2], kv_len=k.shape[2], head_dim=q.shape[3], v_head_dim=v.shape[3],
        scale=params.scale, mask=mspec, score_mods=tuple(mods), dtype=str(q.dtype).replace("torch.", ""),
    )


def _tune_key(spec: AttentionSpec, variant: Variant, device, leading: int = 0, trailing: int = 0) -> dict:
    """The tuning key: the spec with its lengths bucketed (a GNA layout, in the key, pins them
    anyway), the variant, device, triton and template versions."""
    import triton

    spec = dataclasses.replace(spec, q_len=autotune.bucket(spec.q_len), kv_len=autotune.bucket(spec.kv_len))
    key = {"spec": spec.to_json(), "family": variant.family,
           "layout": None if variant.layout is None else repr(variant.layout), "leading": leading,
           "device": generator.device_name(device), "triton": triton.__version__,
           "template": generator.template.template_hash()}
    if trailing:
        key["trailing"] = trailing
    return key


# ---- launchers ---------------------------------------------------------------------------------

def _pow2(x: int) -> int:
    return max(16, 1 << (int(x) - 1).bit_length())


_mask_args = generator.mask_args  # one definition for every kernel family


def _flags(q: Tensor, v: Tensor, mask: Tensor | None, params: AttentionParams, group: int) -> dict:
    """The constexprs every kernel kind takes (head dims, GQA group, mask kind, score mods)."""
    interp = generator.interpreter_active()
    D, Dv = q.shape[3], v.shape[3]
    return dict(
        GROUP=group, HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
        EVEN_D=_pow2(D) == D and _pow2(Dv) == Dv,
        HAS_MASK=mask is not None,
        MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        HAS_SOFTCAP=params.softcap is not None,
        SIGMOID=params.normalizer == "sigmoid",
        UPCAST=interp and q.dtype == torch.bfloat16,  # bf16 tl.dot is garbage in the interpreter
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


@dataclass
class KernelCall:
    """One launch of a generated kernel, built but not yet run (see `run`, and `aot` for compiling
    it for a GPU target on a machine without one)."""

    fn: Any
    grid: tuple[int, int]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    out: Tensor

    def run(self) -> Tensor:
        with generator.interpreter_stdlib():
            self.fn[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)
        return self.out


def dense_call(family: str, cfg: KernelConfig, q, k, v, mask, params: AttentionParams) -> KernelCall:
    B, H, Sq, D = q.shape
    Skv, Dv = k.shape[2], v.shape[3]
    out = torch.empty((B, H, Sq, Dv), dtype=q.dtype, device=q.device)
    m, ms = _mask_args(mask, q, (B, H, Sq, Skv))
    offset = alignment_offset(Sq, Skv, params.causal_alignment)
    left, right = params.window if params.window is not None else (None, None)
    upper = right
    if params.causal:
        upper = 0 if right is None else min(right, 0)
    bm, bn = cfg.q_tile[0], cfg.kv_tile[0]
    args = (q, k, v, m, out, *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
            H, Sq, Skv, float(params.scale), float(params.softcap or 0.0), int(offset),
            int(left or 0), int(upper or 0))
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, HAS_UPPER=upper is not None, HAS_LEFT=left is not None,
                      **_flags(q, v, mask, params, H // k.shape[1]))
    return KernelCall(generator.kernel(family, "dense"), (triton_cdiv(Sq, bm), B * H), args, constexprs,
                      cfg.num_warps, cfg.num_stages, out)


_PLAN_TENSORS: dict = {}


def _plan_tensors(plan, device):
    key = (id(plan), str(device))
    if key not in _PLAN_TENSORS:
        t = lambda a: torch.as_tensor(a, dtype=torch.int32).to(device)  # noqa: E731
        _PLAN_TENSORS[key] = dict(
            q_slot=t(plan.q_index), kv_slot=t(plan.kv_index.clip(min=0)),
            q_range=t(plan.q_range), kv_coord=t(plan.kv_coord), tiles=t(plan.tiles), counts=t(plan.counts),
            plan=plan,  # keep plan alive: id() stays unique
        )
    return _PLAN_TENSORS[key]


def gna_call(family: str, cfg: KernelConfig, q, k, v, mask, params: AttentionParams,
             layout: GNALayout, leading: int = 0, trailing: int = 0) -> KernelCall:
    """With `leading` tokens before the grid (or `trailing` ones after it) the kernel writes the
    grid rows of out only; the caller fills out[:, :, :leading] (and out[:, :, -trailing:]). Under
    a causal layout grid queries see no trailing key (they all come later), so none is visited."""
    B, H, N, D = q.shape
    Dv = v.shape[3]
    plan = gna_tile_plan(layout, tuple(cfg.q_tile), tuple(cfg.kv_tile))
    trail = 0 if any(layout.causal) else int(trailing)
    pt = _plan_tensors(plan, q.device)
    # q/k/v/out stay row-major; the kernel gathers each tile's rows through the slot maps.
    out = torch.empty((B, H, N, Dv), dtype=q.dtype, device=q.device)
    m, ms = _mask_args(mask, q, (B, H, N, N))
    args = (q, k, v, m, out, pt["tiles"], pt["counts"], pt["q_range"], pt["kv_coord"], pt["q_slot"],
            pt["kv_slot"], *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
            H, plan.tiles.shape[1], float(params.scale), float(params.softcap or 0.0))
    constexprs = dict(BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, NDIM=len(layout.shape),
                      LEADING=int(leading), BLOCK_L=_pow2(max(1, leading)), ELEMENT_MASK=plan.element_mask,
                      TRAIL0=int(leading) + math.prod(layout.shape), TRAILING=trail,
                      BLOCK_T=_pow2(max(1, trail)),
                      **_flags(q, v, mask, params, H // k.shape[1]))
    return KernelCall(generator.kernel(family, "gna"), (plan.num_q_tiles, B * H), args, constexprs,
                      cfg.num_warps, cfg.num_stages, out)


def kernel_call(family: str, cfg: KernelConfig, q, k, v, mask, params: AttentionParams,
                layout: GNALayout | None = None, leading: int = 0, trailing: int = 0) -> KernelCall:
    if family == "block_sparse_gna":
        return gna_call(family, cfg, q, k, v, mask, params, layout, leading, trailing)
    return dense_call(family, cfg, q, k, v, mask, params)


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20) * 1e-3


_CHOSEN: dict[tuple, KernelConfig] = {}
MAX_CHOSEN = 4096  # distinct cases remembered before the memo starts over (a bound, not a cache policy)


def _case_key(family: str, q, k, v, mask, params: AttentionParams, layout: TokenLayout | None) -> tuple:
    """Everything the tuning key is built from, as a cheap hashable key: shapes with the sequence
    axis bucketed as in _tune_key, and the mask's dtype only (spec_of reads no more of it);
    strides never reach the tuning key, so they are not here either."""
    def desc(t):
        shape = tuple(t.shape)
        return (*shape[:2], autotune.bucket(shape[2]), *shape[3:], t.dtype, t.device)

    return (family, desc(q), desc(k), desc(v), None if mask is None else mask.dtype, params, layout,
            generator.interpreter_active(), os.environ.get("ATTNOPT_AUTOTUNE", "1"))


def _prepare(family: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
             layout: TokenLayout | None):
    """(tuned config, run(config) -> out) of `family` for this case.

    The config is memoized per case: at small sizes the spec building and tune-key hashing cost
    more host time than the kernel runs (seen on an H100: a 4K-token GNA call took 0.31 ms, most of
    it Python, before this cache)."""
    grid = None if layout is None else layout.grid
    leading = 0 if layout is None else layout.leading
    trailing = 0 if layout is None else layout.trailing
    run = lambda c: kernel_call(family, c, q, k, v, attn_mask, params, grid, leading, trailing).run()  # noqa: E731
    key = _case_key(family, q, k, v, attn_mask, params, layout)
    cfg = _CHOSEN.get(key)
    if cfg is None:
        ndim = 1 if grid is None else len(grid.shape)
        configs = generator.candidate_configs(generator.device_family(q.device), ndim)
        variant = Variant(family, configs[0].q_tile, configs[0].kv_tile, layout=grid)
        spec = spec_of(q, k, v, attn_mask, params, grid)
        cfg = generator.tuned_config(_tune_key(spec, variant, q.device, leading, trailing), configs,
                                     lambda c: _bench(lambda: run(c)))
        if len(_CHOSEN) >= MAX_CHOSEN:
            _CHOSEN.clear()
        _CHOSEN[key] = cfg
    return cfg, run


def chosen_config(family: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                  params: AttentionParams, layout: TokenLayout | None = None):
    """The tile config `launch(family, ...)` runs for this case (autotuning it if needed): a
    KernelConfig, or a decode.DecodeConfig for the decode family."""
    if family == "decode":
        return decode.chosen_config(q, k, v, attn_mask, params)
    return _prepare(family, q, k, v, attn_mask, params, layout)[0]


def launch_decode(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams, *,
                  kv_lens: Tensor | None = None, padding_side: str = "right", sinks: int = 0) -> Tensor:
    """One decode step (the caller checked can_run_decode with the same arguments): `kv_lens`
    int32 [B] valid keys per batch, at the end of the cache (padding_side "left") or its start
    ("right"); `sinks`: the first keys of each cache stay visible past the window's left limit."""
    return decode.launch(q, k, v, attn_mask, params, kv_lens=kv_lens, padding_side=padding_side, sinks=sinks)


def launch(family: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
           layout: TokenLayout | None = None) -> Tensor:
    """Run the generated kernel of `family` for this case (the caller checked can_run_<family>).
    With global tokens before / after a GNA grid, only the grid rows of the result are written: the
    caller fills out[:, :, :leading] and out[:, :, S - trailing:] (the kernel table's Triton GNA
    row does)."""
    if family == "decode":
        return launch_decode(q, k, v, attn_mask, params)
    cfg, run = _prepare(family, q, k, v, attn_mask, params, layout)
    return run(cfg)
