"""Dump the neighbourhood of every attention anchor in every zoo model and flavour.

    PYTHONPATH=.:tests python tests/zoo/dump.py [OUT_DIR] [--hand]

Writes OUT_DIR/<model>__<flavour>.txt (default /tmp/zoo_dumps): around each softmax, sigmoid
and fused attention op, its producers 6 levels up and consumers 3 levels down, in graph order,
with op types, shapes and constant scalar values. For whoever writes detection patterns.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo import flavours as fl
from zoo import handwritten as hw
from zoo import hf

UP, DOWN = 6, 3
FX_ANCHORS = ("softmax", "sigmoid", "scaled_dot_product", "multi_head_attention", "_safe_softmax",
              "flex_attention")
ONNX_ANCHORS = {"Softmax", "Sigmoid", "Attention", "MultiHeadAttention", "GroupQueryAttention"}


class G:
    """A tiny uniform view: order, op, inputs (names or literal reprs), shape, value."""

    def __init__(self):
        self.order: list[str] = []
        self.op: dict[str, str] = {}
        self.ins: dict[str, list[str]] = {}
        self.shape: dict[str, Any] = {}
        self.val: dict[str, str] = {}
        self.users: dict[str, list[str]] = {}

    def add(self, n, op, ins, shape=None, val=None):
        self.order.append(n)
        self.op[n], self.ins[n], self.shape[n] = op, ins, shape
        if val is not None:
            self.val[n] = val
        for i in ins:
            self.users.setdefault(i, []).append(n)


def _lit(a: Any) -> str:
    if isinstance(a, torch.Tensor):
        return f"tensor{tuple(a.shape)}" if a.numel() > 4 else f"tensor({a.tolist()})"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, float):
        return f"{a:.6g}"
    return repr(a)


def from_fx(gm: torch.fx.GraphModule) -> G:
    g = G()
    for n in gm.graph.nodes:
        ins, lits = [], []

        def walk(a):
            if isinstance(a, torch.fx.Node):
                ins.append(a.name)
                lits.append("%" + a.name)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    walk(x)
            else:
                lits.append(_lit(a))
        for a in n.args:
            walk(a)
        for k, a in n.kwargs.items():
            before = len(lits)
            walk(a)
            if len(lits) > before:
                lits[before] = f"{k}={lits[before]}"
        if n.op == "call_function":
            op = getattr(n.target, "__name__", str(n.target))
            op = str(n.target) if "aten" in str(n.target) else op
        elif n.op == "call_method":
            op = "." + n.target
        elif n.op == "call_module":
            op = f"module:{type(gm.get_submodule(n.target)).__name__}"
        else:
            op = n.op
        v = n.meta.get("val", n.meta.get("example_value"))
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
        dt = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else ""
        val = None
        if n.op == "get_attr":
            t = getattr(gm, n.target, None)
            if isinstance(t, torch.Tensor) and t.numel() <= 4:
                val = _lit(t)
        g.add(n.name, f"{op}({', '.join(lits)}) {dt}".rstrip(), ins, shape, val)
    return g


def from_onnx(path: str) -> G:
    import onnx
    from onnx import numpy_helper, shape_inference

    m = shape_inference.infer_shapes(onnx.load(path))
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        t = vi.type.tensor_type
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
    g = G()
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init)
        g.add(init.name, "initializer", [], tuple(arr.shape), np.array2string(arr.ravel()) if arr.size <= 4 else None)
    for inp in m.graph.input:
        if inp.name not in g.op:
            g.add(inp.name, "input", [], shapes.get(inp.name))
    for i, node in enumerate(m.graph.node):
        attrs = []
        val = None
        for a in node.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, onnx.TensorProto):
                arr = numpy_helper.to_array(v)
                v = np.array2string(arr.ravel()) if arr.size <= 4 else f"tensor{arr.shape}"
                val = v
            elif isinstance(v, bytes):
                v = v.decode()
            attrs.append(f"{a.name}={v}")
        out = node.output[0] if node.output else f"node{i}"
        ins = [x for x in node.input if x]
        label = f"{node.op_type}({', '.join('%' + x for x in ins)}){' ' + ' '.join(attrs) if attrs else ''}"
        g.add(out, label, ins, shapes.get(out), val)
        for extra in node.output[1:]:
            g.add(extra, f"(output of {out})", [out], shapes.get(extra))
    return g


def neighbourhood(g: G, anchor: str) -> list[str]:
    keep = {anchor: 0}
    frontier = [anchor]
    for lvl in range(1, UP + 1):
        frontier = [i for n in frontier for i in g.ins.get(n, []) if i not in keep]
        for i in frontier:
            keep[i] = -lvl
    frontier = [anchor]
    for lvl in range(1, DOWN + 1):
        frontier = [u for n in frontier for u in g.users.get(n, []) if u not in keep]
        for u in frontier:
            keep[u] = lvl
    lines = []
    for n in g.order:
        if n in keep:
            mark = ">>" if n == anchor else f"{keep[n]:+d}"
            val = f"  = {g.val[n]}" if n in g.val else ""
            lines.append(f"  {mark:>3} %{n} = {g.op[n]}  {list(g.shape[n]) if g.shape[n] is not None else ''}{val}")
    return lines


def anchors(g: G, onnx_graph: bool) -> list[str]:
    if onnx_graph:
        return [n for n in g.order if g.op[n].split("(")[0] in ONNX_ANCHORS]
    return [n for n in g.order if any(a in g.op[n].split("(")[0] for a in FX_ANCHORS)]


def dump_graph(g: G, onnx_graph: bool, title: str) -> str:
    out = [f"# {title}: {len(g.order)} nodes"]
    for a in anchors(g, onnx_graph):
        out.append(f"\n## anchor %{a}")
        out += neighbourhood(g, a)
    return "\n".join(out) + "\n"


def dump(zm: hf.ZooModel, flavour: str, cache: str) -> str:
    if flavour == "compile":
        return "".join(dump_graph(from_fx(gm), False, f"{zm.name} dynamo graph {i}")
                       for i, (gm, _) in enumerate(fl.via_compile(zm)))
    if flavour == "pt2":
        ep, _ = fl.via_pt2(zm, cache)
        return dump_graph(from_fx(ep.graph_module), False, f"{zm.name} .pt2 (aten)")
    path, _ = fl.export(zm, flavour, cache)
    return dump_graph(from_onnx(str(path)), True, f"{zm.name} {flavour}")


def main(argv: list[str]) -> None:
    out = Path(next((a for a in argv if not a.startswith("--")), "/tmp/zoo_dumps"))
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="zoo_dump_cache_")
    items = [(hf.build(n), fl.FLAVOURS) for n in hf.NAMES]
    if "--hand" in argv:
        items += [(c.as_zoo(), tuple(f for f in fl.hand_flavours(c.name) if f != "module")) for c in hw.cases()]
    for zm, flavours in items:
        for f in flavours:
            target = out / f"{zm.name}__{f}.txt"
            if (zm.name, f) in fl.KNOWN_EXPORT_GAPS:
                target.write_text(f"# export gap: {fl.KNOWN_EXPORT_GAPS[(zm.name, f)]}\n")
                continue
            try:
                target.write_text(dump(zm, f, cache))
            except Exception as e:  # keep going: a dump is a reading aid
                target.write_text(f"# failed: {type(e).__name__}: {e}\n")
            print(target, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
