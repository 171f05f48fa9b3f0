"""Reading fx nodes whichever way the graph was captured (dynamo torch-level or torch.export
aten): an op's base name, its arguments by position or keyword, its example value, its module
scope, and the SDPA family's arguments. Shared by the fx front end and the fx emitter."""
from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx



# Nodes that only assert facts about tensors; they are not users in any meaningful sense.
ASSERT_OPS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range",
               "sym_constrain_range_for_size", "_assert_async", "_check_is_size", "_guards_fn"}


# ---- helpers -------------------------------------------------------------------------------

def base_name(node: fx.Node) -> str:
    """A format-neutral name for what an fx node computes."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op == "call_module":
        return "module:" + str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::", 1)[1]
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::", 1)[1]
    if isinstance(t, torch._ops.HigherOrderOperator):
        return "hop:" + t.__name__
    name = getattr(t, "__name__", str(t))
    if t is operator.truediv:
        return "div"
    if t is operator.invert:
        return "bitwise_not"
    if t is operator.neg:
        return "neg"
    return name


def overload_name(node: fx.Node) -> str:
    t = node.target
    return t._overloadname if isinstance(t, torch._ops.OpOverload) else ""


def meta_val(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _dim(d: Any) -> int | str:
    if isinstance(d, int):
        return d
    try:
        expr = d.node.expr
        if expr.is_number:
            return int(expr)
        return str(expr)
    except AttributeError:
        return str(d)


def shape_dtype(node: fx.Node) -> tuple[tuple | None, str | None]:
    v = meta_val(node)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
        v = v[0]
    if isinstance(v, torch.Tensor):
        return tuple(_dim(d) for d in v.shape), str(v.dtype).removeprefix("torch.")
    if isinstance(v, (int, float, bool)) or type(v).__name__ in ("SymInt", "SymFloat"):
        return (), type(v).__name__.lower().replace("sym", "")
    return None, None


def dtype_name(dt: Any) -> str | None:
    return str(dt).removeprefix("torch.") if isinstance(dt, torch.dtype) else None


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def module_scope(node: fx.Node) -> str:
    """Dotted path of the innermost nn.Module the node came from (best effort)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)       # dynamo: L['self'].encoder...
    path = re.sub(r"\[(\d+)\]", r".\1", path)             # layer[0] -> layer.0
    path = re.sub(r"\['([^']*)'\]", r".\1", path)         # ModuleDict['x'] -> .x
    path = path.replace("_modules.", "").replace("self.", "")
    return path.strip(".")



SDPA_NAMES = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math")


def is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and base_name(n) in SDPA_NAMES


def sdpa_args(n: fx.Node) -> tuple[Any, float, bool, Any]:
    """(mask, dropout_p, is_causal, scale) of an SDPA node, whichever variant's signature it has."""
    name = base_name(n)
    if name == "_scaled_dot_product_efficient_attention":
        mask = arg(n, 3, "attn_bias")
        dropout_p, is_causal = arg(n, 5, "dropout_p", 0.0), arg(n, 6, "is_causal", False)
        scale = n.kwargs.get("scale")
    elif name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        mask = n.kwargs.get("attn_mask")
        dropout_p, is_causal = arg(n, 3, "dropout_p", 0.0), arg(n, 4, "is_causal", False)
        scale = n.kwargs.get("scale")
    else:
        mask = arg(n, 3, "attn_mask")
        dropout_p, is_causal = arg(n, 4, "dropout_p", 0.0), arg(n, 5, "is_causal", False)
        scale = arg(n, 6, "scale")
    return mask, float(dropout_p or 0.0), is_causal, scale

