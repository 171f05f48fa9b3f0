"""Numerical validation of a rewritten torch graph against the original.

Errors are measured relative to the output's scale: max|new - ref| / max(max|ref|, 1e-6), over
every floating output; positions where the original is NaN (fully masked rows: the model's own
output is undefined there) are not compared. Inputs: the example inputs, plus a variant with padded rows for every
key-padding input that detection found, so a dropped padding mask cannot hide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

import torch.fx as fx
from attnopt.frontends.fx_state import preserved
from attnopt.ir.vocab import TOLERANCE_FP32, TOLERANCE_HALF

VALIDATION_SEED = 0x5EED
TOLERANCE = {torch.float32: TOLERANCE_FP32, torch.float64: 1e-8, torch.float16: TOLERANCE_HALF,
             torch.bfloat16: 2 * TOLERANCE_HALF}


@dataclass(frozen=True)
class Error:
    max_abs: float
    rel: float

    @staticmethod
    def worst(errors: Sequence["Error"]) -> "Error":
        if not errors:
            return Error(0.0, 0.0)
        return Error(max(e.max_abs for e in errors), max(e.rel for e in errors))


def tensor_error(ref: torch.Tensor, new: torch.Tensor) -> Error:
    if ref.shape != new.shape:
        return Error(float("inf"), float("inf"))
    r, n = ref.detach().double(), new.detach().double()
    # NaN in the original (softmax over a fully masked row) is undefined output; the fused
    # kernel returns zeros there, like SDPA. Such positions are not compared.
    dont_care = torch.isnan(r)
    diff = torch.where(dont_care, torch.zeros_like(r), (r - n).abs())
    diff = torch.nan_to_num(diff, nan=float("inf"))
    max_abs = float(diff.max()) if diff.numel() else 0.0
    finite = r[torch.isfinite(r)]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-6)
    return Error(max_abs, max_abs / scale)


def outputs_error(ref: Any, new: Any) -> Error:
    flat_r, _ = torch.utils._pytree.tree_flatten(ref)
    flat_n, _ = torch.utils._pytree.tree_flatten(new)
    if len(flat_r) != len(flat_n):
        return Error(float("inf"), float("inf"))
    errs = [tensor_error(a, b) for a, b in zip(flat_r, flat_n)
            if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return Error.worst(errs)


def tolerance_for(ref: Any) -> float:
    flat, _ = torch.utils._pytree.tree_flatten(ref)
    tols = [TOLERANCE.get(t.dtype, TOLERANCE_FP32) for t in flat if isinstance(t, torch.Tensor)
            and t.is_floating_point()]
    return max(tols) if tols else TOLERANCE_FP32


class Capture(fx.Interpreter):
    """Runs a GraphModule and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def reference_semantics(inputs: Sequence[Any]):
    """Context in which graphs are run for validation.

    Randomness: every run starts from the same seed, in a forked RNG (the caller's generator
    state is left as it was), so a model that draws random numbers in its forward (ViTMAE's
    random patch masking, dropout left in training mode) is compared against itself on the same
    draws instead of failing validation on noise that has nothing to do with attention.

    On CUDA, SDPA's output for a query row whose keys are all masked is backend-defined (math:
    NaN, memory-efficient: 0, cuDNN in bf16: other finite values, all seen on an H100), while
    mathematically it is undefined. Running with the math backend makes such rows NaN, which
    validation treats as "don't care" (as on CPU), instead of comparing against one backend's
    arbitrary choice."""
    import contextlib

    flat, _ = torch.utils._pytree.tree_flatten(list(inputs))
    cuda = sorted({x.device.index or 0 for x in flat if isinstance(x, torch.Tensor) and x.is_cuda})
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=cuda))
    torch.manual_seed(VALIDATION_SEED)
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def run_captured(gm: fx.GraphModule, inputs: Sequence[Any], names: set[str]) -> tuple[Any, dict]:
    """One run of `gm` that leaves the caller's state as it found it: whatever the graph writes in
    place (a static KV cache, a buffer) is put back afterwards (frontends/fx_state.py), so
    validation's extra runs never show through."""
    cap = Capture(gm, names)
    with torch.no_grad(), reference_semantics(inputs), preserved(gm, inputs):
        out = cap.run(*inputs)
    return out, cap.values


def padding_positions(graph, sites) -> list[int]:
    """Indices (in the graph's flat input order) of the key-padding inputs the sites' masks use."""
    from attnopt.patterns.values import user_inputs_reached

    deps: set[str] = set()
    for s in sites:
        if s.spec.mask.padding:
            for node in s.mask:
                deps.update(user_inputs_reached(graph, node))
    order = list(graph.inputs)
    return sorted(order.index(d) for d in deps if d in order)


def padded_variants(inputs: Sequence[Any], padding_positions: Sequence[int]) -> list[list[Any]]:
    """The inputs, and (if any key-padding inputs) a copy with padded rows."""
    variants = [list(inputs)]
    if padding_positions:
        padded = list(inputs)
        for i in padding_positions:
            m = inputs[i].clone()
            if m.dim() == 2 and m.shape[1] > 4:
                m[0, -3:] = 0
                if m.shape[0] > 1:
                    m[1, :2] = 0
            padded[i] = m
        variants.append(padded)
    return variants


# ---- low precision: how noisy is the original itself? ---------------------------------------

_LOW = (torch.float16, torch.bfloat16)


def fp32_twin(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` computing in fp32: half-precision params/buffers upcast and every
    half-precision dtype argument in the graph (casts, factory calls) promoted to fp32."""
    import copy

    twin = copy.deepcopy(gm)
    for t in list(twin.parameters()) + list(twin.buffers()):
        if t.dtype in _LOW:
            t.data = t.data.float()
    promote = lambda a: torch.float32 if a in _LOW else a  # noqa: E731
    for n in twin.graph.nodes:
        n.args = fx.node.map_aggregate(n.args, promote)
        n.kwargs = fx.node.map_aggregate(n.kwargs, promote)
    twin.recompile()
    return twin


def low_precision_tolerance(gm: fx.GraphModule, inputs: Sequence[Any], ref: Any, base: float) -> float:
    """Tolerance for comparing a rewrite with a half-precision original.

    A fused kernel keeps fp32 softmax state where the original rounds intermediates to bf16/fp16,
    so the two differ by the original's own rounding noise, which grows with depth (measured on
    an H100: 2-layer sharpened models moved by 2-7% in bf16 with a more accurate kernel). The
    noise is measured against an fp32 twin of the original: |new - orig| <= |new - ref32| +
    |orig - ref32|, so a rewrite as accurate as the original stays within about twice the
    original's own error; 2.5x leaves room for the rewrite's rounding. A planted bug (wrong
    scale, dropped mask) moves sharpened models by 0.1-1 and stays far outside. Falls back to
    `base` when no fp32 twin can run."""
    flat, _ = torch.utils._pytree.tree_flatten(ref)
    if not any(isinstance(t, torch.Tensor) and t.dtype in _LOW for t in flat):
        return base
    try:
        twin = fp32_twin(gm)
        up = [x.float() if isinstance(x, torch.Tensor) and x.dtype in _LOW else x for x in inputs]
        with torch.no_grad(), reference_semantics(up), preserved(twin, up):
            ref32 = twin(*up)
        noise = outputs_error(ref32, ref).rel  # scale from the fp32 output
    except Exception:  # noqa: BLE001  a graph that cannot run in fp32: keep the fixed tolerance
        return base
    if not noise == noise:  # NaN
        return base
    return max(base, 2.5 * noise)
