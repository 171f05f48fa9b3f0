"""The kernel table: every attention kernel attnopt has, in the order they are tried, and the one
dispatcher that `attnopt::attention`, `attnopt::gna_attention` and `attnopt.attention` all call.

Canonical layouts (BHSD, see params.py):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], H % Hkv == 0, attn_mask broadcastable
  to [B, H, Sq, Skv] (bool: True = attend; float: added), out [B, H, Sq, Dv] in q.dtype.
  With a TokenLayout: Sq = Skv = leading + prod(grid.shape) + trailing, leading tokens first, grid
  row-major, trailing tokens last.

Each row (`Candidate`) has a name, the devices it serves, and one signature for both questions:
  can_run(q, k, v, attn_mask, params, layout, request) -> (ok, reason)
  run(q, k, v, attn_mask, params, layout, request) -> Tensor
`layout` is a TokenLayout (GNA grid, leading / trailing global tokens, heads that run it) or None (dense);
`request` says who asks and what they allow (`Request`). The first row whose can_run says yes runs;
"reference" always can, so every call ends somewhere exact.

  triton_block_sparse_gna  generated block-sparse GNA kernel (leading / trailing keys as one extra
                           block each)
  triton_decode            split-KV flash-decoding (q_len <= 16, no layout): GQA rows packed per KV
                           head, KV splits sized to fill the SMs, combined by LSE (triton/decode.py)
  triton_sliding_window    generated FlashAttention-2 kernel, 1-D band
  triton_causal            the same, causal
  triton_sigmoid           the same, sigmoid normalizer
  triton_dense             the same, dense (any mask, softcap)
  cpu_small_decode         one query over K/V under 4 MiB (forward, no window): one SDPA call with
                           enable_gqa and the mask as given, before any row that scans the mask
  cpu_padded               causal attention over a left/right padded batch (causal flag + key mask),
                           SDPA per batch row on its run of real keys (cpu/padded.py)
  cpu_native               exact CPU tile kernel (GNA or 1-D window) in compiled C (cpu/native.py);
                           under needs_grad its compiled backward is attached (cpu/native_backward.py)
  cpu_tiles                the same tile plans run as SDPA per tile group (cpu/tile_sdpa.py)
  cpu_decode               a decode step with grouped KV heads as one matmul per KV head (below)
  sdpa                     F.scaled_dot_product_attention, the layout as a bool mask (exact.py)
  reference                float32 reference math (reference.py), any normalizer / dtype

Why one table: the rules were four checks with four signatures in four modules, and each entry
point had its own copy of the order. Now the order is this tuple and the policies below are the
only entry-point differences.

Who may use which row (`Candidate.applies`, from the Request and the device; not logged):
  Triton rows  forward only (not with request.needs_grad); CUDA tensors, or CPU tensors under the
               interpreter when ATTNOPT_FORCE_TRITON=1 (the ops) or backend="triton"
               (attnopt.attention); not with backend "cpu" / "reference". Imported lazily, from
               inside the rows: importing triton is slow and not needed on CPU.
  CPU rows     CPU tensors, backend "auto" / "cpu". Under ATTNOPT_FORCE_TRITON=1 a GNA layout skips
               them: the GNA op's CPU path is then its CUDA path (Triton, then SDPA).
  sdpa         backend "auto" / "cpu".   reference  always.

The CPU decode path (`cpu_decode`, `grouped_decode`): a decode step's G = H / Hkv query heads that
share a KV head become G x Sq rows of one [B, Hkv, G*Sq, Skv] score matmul (the reference math on a
grouped view: exact, differentiable), so each K/V row is read once per KV head. SDPA's CPU kernel
with enable_gqa loses by more the larger G is, as if it read K/V once per query head (inferred from
the timings, not from its source). Measured (fp32, D=128, causal bottom-right, process CPU
time of one thread, min of 7: the 2-core host ran at load ~10, so wall clocks measured neighbours;
the issue #20 report), grouped matmul / SDPA time over B 1-4, H 8-32, Hkv 1-32, Skv 512-8192:
  Sq=1: G=2 0.51-0.73, G=4 0.45-0.60, G=8 0.32-0.54, G=32 0.16-0.52; Sq 2-4 with G >= 4: 0.45-0.93;
  G=1 (no grouping): 0.97-1.07; Sq=8: 0.58-1.21 and Sq=16: 0.66-1.57 (mixed); Sq 2-8, G=2: 0.80-1.13.
This function itself: Sq=1 0.39-0.61 (G 2-8, Skv 2K-8K); Sq=4 (G 8-32) 0.74-0.97.
So it takes Sq == 1 with G >= 2, and Sq <= 4 with G >= 4; every other decode shape stays SDPA (which
already handles GQA without repeating K/V: exact.sdpa_attention passes enable_gqa). Not measured:
several threads (the host was too loaded for wall clocks to mean anything).
Small steps: with K and V under SMALL_DECODE_KV_BYTES (4 MiB) a one-query step (forward only, no
window) runs SDPA with enable_gqa in the row `cpu_small_decode`, ahead of cpu_padded, whose reading
of each row's run of keys from the mask (a few small ops and host syncs) cost ~100 us a call there
(bench/op_overhead.py, B1 H8/2 D64 over 640 keys), more than the keys it skips. Measured (fp32, one
thread, process CPU time, key mask [B, 1, 1, Skv], grouped / SDPA, load ~6 so +-20%): B1 D64 Skv
515-640 H8/2 1.38-1.64, B4 same 1.13-1.24, B1 D64 Skv 2048 H8/2 1.29 (0.5-2.6 MiB of K/V); B4 D64
Skv 2048 H8/2 0.87, B1 D128 Skv 2048 H32/8 0.46-0.97, B4 D128 Skv 2048 H32/8 0.53 (8-16 MiB): K/V
that stay in cache cost SDPA little to reread per query head, and its one fused kernel beats the
grouped form's separate ops.

Caller policies (request.caller), kept exactly as each entry point behaved before the table:
  "attention"      (the op) takes a CPU window kernel only when its windows leave keys out (it
                   pays where they do: 63 ms vs 890 ms dense for a 4K causal window of 256, 8 heads,
                   2-core EPYC); when every run of queries sees (nearly) every key it keeps to SDPA.
  "gna_attention"  (the op) builds the layout mask with its global tokens and per-head selection,
                   runs SDPA with a plainly cast mask (gna_exact.sdpa_gna), prefixes logged reasons
                   with "gna_attention: ". Its non-softmax / non-float calls arrive as
                   backend="reference".
  "functional"     (attnopt.attention) builds the grid mask with gna.dense_mask (which refuses grids
                   over DENSE_MASK_MAX_TOKENS) and runs SDPA through exact.sdpa_attention (finite
                   float masks saturate to q's dtype); with backend="triton" it raises instead of
                   falling back, with every Triton row's reason.
When Triton rows applied and all refused, the reasons ("family: reason; ...") are logged once per
distinct text (logger "attnopt.codegen.triton", as before), then the next row runs.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from attnopt.codegen import exact, gna_exact
from attnopt.codegen.cpu import padded as cpu_padded
from attnopt.codegen.cpu import tiles as cpu_tiles
from attnopt.codegen.params import AttentionParams, TokenLayout, as_layout
from attnopt.codegen.reference import reference_attention, structural_mask

FORCE_TRITON_ENV = "ATTNOPT_FORCE_TRITON"
BACKENDS = ("auto", "triton", "cpu", "reference")
CALLERS = ("attention", "gna_attention", "functional")

log = logging.getLogger("attnopt.codegen.triton")
_LOGGED: set[str] = set()


def force_triton() -> bool:
    """ATTNOPT_FORCE_TRITON=1: the ops run the Triton kernels on CPU tensors under the interpreter
    (CI of whole rewrites through the Triton path; tiny inputs only)."""
    return os.environ.get(FORCE_TRITON_ENV, "0") == "1"


def log_refusal_once(reason: str) -> None:
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.warning("attnopt: Triton kernel declined, using the exact path: %s", reason)


@dataclass(frozen=True)
class Request:
    """Who asks and what they allow: an entry point's policy, not the tensors.

    caller        "attention" | "gna_attention" (the custom ops) | "functional" (attnopt.attention)
    backend       "auto" | "triton" | "cpu" | "reference" (attnopt.attention's argument; the ops
                  use "auto", and "reference" where their kernels do not apply)
    needs_grad    some input needs a gradient: attnopt.attention, and the ops' backward (codegen/
                  autograd.py recomputes the forward with it set, so only differentiable rows run)
    force_triton  ATTNOPT_FORCE_TRITON=1 (read by the ops per call)"""

    caller: str = "functional"
    backend: str = "auto"
    needs_grad: bool = False
    force_triton: bool = False

    def __post_init__(self) -> None:
        if self.caller not in CALLERS:
            raise ValueError(f"caller must be one of {CALLERS}, got {self.caller!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def for_op(cls, caller: str, backend: str = "auto", needs_grad: bool = False) -> "Request":
        """The ops' request; ATTNOPT_FORCE_TRITON is read on every call (tests switch it)."""
        return _op_request(caller, backend, needs_grad, force_triton())


@functools.lru_cache(maxsize=64)
def _op_request(caller: str, backend: str, needs_grad: bool, force: bool) -> Request:
    return Request(caller=caller, backend=backend, needs_grad=needs_grad, force_triton=force)


Check = Callable[[Tensor, Tensor, Tensor, "Tensor | None", AttentionParams, "TokenLayout | None", Request],
                 "tuple[bool, str]"]
Run = Callable[[Tensor, Tensor, Tensor, "Tensor | None", AttentionParams, "TokenLayout | None", Request], Tensor]
Applies = Callable[[Request, str, "TokenLayout | None"], "tuple[bool, str]"]


@dataclass(frozen=True)
class Candidate:
    """One row of the table. `check` and `run` take the table's signature; `applies` decides from
    the request and device alone (no tensor data)."""

    name: str
    group: str        # "triton" | "cpu" | "exact": Triton refusals are logged as one group
    devices: str      # the devices it serves, in words
    summary: str
    applies_fn: Applies = field(repr=False)
    check: Check = field(repr=False)
    run: Run = field(repr=False)

    @property
    def family(self) -> str:
        """The Triton kernel family (generator/template name) of a Triton row."""
        return self.name.removeprefix("triton_")

    def applies(self, request: Request, device: str, layout: TokenLayout | None = None) -> tuple[bool, str]:
        return self.applies_fn(request, device, layout)

    def can_run(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                layout: TokenLayout | None = None, request: Request = Request()) -> tuple[bool, str]:
        """(True, "") when this row takes the call for `request`, else (False, why)."""
        ok, why = self.applies(request, q.device.type, layout)
        if not ok:
            return ok, why
        return self.check(q, k, v, attn_mask, params, layout, request)


# ---- Triton rows ---------------------------------------------------------------------------------

def _triton_applies(request: Request, device: str, layout: TokenLayout | None) -> tuple[bool, str]:
    if request.backend not in ("auto", "triton"):
        return False, f"backend={request.backend!r}"
    if request.needs_grad:
        return False, "forward only: these inputs need gradients"
    if device == "cuda" or request.backend == "triton":
        return True, ""
    if device == "cpu" and request.force_triton:
        return True, ""
    return False, f"tensors on {device} (on CPU only under {FORCE_TRITON_ENV}=1 or backend='triton')"


def _launcher():
    from attnopt.codegen.triton import launcher  # lazy: importing triton is slow, not needed on CPU

    return launcher


def _triton_row(family: str, summary: str) -> Candidate:
    def check(q, k, v, attn_mask, params, layout, request):
        try:
            launcher = _launcher()
        except ImportError:  # pragma: no cover - triton ships with torch on Linux
            return False, "triton is not installed"
        return getattr(launcher, f"can_run_{family}")(q, k, v, attn_mask, params, layout)

    def run(q, k, v, attn_mask, params, layout, request):
        out = _launcher().launch(family, q, k, v, attn_mask, params, layout)
        if layout is not None and (layout.leading or layout.trailing):
            # the kernel writes the grid rows; the global (leading / trailing) queries are dense rows
            gna_exact.fill_global_rows(out, q, k, v, attn_mask, params, layout.leading, layout.trailing,
                                       layout.causal)
        return out

    return Candidate(f"triton_{family}", "triton", "cuda; cpu under the Triton interpreter", summary,
                     _triton_applies, check, run)


# ---- CPU rows ------------------------------------------------------------------------------------

def _cpu_applies(request: Request, device: str, layout: TokenLayout | None) -> tuple[bool, str]:
    if request.backend not in ("auto", "cpu"):
        return False, f"backend={request.backend!r}"
    if device != "cpu":
        return False, f"tensors on {device}"
    if request.force_triton and layout is not None:
        return False, f"{FORCE_TRITON_ENV}=1: a GNA layout takes the accelerator path (Triton, then SDPA)"
    return True, ""


def _cpu_check(q, k, v, attn_mask, params, layout, request) -> tuple[bool, str]:
    ok, why = cpu_tiles.can_run(q, k, v, attn_mask, params, layout)
    if ok and layout is None and request.caller == "attention":
        left, upper = cpu_tiles.window_bounds(params)
        if min(q.shape[2], 64) + left + upper >= k.shape[2]:
            return False, "every run of queries sees (nearly) every key: nothing to skip"
    return ok, why


def _cpu_native_check(q, k, v, attn_mask, params, layout, request) -> tuple[bool, str]:
    ok, why = _cpu_check(q, k, v, attn_mask, params, layout, request)
    if not ok:
        return ok, why
    return cpu_tiles.native_can_run(q, k, v, attn_mask, params)


def _cpu_native_run(q, k, v, attn_mask, params, layout, request) -> Tensor:
    # tiles of fewer than NATIVE_MIN_QUERIES queries still run as SDPA (tiles.run_plan)
    return cpu_tiles.attention(q, k, v, attn_mask, params, layout, native=True)


def _cpu_tiles_run(q, k, v, attn_mask, params, layout, request) -> Tensor:
    return cpu_tiles.attention(q, k, v, attn_mask, params, layout, native=False)


# torch's softmax that gives 0 (not NaN) on rows whose scores are all -inf (what SDPA's math uses)
_SAFE_SOFTMAX = getattr(torch, "_safe_softmax", None)


def grouped_decode(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams) -> Tensor:
    """Attention with q's G = H / Hkv heads per KV head folded into rows: q viewed as
    [B, Hkv, G*Sq, D] (row g*Sq + i is head hkv*G + g, query i), the reference's order of operations
    in float32 (float64 for float64), causal / window as a mask repeated per head after slicing off
    the keys no row sees. Rows that see no key are 0 (SDPA's and the reference's safe softmax)."""
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = H // Hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    allowed = structural_mask(Sq, Skv, causal=params.causal, causal_alignment=params.causal_alignment,
                              window=params.window, device=q.device)
    lo, hi = 0, Skv
    if allowed is not None:
        if bool(allowed.all()):
            allowed = None
        else:
            cols = allowed.any(0).nonzero()
            lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
            allowed = allowed[:, lo:hi].repeat(G, 1)
    k, v = k[:, :, lo:hi].to(compute), v[:, :, lo:hi].to(compute)
    s = torch.matmul(q.reshape(B, Hkv, G * Sq, D).to(compute), k.transpose(-1, -2)).mul_(params.scale)
    if params.softcap is not None:
        s = torch.tanh(s / params.softcap) * params.softcap  # out of place: tanh's backward reads it
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.shape[1] == 1 and m.shape[2] == 1 and m.shape[3] == Skv:
            m = m[..., lo:hi]  # a key mask: the same for every row of a KV head, broadcast as it is
        else:
            m = m.expand(B, H, Sq, Skv).reshape(B, Hkv, G * Sq, Skv)[..., lo:hi]
        s = s.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else s.add_(m.to(compute))
    if allowed is not None:
        s = s.masked_fill_(~allowed, float("-inf"))
    if params.normalizer == "sigmoid":
        p = torch.sigmoid(s)  # sigmoid(-inf) == 0: masked keys add nothing
    elif _SAFE_SOFTMAX is not None:
        p = _SAFE_SOFTMAX(s, -1)  # rows with every key masked are 0 in one kernel (NaN inputs stay NaN)
    else:
        p = torch.softmax(s, -1)
        bad = p[..., 0].isnan() if p.shape[-1] else None
        if bad is not None and bool(bad.any()):  # rows with every key masked: 0, not NaN
            dead = bad & torch.isneginf(s).all(-1)
            p = p.masked_fill(dead[..., None], 0.0)
    out = torch.matmul(p, v) if p.shape[-1] else s.new_zeros(B, Hkv, G * Sq, v.shape[3])
    return out.reshape(B, H, Sq, v.shape[3]).to(q.dtype)


def _grouped_shapes(q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    """q, k, v are [B, H, S, D] with H a multiple of k's heads, and k, v agree (both decode rows)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return False, "q, k, v are not [B, H, S, D] with grouped heads"
    if k.shape[2] == 0 or k.shape[3] != q.shape[3] or v.shape[:3] != k.shape[:3]:
        return False, "k / v shapes"
    return True, ""


def _cpu_decode_check(q, k, v, attn_mask, params, layout, request) -> tuple[bool, str]:
    if layout is not None:
        return False, "a token layout"
    ok, why = _grouped_shapes(q, k, v)
    if not ok:
        return ok, why
    group, q_len = q.shape[1] // k.shape[1], q.shape[2]
    if not (group >= 2 and (q_len == 1 or (group >= 4 and q_len <= 4))):
        return False, f"q_len {q_len}, group {group}: SDPA is as fast (measured, see the header)"
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False, f"mask dtype {attn_mask.dtype}"
    return True, ""


# Below this many bytes of K and V, a one-query decode step (forward) runs SDPA (enable_gqa) in the
# cpu_small_decode row: K/V stay in cache, so SDPA reading them once per query head costs little, and
# its one fused kernel beats the grouped form's six ops and cpu_padded's scan of the mask (header).
SMALL_DECODE_KV_BYTES = 4 << 20


def _cpu_decode_run(q, k, v, attn_mask, params, layout, request) -> Tensor:
    return grouped_decode(q, k, v, attn_mask, params)


def _cpu_small_decode_check(q, k, v, attn_mask, params, layout, request) -> tuple[bool, str]:
    """One query over K/V that stay in cache: one SDPA call beats every other CPU row there (their
    checks included, which cost a third of SDPA's time at B1 H8/2 D64 over 640 keys)."""
    if layout is not None:
        return False, "a token layout"
    ok, why = _grouped_shapes(q, k, v)
    if not ok:
        return ok, why
    if q.shape[2] != 1:
        return False, f"{q.shape[2]} queries"
    if request.needs_grad:
        return False, "gradients: the differentiable rows decide"
    if params.window is not None:
        return False, "a window: the tile rows read only its keys"
    kv_bytes = k.shape[0] * k.shape[1] * k.shape[2] * (k.shape[3] + v.shape[3]) * k.element_size()
    if kv_bytes >= SMALL_DECODE_KV_BYTES:
        return False, f"{kv_bytes >> 20} MiB of K/V (>= {SMALL_DECODE_KV_BYTES >> 20} MiB)"
    return exact.sdpa_can_run(q, k, v, attn_mask, params)


def _cpu_small_decode_run(q, k, v, attn_mask, params, layout, request) -> Tensor:
    return exact.sdpa_attention(q, k, v, attn_mask, params)


def _cpu_decode_applies(request: Request, device: str, layout: TokenLayout | None) -> tuple[bool, str]:
    if request.backend not in ("auto", "cpu"):
        return False, f"backend={request.backend!r}"
    if device != "cpu":
        return False, f"tensors on {device}"
    return True, ""


# ---- exact rows ----------------------------------------------------------------------------------

def _sdpa_applies(request: Request, device: str, layout: TokenLayout | None) -> tuple[bool, str]:
    if request.backend not in ("auto", "cpu"):
        return False, f"backend={request.backend!r}"
    return True, ""


def _always(*_) -> tuple[bool, str]:
    return True, ""


def _layout_allowed(q: Tensor, layout: TokenLayout, request: Request) -> Tensor:
    """The layout's bool mask for the exact rows (see the caller policies in the header)."""
    if request.caller == "gna_attention":
        return gna_exact.layout_mask(layout.grid, layout.leading, layout.heads, q.shape[1], q.device,
                                     layout.trailing)
    if layout.leading or layout.trailing:
        return gna_exact.full_mask(layout.grid, layout.leading, layout.trailing).to(q.device)
    from attnopt.sparsity.gna import dense_mask

    return torch.from_numpy(dense_mask(layout.grid)).to(q.device)


def _sdpa_run(q, k, v, attn_mask, params, layout, request) -> Tensor:
    if layout is None:
        return exact.sdpa_attention(q, k, v, attn_mask, params)
    if request.caller == "gna_attention":
        return gna_exact.sdpa_gna(q, k, v, attn_mask, params.scale, layout.grid, layout.leading,
                                  layout.trailing)
    return exact.sdpa_attention(q, k, v, gna_exact.and_mask(attn_mask, _layout_allowed(q, layout, request)), params)


def _reference_run(q, k, v, attn_mask, params, layout, request) -> Tensor:
    if layout is not None:
        attn_mask = gna_exact.and_mask(attn_mask, _layout_allowed(q, layout, request))
    return reference_attention(q, k, v, attn_mask, **params.kwargs())


TABLE: tuple[Candidate, ...] = (
    _triton_row("block_sparse_gna", "generated block-sparse GNA kernel; leading / trailing keys as one "
                                    "extra block each per Q tile"),
    _triton_row("decode", "split-KV flash-decoding for q_len <= 16 (causal, window, masks, softcap, GQA)"),
    _triton_row("sliding_window", "generated FlashAttention-2 forward, 1-D band (any alignment)"),
    _triton_row("causal", "generated FlashAttention-2 forward, causal"),
    _triton_row("sigmoid", "generated FlashAttention-2 forward, sigmoid normalizer"),
    _triton_row("dense", "generated FlashAttention-2 forward, dense (masks, softcap, GQA)"),
    Candidate("cpu_small_decode", "cpu", "cpu", "one query over K/V under 4 MiB: one SDPA call (enable_gqa)",
              _cpu_applies, _cpu_small_decode_check, _cpu_small_decode_run),
    Candidate("cpu_padded", "cpu", "cpu", "causal over a padded batch: SDPA per row on its run of real keys",
              _cpu_applies, lambda q, k, v, m, p, layout, request: cpu_padded.can_run(q, k, v, m, p, layout),
              lambda q, k, v, m, p, layout, request: cpu_padded.attention(q, k, v, m, p)),
    Candidate("cpu_native", "cpu", "cpu", "exact tile kernel (GNA or 1-D window) in compiled C",
              _cpu_applies, _cpu_native_check, _cpu_native_run),
    Candidate("cpu_tiles", "cpu", "cpu", "exact tile kernel (GNA or 1-D window) as SDPA per tile group",
              _cpu_applies, _cpu_check, _cpu_tiles_run),
    Candidate("cpu_decode", "cpu", "cpu", "decode step with grouped KV heads as one matmul per KV head",
              _cpu_decode_applies, _cpu_decode_check, _cpu_decode_run),
    Candidate("sdpa", "exact", "any", "F.scaled_dot_product_attention, a layout as a bool mask",
              _sdpa_applies, lambda q, k, v, m, p, layout, request: exact.sdpa_can_run(q, k, v, m, p, layout),
              _sdpa_run),
    Candidate("reference", "exact", "any", "float32 reference math with the full mask (any normalizer, dtype)",
              _always, _always, _reference_run),
)


def candidate(name: str) -> Candidate:
    for c in TABLE:
        if c.name == name:
            return c
    raise KeyError(name)


# ---- dispatch ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """The row that takes a call, and why each row before it did not ({name: reason})."""

    candidate: Candidate
    refusals: dict[str, str]
    triton_tried: bool   # some Triton row applied (then all of them did, and refused)

    @property
    def name(self) -> str:
        return self.candidate.name

    def triton_reason(self) -> str:
        """The Triton rows' refusals as one text ("family: reason; ..."), as logged."""
        return "; ".join(f"{c.family}: {self.refusals[c.name]}" for c in TABLE
                         if c.group == "triton" and c.name in self.refusals)


def choose(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
           layout: TokenLayout | None = None, request: Request = Request()) -> Choice:
    """The first row of TABLE that takes the call (no side effects: nothing logged or run)."""
    refusals: dict[str, str] = {}
    triton_tried = False
    device = q.device.type
    applies: dict[Applies, tuple[bool, str]] = {}  # rows of a group share one policy: ask it once
    for c in TABLE:
        ok, why = applies.get(c.applies) or applies.setdefault(c.applies, c.applies(request, device, layout))
        if ok:
            triton_tried |= c.group == "triton"
            ok, why = c.check(q, k, v, attn_mask, params, layout, request)
        if ok:
            return Choice(c, refusals, triton_tried)
        refusals[c.name] = why
    raise AssertionError("the reference row always runs")  # pragma: no cover


def dispatch(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
             layout: TokenLayout | None = None, request: Request = Request()) -> Tensor:
    """Run the first row that takes the call. Triton refusals are logged once per distinct reason
    (backend="triton" raises with them instead)."""
    if request.backend == "triton" and request.needs_grad:
        raise RuntimeError("backend='triton' is forward only and these inputs need gradients; use "
                           "backend='auto' (exact differentiable path) or run under torch.no_grad()")
    choice = choose(q, k, v, attn_mask, params, layout, request)
    if choice.triton_tried and choice.candidate.group != "triton":
        why = choice.triton_reason()
        if request.backend == "triton":
            raise RuntimeError(f"no Triton kernel fits this call: {why}")
        log_refusal_once(f"gna_attention: {why}" if request.caller == "gna_attention" else why)
    return choice.candidate.run(q, k, v, attn_mask, params, layout, request)


# ---- the Triton rows alone (tests, benchmarks: "the generated kernel for this case") ------------

def triton_family(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                  layout=None, leading: int = 0, trailing: int = 0) -> tuple[str | None, dict[str, str]]:
    """(family of the first Triton row whose check passes, {family: reason} of those before it),
    whatever the device policy. `layout`: a TokenLayout, a GNALayout (plus `leading` /
    `trailing`) or None."""
    layout = as_layout(layout, leading, trailing)
    reasons = {}
    for c in TABLE:
        if c.group != "triton":
            continue
        ok, why = c.check(q, k, v, attn_mask, params, layout, Request())
        if ok:
            return c.family, reasons
        reasons[c.family] = why
    return None, reasons


def can_run_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                   layout=None, leading: int = 0, trailing: int = 0) -> tuple[bool, str]:
    """(True, family) or (False, "family: reason; ...") over the Triton rows."""
    family, reasons = triton_family(q, k, v, attn_mask, params, layout, leading, trailing)
    if family is not None:
        return True, family
    return False, "; ".join(f"{f}: {r}" for f, r in reasons.items())


def launch_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                  layout=None, leading: int = 0, trailing: int = 0) -> Tensor | None:
    """The first fitting Triton row's result (global rows filled), or None when none fits."""
    layout = as_layout(layout, leading, trailing)
    family, _ = triton_family(q, k, v, attn_mask, params, layout)
    if family is None:
        return None
    return candidate(f"triton_{family}").run(q, k, v, attn_mask, params, layout, Request())
