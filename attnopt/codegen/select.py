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
  cpu_native               exact CPU tile kernel (GNA or 1-D window) in compiled C (cpu/native.py)
  cpu_tiles                the same tile plans run as SDPA per tile group (cpu/tile_sdpa.py)
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

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from attnopt.codegen import exact, gna_exact
from attnopt.codegen.cpu import tiles as cpu_tiles
from attnopt.codegen.params import AttentionParams, TokenLayout, as_layout
from attnopt.codegen.reference import reference_attention

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
    needs_grad    some input needs a gradient (only attnopt.attention can say so: the ops have no
                  autograd formula)
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
    def for_op(cls, caller: str, backend: str = "auto") -> "Request":
        return cls(caller=caller, backend=backend, force_triton=force_triton())


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
    Candidate("cpu_native", "cpu", "cpu", "exact tile kernel (GNA or 1-D window) in compiled C",
              _cpu_applies, _cpu_native_check, _cpu_native_run),
    Candidate("cpu_tiles", "cpu", "cpu", "exact tile kernel (GNA or 1-D window) as SDPA per tile group",
              _cpu_applies, _cpu_check, _cpu_tiles_run),
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
    for c in TABLE:
        ok, why = c.applies(request, device, layout)
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
