"""Reading fx nodes whichever way the graph was captured (dynamo torch-level or torch.export
aten): an op's base name, its arguments by position or keyword, its example value, its module
scope, and the SDPA family's arguments. Shared by the fx front end and the fx emitter."""
from __future__ import annotations

import inspect
import operator
import re
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import _torchscript_schema_to_signature, get_signature_for_torch_op



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


def _signatures_of(target: Any, method: bool) -> tuple[inspect.Signature, ...]:
    """Every signature an op may have been called with, in the order overloads are tried."""
    if isinstance(target, torch._ops.OpOverload):
        return (_torchscript_schema_to_signature(target._schema),)
    packet = None
    if isinstance(target, torch._ops.OpOverloadPacket):
        packet = target
    elif not method:
        try:
            return (inspect.signature(target),)
        except (TypeError, ValueError):
            sigs = get_signature_for_torch_op(target)
            if sigs:
                return tuple(sigs)
    name = target if isinstance(target, str) else getattr(target, "__name__", None)
    if packet is None and isinstance(name, str):
        packet = getattr(torch.ops.aten, name, None)   # Tensor methods: aten's schema (self first)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return ()
    sigs = []
    for o in packet.overloads():
        try:
            sigs.append(_torchscript_schema_to_signature(getattr(packet, o)._schema))
        except Exception:  # noqa: BLE001 - a schema inspect cannot express: not bindable
            continue
    return tuple(sigs)


_SIG_CACHE: dict[Any, tuple[inspect.Signature, ...]] = {}


def _signatures(node: fx.Node) -> tuple[inspect.Signature, ...]:
    if node.op not in ("call_function", "call_method"):
        return ()
    key = (node.op, node.target)
    try:
        return _SIG_CACHE[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable target
        return _signatures_of(node.target, node.op == "call_method")
    try:
        sigs = _signatures_of(node.target, node.op == "call_method")
    except Exception:  # noqa: BLE001 - no signature: arguments are read as written
        sigs = ()
    _SIG_CACHE[key] = sigs
    return sigs


def bound_arguments(node: fx.Node) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    """The node's arguments bound to its op's signature, however they were spelled (positional,
    keyword or a mix): (parameter names in signature order, name -> value as passed; defaults
    not filled). None when no signature of the op accepts the call as written."""
    for sig in _signatures(node):
        try:
            b = sig.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        params = tuple(sig.parameters)
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
            return None   # *args (einsum, Tensor.permute(0, 2, 1, 3)): read as written
        return params, dict(b.arguments)
    return None


def arg(node: fx.Node, i: int | None, name: str, default: Any = None) -> Any:
    """Argument `name` of a node, or failing that its i-th parameter (i=None: by name only),
    whether it was passed by position or keyword: the one normalization every reader uses."""
    b = bound_arguments(node)
    if b is not None:
        params, values = b
        if name in values:
            return values[name]
        if i is not None and i < len(params) and params[i] in values:
            return values[params[i]]
        return default
    if i is not None and len(node.args) > i:
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
    """(mask, dropout_p, is_causal, scale) of an SDPA node, whichever variant's signature it has
    and however its arguments were spelled (the variants share these parameter names; the
    efficient/cuDNN kernels call the mask attn_bias)."""
    mask = arg(n, None, "attn_mask", arg(n, None, "attn_bias"))
    dropout_p, is_causal = arg(n, None, "dropout_p", 0.0), arg(n, None, "is_causal", False)
    return mask, float(dropout_p or 0.0), is_causal, arg(n, None, "scale")


def sdpa_qkv(n: fx.Node) -> tuple[Any, Any, Any]:
    return arg(n, 0, "query"), arg(n, 1, "key"), arg(n, 2, "value")


def dead_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Computations whose values reach no output and that change nothing: an exporter may keep
    them (F.multi_head_attention_forward's head-averaged weights that the caller drops), and
    counted as uses they would make attention weights look like they escape. Conservative: a
    call is pure only if fx calls it pure and it is not an in-place method (name ending in _)."""
    dead: set[fx.Node] = set()
    for n in reversed(graph.nodes):
        if n.op not in ("call_function", "call_method") or not all(u in dead for u in n.users):
            continue
        if base_name(n).endswith("_"):
            continue
        try:
            impure = n.is_impure()
        except Exception:  # noqa: BLE001 - unknown targets are kept
            impure = True
        if not impure:
            dead.add(n)
    return dead
