"""Neutral graph IR shared by every front end and the pattern library.

A front end (torch.fx, torch.export, ONNX) translates its native graph into a `Graph`: a
networkx DiGraph whose nodes carry one op from the small vocabulary below, the ordered list of
their input node ids, attributes, a static shape where known (ints, with symbolic dims kept as
strings) and a dtype name. Patterns match on this IR only, so there is one pattern library.

Vocabulary (`Node.op`):
  input      graph input. attrs: role = "user" | "param" (weights and buffers).
  const      a constant. `value` holds it as a numpy array when it is small enough to matter
             (scalars, masks); large weights may carry value=None.
  output     a graph output (one IR node per returned value).
  matmul     numpy/torch matmul semantics (bmm, mm and ONNX MatMul map here).
  einsum     attrs: equation (two operands, explicit "->").
  transpose  attrs: perm (a full permutation of the input's axes).
  reshape    any view that keeps element order: view, reshape, flatten, (un)squeeze.
  expand     broadcast to a larger shape (attrs: none; see the output shape).
  identity   layout no-op: contiguous, clone, full slices, eval-mode dropout, Identity.
  mul div add sub       binary elementwise; scalar literals become const nodes.
  where      inputs (cond, a, b): cond ? a : b. masked_fill(x, m, v) becomes where(m, v, x).
  softmax    attrs: axis (non-negative).
  sigmoid tanh exp sqrt isnan logical_not cast(attrs: to = target dtype name)
  shape      a shape query (ONNX Shape, fx sym_size): depends on its input's shape only.
  dropout    attrs: p, train (train=False is normalized to identity by front ends).
  sdpa       fused scaled dot-product attention. inputs (q, k, v[, mask]);
             attrs: is_causal, scale (None = 1/sqrt(D)), dropout_p, enable_gqa, layout ("BHSD"
             or "BSD" for fused ops whose heads are folded into the hidden dim), num_heads,
             num_kv_heads, flavor (which native op).
  other      anything else; attrs: native (the native op name). Blocks matching.

Canonical layouts named in this package: BHSD = [batch, heads, seq, head_dim].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np

from attnopt.ir.score_mods import ScoreMod

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

@dataclass(frozen=True)
class MaskSpec:
    """Which (query, key) pairs may attend.

    kind: none | causal | sliding_window | block | padding | tensor.
    For causal and sliding_window, key j is allowed for query i iff
    -left <= (j - i - offset) <= right, where offset = kv_len - q_len aligns the diagonal
    bottom-right (offset 0 for top-left alignment is stated in `alignment`). left is None for
    an unbounded left side (plain causal). `padding` is True when, on top of the structural
    kind, keys are masked per batch row by a key-padding input (HF attention_mask).
    kind "padding" alone means only key padding. kind "tensor" is an arbitrary mask tensor.
    """

    kind: str = "none"
    left: int | None = None
    right: int | None = None
    block: int | None = None
    padding: bool = False
    alignment: str = "bottom_right"
    source: str | None = None  # node that produced the mask, for reports

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("causal", "sliding_window"):
            d["left"], d["right"] = self.left, self.right
            if self.alignment != "bottom_right":
                d["alignment"] = self.alignment
        if self.kind == "block":
            d["block"] = self.block
        if self.padding or self.kind == "padding":
            d["padding"] = True
        return d

    def describe(self) -> str:
        base = {
            "none": "none",
            "causal": "causal",
            "padding": "padding",
            "tensor": "tensor",
            "block": f"block({self.block})",
            "sliding_window": f"window({self.left},{self.right})",
        }.get(self.kind, self.kind)
        if self.padding and self.kind != "padding":
            base += "+padding"
        return base


@dataclass(frozen=True)
class TokenGrid:
    """Tokens laid out on a grid: `shape` (e.g. (14, 14)) after `leading` non-grid tokens."""

    shape: tuple[int, ...]
    leading: int = 0

    def describe(self) -> str:
        s = "x".join(str(d) for d in self.shape)
        return f"{s}+{self.leading}" if self.leading else s


@dataclass(frozen=True)
class AttentionSpec:
    """The math of one attention site (see DESIGN.md)."""

    normalizer: str  # softmax | sigmoid | softplus | linear
    batch: Dim
    num_heads: Dim
    num_kv_heads: Dim
    q_len: Dim
    kv_len: Dim
    head_dim: Dim
    v_head_dim: Dim
    scale: float | None  # folded; None only for fused ops whose scale is implicit and unknown
    mask: MaskSpec = field(default_factory=MaskSpec)
    score_mods: tuple[ScoreMod, ...] = ()  # typed (ir/score_mods.py), shown as "bias", "softcap:30.0"
    token_grid: TokenGrid | None = None
    dtype: str | None = None
    layout: str = "BHSD"

    def to_json(self) -> dict[str, Any]:
        return {
            "normalizer": self.normalizer,
            "batch": self.batch,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "scale": self.scale,
            "mask": self.mask.to_json(),
            "score_mods": list(self.score_mods),
            "token_grid": (None if self.token_grid is None else
                           {"shape": list(self.token_grid.shape), "leading": self.token_grid.leading}),
            "dtype": self.dtype,
            "layout": self.layout,
        }


@dataclass(frozen=True, kw_only=True)
class PatternDetails:
    """Base of the typed facts a pattern family records for its rewrite.

    Each family (patterns/decomposed.py, patterns/fused.py) has its own frozen subclass, and the
    registry (patterns/registry.py) maps a details type back to the family that builds its
    recipe, so no code branches on pattern names."""


@dataclass(frozen=True)
class Site:
    """One attention site: its spec and where it lives in the graph.

    q, k, v, mask, bias: IR node ids of the boundary values. `output` is the node whose value
    the site computes (what a rewrite replaces). `nodes` are the IR nodes inside the site, all
    of whose users are inside it too (a rewrite may delete them). `details` keeps the facts a
    rewrite needs (e.g. whether k arrives transposed, which scale ops were folded), typed by
    the pattern family that found the site.
    """

    name: str
    spec: AttentionSpec
    output: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    mask: tuple[str, ...] = ()
    bias: tuple[str, ...] = ()
    nodes: frozenset[str] = frozenset()
    pattern: str = ""
    details: PatternDetails = field(default_factory=PatternDetails)

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "pattern": self.pattern, "output_node": self.output}
        d.update(self.spec.to_json())
        return d


@dataclass(frozen=True)
class Rejection:
    """A near miss: something that looked like attention and is not, with the reason."""

    node: str
    reason: str
    pattern: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "reason": self.reason}


def dim_str(d: Dim | None) -> str:
    return "?" if d is None else str(d)


def as_json(obj: Any) -> Any:
    """Dataclass -> plain JSON-able structure (for reports)."""
    if hasattr(obj, "to_json"):
        return obj.to_json()
    return asdict(obj)


def topo_filter(graph: Graph, keep: Callable[[str], bool]) -> Iterable[str]:
    return (n for n in graph.nodes() if keep(n))


@dataclass(frozen=True)
class GNALayout:
    """A Generalized Neighborhood Attention layout over a 1-/2-/3-D token grid.

    Per dimension: window w (>= 2), stride s (1 <= s <= w), dilation d (w*d <= L), causal flag.
    Semantics are exactly those of DESIGN.md ("GNA: the sparsity family"); attnopt.sparsity.gna
    implements them.
    """

    shape: tuple[int, ...]
    window: tuple[int, ...]
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    causal: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.shape)
        # Fill defaults per dimension so every field has one entry per grid dimension.
        if not self.stride:
            object.__setattr__(self, "stride", (1,) * n)
        if not self.dilation:
            object.__setattr__(self, "dilation", (1,) * n)
        if not self.causal:
            object.__setattr__(self, "causal", (False,) * n)
        for name in ("window", "stride", "dilation", "causal"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"GNALayout.{name} needs {n} entries, got {getattr(self, name)}")


@dataclass(frozen=True)
class Variant:
    """How to run a spec: kernel family, tiles, sparsity layout.

    family: dense | causal | gqa_decode | block_sparse_gna | sliding_window | sigmoid |
            linear_chunked | cpu_reference.
    q_tile / kv_tile: tile shapes (one entry per tiled grid dimension; 1-D tiles are (n,)).
    exact: False for approximations the user must opt into.
    """

    family: str = "dense"
    q_tile: tuple[int, ...] = (64,)
    kv_tile: tuple[int, ...] = (64,)
    layout: GNALayout | None = None
    dynamic_kv_tiling: bool = False
    exact: bool = True
