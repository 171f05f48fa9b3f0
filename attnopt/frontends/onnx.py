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

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from attnopt.errors import UnreadableModel
from attnopt.ir import Graph, Shape
from attnopt.ir.vocab import SMALL_CONST_ELEMENTS as MAX_CONST_ELEMENTS
from attnopt.frontends.onnx_checks import (check_external_files, check_sizes,
                                           check_structure, infer_shapes, read_model)
from attnopt.frontends.onnx_eval import OnnxEvaluator
from attnopt.frontends.onnx_proto import (OnnxEvaluationError, constant_node_type, constant_node_value,
                                          domain, dtype_name, is_external, node_attrs, node_scope, numel,
                                          simplify_dim_exprs, subgraph_refs, tensor_value, type_info)

_BINARY = {"Mul": "mul", "Div": "div", "Add": "add", "Sub": "sub"}
_UNARY = {"Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Sqrt": "sqrt", "IsNaN": "isnan",
          "Not": "logical_not"}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
_NOT_TENSORS = ("Sequence", "SplitToSequence", "Optional")  # ops that may output no tensor
_MS = "com.microsoft"


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
        proto = read_model(path)
        where = path
        name = Path(path).stem
        base_dir = os.path.dirname(os.path.abspath(path))
    else:
        raise TypeError(f"load_onnx expects a path or onnx.ModelProto, got {type(model).__name__}")
    opset = check_structure(proto, where)
    check_sizes(proto, where)
    check_external_files(proto, base_dir, where)
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


def _lost_dim(d: int | str) -> bool:
    """A dim shape inference could not name ('?', or its own 'unk__N': equal to nothing)."""
    return isinstance(d, str) and (d == "?" or d.startswith("unk__"))


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
        inferred = infer_shapes(self.model)
        src = inferred.graph if inferred is not None else self.model.graph
        for vi in list(src.value_info) + list(src.input) + list(src.output):
            shape, dt = type_info(vi.type)
            old = self.types.get(vi.name)
            if old is None or (old[0] is None and shape is not None):
                self.types[vi.name] = (shape, dt)
        if inferred is not None:  # declared graph types beat inferred ones
            for vi in list(self.model.graph.input) + list(self.model.graph.output):
                shape, dt = type_info(vi.type)
                if shape is not None or vi.name not in self.types:
                    self.types[vi.name] = (shape, dt or self.types.get(vi.name, (None, None))[1])
        for t in self.model.graph.initializer:
            self.types[t.name] = (tuple(int(d) for d in t.dims), dtype_name(t.data_type))
        simplify_dim_exprs(self.types)

    def shape(self, name: str) -> Shape | None:
        return self.types.get(name, (None, None))[0]

    def dtype(self, name: str) -> str | None:
        return self.types.get(name, (None, None))[1]

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def _lost_shapes(self) -> list[str]:
        """Values (not integer ones: those are shape arithmetic) whose rank or some of whose
        dims shape inference lost; symbols the graph's inputs declare are not lost."""
        lost = []
        for node in self.model.graph.node:
            if (node.op_type in _CONTROL_FLOW or node.op_type.startswith(_NOT_TENSORS)
                    or domain(node.domain) not in ("ai.onnx", _MS)):
                continue  # may be sequences, or ops ORT does not know
            for o in node.output:
                shape, dt = self.types.get(o, (None, None))
                if not o or (dt is not None and not dt.startswith(("float", "bfloat", "bool"))):
                    continue
                if shape is None or any(_lost_dim(d) for d in shape):
                    lost.append(o)
        return lost

    # main --------------------------------------------------------------------------------
    def run(self, name: str, path: str | None) -> Graph:
        self._collect_types()
        graph = self._build(name, path)
        lost = self._lost_shapes()
        if not lost:
            return graph
        # Shapes ONNX inference lost, read off probe runs (onnx_eval.recover_shapes). Then the
        # graph is translated again: rank-dependent readings (a Transpose's default perm, a
        # Softmax axis, layouts) are made once every rank is known.
        found = graph.evaluator.recover_shapes(lost)
        if not found:
            return graph
        for n, shape in found.items():
            old = self.shape(n)
            if old is not None and len(old) == len(shape):  # what inference knew stays
                shape = tuple(o if isinstance(o, int) or not _lost_dim(o) else d
                              for o, d in zip(old, shape))
            self.types[n] = (shape, self.dtype(n))
        probed = graph.evaluator.probed_shapes()
        graph = self._build(name, path)
        graph.evaluator.seed_shapes(probed)
        return graph

    def _build(self, name: str, path: str | None) -> Graph:
        graph = Graph(name=name, source="onnx")
        self.graph = graph
        gp = self.model.graph
        inits = {t.name: t for t in gp.initializer}
        for t in gp.initializer:
            n = numel(t.dims)
            value = None
            if n <= MAX_CONST_ELEMENTS:
                try:
                    value = tensor_value(t, self.base_dir)
                except OnnxEvaluationError:
                    value = None
                except Exception as e:  # noqa: BLE001
                    raise UnreadableModel(f"{self.where}: cannot read initializer {t.name!r}: "
                                          f"{str(e).splitlines()[0][:120] if str(e) else e!r}"
                                          ) from None
            _gadd(graph, t.name, "const", (), None, "initializer",
                  shape=tuple(int(d) for d in t.dims), dtype=dtype_name(t.data_type),
                  value=value, initializer=True, external=is_external(t))
        for vi in gp.input:
            if vi.name in inits or vi.name in graph:
                continue
            shape, dt = self.shape(vi.name), self.dtype(vi.name)
            _gadd(graph, vi.name, "input", (), None, "graph_input", shape=shape, dtype=dt,
                  role="user")

        local_funcs = {(domain(f.domain), f.name) for f in self.model.functions}
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
        _gadd(g, nid, op, inputs, node, f"{domain(node.domain)}::{node.op_type}",
              shape=self.shape(nid), dtype=self.dtype(nid), value=value, attrs=attrs)

    def _const_value(self, name: str) -> np.ndarray | None:
        g = self.graph
        if name and name in g and g.op(name) == "const":
            return g.value(name)
        return None

    def _node(self, node: onnx.NodeProto, local_funcs: set) -> None:
        dom, t = domain(node.domain), node.op_type
        ins = [x for x in node.input if x]
        outs = list(node.output)
        first = outs[0] if outs else ""
        nattrs = node_attrs(node)
        if dom == "ai.onnx" and t == "Constant":
            if first:
                v = constant_node_value(node)
                shape, dt = constant_node_type(node)
                self.types.setdefault(first, (shape, dt))
                self._add(first, "const", [], node, value=v)
                self.graph.g.nodes[first]["shape"] = shape if shape is not None else self.shape(first)
                self.graph.g.nodes[first]["dtype"] = dt or self.dtype(first)
            return
        if dom == "ai.onnx" and t in _CONTROL_FLOW or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute):
            implicit = [x for x in subgraph_refs(node) if x in self.graph and x not in ins]
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
            if t in ("Shape", "Size"):  # both depend on their input's shape only
                return "shape", [x0], {"native_attrs": a}
            if t == "Tile":  # tiles=True: repeats its input along axes (patterns/heads.repeat_factor)
                return "other", ins, {"native_attrs": a, "tiles": True}
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


__all__ = ["load_onnx", "OnnxEvaluator", "OnnxEvaluationError", "dtype_name"]
