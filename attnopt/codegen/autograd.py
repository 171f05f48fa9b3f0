"""Autograd for the custom ops `attnopt::attention` and `attnopt::gna_attention`: their backward,
itself one custom op per forward op, so torch.compile / torch.export training graphs hold it as one
opaque call (the joint graph: forward op, then its backward op).

Canonical layouts (BHSD, as the forward ops):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], attn_mask broadcastable to
  [B, H, Sq, Skv] (bool: True = attend; float: added), grad_out [B, H, Sq, Dv].
  Gradients: dq like q, dk like k, dv like v (under GQA summed over each KV head's query group),
  dmask shaped like attn_mask (a float mask that requires grad: a learned bias; summed over the
  dimensions it broadcasts over), all contiguous. Bool masks get None.

Backward ops (new names; the forward schemas stay as they are):
  attnopt::attention_backward(Tensor grad_out, <the forward's arguments>, bool[] needs)
  attnopt::gna_attention_backward(Tensor grad_out, <the forward's arguments>, bool[] needs)
    -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)
  `needs` = which of (q, k, v, attn_mask) need a gradient; a gradient not needed comes back as an
  empty tensor (a custom op cannot return None in a tuple) and the formula hands autograd None.

How (where no Triton backward below takes the call): exact recomputation. The forward kernels
return the output only (their schemas are fixed, and the CPU tile kernel, SDPA and the Triton
kernels keep no log-sum-exp a backward could read), so the backward runs the same attention again
through the kernel table with `needs_grad` set (which leaves out the forward-only Triton rows) and
differentiates that:
  * windows and GNA layouts on CPU: the compiled tile forward with its compiled backward
    (cpu/native_backward.py: each tile's softmax recomputed in cache, no autograd graph), or, for a
    learned bias or a head dim not a multiple of 8, SDPA per tile group (cpu/tile_sdpa.py), so what
    autograd keeps is the tiles' scores, O(tiles x box) rather than O(S^2);
  * dense / causal / masked softmax: SDPA (its own fused backward);
  * softcap, sigmoid, mixed dtypes: the float32 reference math on the same masks.
The result is the exact gradient of the same function the forward computed (up to floating-point
order: the forward may have run the compiled kernel or Triton, the recomputation runs SDPA), at the
cost of one extra forward. A backward from the forward's log-sum-exp needs kernels that return it
(and a schema that carries it): not done yet.

Triton backward: on CUDA tensors, or CPU tensors under ATTNOPT_FORCE_TRITON=1 (the interpreter),
where a Triton backward's `can_run` takes the call, the backward op runs its kernels instead: no S^2
autograd graph. The forward schemas carry no log-sum-exp, so those kernels recompute it with one
LSE-writing forward.
  * attnopt::attention: triton/backward.py, FlashAttention-2 (the dense family: dense, causal,
    windows, GQA, masks, softcap, sigmoid; fp16/bf16/fp32, head dims <= 128).
  * attnopt::gna_attention: triton/gna_backward.py (what the forward's block-sparse GNA kernel
    takes: 1-/2-/3-D layouts, strides, causal dims, dilation, leading / trailing global tokens,
    masks, GQA; softmax, head dims <= 128): dQ over the forward's tile plan, dK/dV over the
    transposed plan, the global tokens' small dense parts in torch math. A per-head selection
    splits: the layout's heads there, the exact heads through triton/backward.py (dense, or causal
    for a 1-D causal layout) or, causal multi-D, gna_backward.py on the full window; a mask
    gradient with a selection keeps the recomputation.
Anything else (mixed dtypes, larger head dims, other normalizers) keeps the recomputation; CPU
tensors without the variable never reach Triton.

Why a dispatch-key guard: a custom op's implementation runs below autograd (torch's custom_op
wrapper excludes the autograd dispatch keys while it runs), so grad mode alone records nothing there.
`_recording()` lifts that exclusion for the recomputation only. The backward op has no autograd
formula of its own: double backward raises torch's "no autograd formula" error.

`register(op, name, forward)` is called by ops.py / gna_op.py with the plain forward math (the op's
body with a `needs_grad` switch), so this module imports neither (no import cycle).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

ATTENTION_BACKWARD = "attnopt::attention_backward"
GNA_BACKWARD = "attnopt::gna_attention_backward"
_RESULT = "-> (Tensor, Tensor, Tensor, Tensor)"
ATTENTION_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, bool causal, "
    "str causal_alignment, int window_left, int window_right, float softcap, str normalizer, bool[] needs) "
    + _RESULT
)
GNA_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int[] shape, "
    "int[] window, int[] stride, int[] dilation, bool[] causal, int leading, str normalizer, int[] heads, "
    "int trailing, bool[] needs) " + _RESULT
)

# forward math per op name ("attention", "gna_attention"): forward(q, k, v, attn_mask, *scalars,
# needs_grad=True) -> out, differentiable (filled by register()).
_FORWARDS: dict[str, Callable[..., Tensor]] = {}

_AUTOGRAD_KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")


@contextlib.contextmanager
def _recording():
    """Grad mode with the autograd dispatch keys back in: inside a custom op's implementation
    (run below autograd) the recomputation then records its graph."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        exclude = exclude.remove(getattr(torch._C.DispatchKey, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


def _vjp(name: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
         scalars: tuple, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask) of the op `name` by recomputation; empty tensors where not needed."""
    needs = [bool(n) for n in needs] + [False] * (4 - len(needs))
    if attn_mask is None or not attn_mask.is_floating_point():
        needs[3] = False
    with _recording():
        leaves = [None if x is None else x.detach().requires_grad_(n) for x, n in zip((q, k, v, attn_mask), needs)]
        wrt = [x for x, n in zip(leaves, needs) if n]
        grads = iter(())
        if wrt:
            out = _FORWARDS[name](*leaves, *scalars, needs_grad=True)
            grads = iter(torch.autograd.grad(out, wrt, grad_out.to(out.dtype), allow_unused=True))
    result = []
    for x, n in zip((q, k, v, attn_mask), needs):
        if not n:
            result.append(q.new_empty(0))
            continue
        g = next(grads)
        result.append(torch.zeros(x.shape, dtype=x.dtype, device=x.device) if g is None else g.contiguous())
    return tuple(result)


def _fake_grads(q, k, v, attn_mask, needs):
    """The backward ops' fake results: contiguous tensors like the inputs, empty where not needed."""
    needs = list(needs) + [False] * (4 - len(needs))
    if attn_mask is None or not attn_mask.is_floating_point():
        needs[3] = False
    return tuple(x.new_empty(x.shape) if n else q.new_empty(0) for x, n in zip((q, k, v, attn_mask), needs))


@torch.library.custom_op(ATTENTION_BACKWARD, mutates_args=(), schema=ATTENTION_BACKWARD_SCHEMA)
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                       scale: float, causal: bool, causal_alignment: str, window_left: int, window_right: int,
                       softcap: float, normalizer: str, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """attnopt::attention's gradients (module header)."""
    scalars = (scale, causal, causal_alignment, window_left, window_right, softcap, normalizer)
    grads = _triton_vjp(grad_out, q, k, v, attn_mask, scalars, needs)
    return grads if grads is not None else _vjp("attention", grad_out, q, k, v, attn_mask, scalars, needs)


def _triton_vjp(grad_out, q, k, v, attn_mask, scalars, needs):
    """The Triton backward (triton/backward.py) where it takes the call: CUDA tensors, or CPU ones
    under ATTNOPT_FORCE_TRITON=1 (the interpreter); None otherwise (the recomputation then runs).
    CPU calls without the variable never import triton here."""
    from attnopt.codegen import select

    if not (q.is_cuda or select.force_triton()):
        return None
    from attnopt.codegen.params import AttentionParams
    from attnopt.codegen.triton import backward

    params = AttentionParams.from_schema(*scalars)
    ok, why = backward.can_run(q, k, v, attn_mask, params)
    if not ok:
        select.log_refusal_once(f"backward: {why}")
        return None
    return backward.attention_backward(grad_out, q, k, v, attn_mask, params, needs)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, attn_mask, scale, causal, causal_alignment, window_left,
                             window_right, softcap, normalizer, needs):
    return _fake_grads(q, k, v, attn_mask, needs)


@torch.library.custom_op(GNA_BACKWARD, mutates_args=(), schema=GNA_BACKWARD_SCHEMA)
def gna_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                           scale: float, shape: list[int], window: list[int], stride: list[int],
                           dilation: list[int], causal: list[bool], leading: int, normalizer: str,
                           heads: list[int], trailing: int, needs: list[bool]
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """attnopt::gna_attention's gradients (module header)."""
    scalars = (scale, shape, window, stride, dilation, causal, leading, normalizer, heads, trailing)
    grads = _triton_gna_vjp(grad_out, q, k, v, attn_mask, scalars, needs)
    return grads if grads is not None else _vjp("gna_attention", grad_out, q, k, v, attn_mask, scalars, needs)


def _triton_gna_vjp(grad_out, q, k, v, attn_mask, scalars, needs):
    """The GNA Triton backward (triton/gna_backward.py) where it takes the call, on the same terms
    as _triton_vjp; None otherwise (the recomputation then runs, and raises on a bad layout)."""
    from attnopt.codegen import select

    if not (q.is_cuda or select.force_triton()):
        return None
    from attnopt.codegen.params import TokenLayout
    from attnopt.codegen.triton import gna_backward
    from attnopt.ir import GNALayout

    scale, shape, window, stride, dilation, causal, leading, normalizer, heads, trailing = scalars
    try:
        grid = GNALayout(tuple(int(x) for x in shape), tuple(int(x) for x in window),
                         tuple(int(x) for x in stride), tuple(int(x) for x in dilation),
                         tuple(bool(x) for x in causal))
        layout = TokenLayout(grid, int(leading), tuple(int(h) for h in heads), int(trailing))
    except (TypeError, ValueError):
        return None
    if layout.leading < 0 or layout.trailing < 0:
        return None
    ok, why = gna_backward.can_run(q, k, v, attn_mask, scale, layout, normalizer, needs)
    if not ok:
        select.log_refusal_once(f"gna_attention backward: {why}")
        return None
    return gna_backward.attention_backward(grad_out, q, k, v, attn_mask, scale, layout, needs)


@gna_attention_backward.register_fake
def _gna_backward_fake(grad_out, q, k, v, attn_mask, scale, shape, window, stride, dilation, causal, leading,
                       normalizer, heads, trailing, needs):
    return _fake_grads(q, k, v, attn_mask, needs)


_BACKWARD_OPS = {"attention": attention_backward, "gna_attention": gna_attention_backward}
# scalars after (q, k, v, attn_mask) in each forward schema, with their defaults
_SCALARS = {"attention": 7, "gna_attention": 10}
_GNA_DEFAULTS = ((), 0)  # heads, trailing


def _setup_context(name: str):
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, attn_mask, *scalars = inputs
        if name == "gna_attention" and len(scalars) < _SCALARS[name]:  # defaults left out by the caller
            scalars = scalars + list(_GNA_DEFAULTS[len(scalars) - _SCALARS[name]:])
        ctx.scalars = tuple(list(s) if isinstance(s, (list, tuple)) else s for s in scalars)
        ctx.save_for_backward(q, k, v, attn_mask)
    return setup_context


def _backward(name: str):
    def backward(ctx, grad_out):
        q, k, v, attn_mask = ctx.saved_tensors
        float_mask = attn_mask is not None and attn_mask.is_floating_point()
        needs = [bool(n) for n in ctx.needs_input_grad[:3]] + [bool(ctx.needs_input_grad[3]) and float_mask]
        if not any(needs):
            return (None,) * (4 + _SCALARS[name])
        grads = _BACKWARD_OPS[name](grad_out, q, k, v, attn_mask, *ctx.scalars, needs)
        return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * _SCALARS[name]
    return backward


# Where the CPU fast path (register_cpu_inference) registers its kernels: a fragment of the ops'
# namespace of its own (the custom ops' own library object registers the rest).
_FAST_LIB = torch.library.Library("attnopt", "FRAGMENT")
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_CPU_KEY = torch._C.DispatchKey.CPU
_AD_INPLACE = torch._C.DispatchKey.ADInplaceOrView


def register_cpu_inference(op_name: str, kernel: Callable[..., Tensor]) -> None:
    """A shorter road for the common case of `attnopt::<op_name>`: plain CPU tensors that need no
    gradient (a decode step under `generate`'s no_grad, inference). There the custom op's own
    layers (its autograd kernel, a redispatch, its CPU wrapper with a dynamo guard and an aliasing
    check) cost about as much as the attention itself at one query over a few hundred keys
    (bench/op_overhead.py); this AutogradCPU kernel calls `kernel` (the op's body) directly.

    Every other call takes the op's own kernels, unchanged: gradients needed (the registered
    autograd formula), or any dispatch key between autograd and the CPU kernel (fake tensors and
    tracing modes, functionalization) - the op's computed AutogradCPU kernel, read before this
    registration, runs them. Inside a compiled graph the op is one opaque call either way (its
    fake impl is what the compilers see)."""
    qualname = f"attnopt::{op_name}"
    original = torch._C._dispatch_get_computed_kernel_for_dispatch_key(qualname, "AutogradCPU")

    def autograd_cpu(keyset, *args):
        if ((keyset & _BELOW_AUTOGRAD).remove(_AD_INPLACE).highestPriorityTypeId() == _CPU_KEY
                and not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
            return kernel(*args)
        return original.call_boxed(keyset, *args)

    _FAST_LIB.impl(op_name, autograd_cpu, "AutogradCPU", with_keyset=True)


def register(op, name: str, forward: Callable[..., Tensor]) -> None:
    """Give the custom op `op` ("attention" or "gna_attention") its autograd formula; `forward` is
    its differentiable math (module header)."""
    _FORWARDS[name] = forward
    torch.library.register_autograd(op, _backward(name), setup_context=_setup_context(name))
