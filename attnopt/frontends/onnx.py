"""ONNX front end: any ONNX model (opset >= 13) -> `attnopt.ir.Graph`, plus an ORT evaluator.

Layouts named here: BHSD = [batch, heads, seq, head_dim] (standard `Attention` with 4-D Q);
BSD = [batch, seq, heads*head_dim] (3-D Q of the standard op and of the com.microsoft ops).

One IR node per ONNX value (ids are the value names, which ONNX makes unique); graph outputs
get an extra node "output:<name>". Layout ops keep only their data input, so a pattern can walk
through them without looking at shape tensors. Weights are never loaded for translation: big
initializers (> 4096 elements) carry value=None, and external data stays on disk until the
evaluator needs it.
"""
from __future__ import annotations

import ast
import collections
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from attnopt.errors import InputNotFound, UnreadableModel, UnsupportedModel
from attnopt.ir import Evaluator, Graph, Shape
from attnopt.ir.vocab import SMALL_CONST_ELEMENTS as MAX_CONST_ELEMENTS

MIN_OPSET = 13
PROBE_BATCH = 2
PROBE_DIM = 48
PROBE_SEED = 0
MAX_PROBE_SESSIONS = 4  # probe sessions kept (see OnnxEvaluator._sessions)

_DTYPES = {
    TensorProto.FLOAT: "float32", TensorProto.UINT8: "uint8", TensorProto.INT8: "int8",
    TensorProto.UINT16: "uint16", TensorProto.INT16: "int16", TensorProto.INT32: "int32",
    TensorProto.INT64: "int64", TensorProto.STRING: "string", TensorProto.BOOL: "bool",
    TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64", TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64", TensorProto.COMPLEX64: "complex64",
    TensorProto.COMPLEX128: "complex128", TensorProto.BFLOAT16: "bfloat16",
}
_BINARY = {"Mul": "mul", "Div": "div", "Add": "add", "Sub": "sub"}
_UNARY = {"Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Sqrt": "sqrt", "IsNaN": "isnan",
          "Not": "logical_not"}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
_MS = "com.microsoft"


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


def _domain(d: str) -> str:
    return "ai.onnx" if d in ("", "ai.onnx") else d


def _type_info(tp: onnx.TypeProto) -> tuple[Shape | None, str | None]:
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


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[a.name] = "<subgraph>"
            continue
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = ("<tensor>" if _numel(a.t.dims) > MAX_CONST_ELEMENTS
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


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _tensor_value(t: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    if _is_external(t):
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


def _loaded_tensor(t: onnx.TensorProto, base_dir: str | None) -> onnx.TensorProto:
    """An initializer with its external data read into memory (others returned as is)."""
    if not _is_external(t):
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


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t) if _numel(a.t.dims) <= MAX_CONST_ELEMENTS else None
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


def _constant_node_type(node: onnx.NodeProto) -> tuple[Shape | None, str | None]:
    for a in node.attribute:
        if a.name == "value":
            return tuple(int(d) for d in a.t.dims), dtype_name(a.t.data_type)
        if a.name == "sparse_value":
            return tuple(int(d) for d in a.sparse_tensor.dims), dtype_name(
                a.sparse_tensor.values.data_type)
    v = _constant_node_value(node)
    if v is None:
        return None, None
    return tuple(v.shape), ("string" if v.dtype == object else str(v.dtype))


def _subgraph_refs(node: onnx.NodeProto) -> list[str]:
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
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        walk(sg)
        for o in g.output:
            if o.name not in defined and o.name not in seen:
                seen.add(o.name)
                refs.append(o.name)

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            walk(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for sg in a.graphs:
                walk(sg)
    return refs


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPR = re.compile(r"^[A-Za-z0-9_ +\-*/%(),]+$")


def _simplify_dim_exprs(types: dict[str, tuple[Shape | None, str | None]]) -> None:
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


def _eval_dim(d: str, sizes: Mapping[str, int]) -> int | None:
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


# ---- loading -----------------------------------------------------------------------------

def _read_model(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise InputNotFound(f"no such file: {path}")
    if os.path.isdir(path):
        raise UnreadableModel(f"{path} is not a valid ONNX model: it is a directory")
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableModel(f"{path} is not a valid ONNX model: empty file")
        model = onnx.load(path, load_external_data=False)
    except UnreadableModel:
        raise
    except Exception as e:  # noqa: BLE001 - protobuf/onnx errors must not escape raw
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if "parsing" in reason.lower() or "decode" in reason.lower() or not reason:
            reason = "protobuf parse error (truncated or not an ONNX file)"
        raise UnreadableModel(f"{path} is not a valid ONNX model: {reason}") from None
    return model


def _check_structure(model: onnx.ModelProto, where: str) -> int:
    """Sanity checks that catch files protobuf happens to parse; returns the ai.onnx opset."""
    bad = f"{where} is not a valid ONNX model"
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise UnreadableModel(f"{bad}: no graph")
    if model.ir_version <= 0:
        raise UnreadableModel(f"{bad}: no ir_version")
    if not model.opset_import:
        raise UnreadableModel(f"{bad}: no opset_import")
    opset = None
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            opset = int(o.version)
    if opset is None:
        # A model made only of custom-domain ops; nothing to hold it to.
        opset = MIN_OPSET
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise UnsupportedModel(f"{where} uses ONNX opset {opset}; the installed onnx knows opsets up "
                               f"to {newest}")
    if opset < MIN_OPSET:
        raise UnsupportedModel(f"{where} uses ONNX opset {opset}; attnopt needs opset >= "
                               f"{MIN_OPSET} (convert it with onnx.version_converter)")
    return opset


MAX_INPUT_ELEMENTS = 1 << 28  # a graph input attnopt must build probe and validation data for


def _check_sizes(model: onnx.ModelProto, where: str) -> None:
    """Dimensions and initializer sizes a file can get wrong (0, negative, 1e12 elements): one line
    here instead of an allocation failure or a runtime error deep in validation."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims):
            raise UnreadableModel(f"{where} is not a valid ONNX model: input {vi.name!r} has a "
                                  f"negative dimension {min(dims)}")
        if any(d == 0 for d in dims):
            raise UnsupportedModel(f"{where}: input {vi.name!r} has a dimension of 0 (an empty "
                                   "tensor); attnopt needs inputs it can run the model on")
        if _numel(dims) > MAX_INPUT_ELEMENTS:
            raise UnsupportedModel(f"{where}: input {vi.name!r} declares {_numel(dims):.3g} elements, "
                                   f"more than attnopt can validate ({MAX_INPUT_ELEMENTS:.3g})")
    for t in _all_tensors(model):
        if any(d < 0 for d in t.dims):
            raise UnreadableModel(f"{where} is not a valid ONNX model: initializer {t.name!r} has "
                                  f"a negative dimension")
        if _is_external(t) or t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            continue  # external sizes are checked against the file; strings have no fixed size
        stored = _stored_elements(t)
        if stored is not None and stored != _numel(t.dims):
            raise UnreadableModel(f"{where} is not a valid ONNX model: initializer {t.name!r} "
                                  f"declares {_numel(t.dims):.3g} elements but stores {stored}")


_PACKED_TYPES = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                 if hasattr(TensorProto, n)}  # several elements a byte
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _stored_elements(t: onnx.TensorProto) -> int | None:
    """How many elements a non-external tensor actually holds (None: cannot tell cheaply)."""
    typed = next((len(getattr(t, f)) for f in _TYPED_FIELDS if len(getattr(t, f))), 0)
    if typed:
        return typed // 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else typed
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if t.data_type in _PACKED_TYPES or itemsize == 0:
        return None  # packed sub-byte types
    return len(t.raw_data) // itemsize


def _check_external_files(model: onnx.ModelProto, base_dir: str | None, where: str) -> None:
    if base_dir is None:
        return
    checked: dict[str, int] = {}
    for t in _all_tensors(model):
        if not _is_external(t):
            continue
        info = _external_info(t)
        loc = info.get("location", "")
        if os.path.isabs(loc) or ".." in Path(loc.replace("\\", "/")).parts:
            # a model file may name its weights, not any file on the user's disk (its bytes would
            # be copied into the optimized model)
            raise UnreadableModel(f"{where}: external data location {loc[:80]!r} of tensor "
                                  f"{t.name[:80]!r} is outside the model's folder")
        fpath = os.path.join(base_dir, loc)
        if fpath not in checked:
            if not loc or not os.path.isfile(fpath):
                raise UnreadableModel(f"{where}: external data file {loc!r} is missing "
                                      f"(looked in {base_dir})")
            checked[fpath] = os.path.getsize(fpath)
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > checked[fpath]:
            raise UnreadableModel(f"{where}: external data file {loc!r} is truncated "
                                  f"(tensor {t.name!r} needs {end} bytes, file has "
                                  f"{checked[fpath]})")


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    yield a.t


def _infer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Shape inference on a weight-free skeleton (big initializers become typed inputs)."""
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g = sk.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    input_names = set()
    for i in model.graph.input:
        g.input.append(i)
        input_names.add(i.name)
    for t in model.graph.initializer:
        if not _is_external(t) and _numel(t.dims) <= MAX_CONST_ELEMENTS:
            g.initializer.append(t)
        elif t.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for kw in ({"data_prop": True}, {}):
        try:
            return onnx.shape_inference.infer_shapes(sk, check_type=False, strict_mode=False, **kw)
        except Exception:  # noqa: BLE001 - inference is a best effort
            continue
    return None


def load_onnx(model: str | os.PathLike | onnx.ModelProto, *, base_dir: str | None = None) -> Graph:
    """Translate an ONNX model (a path or a ModelProto) into the neutral IR.

    base_dir: where external data lives for an in-memory ModelProto (for a path: its folder).
    """
    path: str | None = None
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = proto.graph.name or "model"
        name = proto.graph.name or "model"
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        proto = _read_model(path)
        where = path
        name = Path(path).stem
        base_dir = os.path.dirname(os.path.abspath(path))
    else:
        raise TypeError(f"load_onnx expects a path or onnx.ModelProto, got {type(model).__name__}")
    opset = _check_structure(proto, where)
    _check_sizes(proto, where)
    _check_external_files(proto, base_dir, where)
    return _Translator(proto, opset, base_dir, where).run(name, path)


def _gadd(graph: Graph, nid: str, op: str, inputs: Sequence[str], ref: Any,
          native_name: str, *, shape: Shape | None = None, dtype: str | None = None,
          value: np.ndarray | None = None, attrs: Mapping[str, Any] | None = None,
          **more: Any) -> str:
    """Graph.add with attrs given as a dict, plus attrs["native"] naming the native op."""
    a = dict(attrs or {})
    a.update(more)
    a["native"] = native_name
    return graph.add(nid, op, inputs, shape=shape, dtype=dtype, value=value, ref=ref, **a)


# ---- translation -------------------------------------------------------------------------

class _Translator:
    def __init__(self, model: onnx.ModelProto, opset: int, base_dir: str | None, where: str):
        self.model = model
        self.opset = opset
        self.base_dir = base_dir
        self.where = where
        self.types: dict[str, tuple[Shape | None, str | None]] = {}
        self.graph: Graph | None = None

    # shapes ------------------------------------------------------------------------------
    def _collect_types(self) -> None:
        inferred = _infer(self.model)
        src = inferred.graph if inferred is not None else self.model.graph
        for vi in list(src.value_info) + list(src.input) + list(src.output):
            shape, dt = _type_info(vi.type)
            old = self.types.get(vi.name)
            if old is None or (old[0] is None and shape is not None):
                self.types[vi.name] = (shape, dt)
        if inferred is not None:  # declared graph types beat inferred ones
            for vi in list(self.model.graph.input) + list(self.model.graph.output):
                shape, dt = _type_info(vi.type)
                if shape is not None or vi.name not in self.types:
                    self.types[vi.name] = (shape, dt or self.types.get(vi.name, (None, None))[1])
        for t in self.model.graph.initializer:
            self.types[t.name] = (tuple(int(d) for d in t.dims), dtype_name(t.data_type))
        _simplify_dim_exprs(self.types)

    def shape(self, name: str) -> Shape | None:
        return self.types.get(name, (None, None))[0]

    def dtype(self, name: str) -> str | None:
        return self.types.get(name, (None, None))[1]

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    # main --------------------------------------------------------------------------------
    def run(self, name: str, path: str | None) -> Graph:
        self._collect_types()
        graph = Graph(name=name, source="onnx")
        self.graph = graph
        gp = self.model.graph
        inits = {t.name: t for t in gp.initializer}
        for t in gp.initializer:
            n = _numel(t.dims)
            value = None
            if n <= MAX_CONST_ELEMENTS:
                try:
                    value = _tensor_value(t, self.base_dir)
                except OnnxEvaluationError:
                    value = None
                except Exception as e:  # noqa: BLE001
                    raise UnreadableModel(f"{self.where}: cannot read initializer {t.name!r}: "
                                          f"{str(e).splitlines()[0][:120] if str(e) else e!r}"
                                          ) from None
            _gadd(graph, t.name, "const", (), None, "initializer",
                  shape=tuple(int(d) for d in t.dims), dtype=dtype_name(t.data_type),
                  value=value, initializer=True, external=_is_external(t))
        for vi in gp.input:
            if vi.name in inits or vi.name in graph:
                continue
            shape, dt = self.shape(vi.name), self.dtype(vi.name)
            _gadd(graph, vi.name, "input", (), None, "graph_input", shape=shape, dtype=dt,
                  role="user")

        local_funcs = {(_domain(f.domain), f.name) for f in self.model.functions}
        for node in self._topo_nodes():
            self._node(node, local_funcs)
        for vi in gp.output:
            if f"output:{vi.name}" in graph:
                continue  # the same value listed twice as an output
            if vi.name not in graph:
                raise UnreadableModel(f"{self.where} is not a valid ONNX model: graph output "
                                      f"{vi.name!r} is never produced")
            _gadd(graph, f"output:{vi.name}", "output", [vi.name], None, "graph_output",
                  shape=self.shape(vi.name), dtype=self.dtype(vi.name))
        if graph.control_flow_nodes:
            graph.notes.append("attention inside control flow (If/Loop/Scan bodies) is not "
                               "inspected: " + ", ".join(graph.control_flow_nodes[:5]))
        if graph.function_calls:
            graph.notes.append("calls of model-local functions are not inspected: "
                               + ", ".join(graph.function_calls[:5]))
        graph.native_model = self.model
        graph.native_path = path
        graph.base_dir = self.base_dir
        graph.opset = self.opset
        graph.evaluator = OnnxEvaluator(graph, self.model, self.base_dir, self.types)
        return graph

    def _topo_nodes(self) -> list[onnx.NodeProto]:
        nodes = list(self.model.graph.node)
        known = {t.name for t in self.model.graph.initializer} | {
            i.name for i in self.model.graph.input}
        ok = True
        avail = set(known)
        for n in nodes:
            if any(x and x not in avail for x in n.input):
                ok = False
                break
            avail.update(o for o in n.output if o)
        if ok:
            return nodes
        # Not sorted (allowed by some producers): Kahn's algorithm.
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        indeg = [0] * len(nodes)
        users: dict[int, list[int]] = {}
        for i, n in enumerate(nodes):
            deps = {producer[x] for x in n.input if x and x not in known and x in producer}
            missing = [x for x in n.input if x and x not in known and x not in producer]
            if missing:
                raise UnreadableModel(f"{self.where} is not a valid ONNX model: node "
                                      f"{n.name or n.op_type!r} uses undefined value "
                                      f"{missing[0]!r}")
            indeg[i] = len(deps)
            for d in deps:
                users.setdefault(d, []).append(i)
        ready = [i for i in range(len(nodes)) if indeg[i] == 0]
        order: list[int] = []
        while ready:
            i = ready.pop(0)
            order.append(i)
            for u in users.get(i, ()):
                indeg[u] -= 1
                if indeg[u] == 0:
                    ready.append(u)
        if len(order) != len(nodes):
            raise UnreadableModel(f"{self.where} is not a valid ONNX model: the graph has a cycle")
        return [nodes[i] for i in order]

    # one node ----------------------------------------------------------------------------
    def _add(self, nid: str, op: str, inputs: Sequence[str], node: onnx.NodeProto,
             **attrs: Any) -> None:
        g = self.graph
        assert g is not None
        if nid in g:
            raise UnreadableModel(f"{self.where} is not a valid ONNX model: value {nid!r} is "
                                  "defined twice")
        missing = [x for x in inputs if x not in g]
        if missing:
            raise UnreadableModel(f"{self.where} is not a valid ONNX model: node "
                                  f"{node.name or node.op_type!r} uses undefined value "
                                  f"{missing[0]!r}")
        value = attrs.pop("value", None)
        attrs.setdefault("scope", node_scope(node))
        _gadd(g, nid, op, inputs, node, f"{_domain(node.domain)}::{node.op_type}",
              shape=self.shape(nid), dtype=self.dtype(nid), value=value, attrs=attrs)

    def _const_value(self, name: str) -> np.ndarray | None:
        g = self.graph
        if name and name in g and g.op(name) == "const":
            return g.value(name)
        return None

    def _node(self, node: onnx.NodeProto, local_funcs: set) -> None:
        dom, t = _domain(node.domain), node.op_type
        ins = [x for x in node.input if x]
        outs = list(node.output)
        first = outs[0] if outs else ""
        nattrs = _attrs(node)
        if dom == "ai.onnx" and t == "Constant":
            if first:
                v = _constant_node_value(node)
                shape, dt = _constant_node_type(node)
                self.types.setdefault(first, (shape, dt))
                self._add(first, "const", [], node, value=v)
                self.graph.g.nodes[first]["shape"] = shape if shape is not None else self.shape(first)
                self.graph.g.nodes[first]["dtype"] = dt or self.dtype(first)
            return
        if dom == "ai.onnx" and t in _CONTROL_FLOW or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute):
            implicit = [x for x in _subgraph_refs(node) if x in self.graph and x not in ins]
            for i, o in enumerate(outs):
                if o:
                    self._add(o, "other", ins + implicit, node, output_index=i,
                              native_attrs=nattrs, implicit_inputs=tuple(implicit))
            self.graph.control_flow_nodes.append(first or node.name)
            return
        if (dom, t) in local_funcs:
            self.graph.function_calls.append(first or node.name)
        op, inputs, extra = self._map(node, dom, t, ins, nattrs)
        sdpa = op == "sdpa"
        for i, o in enumerate(outs):
            if not o:
                continue
            if i == 0:
                self._add(o, op, inputs, node, **extra)
            elif sdpa and first:
                self._add(o, "other", [first], node, output_index=i, native_attrs=nattrs)
            elif t == "Dropout" and op == "identity":
                self._add(o, "other", ins[:1], node, output_index=i, native_attrs=nattrs)
            else:
                self._add(o, "other", ins, node, output_index=i, native_attrs=nattrs)

    def _map(self, node: onnx.NodeProto, dom: str, t: str, ins: list[str],
             a: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
        x0 = node.input[0] if node.input else ""
        if dom == "ai.onnx":
            if t == "MatMul":
                return "matmul", ins, {}
            if t == "Shape":
                return "shape", [x0], {"native_attrs": a}
            if t == "Einsum":
                return "einsum", ins, {"equation": a.get("equation", "")}
            if t == "Transpose":
                perm = a.get("perm")
                if perm is None:
                    r = self.rank(x0)
                    perm = None if r is None else tuple(reversed(range(r)))
                else:
                    perm = tuple(int(p) for p in perm)
                return "transpose", [x0], {"perm": perm}
            if t in _RESHAPES:
                return "reshape", [x0], {}
            if t == "Expand":
                return "expand", [x0], {}
            if t == "Identity":
                return "identity", [x0], {}
            if t == "Dropout":
                tm = node.input[2] if len(node.input) > 2 else ""
                if not tm:
                    return "identity", [x0], {}
                v = self._const_value(tm)
                if v is not None and not bool(np.asarray(v).reshape(-1)[0]):
                    return "identity", [x0], {}
                return "other", ins, {"native_attrs": a}
            if t == "Slice":
                if self._slice_is_identity(node):
                    return "identity", [x0], {}
                return "other", ins, {"native_attrs": a}
            if t in _BINARY:
                return _BINARY[t], ins, {}
            if t == "Where":
                return "where", ins, {}
            if t == "Softmax":
                return self._softmax(node, a, ins)
            if t in _UNARY:
                return _UNARY[t], ins, {}
            if t == "Cast":
                return "cast", [x0], {"to": dtype_name(int(a.get("to", 0)))}
            if t == "CastLike":
                tgt = node.input[1] if len(node.input) > 1 else ""
                return "cast", [x0], {"to": self.dtype(tgt)}
            if t == "Attention" and self.opset >= 23:
                return self._onnx_attention(node, a, ins)
        elif dom == _MS:
            if t == "MultiHeadAttention":
                return self._ms_mha(node, a, ins)
            if t == "Attention":
                return self._ms_attention(node, a, ins)
            if t == "GroupQueryAttention":
                return self._ms_gqa(node, a, ins)
        return "other", ins, {"native_attrs": a}

    def _slice_is_identity(self, node: onnx.NodeProto) -> bool:
        x0 = node.input[0]
        si, so = self.shape(x0), self.shape(node.output[0])
        if (si is not None and so is not None and si == so
                and all(isinstance(d, int) for d in si)):
            return True
        # Constant full-range slices on symbolic dims: start 0, end >= INT32 max, step 1.
        inp = list(node.input) + [""] * (5 - len(node.input))
        starts, ends = self._const_value(inp[1]), self._const_value(inp[2])
        steps = self._const_value(inp[4]) if inp[4] else None
        if starts is None or ends is None or (inp[4] and steps is None):
            return False
        starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
        steps = np.ones_like(starts) if steps is None else np.asarray(steps).reshape(-1)
        return bool(np.all(starts == 0) and np.all(ends >= 2**31 - 1) and np.all(steps == 1))

    def _softmax(self, node, a, ins):
        x0 = node.input[0]
        r = self.rank(x0)
        if r is None:
            r = self.rank(node.output[0])
        if self.opset < 13:
            axis = int(a.get("axis", 1))
            if r is not None and axis < 0:
                axis += r
            if r is not None and axis == r - 1:
                return "softmax", ins, {"axis": axis}
            return "other", ins, {"native_attrs": a}
        axis = int(a.get("axis", -1))
        if r is not None and axis < 0:
            axis += r
        return "softmax", ins, {"axis": axis}

    def _slots(self, node: onnx.NodeProto, names: Sequence[str]) -> dict[str, str | None]:
        slots: dict[str, str | None] = {}
        for i, n in enumerate(names):
            v = node.input[i] if i < len(node.input) else ""
            slots[n] = v or None
        return slots

    @staticmethod
    def _opt_float(v: Any, zero_is_none: bool = True) -> float | None:
        if v is None:
            return None
        v = float(v)
        return None if (zero_is_none and v == 0.0) else v

    def _onnx_attention(self, node, a, ins):
        slots = self._slots(node, ["q", "k", "v", "mask", "past_key", "past_value",
                                   "nonpad_kv_seqlen"])
        qr = self.rank(slots["q"])
        layout = "BHSD" if qr == 4 else "BSD" if qr == 3 else None
        nh = a.get("q_num_heads")
        nkv = a.get("kv_num_heads")
        if layout == "BHSD":
            if nh is None:
                nh = self.shape(slots["q"])[1]
            if nkv is None and slots["k"] and self.rank(slots["k"]) == 4:
                nkv = self.shape(slots["k"])[1]
        if nkv is None:
            nkv = nh
        scale = a.get("scale")
        return "sdpa", ins, {
            "flavor": "onnx_attention", "layout": layout, "num_heads": nh, "num_kv_heads": nkv,
            "is_causal": bool(a.get("is_causal", 0)),
            "scale": None if scale is None else float(scale),
            "softcap": self._opt_float(a.get("softcap")), "dropout_p": 0.0,
            "enable_gqa": (nh is not None and nkv is not None and nh != nkv),
            "qk_matmul_output_mode": int(a.get("qk_matmul_output_mode", 0)),
            "softmax_precision": a.get("softmax_precision"),
            "slots": slots, "mask_input": slots["mask"], "native_attrs": a,
        }

    def _ms_mha(self, node, a, ins):
        slots = self._slots(node, ["q", "k", "v", "bias", "key_padding_mask", "attention_bias",
                                   "past_key", "past_value", "past_sequence_length",
                                   "cache_indirection"])
        slots["mask"] = slots["key_padding_mask"]
        qr = self.rank(slots["q"])
        kr = self.rank(slots["k"]) if slots["k"] else None
        nh = a.get("num_heads")
        return "sdpa", ins, {
            "flavor": "ms_mha",
            "layout": {3: "BSD", 5: "packed_qkv"}.get(qr) if qr is not None else None,
            "kv_layout": {3: "BSD", 4: "BHSD", 5: "packed_kv"}.get(kr) if kr else None,
            "num_heads": nh, "num_kv_heads": nh,
            "is_causal": bool(a.get("unidirectional", 0)),
            "scale": self._opt_float(a.get("scale")), "softcap": None, "dropout_p": 0.0,
            "enable_gqa": False, "mask_filter_value": a.get("mask_filter_value"),
            "slots": slots, "mask_input": slots["mask"], "native_attrs": a,
        }

    def _ms_attention(self, node, a, ins):
        slots = self._slots(node, ["input", "weights", "bias", "mask_index", "past",
                                   "attention_bias", "past_sequence_length"])
        # Q, K and V are all projections of the one hidden-states input by packed weights.
        slots.update({"q": slots["input"], "k": slots["input"], "v": slots["input"],
                      "mask": slots["mask_index"]})
        nh = a.get("num_heads")
        qkv = a.get("qkv_hidden_sizes")
        return "sdpa", ins, {
            "flavor": "ms_attention", "layout": "BSD", "num_heads": nh, "num_kv_heads": nh,
            "is_causal": bool(a.get("unidirectional", 0)),
            "scale": self._opt_float(a.get("scale")), "softcap": None, "dropout_p": 0.0,
            "enable_gqa": False,
            "qkv_hidden_sizes": None if qkv is None else tuple(int(x) for x in qkv),
            "mask_filter_value": a.get("mask_filter_value"),
            "slots": slots, "mask_input": slots["mask"], "native_attrs": a,
        }

    def _ms_gqa(self, node, a, ins):
        slots = self._slots(node, ["q", "k", "v", "past_key", "past_value", "seqlens_k",
                                   "total_sequence_length", "cos_cache", "sin_cache",
                                   "position_ids", "attention_bias", "head_sink"])
        slots["mask"] = slots["attention_bias"]
        nh, nkv = a.get("num_heads"), a.get("kv_num_heads")
        lw = a.get("local_window_size", -1)
        return "sdpa", ins, {
            "flavor": "ms_gqa", "layout": "BSD" if slots["k"] else "packed_qkv",
            "num_heads": nh, "num_kv_heads": nkv,
            "is_causal": True,  # GroupQueryAttention is always causal (bottom-right)
            "scale": self._opt_float(a.get("scale")), "softcap": self._opt_float(a.get("softcap")),
            "local_window_size": None if lw is None or int(lw) < 0 else int(lw),
            "dropout_p": 0.0, "enable_gqa": nh != nkv,
            "slots": slots, "mask_input": slots["mask"], "native_attrs": a,
        }


# ---- evaluation --------------------------------------------------------------------------

def _probe_dim(d: int | str, sizes: dict[str, int]) -> int:
    if isinstance(d, int):
        return d
    if d == "?":
        return PROBE_DIM
    if d not in sizes:
        sizes[d] = PROBE_BATCH if "batch" in d.lower() else PROBE_DIM
    return sizes[d]


class OnnxEvaluator(Evaluator):
    """Evaluates IR values with onnxruntime (CPU, one thread) on probe inputs.

    For a set of requested values it extracts the minimal subgraph (their ancestors, the graph
    inputs and initializers those read), with external data read from disk only for the
    initializers it needs, and caches one InferenceSession per requested set. Results on the
    default probes are cached per value.
    """

    def __init__(self, graph: Graph, model: onnx.ModelProto, base_dir: str | None,
                 types: Mapping[str, tuple[Shape | None, str | None]]):
        self.graph = graph
        self.model = model
        self.base_dir = base_dir
        self._types = types
        gp = model.graph
        self._nodes = list(gp.node)
        self._producer: dict[str, int] = {}
        self._reads: list[list[str]] = []
        for i, n in enumerate(self._nodes):
            for o in n.output:
                if o:
                    self._producer[o] = i
            reads = [x for x in n.input if x]
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in n.attribute):
                reads += [x for x in _subgraph_refs(n) if x not in reads]
            self._reads.append(reads)
        self._inits = {t.name: t for t in gp.initializer}
        self._input_vi = {vi.name: vi for vi in gp.input if vi.name not in self._inits}
        # Probe sessions, least recently used first. Each holds the weights of the subgraph it
        # runs (up to the whole model) and ORT's buffers: a BERT-base at seq 2048 grew by ~1 GB
        # per cached session and was killed for memory after 24 of them; a few suffice.
        self._sessions: collections.OrderedDict[frozenset, Any] = collections.OrderedDict()
        self._cache: dict[str, np.ndarray] = {}
        self._probe_sizes: dict[str, int] = {}
        self._default_feeds: dict[str, np.ndarray] | None = None
        self._shape_cache: dict[str, tuple[int, ...]] = {}
        self._bulk_tried = False

    # probes ------------------------------------------------------------------------------
    def probe_sizes(self) -> dict[str, int]:
        """The concrete size given to each symbolic input dim on the default probes."""
        self.default_feeds()
        return dict(self._probe_sizes)

    def default_feeds(self) -> dict[str, np.ndarray]:
        if self._default_feeds is None:
            rng = np.random.default_rng(PROBE_SEED)
            feeds: dict[str, np.ndarray] = {}
            for name in self.graph.inputs:
                shape, dt = self._types.get(name, (None, None))
                if shape is None:
                    continue  # unknown rank: only usable with an explicit feed
                conc = tuple(_probe_dim(d, self._probe_sizes) for d in shape)
                dt = dt or "float32"
                if dt in ("float32", "float16", "float64", "bfloat16"):
                    arr = rng.standard_normal(conc).astype(np.float32)
                    if dt == "bfloat16":
                        import ml_dtypes  # onnx depends on it

                        arr = arr.astype(ml_dtypes.bfloat16)
                    else:
                        arr = arr.astype(dt)
                elif dt == "bool":
                    arr = np.full(conc, "mask" in name.lower(), dtype=bool)
                elif dt == "string":
                    arr = np.full(conc, "", dtype=object)
                else:
                    fill = 1 if "mask" in name.lower() else 0
                    arr = np.full(conc, fill, dtype=np.dtype(dt))
                feeds[name] = arr
            self._default_feeds = feeds
        return self._default_feeds

    def _resolve(self, nid: str) -> str:
        if nid in self.graph and self.graph.op(nid) == "output":
            return self.graph.inputs_of(nid)[0]
        if nid not in self.graph:
            raise KeyError(f"unknown IR node {nid!r}")
        return nid

    def probe_shape(self, nid: str) -> tuple[int, ...] | None:
        name = self._resolve(nid)
        if name in self._shape_cache:
            return self._shape_cache[name]
        self.default_feeds()
        out = self._static_probe_shape(name)
        if out is None and not self._bulk_tried:
            self._bulk_probe_shapes()
            out = self._shape_cache.get(name)
        if out is None:
            out = tuple(np.shape(self.evaluate([name])[name]))
        self._shape_cache[name] = out
        return out

    def _bulk_probe_shapes(self) -> None:
        """The probe shape of every node output the IR cannot size statically, from one run of
        the whole graph that returns only Shape(value) for each. One probe per value costs a
        session (its subgraph's weights serialized) and a run of the model prefix: 12 BERT-base
        sites x 2 values took 54 of 64 s of `optimize` on a TorchScript export at 512 tokens.
        If the whole graph will not run on the probes (a part unrelated to attention may need
        real data), the per-value probes serve as before."""
        self._bulk_tried = True
        names = [v for v in self._producer
                 if v not in self._shape_cache and v not in self._inits and self._static_probe_shape(v) is None]
        if not names:
            return
        try:
            sess, inputs = self._session(names, shapes=True)
            feeds = self.default_feeds()
            outs = sess.run(None, {n: feeds[n] for n in inputs})
        except Exception:  # noqa: BLE001  (OnnxEvaluationError, ORT errors): per-value probes
            return
        for name, shape in zip(names, outs):
            self._shape_cache[name] = tuple(int(d) for d in np.asarray(shape).reshape(-1))

    def _static_probe_shape(self, name: str) -> tuple[int, ...] | None:
        self.default_feeds()
        s = self.graph.shape(name)
        if s is None:
            return None
        out = []
        for d in s:
            v = d if isinstance(d, int) else _eval_dim(d, self._probe_sizes)
            if v is None:
                return None
            out.append(v)
        return tuple(out)

    def probe_shapes(self, nids: Sequence[str]) -> dict[str, tuple[int, ...] | None]:
        """probe_shape for many nodes with one evaluation for those that need it."""
        def missing():
            return [name for name in dict.fromkeys(self._resolve(n) for n in nids)
                    if name not in self._shape_cache and self._static_probe_shape(name) is None]

        need = missing()
        if need and not self._bulk_tried:
            self._bulk_probe_shapes()
            need = missing()
        if need:
            vals = self.evaluate(need)
            for name in need:
                self._shape_cache[name] = tuple(np.shape(vals[name]))
        return {n: self.probe_shape(n) for n in nids}

    # evaluation --------------------------------------------------------------------------
    def evaluate(self, nids: Sequence[str], feeds: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
        defaults = self.default_feeds()
        feeds = dict(feeds or {})
        for k in feeds:
            if k not in self._input_vi:
                raise KeyError(f"feed {k!r} is not a graph input (inputs: "
                               f"{', '.join(self._input_vi)})")
        use_cache = not feeds
        all_feeds = {**defaults, **{k: np.asarray(v) for k, v in feeds.items()}}
        result: dict[str, np.ndarray] = {}
        todo: list[str] = []
        names = {nid: self._resolve(nid) for nid in nids}
        for name in dict.fromkeys(names.values()):
            if name in self._input_vi:
                if name not in all_feeds:
                    raise OnnxEvaluationError(f"input {name!r} has unknown rank; pass a feed")
                result[name] = all_feeds[name]
            elif name in self._inits:
                v = self.graph.value(name)
                if v is None:
                    if name not in self._cache:
                        self._cache[name] = _tensor_value(self._inits[name], self.base_dir)
                    v = self._cache[name]
                result[name] = v
            elif use_cache and name in self._cache:
                result[name] = self._cache[name]
            else:
                todo.append(name)
        if todo:
            result.update(self._run(todo, all_feeds))
            if use_cache:
                for n in todo:
                    self._cache[n] = result[n]
        return {nid: result[name] for nid, name in names.items()}

    def _session(self, names: Sequence[str], shapes: bool = False):
        """(session, its graph inputs) computing `names` (with `shapes`: their Shape instead,
        outputs in the order of `names`; such a session is not kept)."""
        key = frozenset(names)
        if not shapes and key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        import onnxruntime as ort

        need_nodes: set[int] = set()
        need_vals: set[str] = set()
        stack = list(names)
        seen: set[str] = set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            i = self._producer.get(v)
            if i is None:
                need_vals.add(v)
                continue
            if i in need_nodes:
                continue
            need_nodes.add(i)
            stack.extend(self._reads[i])
        m = onnx.ModelProto()
        m.ir_version = self.model.ir_version
        m.opset_import.extend(self.model.opset_import)
        m.functions.extend(self.model.functions)
        g = m.graph
        g.name = "attnopt_probe"
        # Shape probes listed right after their value's producer (see execution_order below).
        shape_of = {n: f"attnopt_probe_shape_{k}" for k, n in enumerate(names)} if shapes else {}
        for i in sorted(need_nodes, key=self._order_key):
            g.node.append(self._nodes[i])
            g.node.extend(onnx.helper.make_node("Shape", [o], [shape_of[o]])
                          for o in self._nodes[i].output if o in shape_of)
        inputs = [n for n in self._input_vi if n in need_vals]
        g.input.extend(self._input_vi[n] for n in inputs)
        # External data stays on disk: ORT reads it from the model's folder itself, which
        # avoids serializing weights into the probe model.
        for n in sorted(need_vals):
            if n in self._inits:
                t = self._inits[n]
                g.initializer.append(t if self.base_dir is not None else
                                     _loaded_tensor(t, self.base_dir))
        for n in names:
            vi = onnx.ValueInfoProto()
            vi.name = shape_of.get(n, n)
            g.output.append(vi)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.enable_cpu_mem_arena = False  # give score-sized buffers back after each probe
        if shapes:
            # ORT's default order ran the Shape probes late and kept every probed intermediate
            # alive until then (14.7 GB for BERT-base at 2048 tokens); priority order runs each
            # right after its producer (3.1 GB, as a plain run of the model: 2.6 GB).
            so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        if self.base_dir is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        self.base_dir)
        while not shapes and len(self._sessions) >= MAX_PROBE_SESSIONS:
            self._sessions.popitem(last=False)
        try:
            sess = ort.InferenceSession(m.SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise OnnxEvaluationError(f"onnxruntime rejected the probe subgraph for "
                                      f"{list(names)[:4]}: {str(e).splitlines()[0][:300]}") from None
        entry = (sess, inputs)
        if not shapes:
            self._sessions[key] = entry
        return entry

    def _order_key(self, i: int) -> int:
        return self._topo_pos().get(i, i)

    def _topo_pos(self) -> dict[int, int]:
        # Nodes in the IR's (topological) order, which may differ from file order.
        if not hasattr(self, "_pos"):
            pos: dict[int, int] = {}
            k = 0
            for nid in self.graph.nodes():
                i = self._producer.get(nid)
                if i is not None and i not in pos:
                    pos[i] = k
                    k += 1
            self._pos = pos
        return self._pos

    def _run(self, names: list[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess, inputs = self._session(names)
        try:
            outs = sess.run(names, {n: feeds[n] for n in inputs})
        except Exception as e:  # noqa: BLE001
            raise OnnxEvaluationError(f"onnxruntime failed evaluating {names[:4]}: "
                                      f"{str(e).splitlines()[0][:300]}") from None
        return dict(zip(names, outs))


__all__ = ["load_onnx", "OnnxEvaluator", "OnnxEvaluationError", "dtype_name"]
