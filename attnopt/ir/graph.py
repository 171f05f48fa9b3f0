"""The neutral graph: nodes with one op from the vocabulary (ir/vocab.py OPS; meanings in
ir/__init__.py's header), ordered inputs, attributes, static shapes (symbolic dims as strings),
dtype names, and the front end's evaluator for probe values."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np

from attnopt.ir.vocab import OPS

Dim = int | str  # a static size, or a symbolic one by name
Shape = tuple[Dim, ...]

LAYOUT_OPS = frozenset({"transpose", "reshape", "expand", "identity"})
ELEMENTWISE_BINARY = frozenset({"mul", "div", "add", "sub"})


class Graph:
    """A neutral graph. Node ids are strings unique within the graph (native names)."""

    def __init__(self, name: str = "graph", source: str = "unknown"):
        self.g = nx.DiGraph()
        self.name = name
        self.source = source  # "fx" | "aten" | "onnx"
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        # Set by the front end: evaluates IR values on probe inputs (see `Evaluator`).
        self.evaluator: Evaluator | None = None
        # Set by the front end: the native model this graph stands for (an fx.GraphModule or an
        # onnx ModelProto; opaque here), where it came from, and what was left out.
        self.native_model: Any = None
        self.native_program: Any = None  # torch: the ExportedProgram a graph was read from
        self.native_path: str | None = None  # ONNX: the file it was read from
        self.base_dir: str | None = None  # ONNX: where its external data lives
        self.opset: int | None = None  # ONNX: the ai.onnx opset
        self.notes: list[str] = []  # what the front end did not inspect, for the report
        self.control_flow_nodes: list[str] = []  # ONNX: If/Loop/Scan nodes whose bodies were skipped
        self.function_calls: list[str] = []  # ONNX: calls of model-local functions
        self._order: list[str] = []

    # construction ---------------------------------------------------------------------
    def add(self, nid: str, op: str, inputs: Sequence[str] = (), *, shape: Shape | None = None,
            dtype: str | None = None, value: np.ndarray | None = None, ref: Any = None,
            **attrs: Any) -> str:
        """Add a node. `ref` is the native object (fx.Node, NodeProto) the node stands for;
        the attribute `native` (a string such as "ai.onnx::MatMul") names its native op."""
        if nid in self.g:
            raise ValueError(f"duplicate IR node id {nid!r}")
        if op not in OPS:
            raise ValueError(f"{op!r} is not an IR op (ir/vocab.py OPS); use 'other' with attrs")
        self.g.add_node(nid, op=op, inputs=list(inputs), attrs=attrs, shape=shape, dtype=dtype,
                        value=value, ref=ref)
        for i in inputs:
            if i not in self.g:
                raise ValueError(f"node {nid!r} uses unknown input {i!r}")
            self.g.add_edge(i, nid)
        self._order.append(nid)
        if op == "input":
            self.inputs.append(nid)
        elif op == "output":
            self.outputs.append(nid)
        return nid

    def add_const(self, nid: str, value: Any, dtype: str | None = None) -> str:
        arr = np.asarray(value)
        return self.add(nid, "const", shape=tuple(arr.shape), dtype=dtype or str(arr.dtype), value=arr)

    # queries ----------------------------------------------------------------------------
    def __contains__(self, nid: str) -> bool:
        return nid in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def nodes(self) -> list[str]:
        """Node ids in topological (insertion) order."""
        return list(self._order)

    def op(self, nid: str) -> str:
        return self.g.nodes[nid]["op"]

    def attrs(self, nid: str) -> dict[str, Any]:
        return self.g.nodes[nid]["attrs"]

    def attr(self, nid: str, key: str, default: Any = None) -> Any:
        return self.g.nodes[nid]["attrs"].get(key, default)

    def inputs_of(self, nid: str) -> list[str]:
        return self.g.nodes[nid]["inputs"]

    def users(self, nid: str) -> list[str]:
        return list(self.g.successors(nid))

    def num_uses(self, nid: str) -> int:
        """Number of input slots fed by `nid` (x * x counts twice)."""
        return sum(self.inputs_of(u).count(nid) for u in self.g.successors(nid))

    def shape(self, nid: str) -> Shape | None:
        return self.g.nodes[nid]["shape"]

    def rank(self, nid: str) -> int | None:
        s = self.shape(nid)
        return None if s is None else len(s)

    def dtype(self, nid: str) -> str | None:
        return self.g.nodes[nid]["dtype"]

    def value(self, nid: str) -> np.ndarray | None:
        return self.g.nodes[nid]["value"]

    def ref(self, nid: str) -> Any:
        """The native object (fx.Node, onnx NodeProto) this node was translated from."""
        return self.g.nodes[nid]["ref"]

    def scalar(self, nid: str) -> float | None:
        """The value of a constant holding one element, else None."""
        v = self.value(nid) if self.op(nid) == "const" else None
        if v is None or v.size != 1:
            return None
        return float(v.reshape(()))

    def ancestors(self, nid: str) -> set[str]:
        return nx.ancestors(self.g, nid)

    def describe(self, nid: str) -> str:
        n = self.g.nodes[nid]
        native = n["attrs"].get("native")
        what = f"{n['op']}({native})" if native else n["op"]
        return f"{nid} ({what})"


class Evaluator:
    """Computes IR values on probe inputs, using the native runtime of the front end.

    `evaluate(nids, feeds)` returns numpy arrays for the requested nodes. `feeds` maps input
    node ids to arrays and overrides the evaluator's default probe inputs (example inputs
    when the user gave some, else generated ones of the graph's shapes).
    """

    def evaluate(self, nids: Sequence[str], feeds: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def probe_shape(self, nid: str) -> tuple[int, ...] | None:
        """The concrete shape a node takes on the default probe inputs."""
        raise NotImplementedError  # pragma: no cover - interface


# ---- specs -------------------------------------------------------------------------------


def topo_filter(graph: Graph, keep: Callable[[str], bool]) -> Iterable[str]:
    return (n for n in graph.nodes() if keep(n))
