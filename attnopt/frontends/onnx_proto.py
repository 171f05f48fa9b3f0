"""Reading pieces of an ONNX protobuf without loading weights: dtypes, attributes, tensor
values (external data read on demand), constant nodes, subgraph references, symbolic dims.

Layouts: none; these helpers see values, not attention.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from attnopt.ir import Shape
from attnopt.ir.vocab import SMALL_CONST_ELEMENTS as MAX_CONST_ELEMENTS

_DTYPES = {
    TensorProto.FLOAT: "float32", TensorProto.UINT8: "uint8", TensorProto.INT8: "int8",
    TensorProto.UINT16: "uint16", TensorProto.INT16: "int16", TensorProto.INT32: "int32",
    TensorProto.INT64: "int64", TensorProto.STRING: "string", TensorProto.BOOL: "bool",
    TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64", TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64", TensorProto.COMPLEX64: "complex64",
    TensorProto.COMPLEX128: "complex128", TensorProto.BFLOAT16: "bfloat16",
}


class OnnxEvaluationError(RuntimeError):
    """onnxruntime could not compute a requested value (a bug or an unsupported op)."""


def dtype_name(elem_type: int) -> str | None:
    if elem_type in _DTYPES:
        return _DTYPES[elem_type]
    if not elem_type:
        return None
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return None


def node_scope(node: onnx.NodeProto) -> str:
    """Dotted module path of the torch module a node was exported from (best effort).

    The dynamo exporter records `pkg.torch.onnx.name_scopes` (['', 'layers.0', 'softmax']);
    the TorchScript exporter names nodes by path (/encoder/layer.0/attention/self/Softmax).
    """
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:  # metadata is the file's text: parsed as a literal only, and only if it is one
                parts = ast.literal_eval(p.value) if len(p.value) < 10_000 else None
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                break
            if not isinstance(parts, (list, tuple)):
                break
            return ".".join(x for x in parts[:-1] if isinstance(x, str) and x)
    if node.name.startswith("/"):
        return ".".join(x for x in node.name.split("/")[1:-1] if x)
    return ""


def domain(d: str) -> str:
    return "ai.onnx" if d in ("", "ai.onnx") else d


def type_info(tp: onnx.TypeProto) -> tuple[Shape | None, str | None]:
    if not tp.HasField("tensor_type"):
        return None, None
    tt = tp.tensor_type
    dt = dtype_name(tt.elem_type)
    if not tt.HasField("shape"):
        return None, dt
    dims: list[int | str] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append("?")
    return tuple(dims), dt


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[a.name] = "<subgraph>"
            continue
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = ("<tensor>" if numel(a.t.dims) > MAX_CONST_ELEMENTS
                           else numpy_helper.to_array(a.t))
            continue
        try:
            v = onnx.helper.get_attribute_value(a)
        except Exception:  # noqa: BLE001 - unusual attribute kinds are not needed
            continue
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, list):
            v = tuple(x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v)
        out[a.name] = v
    return out


def numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def tensor_value(t: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    if is_external(t):
        if base_dir is None:
            raise OnnxEvaluationError(f"initializer {t.name!r} has external data but the model "
                                      "has no base directory")
        from onnx.external_data_helper import load_external_data_for_tensor

        c = TensorProto()
        c.CopyFrom(t)
        load_external_data_for_tensor(c, base_dir)
        c.data_location = TensorProto.DEFAULT
        del c.external_data[:]
        return numpy_helper.to_array(c)
    return numpy_helper.to_array(t)


def loaded_tensor(t: onnx.TensorProto, base_dir: str | None) -> onnx.TensorProto:
    """An initializer with its external data read into memory (others returned as is)."""
    if not is_external(t):
        return t
    from onnx.external_data_helper import load_external_data_for_tensor

    c = TensorProto()
    c.CopyFrom(t)
    if base_dir is None:
        raise OnnxEvaluationError(f"initializer {t.name!r} has external data but the model "
                                  "has no base directory")
    load_external_data_for_tensor(c, base_dir)
    c.data_location = TensorProto.DEFAULT
    del c.external_data[:]
    return c


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t) if numel(a.t.dims) <= MAX_CONST_ELEMENTS else None
        if a.name == "value_float":
            return np.asarray(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.asarray(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.asarray(list(a.ints), dtype=np.int64)
        if a.name == "value_string":
            return np.asarray(a.s.decode("utf-8", "replace"), dtype=object)
        if a.name == "value_strings":
            return np.asarray([s.decode("utf-8", "replace") for s in a.strings], dtype=object)
    return None


def constant_node_type(node: onnx.NodeProto) -> tuple[Shape | None, str | None]:
    for a in node.attribute:
        if a.name == "value":
            return tuple(int(d) for d in a.t.dims), dtype_name(a.t.data_type)
        if a.name == "sparse_value":
            return tuple(int(d) for d in a.sparse_tensor.dims), dtype_name(
                a.sparse_tensor.values.data_type)
    v = constant_node_value(node)
    if v is None:
        return None, None
    return tuple(v.shape), ("string" if v.dtype == object else str(v.dtype))


def subgraph_refs(node: onnx.NodeProto) -> list[str]:
    """Names a control-flow node's bodies read (over-approximates outer-scope captures)."""
    refs: list[str] = []
    seen: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            for x in n.input:
                if x and x not in defined and x not in seen:
                    seen.add(x)
                    refs.append(x)
            defined.update(o for o in n.output if o)
            for sg in _bodies(n):
                walk(sg)
        for o in g.output:
            if o.name not in defined and o.name not in seen:
                seen.add(o.name)
                refs.append(o.name)

    for sg in _bodies(node):
        walk(sg)
    return refs


def all_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """The nodes and, depth first, those of their bodies (If branches, Loop and Scan bodies)."""
    for n in nodes:
        yield n
        for sg in _bodies(n):
            yield from all_nodes(sg.node)


def _bodies(node: onnx.NodeProto):
    """The subgraphs a node's attributes hold (If branches, Loop and Scan bodies)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPR = re.compile(r"^[A-Za-z0-9_ +\-*/%(),]+$")


def simplify_dim_exprs(types: dict[str, tuple[Shape | None, str | None]]) -> None:
    """Rewrite exporter dim expressions such as '((batch*seq)//batch)' to 'seq' (or an int).

    The dynamo exporter writes symbolic sizes as sympy expressions; simplified, equal sizes
    compare equal as strings. Expressions that do not reduce to one symbol stay as written.
    """
    exprs = {d for shape, _ in types.values() if shape for d in shape
             if isinstance(d, str) and d != "?" and not _IDENT.match(d) and _EXPR.match(d)}
    if not exprs:
        return
    try:
        import sympy
    except ImportError:  # pragma: no cover - sympy comes with torch
        return
    mapping: dict[str, int | str] = {}
    for e in exprs:
        try:
            names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", e)) - {"Min", "Max", "Mod"}
            syms = {n: sympy.Symbol(n, integer=True, positive=True) for n in names}
            syms.update(Min=sympy.Min, Max=sympy.Max, Mod=sympy.Mod)
            r = sympy.simplify(sympy.sympify(e, locals=syms))
            if r.is_Integer:
                mapping[e] = int(r)
            elif r.is_Symbol:
                mapping[e] = str(r)
        except Exception:  # noqa: BLE001 - unparsable: keep the string
            continue
    if not mapping:
        return
    for k, (shape, dt) in list(types.items()):
        if shape and any(isinstance(d, str) and d in mapping for d in shape):
            types[k] = (tuple(mapping.get(d, d) if isinstance(d, str) else d for d in shape), dt)


def eval_dim(d: str, sizes: Mapping[str, int]) -> int | None:
    """Value of a dim expression on the probe sizes (None if it names an unknown symbol)."""
    if d in sizes:
        return sizes[d]
    if d == "?" or not _EXPR.match(d):
        return None
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}

    def ev(n: ast.AST) -> int:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name) and n.id in sizes:
            return sizes[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            return ev(n.left) // ev(n.right)
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                and n.func.id in ("Min", "Max", "min", "max") and not n.keywords):
            f = min if n.func.id.lower() == "min" else max
            return f(ev(a) for a in n.args)
        raise ValueError(d)

    try:
        return int(ev(ast.parse(d, mode="eval")))
    except Exception:  # noqa: BLE001
        return None

