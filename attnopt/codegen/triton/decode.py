"""Split-KV flash-decoding: the Triton kernel family `decode` for q_len <= 16 against a long KV cache.

Canonical layouts:
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] (any strides), H % Hkv == 0,
  attn_mask broadcastable to [B, H, Sq, Skv] (bool: True = attend; float: added), out [B, H, Sq, Dv].
  kv_lens (optional) int32 [B]: batch b's cache holds kv_lens[b] valid keys, at [Skv - len, Skv) with
  padding_side "left", at [0, len) with "right". Everything positional (causal alignment, window,
  sinks) is measured in that batch's own cache: the result is that of attention over the valid keys
  alone (attn_mask still indexes the physical key axis).
  Partials: OP [B, H, Sq, NUM_SPLITS, Dv] fp32 (each split's output, normalized by its own sum) and
  LSE [B, H, Sq, NUM_SPLITS] fp32 (its log2-sum-exp2 of scores in log2 units; -inf: saw no key).

Why a family of its own: the dense kernel gives one 64-query tile to each (batch, head), so a decode
step wastes ~63/64 of every tile and runs only B*H programs (a GPU idles at batch 1). Here one
program handles one (batch, KV head, KV split, row tile): it packs the q_len x group query rows that
share a KV head (GQA / MQA) into one tile padded to 16, so each K/V block is read once per KV head, and
the KV range is cut into splits so B*Hkv*splits programs fill the SMs. A second small kernel combines
the splits by their LSE (a torch epilogue would cost several launches and temporaries per step).
With one split the first kernel writes the final output directly.

Sinks: the first `sinks` keys of each batch's cache stay visible whatever the window's left limit
(StreamingLLM); they still obey the causal / right limit, kv_lens and attn_mask. The rest of attnopt
expresses sinks as leading global tokens of a TokenLayout (a GNA layout, never a decode call), so
the decode launcher takes them as an int.

Tuning: a config is (KV block, splits, warps, stages), measured per case key whose KV length is
bucketed (autotune.bucket): a cache growing one token per step retunes once per power of two.
"""
from __future__ import annotations

import hashlib
import linecache
import math
import sys
import types
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from attnopt.codegen import autotune
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.triton import generator, template
from attnopt.util import cache

MAX_Q_LEN = 16
PADDING_SIDES = ("left", "right")
MAX_BLOCK_M = 64        # row tiles beyond this (group x q_len > 64) become a third grid axis
MAX_SPLITS = 64
MIN_SPLIT_KEYS = 128    # a split shorter than this costs more in the combine than it saves
INTERPRETER_SMS = 4     # "SMs" under the interpreter: enough splits to exercise the combine

DECODE = r'''

@triton.jit
def _decode_inner(
    b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_rows, m_rows, offs_i, offs_d, offs_dv, lo, hi,
    kv_lo, sinks, offset, win_left, win_right,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SIGMOID: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Physical keys [lo, hi); their position in this batch's cache is key - kv_lo.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_n = offs_n < hi
        p_k = p_k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        p_v = p_v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        b_k, b_v = _load_kv(p_k, p_v, m_n, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, True, UPCAST)
        b_s = _scores(b_q, b_k, scale, softcap, HAS_SOFTCAP, SIGMOID, INPUT_PRECISION)
        if HAS_MASK:
            p_mask = p_mask_rows[:, None] + offs_n[None, :] * stride_mn
            b_s = _user_mask(b_s, p_mask, m_rows[:, None] & m_n[None, :], True, MASK_IS_BOOL, SIGMOID)
        pos = offs_n - kv_lo
        rel = pos[None, :] - offs_i[:, None] - offset
        m_keep = m_n[None, :] & m_rows[:, None]
        if HAS_UPPER:
            m_keep = m_keep & (rel <= win_right)
        if HAS_LEFT:
            m_left = rel >= -win_left
            if HAS_SINKS:
                m_left = m_left | (pos[None, :] < sinks)
            m_keep = m_keep & m_left
        b_s = tl.where(m_keep, b_s, float("-inf"))
        b_acc, b_m, b_l = _update(b_acc, b_m, b_l, b_s, b_v, SIGMOID, INPUT_PRECISION)
    return b_acc, b_m, b_l


@triton.jit
def decode_split_kernel(
    Q, K, V, MASK, LENS, O, OP, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    HKV, Q_LEN, KV_LEN, NUM_SPLITS, scale, softcap, align_bottom_right, win_left, win_right, sinks,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LENS: tl.constexpr, LEFT_PAD: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SIGMOID: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DIRECT: tl.constexpr,
):
    """One (KV split, batch x KV head, row tile). Row r of the tile is query row g * Q_LEN + i of
    the GROUP x Q_LEN rows that share KV head hkv (query head hkv * GROUP + g, query i). Query i
    sees cache position p iff -win_left <= p - i - offset <= win_right (sides switched off by
    HAS_LEFT / HAS_UPPER; causal is win_right = min(right, 0)), or p < sinks on the left side.
    The split's share of the keys any row may see is visited block by block; with DIRECT (one
    split) the normalized output goes to O, else the split's partial to OP / LSE."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_t = tl.program_id(2)
    # 64-bit batch / head offsets: B x Hkv x Skv x D of a long cache passes 2**31 elements.
    off_b = (pid_bh // HKV).to(tl.int64)
    off_hkv = (pid_bh % HKV).to(tl.int64)
    rows = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    m_rows = rows < GROUP * Q_LEN
    rows = tl.minimum(rows, GROUP * Q_LEN - 1)
    offs_g = rows // Q_LEN
    offs_i = rows % Q_LEN
    head = off_hkv * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    p_q = (Q + off_b * stride_qb + head[:, None] * stride_qh + offs_i[:, None] * stride_qm
           + offs_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_rows[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    p_k_base = K + off_b * stride_kb + off_hkv * stride_kh
    p_v_base = V + off_b * stride_vb + off_hkv * stride_vh
    p_mask_rows = MASK + off_b * stride_mb + head * stride_mh + offs_i * stride_mm

    kv_len = KV_LEN
    if HAS_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(LENS + off_b), 0), KV_LEN)
    kv_lo = 0
    if LEFT_PAD:
        kv_lo = KV_LEN - kv_len
    offset = align_bottom_right * (kv_len - Q_LEN)
    # Positions any row may see: [band_lo, band_hi) (rows hold queries 0..Q_LEN-1).
    band_lo = 0
    band_hi = kv_len
    if HAS_LEFT:
        band_lo = tl.maximum(offset - win_left, 0)
    if HAS_UPPER:
        band_hi = tl.minimum(tl.maximum(Q_LEN + offset + win_right, 0), kv_len)
    band_lo = tl.minimum(band_lo, band_hi)
    # This split's share of the band, in whole blocks.
    chunk = (((band_hi - band_lo + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    lo = tl.minimum(band_lo + pid_s * chunk, band_hi)
    hi = tl.minimum(lo + chunk, band_hi)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_SINKS:
        # Sink positions left of the band, visited by split 0 only.
        sink_hi = tl.minimum(tl.minimum(sinks, band_lo), kv_len)
        sink_hi = tl.where(pid_s == 0, sink_hi, 0)
        b_acc, b_m, b_l = _decode_inner(
            b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_rows, m_rows, offs_i, offs_d, offs_dv,
            kv_lo, kv_lo + sink_hi, kv_lo, sinks, offset, win_left, win_right,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, scale, softcap,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, HAS_UPPER, HAS_LEFT, HAS_SINKS, HAS_MASK, MASK_IS_BOOL,
            HAS_SOFTCAP, SIGMOID, UPCAST, INPUT_PRECISION)
    b_acc, b_m, b_l = _decode_inner(
        b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_rows, m_rows, offs_i, offs_d, offs_dv,
        kv_lo + lo, kv_lo + hi, kv_lo, sinks, offset, win_left, win_right,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, scale, softcap,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, HAS_UPPER, HAS_LEFT, HAS_SINKS, HAS_MASK, MASK_IS_BOOL,
        HAS_SOFTCAP, SIGMOID, UPCAST, INPUT_PRECISION)

    if not SIGMOID:
        b_acc = b_acc / tl.maximum(b_l, 1.17549435e-38)[:, None]
    m_out = m_rows[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    if DIRECT:
        p_o = (O + off_b * stride_ob + head[:, None] * stride_oh + offs_i[:, None] * stride_om
               + offs_dv[None, :] * stride_od)
        tl.store(p_o, b_acc.to(O.dtype.element_ty), mask=m_out)
    else:
        row = (off_b * (HKV * GROUP) + head) * Q_LEN + offs_i
        p_op = OP + (row[:, None] * NUM_SPLITS + pid_s) * HEAD_DIM_V + offs_dv[None, :]
        tl.store(p_op, b_acc, mask=m_out)
        if not SIGMOID:
            b_lse = tl.where(b_l > 0, b_m + tl.math.log2(tl.maximum(b_l, 1.17549435e-38)), float("-inf"))
            tl.store(LSE + row * NUM_SPLITS + pid_s, b_lse, mask=m_rows)


@triton.jit
def decode_combine_kernel(
    OP, LSE, O, stride_ob, stride_oh, stride_om, stride_od, H, Q_LEN, NUM_SPLITS,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, SIGMOID: tl.constexpr,
):
    """One output row (b, h, i): the splits' partials weighted by exp2(lse - max lse) (softmax),
    or summed (sigmoid). A row no split saw a key of (every lse -inf) is 0, as the reference."""
    row = tl.program_id(0)
    off_i = row % Q_LEN
    off_h = (row // Q_LEN) % H
    off_b = row // (Q_LEN * H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_s = offs_s < NUM_SPLITS
    m_dv = offs_dv < HEAD_DIM_V
    b_o = tl.load(OP + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM_V + offs_dv[None, :],
                  mask=m_s[:, None] & m_dv[None, :], other=0.0)
    if SIGMOID:
        b_out = tl.sum(b_o, 0)
    else:
        b_lse = tl.load(LSE + row * NUM_SPLITS + offs_s, mask=m_s, other=float("-inf"))
        b_max = tl.max(b_lse, 0)
        b_max = tl.where(b_max == float("-inf"), 0.0, b_max)
        b_w = tl.math.exp2(b_lse - b_max)
        b_out = tl.sum(b_o * b_w[:, None], 0) / tl.maximum(tl.sum(b_w, 0), 1.17549435e-38)
    p_o = O + off_b * stride_ob + off_h * stride_oh + off_i * stride_om + offs_dv * stride_od
    tl.store(p_o, b_out.to(O.dtype.element_ty), mask=m_dv)
'''


def source() -> str:
    """The kernel module's Python source: the template's shared helpers, then the decode kernels."""
    return '"""Generated by attnopt.codegen.triton.decode."""\n' + template.COMMON + DECODE


def source_hash() -> str:
    return hashlib.sha256(source().encode()).hexdigest()[:12]


_MODULES: dict[bool, Any] = {}


def kernels() -> Any:
    """The module holding decode_split_kernel / decode_combine_kernel for the current mode. As in
    generator.kernel: @triton.jit reads TRITON_INTERPRET when it runs, so each mode gets its own
    module, executed from the text rendered here (the cached file is for tracebacks only)."""
    interp = generator.interpreter_active()
    if interp in _MODULES:
        return _MODULES[interp]
    text = source()
    stem = f"decode_{source_hash()}"
    path = cache.generated_file("triton", f"{stem}.py", text)
    filename = str(path) if path is not None else f"<attnopt generated {stem}.py>"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    mod_name = f"attnopt_generated.{stem}{'_interp' if interp else ''}"
    module = types.ModuleType(mod_name)
    module.__file__ = filename
    sys.modules[mod_name] = module
    exec(compile(text, filename, "exec"), module.__dict__)  # noqa: S102  our own source text
    _MODULES[interp] = module
    return module


# ---- checks ------------------------------------------------------------------------------------

def can_run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
            kv_lens: Tensor | None = None, padding_side: str = "right", sinks: int = 0) -> tuple[bool, str]:
    """What the decode kernel needs beyond the launcher's common checks (4-D, dtypes, GQA, mask)."""
    if q.dim() != 4 or k.dim() != 4:
        return False, "q, k, v must be 4-D [B, H, S, D]"
    if q.shape[2] > MAX_Q_LEN:
        return False, f"q_len {q.shape[2]} > {MAX_Q_LEN} (not a decode step)"
    if params.normalizer not in ("softmax", "sigmoid"):
        return False, f"normalizer {params.normalizer!r}"
    if padding_side not in PADDING_SIDES:
        return False, f"padding_side {padding_side!r} (one of {PADDING_SIDES})"
    if int(sinks) < 0:
        return False, f"sinks {sinks} < 0"
    if kv_lens is not None:
        if kv_lens.dtype != torch.int32 or tuple(kv_lens.shape) != (q.shape[0],):
            return False, f"kv_lens must be int32 [B={q.shape[0]}], got {kv_lens.dtype} {tuple(kv_lens.shape)}"
        if kv_lens.device != q.device:
            return False, "kv_lens on another device"
    return True, ""


# ---- configs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeConfig:
    """A KV block of `block_n` keys, the KV range cut into `num_splits` (at most: a short cache
    gets fewer, see `splits_for`), warps and pipelining stages of the split kernel."""

    block_n: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 2

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DecodeConfig":
        return cls(int(d["block_n"]), int(d["num_splits"]), int(d["num_warps"]), int(d["num_stages"]))


def _pow2(x: int) -> int:
    return max(16, 1 << (int(x) - 1).bit_length())


def row_tiles(q: Tensor, k: Tensor) -> tuple[int, int]:
    """(BLOCK_M, row tiles per KV head): the group x q_len rows padded to 16, tiles of at most
    MAX_BLOCK_M rows."""
    rows = (q.shape[1] // k.shape[1]) * q.shape[2]
    block_m = min(_pow2(rows), MAX_BLOCK_M)
    return block_m, -(-rows // block_m)


def sm_count(device) -> int:
    if generator.interpreter_active() or torch.device(device).type != "cuda":
        return INTERPRETER_SMS
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def heuristic_splits(batch: int, kv_heads: int, tiles: int, kv_len: int, sms: int) -> int:
    """Enough splits that batch x kv heads x row tiles x splits programs fill about two waves of
    the SMs, each split at least MIN_SPLIT_KEYS keys, at most MAX_SPLITS."""
    base = max(1, batch * kv_heads * tiles)
    want = -(-2 * sms // base)
    return max(1, min(want, -(-int(kv_len) // MIN_SPLIT_KEYS), MAX_SPLITS))


# (KV block, warps) pairs tuned. Compiled for sm_90 (aot.py, bf16, D=128, 16-row tile, 2 stages):
# 64 keys / 4 warps took 255 registers and spilled 56 bytes; 64 / 8 took 255 without spilling;
# 32 / 4 took 202. The first pair is the untuned default.
BLOCKS_WARPS = ((64, 8), (32, 4), (128, 8))


def candidate_configs(table: str, batch: int, kv_heads: int, tiles: int, kv_len: int, sms: int
                      ) -> list[DecodeConfig]:
    """The tuning space for one (bucketed) case: the heuristic split count, half and double it,
    times KV blocks and stages (`table`: "interpreter" or a GPU family). The first is the default."""
    h = heuristic_splits(batch, kv_heads, tiles, kv_len, sms)
    if table == "interpreter":
        return [DecodeConfig(32, h, 4, 1)]
    splits = [h] + [s for s in (max(1, h // 2), min(2 * h, MAX_SPLITS)) if s != h]
    out = []
    for s in dict.fromkeys(splits):
        for bn, warps in BLOCKS_WARPS:
            for stages in (2, 3):
                out.append(DecodeConfig(bn, s, warps, stages))
    return out


# ---- launch ------------------------------------------------------------------------------------

@dataclass
class Launch:
    """One kernel launch, built but not run (the fields aot.compile_call reads)."""

    fn: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int


@dataclass
class DecodeCall:
    """The split kernel's launch and, with more than one split, the combine's."""

    calls: list[Launch]
    out: Tensor

    def run(self) -> Tensor:
        with generator.interpreter_stdlib():
            for c in self.calls:
                c.fn[c.grid](*c.args, **c.constexprs, num_warps=c.num_warps, num_stages=c.num_stages)
        return self.out


_mask_args = generator.mask_args  # one definition for every kernel family


def decode_call(cfg: DecodeConfig, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                params: AttentionParams, kv_lens: Tensor | None = None, padding_side: str = "right",
                sinks: int = 0) -> DecodeCall:
    """The launches of one decode step under `cfg` (the caller checked can_run)."""
    B, H, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    block_m, tiles = row_tiles(q, k)
    block_n = cfg.block_n
    splits = max(1, min(cfg.num_splits, -(-Skv // block_n)))
    out = torch.empty((B, H, Sq, Dv), dtype=q.dtype, device=q.device)
    if splits > 1:
        op = torch.empty((B, H, Sq, splits, Dv), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, H, Sq, splits), dtype=torch.float32, device=q.device)
    else:
        op = lse = out
    m, ms = _mask_args(attn_mask, q, (B, H, Sq, Skv))
    left, right = params.window if params.window is not None else (None, None)
    upper = right
    if params.causal:
        upper = 0 if right is None else min(right, 0)
    if params.causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment {params.causal_alignment!r}")
    interp = generator.interpreter_active()
    args = (q, k, v, m, q if kv_lens is None else kv_lens, out, op, lse,
            *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
            Hkv, Sq, Skv, splits, float(params.scale), float(params.softcap or 0.0),
            int(params.causal_alignment == "bottom_right"), int(left or 0), int(upper or 0), int(sinks))
    constexprs = dict(
        GROUP=group, HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_LENS=kv_lens is not None, LEFT_PAD=padding_side == "left",
        HAS_UPPER=upper is not None, HAS_LEFT=left is not None, HAS_SINKS=left is not None and sinks > 0,
        HAS_MASK=attn_mask is not None, MASK_IS_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        HAS_SOFTCAP=params.softcap is not None, SIGMOID=params.normalizer == "sigmoid",
        UPCAST=interp and q.dtype == torch.bfloat16,  # bf16 tl.dot is garbage in the interpreter
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DIRECT=splits == 1,
    )
    mod = kernels()
    calls = [Launch(mod.decode_split_kernel, (splits, B * Hkv, tiles), args, constexprs,
                    cfg.num_warps, cfg.num_stages)]
    if splits > 1:
        calls.append(Launch(mod.decode_combine_kernel, (B * H * Sq,),
                            (op, lse, out, *out.stride(), H, Sq, splits),
                            dict(HEAD_DIM_V=Dv, BLOCK_S=_pow2(splits), BLOCK_DV=_pow2(Dv),
                                 SIGMOID=params.normalizer == "sigmoid"),
                            4 if Dv <= 128 else 8, 1))
    return DecodeCall(calls, out)


# ---- tuning ------------------------------------------------------------------------------------

def tuning_active() -> bool:
    """Whether configs are measured (a GPU, ATTNOPT_AUTOTUNE not 0); else the first is taken."""
    return not generator.interpreter_active() and autotune.enabled()


def config_table(device) -> str:
    """The tuning space's table: "interpreter", or the GPU generation (generator.device_family)."""
    return "interpreter" if generator.interpreter_active() else generator.device_family(device)


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20) * 1e-3


def case_key(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
             kv_lens: Tensor | None, padding_side: str, sinks: int) -> tuple:
    """What the choice of config depends on, KV length bucketed: a growing cache maps to one key
    per power of two (strides and exact lengths do not reach the tuning key)."""
    mask = None if attn_mask is None else attn_mask.dtype
    return (q.dtype, str(q.device), q.shape[0], q.shape[1], k.shape[1], q.shape[2],
            autotune.bucket(k.shape[2]), q.shape[3], v.shape[3], mask, params, kv_lens is not None,
            padding_side, sinks > 0, generator.interpreter_active(), autotune.enabled())


def tune_key(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
             kv_lens: Tensor | None, padding_side: str, sinks: int) -> dict:
    import triton

    key = dict(zip(("dtype", "device", "batch", "heads", "kv_heads", "q_len", "kv_bucket", "head_dim",
                    "v_head_dim", "mask", "params", "kv_lens", "padding_side", "sinks"),
                   map(str, case_key(q, k, v, attn_mask, params, kv_lens, padding_side, sinks)[:14])))
    key.update(family="decode", device=generator.device_name(q.device), triton=triton.__version__,
               source=source_hash())
    return key


_CHOSEN: dict[tuple, DecodeConfig] = {}
_TUNED: dict[str, DecodeConfig] = {}
MAX_CHOSEN = 4096  # distinct cases remembered in memory before the memo starts over


def chosen_config(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                  kv_lens: Tensor | None = None, padding_side: str = "right", sinks: int = 0) -> DecodeConfig:
    """The config `launch` runs for this case: memo (bucketed case key), then disk, then measured."""
    key = case_key(q, k, v, attn_mask, params, kv_lens, padding_side, sinks)
    cfg = _CHOSEN.get(key)
    if cfg is not None:
        return cfg
    _, tiles = row_tiles(q, k)
    configs = candidate_configs(config_table(q.device), q.shape[0], k.shape[1], tiles, autotune.bucket(k.shape[2]),
                                sm_count(q.device))
    if not tuning_active() or len(configs) == 1:
        cfg = configs[0]
    else:
        def bench(c: DecodeConfig) -> float:
            return _bench(lambda: decode_call(c, q, k, v, attn_mask, params, kv_lens, padding_side, sinks).run())

        cfg = autotune.fastest(tune_key(q, k, v, attn_mask, params, kv_lens, padding_side, sinks), configs,
                               bench, subdir="triton", encode=DecodeConfig.to_json,
                               decode=DecodeConfig.from_json, memo=_TUNED)
    if len(_CHOSEN) >= MAX_CHOSEN:
        _CHOSEN.clear()
    _CHOSEN[key] = cfg
    return cfg


def launch(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams, *,
           kv_lens: Tensor | None = None, padding_side: str = "right", sinks: int = 0,
           config: DecodeConfig | None = None) -> Tensor:
    """One decode step: out [B, H, Sq, Dv] in q.dtype (the caller checked can_run and the
    launcher's common checks). `config` pins the tile config (tests; else tuned)."""
    cfg = config or chosen_config(q, k, v, attn_mask, params, kv_lens, padding_side, sinks)
    return decode_call(cfg, q, k, v, attn_mask, params, kv_lens, padding_side, sinks).run()


def expected_programs(q: Tensor, k: Tensor, cfg: DecodeConfig) -> int:
    """Programs of the split kernel under `cfg` (what fills the GPU; benchmarks and tests)."""
    _, tiles = row_tiles(q, k)
    return q.shape[0] * k.shape[1] * tiles * max(1, min(cfg.num_splits, math.ceil(k.shape[2] / cfg.block_n)))


__all__ = ["DecodeConfig", "can_run", "launch", "chosen_config", "decode_call", "MAX_Q_LEN"]
