"""Evaluating IR values of an ONNX model with ONNX Runtime on probe inputs (the front end's
`Evaluator`): minimal subgraphs, external data read only for the initializers they need."""
from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from attnopt.ir import Evaluator, Graph, Shape
from attnopt.frontends.onnx_proto import OnnxEvaluationError, eval_dim, loaded_tensor, subgraph_refs, tensor_value

PROBE_BATCH = 2
PROBE_DIM = 48
PROBE_SEED = 0
ALT_SIZES = {False: (32, 2 * PROBE_DIM), True: (3, 2 * PROBE_BATCH)}  # recover_shapes: (dim, batch)
MAX_PROBE_SESSIONS = 4  # probe sessions kept (see OnnxEvaluator._sessions)

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
                reads += [x for x in subgraph_refs(n) if x not in reads]
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
        self._fresh = 0  # fresh symbolic dims named by recover_shapes

    # probes ------------------------------------------------------------------------------
    def probe_sizes(self) -> dict[str, int]:
        """The concrete size given to each symbolic input dim on the default probes."""
        self.default_feeds()
        return dict(self._probe_sizes)

    def default_feeds(self) -> dict[str, np.ndarray]:
        if self._default_feeds is None:
            self._default_feeds = self._feeds(lambda d: _probe_dim(d, self._probe_sizes))
        return self._default_feeds

    def _feeds(self, size_of) -> dict[str, np.ndarray]:
        """Random probe inputs, each symbolic dim sized by `size_of`."""
        rng = np.random.default_rng(PROBE_SEED)
        feeds: dict[str, np.ndarray] = {}
        for name in self.graph.inputs:
            shape, dt = self._types.get(name, (None, None))
            if shape is None:
                continue  # unknown rank: only usable with an explicit feed
            conc = tuple(size_of(d) for d in shape)
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
        return feeds

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

    def recover_shapes(self, names: Sequence[str]) -> dict[str, Shape]:
        """Shapes ONNX shape inference lost, read off runs of the graph on probe inputs.

        Inference loses the rank at ops it cannot follow (a Reshape whose target is computed
        through Mod, as torch's unflatten exports; ops without inference) and with it every
        reading downstream. Each value's Shape is read on the default probes, then once more
        per symbolic input dim moved to another size (ALT_SIZES: smaller first, for position
        tables; then a multiple, for divisibility): an axis that moves with no symbol is
        static, one that moves with exactly one symbol and equals it on both runs is that
        symbol, any other stays symbolic under a fresh name (equal to nothing). A symbol the
        graph will not run at any other size is pinned at its probe size, as the model is.
        Where the default run fails (a part of the graph needs real data) nothing is
        recovered and per-value probes serve as before."""
        if not names:
            return {}
        try:
            sess, inputs = self._session(names, shapes=True)
            first = self._shape_run(sess, inputs, self.default_feeds())
        except Exception:  # noqa: BLE001 (OnnxEvaluationError, ORT errors): nothing recovered
            self._bulk_tried = True  # the bulk probe's values include these: it would fail too
            return {}
        self._shape_cache.update(zip(names, first))  # the default probe's, exactly
        sizes = dict(self._probe_sizes)
        symbols = list(dict.fromkeys(d for n in inputs for d in self._types[n][0]
                                     if not isinstance(d, int)))
        moved: list[tuple[str, int, list[tuple[int, ...]]]] = []  # (symbol, its size, shapes)
        for sym in symbols:
            for alt in ALT_SIZES[sym != "?" and "batch" in sym.lower()]:
                try:
                    feeds = self._feeds(lambda d: alt if d == sym else _probe_dim(d, sizes))
                    moved.append((sym, alt, self._shape_run(sess, inputs, feeds)))
                    break
                except Exception:  # noqa: BLE001 - not at this size
                    continue
        out: dict[str, Shape] = {}
        for k, name in enumerate(names):
            a = first[k]
            if any(len(shapes[k]) != len(a) for _, _, shapes in moved):
                continue  # the rank itself moves with the input sizes
            dims: list[int | str] = []
            for axis, da in enumerate(a):
                deps = [(sym, alt, shapes[k][axis]) for sym, alt, shapes in moved
                        if shapes[k][axis] != da]
                if not deps:
                    dims.append(da)
                    continue
                sym, alt, db = deps[0]
                if len(deps) == 1 and sym != "?" and (da, db) == (sizes[sym], alt):
                    dims.append(sym)
                else:
                    self._fresh += 1
                    dims.append(f"unk_probe_{self._fresh}")
            out[name] = tuple(dims)
        return out

    @staticmethod
    def _shape_run(sess, inputs: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[tuple[int, ...]]:
        import onnxruntime as ort

        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a failed run is an answer here, not an error to print
        outs = sess.run(None, {n: feeds[n] for n in inputs}, quiet)
        return [tuple(int(d) for d in np.asarray(x).reshape(-1)) for x in outs]

    def probed_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every shape read on the default probes so far (to seed a successor evaluator)."""
        return dict(self._shape_cache)

    def seed_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Default-probe shapes already read (by an earlier evaluator of the same model)."""
        self._shape_cache.update(shapes)

    def _static_probe_shape(self, name: str) -> tuple[int, ...] | None:
        self.default_feeds()
        s = self.graph.shape(name)
        if s is None:
            return None
        out = []
        for d in s:
            v = d if isinstance(d, int) else eval_dim(d, self._probe_sizes)
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
                        self._cache[name] = tensor_value(self._inits[name], self.base_dir)
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
                                     loaded_tensor(t, self.base_dir))
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

