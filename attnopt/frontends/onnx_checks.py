"""Opening an ONNX file and checking it before anything is allocated: protobuf parse,
structure (graph, ir_version, opsets), sizes (dims of 0, negative or absurd; initializers that
declare more than they store), external data (inside the model's folder, present, long enough),
and best-effort shape inference on a weight-free skeleton."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto

from attnopt.errors import InputNotFound, UnreadableModel, UnsupportedModel
from attnopt.ir.vocab import SMALL_CONST_ELEMENTS as MAX_CONST_ELEMENTS
from attnopt.frontends.onnx_proto import external_info, is_external, numel

MIN_OPSET = 13

# ---- loading -----------------------------------------------------------------------------

def read_model(path: str) -> onnx.ModelProto:
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


def check_structure(model: onnx.ModelProto, where: str) -> int:
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


def check_sizes(model: onnx.ModelProto, where: str) -> None:
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
        if numel(dims) > MAX_INPUT_ELEMENTS:
            raise UnsupportedModel(f"{where}: input {vi.name!r} declares {numel(dims):.3g} elements, "
                                   f"more than attnopt can validate ({MAX_INPUT_ELEMENTS:.3g})")
    for t in _all_tensors(model):
        if any(d < 0 for d in t.dims):
            raise UnreadableModel(f"{where} is not a valid ONNX model: initializer {t.name!r} has "
                                  f"a negative dimension")
        if is_external(t) or t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            continue  # external sizes are checked against the file; strings have no fixed size
        stored = _stored_elements(t)
        if stored is not None and stored != numel(t.dims):
            raise UnreadableModel(f"{where} is not a valid ONNX model: initializer {t.name!r} "
                                  f"declares {numel(t.dims):.3g} elements but stores {stored}")


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


def check_external_files(model: onnx.ModelProto, base_dir: str | None, where: str) -> None:
    if base_dir is None:
        return
    checked: dict[str, int] = {}
    for t in _all_tensors(model):
        if not is_external(t):
            continue
        info = external_info(t)
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


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
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
        if not is_external(t) and numel(t.dims) <= MAX_CONST_ELEMENTS:
            g.initializer.append(t)
        elif t.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for kw in ({"data_prop": True}, {}):
        try:
            return onnx.shape_inference.infer_shapes(sk, check_type=False, strict_mode=False, **kw)
        except Exception:  # noqa: BLE001 - inference is a best effort
            continue
    return None

