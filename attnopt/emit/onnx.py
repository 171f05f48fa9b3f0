"""Execute rewrite recipes on an ONNX model: each site becomes ONE fused attention node.

Layouts: the recipe's canonical operands are q [B, H, Sq, D], k [B, Hkv, Skv, D],
v [B, Hkv, Skv, Dv] (fewer or more batch axes: see Recipe.batch_rank); scores/masks are
[batch..., Sq, Skv].

Targets (measured on onnxruntime 1.32, CPU provider):
  op="ort"       com.microsoft.MultiHeadAttention with 3-D BSD inputs: query [B, Sq, H*D],
                 key [B, Skv, H*D], value [B, Skv, H*Dv]. 4-D BNSH key/value is accepted only
                 when key and value have the same shape (Dv == D), and the op has no GQA (key
                 hidden size must equal the query's), so k/v with fewer heads are expanded to
                 H heads here (Unsqueeze -> Expand -> Reshape). `unidirectional` matches causal
                 only for Sq == Skv (for Sq < Skv it is neither top-left nor bottom-right), so
                 other causal sites get an explicit additive mask. `attention_bias` must be
                 [B|1, H|1, Sq, Skv] with Sq and Skv in full; masks are expanded to that.
                 No softcap or sigmoid: such sites are left untouched.
                 A mask proven to depend on batch and key position only (a key-padding mask,
                 even one the exporter broadcast to [B, 1, Sq, Skv]: onnx_axes.py) is folded
                 into q and k instead: q' = [q, 1], k' = [k, mask / scale] per head, so
                 scale * q'.k' = scale * q.k + mask. ORT's CPU kernel takes its flash path only
                 without a mask or bias (1.1-1.2x faster than a [B, 1, Sq, Skv] bias: bench/
                 attention_layer.py); the extra head-dim column costs ~5%. fp32 only (the
                 column / scale must not overflow, and fp16 would round the mask), and only
                 masks of 0 and exact fills (-inf or <= -1e30: onnx_axes.zero_or_masked).
                 With such a key mask (and no causal flag), k and v are also sliced at run
                 time to end at the last key any query attends: trailing padding is not
                 computed (its probabilities are exactly 0); not when a batch row masks
                 every key (its softmax is uniform over all of them).
  op="standard"  ONNX Attention (opset 23) with 4-D q/k/v (native GQA). attn_mask needs the
                 full Sq in its second-to-last dim (a [B,1,1,Skv] mask is rejected) and
                 is_causal aligns top-left, so bottom-right causal with Sq != Skv becomes an
                 explicit mask. Models below opset 23 are upgraded first.
Masks are always passed as float additive masks (-inf where the model filled -inf), which is
the model's own arithmetic. Rows where every key is masked: MultiHeadAttention reproduces the
model bit for bit (NaN for all -inf, the mean of v for all finfo.min); the standard op writes
zeros for a row whose max score is the lowest float, so its mask is floored at lowest/2
(finite values only); rows of only -inf still give 0 there where the model gives NaN.

The input ModelProto is never modified; untouched nodes, initializers and metadata are copied
as they are, and only nodes that the rewrite left without consumers are removed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from attnopt.codegen.reference import EXACT_FILL
from attnopt.errors import UnsupportedModel
from attnopt.frontends.onnx_proto import subgraph_refs as _subgraph_refs
from attnopt.ir import Graph
from attnopt.passes.rewrite import Recipe

STANDARD_OPSET = 23
MS_DOMAIN = "com.microsoft"
FUSED_OPS = {"ort": (MS_DOMAIN, "MultiHeadAttention"), "standard": ("", "Attention")}
# Ops whose newer versions changed meaning without changing their signature: an opset bump
# must convert them (onnx.version_converter) rather than relabel them.
_SEMANTIC_CHANGES = {"GridSample", "DFT", "Resize", "GroupNormalization", "Split", "Pad"}


@dataclass
class SpliceResult:
    model: onnx.ModelProto
    fused: dict[str, str] = field(default_factory=dict)  # site -> fused node name
    skipped: dict[str, str] = field(default_factory=dict)  # site -> reason
    upgraded_from: int | None = None  # the default-domain opset before an upgrade
    upgrade: str = ""  # "" | "relabel" (same nodes) | "version_converter"


class _Skip(Exception):
    pass


def splice(graph: Graph, recipes: Sequence[Recipe | str], *, op: str = "ort") -> onnx.ModelProto:
    """A new ModelProto with each recipe's site replaced by one fused attention node."""
    return splice_report(graph, recipes, op=op).model


def splice_report(graph: Graph, recipes: Sequence[Recipe | str], *, op: str = "ort") -> SpliceResult:
    """Like `splice`, also saying which sites were fused and why others were left alone."""
    if op not in FUSED_OPS:
        raise ValueError(f"op must be one of {sorted(FUSED_OPS)}, got {op!r}")
    src = getattr(graph, "native_model", None)
    if src is None:
        raise ValueError("splice needs a graph loaded from ONNX (graph.native_model)")
    model = onnx.ModelProto()
    model.CopyFrom(src)
    result = SpliceResult(model)
    todo = [r for r in recipes if isinstance(r, Recipe)]
    if op == "standard" and todo:
        result.upgraded_from, result.upgrade = _ensure_opset(model, STANDARD_OPSET, todo)
    _Splicer(graph, model, op, result).run(todo)
    if result.fused and op == "ort" and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return result


# ---- opset upgrade ------------------------------------------------------------------------

def _default_opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _bump_is_safe(model: onnx.ModelProto, old: int, new: int) -> str | None:
    """None when relabelling the default-domain opset keeps every node's meaning, else why not."""
    def walk(g):
        for n in g.node:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        yield from walk(sg)

    seen: set[str] = set()
    for n in walk(model.graph):
        if n.domain not in ("", "ai.onnx") or n.op_type in seen:
            continue
        seen.add(n.op_type)
        try:
            s_old = onnx.defs.get_schema(n.op_type, old, "")
            s_new = onnx.defs.get_schema(n.op_type, new, "")
        except Exception:  # noqa: BLE001
            return f"{n.op_type} has no schema at opset {new}"
        if s_old.since_version == s_new.since_version:
            continue
        if n.op_type in _SEMANTIC_CHANGES:
            return f"{n.op_type} changed meaning between opsets {old} and {new}"
        old_in = [(i.name, i.option) for i in s_old.inputs]
        new_in = [(i.name, i.option) for i in s_new.inputs]
        if new_in[:len(old_in)] != old_in or any(
                o != onnx.defs.OpSchema.FormalParameterOption.Optional for _, o in new_in[len(old_in):]):
            return f"{n.op_type}'s inputs changed between opsets {old} and {new}"
        if not set(s_old.attributes) <= set(s_new.attributes):
            return f"{n.op_type}'s attributes changed between opsets {old} and {new}"
    return None


def _ensure_opset(model: onnx.ModelProto, target: int, recipes: Sequence[Recipe]
                  ) -> tuple[int | None, str]:
    """Raise the model's default-domain opset to `target` in place; returns the old opset
    (None when no upgrade was needed) and how ("relabel" or "version_converter").

    Relabels the opset when no op used changed meaning (every node kept byte-for-byte),
    else converts with onnx.version_converter and checks that the values recipes name survive.
    """
    old = _default_opset(model)
    if old >= target:
        return None, ""
    why = _bump_is_safe(model, old, target)
    how = "relabel" if why is None else "version_converter"
    if why is None:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
    else:
        from onnx import version_converter

        try:
            conv = version_converter.convert_version(model, target)
        except Exception as e:  # noqa: BLE001
            raise UnsupportedModel(f"cannot raise the model from opset {old} to {target} for the "
                                   f"standard Attention op ({why}; version_converter: "
                                   f"{str(e).splitlines()[0][:160]})") from None
        names = {o for n in conv.graph.node for o in n.output} | {t.name for t in conv.graph.initializer} \
            | {i.name for i in conv.graph.input}
        needed = {x for r in recipes for x in (r.q.node, r.k.node, r.v.node, r.output,
                                               *(t.node for t in r.masks), *(p for _, p in r.bypass))}
        missing = sorted(needed - names)
        if missing:
            raise UnsupportedModel(f"converting opset {old} -> {target} renamed values the rewrite "
                                   f"needs ({', '.join(missing[:4])})")
        model.CopyFrom(conv)
    need_ir = helper.find_min_ir_version_for([helper.make_opsetid("", target)])
    if model.ir_version < need_ir:
        model.ir_version = need_ir
    return old, how


# ---- node building ------------------------------------------------------------------------

def _np_dtype(name: str | None) -> np.dtype:
    if name in (None, "bfloat16"):
        return np.dtype(np.float32)
    return np.dtype(name)


def _inverse(p: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, x in enumerate(p):
        inv[x] = i
    return tuple(inv)


def _is_ident(p: Sequence[int]) -> bool:
    return tuple(p) == tuple(range(len(p)))


class _Block:
    """The nodes replacing one site, with names unique in the model."""

    def __init__(self, prefix: str, taken: set[str]):
        self.prefix = prefix
        self.taken = taken
        self.nodes: list[onnx.NodeProto] = []

    def fresh(self, hint: str) -> str:
        base = f"{self.prefix}/{hint}"
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str | None = None, domain: str = "",
             **attrs) -> str:
        out = self.fresh(hint or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.fresh(f"{op}_node"),
                                           domain=domain, **attrs))
        return out

    def const(self, value, hint: str = "const") -> str:
        arr = np.asarray(value)
        out = self.fresh(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("Constant_node"),
                                           value=numpy_helper.from_array(arr, out)))
        return out

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint)

    def transpose(self, x: str, perm: Sequence[int], hint: str = "transpose") -> str:
        if _is_ident(perm):
            return x
        return self.node("Transpose", [x], hint, perm=list(perm))

    def reshape(self, x: str, shape: Sequence[int], hint: str = "reshape") -> str:
        return self.node("Reshape", [x, self.ints(shape, hint + "_shape")], hint)

    def unsqueeze(self, x: str, axes: Sequence[int], hint: str = "unsqueeze") -> str:
        if not axes:
            return x
        return self.node("Unsqueeze", [x, self.ints(axes, hint + "_axes")], hint)

    def squeeze(self, x: str, axes: Sequence[int], hint: str = "squeeze") -> str:
        return self.node("Squeeze", [x, self.ints(axes, hint + "_axes")], hint)

    def dim(self, x: str, axis: int, static, hint: str) -> str:
        """A 1-element int64 tensor holding x's size on `axis` (a constant when static)."""
        if isinstance(static, int):
            return self.ints([static], hint)
        shp = self.node("Shape", [x], hint + "_shape")
        return self.node("Gather", [shp, self.ints([axis], hint + "_axis")], hint, axis=0)


# ---- the splicer --------------------------------------------------------------------------

class _Splicer:
    def __init__(self, graph: Graph, model: onnx.ModelProto, op: str, result: SpliceResult):
        self.g = graph
        self.m = model
        self.op = op
        self.result = result
        gp = model.graph
        self.taken: set[str] = {n.name for n in gp.node} | {o for n in gp.node for o in n.output} \
            | {t.name for t in gp.initializer} | {i.name for i in gp.input}
        self._axes = None  # onnx_axes.AxisFacts, built when a key-padding fold is first considered

    # shape facts from the IR (static ints, else symbolic strings / None)
    def shape(self, nid: str):
        return self.g.shape(nid) if nid in self.g else None

    def run(self, recipes: Sequence[Recipe]) -> None:
        gp = self.m.graph
        nodes = list(gp.node)
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        blocks: dict[int, list[onnx.NodeProto]] = {}
        dead: set[int] = set()
        renames: dict[str, str] = {}
        seeds: set[int] = set()
        for r in recipes:
            idx = producer.get(r.output)
            if idx is None or idx in dead:
                self.result.skipped[r.site] = f"output {r.output!r} is not produced by a node"
                continue
            try:
                block, fused_name = self.build(r)
            except _Skip as e:
                self.result.skipped[r.site] = str(e)
                continue
            # The block's last node takes over the site output's name, so consumers stay as they are.
            last = block.nodes[-1]
            old_out = last.output[0]
            last.output[0] = r.output
            for n in block.nodes:  # (the last value is read by nobody inside the block)
                assert old_out not in n.input
            blocks[idx] = block.nodes
            dead.add(idx)
            for name, path in r.bypass:
                renames[name] = path
                if name in producer:
                    seeds.add(producer[name])
            seeds.update(producer[n] for n in r.remove if n in producer)
            self.result.fused[r.site] = fused_name
        if not blocks:
            return
        # Consumers of bypassed scale ops read the unscaled tensor (the fused op applies the scale).
        for i, n in enumerate(nodes):
            if i in dead:
                continue
            for j, x in enumerate(n.input):
                if x in renames:
                    n.input[j] = _follow(renames, x)
        # The fused blocks too: a site's own q/k operand may be the bypassed scale op itself
        # (q * sqrt(scale) feeding the matmul directly), which must not be applied twice.
        for block in blocks.values():
            for n in block:
                for j, x in enumerate(n.input):
                    if x in renames:
                        n.input[j] = _follow(renames, x)
        graph_outputs = {o.name for o in gp.output}
        consumers: dict[str, int] = {}

        def uses(n: onnx.NodeProto) -> list[str]:
            refs = [x for x in n.input if x]
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                refs += _subgraph_refs(n)
            return refs

        for n in nodes:
            for x in uses(n):
                consumers[x] = consumers.get(x, 0) + 1
        for block in blocks.values():
            for n in block:
                for x in n.input:
                    if x:
                        consumers[x] = consumers.get(x, 0) + 1
        # Dead-code removal, starting from what the sites owned; the replaced output
        # producers are dead by construction.
        work = list(seeds | dead)
        removed_inputs: set[str] = set()
        done: set[int] = set()
        while work:
            i = work.pop()
            if i in done:
                continue
            n = nodes[i]
            if i not in dead:
                if any(consumers.get(o, 0) or o in graph_outputs for o in n.output if o):
                    continue
                dead.add(i)
            done.add(i)
            for x in uses(n):
                consumers[x] -= 1
                removed_inputs.add(x)
                p = producer.get(x)
                if p is not None and p not in dead and consumers[x] == 0:
                    work.append(p)
        new_nodes: list[onnx.NodeProto] = []
        for i, n in enumerate(nodes):
            if i in blocks:
                new_nodes.extend(blocks[i])
            if i not in dead:
                new_nodes.append(n)
        del gp.node[:]
        gp.node.extend(new_nodes)
        # Initializers only the removed nodes read go with them (graph inputs stay).
        input_names = {i.name for i in gp.input}
        keep_inits = [t for t in gp.initializer
                      if not (t.name in removed_inputs and consumers.get(t.name, 0) == 0
                              and t.name not in input_names and t.name not in graph_outputs)]
        if len(keep_inits) != len(gp.initializer):
            del gp.initializer[:]
            gp.initializer.extend(keep_inits)
        produced = {o for n in new_nodes for o in n.output}
        vis = [vi for vi in gp.value_info if vi.name in produced]
        if len(vis) != len(gp.value_info):
            del gp.value_info[:]
            gp.value_info.extend(vis)

    # -- one site --------------------------------------------------------------------------
    def build(self, r: Recipe) -> tuple[_Block, str]:
        if r.normalizer != "softmax":
            raise _Skip(f"{r.normalizer} attention has no fused ONNX op")
        # MultiHeadAttention has no softcap: such sites take the standard Attention op where the
        # model's opset already has it (Gemma-2 exported at opset 23), so nothing else changes.
        standard = self.op == "standard" or (r.softcap is not None and _default_opset(self.m) >= STANDARD_OPSET)
        if r.softcap is not None and not standard:
            raise _Skip(f"MultiHeadAttention has no softcap, and the model's opset "
                        f"{_default_opset(self.m)} has no Attention op (--onnx-op standard upgrades it)")
        if r.window is not None and any(w is not None for w in r.window):
            raise _Skip("sliding-window recipes are not spliced into ONNX yet")
        b = _Block(f"attnopt/{r.site or r.output}", self.taken)
        rb = r.batch_rank
        qs, ks, vs = self.shape(r.q.node), self.shape(r.k.node), self.shape(r.v.node)
        if qs is None or ks is None or vs is None:
            raise _Skip("q/k/v shapes are unknown")
        qc = [qs[p] for p in r.q.perm]  # canonical [batch..., Sq, D]
        kc = [ks[p] for p in r.k.perm]
        vc = [vs[p] for p in r.v.perm]
        self.sq, self.skv = qc[rb], kc[rb]
        # Head dims are structural: where shape inference lost them, detection probed them.
        self.d = qc[-1] if isinstance(qc[-1], int) else (r.head_dims[0] or qc[-1])
        self.dv = vc[-1] if isinstance(vc[-1], int) else (r.head_dims[1] or vc[-1])
        dtype = _np_dtype(self.g.dtype(r.q.node))
        heads = self._heads(r, qc, kc)
        key_bias = self._key_bias(b, r, dtype) if not standard else None
        mask = None if key_bias is not None else self._mask(b, r, dtype)
        causal_flag = False
        if r.causal:
            same = self.sq == self.skv and self.sq is not None
            if same or (standard and r.causal_alignment == "top_left"):
                causal_flag = True
            else:
                cm = self._causal_mask(b, r, dtype)
                mask = cm if mask is None else b.node("Add", [mask, cm], "mask_causal")
        if standard:
            fused = self._standard(b, r, heads, mask, causal_flag)
        else:
            fused = self._mha(b, r, heads, mask, causal_flag, key_bias)
        if r.nan_guard:
            # The model zeroed NaN probabilities (rows with every key masked); the fused op may
            # give NaN there, so its output gets the same guard (such rows are all-NaN).
            out = b.nodes[-1].output[0]
            zero = b.const(np.zeros((), dtype), "zero")
            b.node("Where", [b.node("IsNaN", [out], "isnan"), zero, out], "nan_guard")
        if r.dead_rows_mean_v:
            self._mean_v_on_dead_rows(b, r, b.nodes[-1].output[0])
        return b, fused

    def _heads(self, r: Recipe, qc, kc) -> tuple:
        """(query heads, kv heads) after the canonical flattening to 4-D (ints or None)."""
        rb = r.batch_rank
        if rb == 2:
            h = qc[1] if isinstance(qc[1], int) else r.q_heads
            kh = kc[1] if isinstance(kc[1], int) else r.k_heads
            return h, kh
        if r.split_heads:
            return r.split_heads, r.split_heads
        if rb == 3:
            h = qc[1] * qc[2] if isinstance(qc[1], int) and isinstance(qc[2], int) else None
            if r.k_group_broadcast:
                return h, kc[1]
            kh = kc[1] * kc[2] if isinstance(kc[1], int) and isinstance(kc[2], int) else None
            return h, kh
        return 1, 1

    # -- q/k/v into canonical 4-D [B, H, S, D] -------------------------------------------
    def _canon4(self, b: _Block, r: Recipe, which: str) -> str:
        o = getattr(r, which)
        x = b.transpose(o.node, o.perm, f"{which}_canon")
        rb = r.batch_rank
        if rb == 2:
            return x
        if r.split_heads:  # [B*H, S, D] -> [B, H, S, D]
            return self._unmerge(b, x, r.split_heads, f"{which}_4d")
        if rb == 1:
            return b.unsqueeze(x, [1], f"{which}_4d")
        if rb == 0:
            return b.unsqueeze(x, [0, 1], f"{which}_4d")
        if which != "q" and r.k_group_broadcast:
            return b.squeeze(x, [2], f"{which}_4d")
        b1, b2 = r.batch_sizes[1:3]
        last = (self.d if which != "v" else self.dv)
        if not isinstance(last, int):
            raise _Skip("symbolic head dim with three batch axes")
        return b.reshape(x, [0, b1 * b2, -1, last], f"{which}_4d")

    @staticmethod
    def _unmerge(b: _Block, x: str, h: int, hint: str) -> str:
        """[B*H, A, C] -> [B, H, A, C]."""
        return _Splicer._relead(b, x, [-1, h], 1, hint)

    @staticmethod
    def _merge(b: _Block, x: str, hint: str) -> str:
        """[B, H, A, C] -> [B*H, A, C]."""
        return _Splicer._relead(b, x, [-1], 2, hint)

    @staticmethod
    def _relead(b: _Block, x: str, lead: list[int], keep_from: int, hint: str) -> str:
        """x reshaped to `lead` + its own sizes from axis `keep_from` on (read at run time, so
        symbolic sequence lengths stay symbolic)."""
        shp = b.node("Shape", [x], hint + "_shape")
        rest = b.node("Slice", [shp, b.ints([keep_from], hint + "_from"), b.ints([keep_from + 2], hint + "_to")],
                      hint + "_rest")
        return b.node("Reshape", [x, b.node("Concat", [b.ints(lead, hint + "_lead"), rest],
                                            hint + "_dims", axis=0)], hint)

    def _expand_heads(self, b: _Block, x: str, h, kh, last, which: str) -> str:
        """[B, Hkv, S, D] -> [B, H, S, D] (GQA/MQA for ops without grouped heads)."""
        if not (isinstance(h, int) and isinstance(kh, int)) or h % kh:
            raise _Skip(f"cannot expand {kh} kv heads to {h} query heads")
        rep = h // kh
        if kh == 1:
            return b.node("Expand", [x, b.ints([1, h, 1, 1], f"{which}_heads")], f"{which}_rep")
        if not isinstance(last, int):
            raise _Skip("symbolic head dim with grouped kv heads")
        u = b.unsqueeze(x, [2], f"{which}_grp")
        e = b.node("Expand", [u, b.ints([1, 1, rep, 1, 1], f"{which}_reps")], f"{which}_rep")
        return b.reshape(e, [0, h, -1, last], f"{which}_heads")

    # -- op="ort": com.microsoft.MultiHeadAttention ----------------------------------------
    def _mha(self, b: _Block, r: Recipe, heads, mask, causal_flag: bool, key_bias: str | None) -> str:
        h, kh = heads
        rb = r.batch_rank
        if not isinstance(h, int):
            raise _Skip("MultiHeadAttention needs a static number of heads")
        if not isinstance(self.dv, int):
            raise _Skip("MultiHeadAttention needs a static value head dim")
        p1 = (0, 2, 1, 3)  # BHSD -> BSHD

        def to_bsd(which: str, expand: bool) -> str:
            o = getattr(r, which)
            if rb == 2 and not expand:
                # One transpose straight from the operand's own layout to BSHD.
                x = b.transpose(o.node, tuple(o.perm[j] for j in p1), f"{which}_bshd")
            else:
                x4 = self._canon4(b, r, which)
                if expand:
                    x4 = self._expand_heads(b, x4, h, kh, self.d if which == "k" else self.dv, which)
                x = b.transpose(x4, p1, f"{which}_bshd")
            if key_bias is not None and which in "qk":
                x = self._append_column(b, x, key_bias if which == "k" else None, h, which)
            return b.reshape(x, [0, 0, -1], f"{which}_bsd")

        expand = kh != h
        q3 = to_bsd("q", False)
        k3 = to_bsd("k", expand)
        v3 = to_bsd("v", expand)
        if key_bias is not None and not r.causal:
            n = self._live_key_count(b, key_bias, r.scale)
            k3, v3 = (b.node("Slice", [x, b.ints([0], f"{w}_trim_start"), n, b.ints([1], f"{w}_trim_axis")],
                             f"{w}_trimmed") for x, w in ((k3, "k"), (v3, "v")))
        ins = [q3, k3, v3]
        if mask is not None:
            ins += ["", "", self._mask4(b, r, mask)]
        attrs = dict(num_heads=int(h), scale=float(r.scale))
        if causal_flag:
            attrs["unidirectional"] = 1
        out = b.node("MultiHeadAttention", ins, "mha", domain=MS_DOMAIN, **attrs)
        fused_name = b.nodes[-1].name
        # [B, Sq, H*Dv] -> [B, Sq, H, Dv] -> canonical [B, H, Sq, Dv] -> the site's layout.
        if rb == 2:
            o4 = b.reshape(out, [0, 0, h, self.dv], "out_bshd")
            perm = tuple(p1[i] for i in r.out_perm)  # p1 is its own inverse
            b.transpose(o4, perm, "out")
        else:
            o4 = b.transpose(b.reshape(out, [0, 0, h, self.dv], "out_bshd"), p1, "out_bhsd")
            b.transpose(self._from4(b, r, o4), r.out_perm, "out")
        return fused_name

    def _live_key_count(self, b: _Block, key_bias: str, scale: float) -> str:
        """[1] int64: 1 + the last key some query attends, so the keys after it (padding at the
        end of a fixed-length input) can be sliced off k and v: their probabilities are exactly 0
        (a fill <= -1e30 underflows exp). All keys when some batch row masks every key: the
        model's softmax is uniform over all of them there. key_bias: [B|1, Skv], fill / scale."""
        # live keys hold 0, masked ones <= EXACT_FILL / scale (or -inf, or the clamped lowest)
        below = np.asarray(EXACT_FILL / 10 / scale, np.float32)
        live = b.node("Greater", [key_bias, b.const(below, "kb_live_below")], "kb_live")
        live_i = b.node("Cast", [live], "kb_live_int", to=TensorProto.INT64)
        kv_len = b.dim(key_bias, 1, self.skv, "kb_len")
        one = b.const(np.asarray(1, np.int64), "kb_one")
        pos = b.node("Range", [one, b.node("Add", [b.reshape(kv_len, [], "kb_len_scalar"), one], "kb_len_1"),
                               one], "kb_positions")
        last = b.reshape(b.node("ReduceMax", [b.node("Mul", [live_i, pos], "kb_live_pos")], "kb_last",
                                keepdims=1), [1], "kb_last_1")
        rows = self._reduce(b, "ReduceMax", live_i, [1], "kb_row_live")
        every_row = b.node("Cast", [b.node("ReduceMin", [rows], "kb_rows_live", keepdims=1)], "kb_rows_ok",
                           to=TensorProto.BOOL)
        return b.node("Where", [b.reshape(every_row, [1], "kb_rows_ok_1"), last, kv_len], "kb_live_len")

    def _reduce(self, b: _Block, op: str, x: str, axes: list[int], hint: str, keepdims: int = 0) -> str:
        """A reduction over `axes` in the model's opset (axes became an input at 18)."""
        if _default_opset(self.m) >= 18:
            return b.node(op, [x, b.ints(axes, hint + "_axes")], hint, keepdims=keepdims)
        return b.node(op, [x], hint, keepdims=keepdims, axes=axes)

    def _append_column(self, b: _Block, x: str, bias: str | None, h: int, which: str) -> str:
        """BSHD x [B, S, H, D] -> [B, S, H, D + 1]: q gets a column of ones, k the key bias
        [B|1, S] (already divided by the scale) repeated over heads."""
        shape = b.node("Concat", [b.node("Slice", [b.node("Shape", [x], f"{which}_shape"),
                                                   b.ints([0], f"{which}_s0"), b.ints([2], f"{which}_s2")],
                                         f"{which}_bs"),
                                  b.ints([h, 1], f"{which}_h1")], f"{which}_col_shape", axis=0)
        src = b.const(np.ones((1, 1, 1, 1), np.float32), "ones") if bias is None \
            else b.unsqueeze(bias, [2, 3], "key_bias_4d")
        col = b.node("Expand", [src, shape], f"{which}_col")
        return b.node("Concat", [x, col], f"{which}_aug", axis=3)

    def _key_bias(self, b: _Block, r: Recipe, dtype: np.dtype) -> str | None:
        """The site's masks as one additive key bias [B|1, Skv] divided by the scale, when
        they provably vary along batch and key axes only (else None); see the module header."""
        from attnopt.emit.onnx_axes import AxisFacts

        if not r.masks or dtype != np.float32 or not r.scale > 0 or r.split_heads:
            return None
        if r.causal and not (self.sq == self.skv and self.sq is not None):
            return None  # an explicit causal mask would be needed anyway
        if self._axes is None:
            self._axes = AxisFacts.of_graph(self.g)
        rb = r.batch_rank
        allowed = {rb + 1} | ({0} if rb >= 1 else set())
        for t in r.masks:
            if t.literal is not None:
                return None
            if t.how in ("keep", "drop"):
                exact = t.fill is not None and t.fill <= EXACT_FILL
            else:
                exact = t.factor > 0 and self._axes.zero_or_masked(t.node)
            if not exact:
                return None  # a moderate fill: the model's rounding of score + fill is its result
            var = self._axes.varying(t.node)
            if var is None:
                return None
            pos = {a + t.rank for a in var}
            if {i for i, p in enumerate(t.perm) if p in pos} - allowed:
                return None
        m = self._mask(b, r, dtype)
        if m is None:
            return None
        middle = list(range(1, rb + 1)) if rb >= 1 else [0]
        m = b.node("Slice", [m, b.ints([0] * len(middle), "kb_starts"), b.ints([1] * len(middle), "kb_ends"),
                             b.ints(middle, "kb_axes")], "key_bias_slice")
        m = b.reshape(m, [0 if rb >= 1 else 1, -1], "key_bias_2d")
        # mask / scale: a finite fill (finfo.min) would overflow to -inf, which turns the model's
        # mean-of-V rows (every key masked) into NaN: clamp those to the lowest float.
        scaled = b.node("Div", [m, b.const(np.asarray(r.scale, np.float32), "kb_scale")], "key_bias_scaled")
        lowest = b.const(np.asarray(np.finfo(np.float32).min, np.float32), "kb_lowest")
        clamped = b.node("Max", [scaled, lowest], "key_bias_clamped")
        return b.node("Where", [b.node("IsInf", [m], "key_bias_isinf", detect_positive=0), m, clamped],
                      "key_bias")

    def _from4(self, b: _Block, r: Recipe, x: str) -> str:
        """Canonical 4-D [B, H, Sq, Dv] -> [batch..., Sq, Dv]."""
        rb = r.batch_rank
        if rb == 2:
            return x
        if r.split_heads:  # [B, H, Sq, Dv] -> [B*H, Sq, Dv]
            return self._merge(b, x, "out_3d")
        if rb == 1:
            return b.squeeze(x, [1], "out_3d")
        if rb == 0:
            return b.squeeze(x, [0, 1], "out_2d")
        b1, b2 = r.batch_sizes[1:3]
        return b.reshape(x, [0, b1, b2, -1, self.dv], "out_5d")

    # -- op="standard": ONNX Attention -----------------------------------------------------
    def _standard(self, b: _Block, r: Recipe, heads, mask, causal_flag: bool) -> str:
        h, kh = heads
        q4, k4, v4 = (self._canon4(b, r, w) for w in ("q", "k", "v"))
        if isinstance(h, int) and isinstance(kh, int) and (kh != h) and h % kh:
            raise _Skip(f"{h} query heads are not a multiple of {kh} kv heads")
        ins = [q4, k4, v4]
        if mask is not None:
            # ORT's Attention writes zeros for a query row whose largest score is the dtype's
            # lowest value (a row of HF finfo.min masks), where the model's own softmax gives
            # the mean of v; finite mask values are clamped to lowest/2 to keep the model's
            # answer (exp underflows to 0 either way). -inf stays -inf.
            dt = _np_dtype(self.g.dtype(r.q.node))
            m = self._mask4(b, r, mask)
            low = b.const(np.asarray(np.finfo(dt).min / 2, dt), "mask_floor")
            m = b.node("Where", [b.node("IsInf", [m], "mask_isinf"), m,
                                 b.node("Max", [m, low], "mask_clamped")], "attn_mask_floored")
            ins.append(m)
        attrs = dict(scale=float(r.scale))
        if causal_flag:
            attrs["is_causal"] = 1
        if r.softcap is not None:
            attrs["softcap"] = float(r.softcap)
        out = b.node("Attention", ins, "attention", **attrs)
        fused_name = b.nodes[-1].name
        b.transpose(self._from4(b, r, out), r.out_perm, "out")
        return fused_name

    # -- masks ----------------------------------------------------------------------------
    def _term(self, b: _Block, t, hint: str) -> str:
        """A mask term at the score rank in canonical order ([B, H, Sq, Skv] for merged-head
        recipes, whose merged-layout terms are viewed as such)."""
        s = self.shape(t.node)
        if s is None:
            raise _Skip(f"mask {t.node} has unknown rank")
        x = b.unsqueeze(t.node, list(range(t.rank - len(s))), f"{hint}_rank")
        x = b.transpose(x, t.perm, f"{hint}_perm")
        if t.merged_heads:  # [B*H | 1, Sq, Skv] -> [B | 1, H | 1, Sq, Skv]
            lead = s[0] if len(s) == t.rank else 1
            x = b.unsqueeze(x, [0], f"{hint}_4d") if lead == 1 else \
                self._unmerge(b, x, t.merged_heads, f"{hint}_4d")
        return x

    def _mean_v_on_dead_rows(self, b: _Block, r: Recipe, out: str) -> None:
        """Rows whose keys are all masked by a finite-fill where are the mean of V in the model
        (softmax of a constant); the fused ops give them zeros. Appends the fix-up to `out`."""
        if r.q_heads and r.k_heads and r.q_heads != r.k_heads:
            raise _Skip("rows with every key masked average V, and grouped kv heads would need "
                        "V repeated for that")
        keep = None
        for i, t in enumerate(r.masks):
            if t.how not in ("keep", "drop"):
                continue  # biases beside the where never mask (rewrite._dead_row_rule)
            x = self._term(b, t, f"dead{i}")
            if self.g.dtype(t.node) != "bool":
                x = b.node("Cast", [x], f"dead{i}_bool", to=TensorProto.BOOL)
            if t.how == "drop":
                x = b.node("Not", [x], f"dead{i}_keep")
            keep = x if keep is None else b.node("And", [keep, x], f"dead{i}_and")
        rank = 4 if r.split_heads else r.batch_rank + 2
        live = self._reduce(b, "ReduceMax", b.node("Cast", [keep], "dead_keep_f", to=TensorProto.FLOAT),
                            [rank - 1], "dead_live", keepdims=1)
        dead = b.node("Less", [live, b.const(np.asarray(0.5, np.float32), "dead_half")], "dead_rows")
        v = b.transpose(r.v.node, r.v.perm, "dead_v")
        if r.split_heads:
            v, o = self._unmerge(b, v, r.split_heads, "dead_v4"), self._unmerge(b, out, r.split_heads, "dead_o4")
        else:
            o = b.transpose(out, [r.out_perm.index(i) for i in range(len(r.out_perm))], "dead_o")
        v_mean = self._reduce(b, "ReduceMean", v, [rank - 2], "dead_v_mean", keepdims=1)
        fixed = b.node("Where", [dead, v_mean, o], "dead_fixed")
        if r.split_heads:
            self._merge(b, fixed, "dead_out")
        else:
            b.transpose(fixed, r.out_perm, "dead_out")

    def _mask(self, b: _Block, r: Recipe, dtype: np.dtype) -> str | None:
        """One additive float mask in score-canonical layout [batch..., Sq, Skv]."""
        acc = None
        for i, t in enumerate(r.masks):
            x = self._term(b, t, f"mask{i}")
            mdt = self.g.dtype(t.node)
            if t.how == "add":
                if mdt != dtype.name:
                    x = b.node("Cast", [x], f"mask{i}_cast", to=helper.np_dtype_to_tensor_dtype(dtype))
                if t.factor != 1.0:
                    x = b.node("Mul", [x, b.const(np.asarray(t.factor, dtype), f"mask{i}_factor")],
                               f"mask{i}_scaled")
            elif t.how in ("keep", "drop"):
                if t.fill is None:
                    raise _Skip(f"mask {t.node}: a where without a fill value")
                if mdt != "bool":
                    x = b.node("Cast", [x], f"mask{i}_bool", to=TensorProto.BOOL)
                fill = b.const(np.asarray(t.fill, dtype), f"mask{i}_fill")
                zero = b.const(np.asarray(0, dtype), f"mask{i}_zero")
                x = b.node("Where", [x, fill, zero] if t.how == "drop" else [x, zero, fill],
                           f"mask{i}_additive")
            else:
                raise _Skip(f"unknown mask term kind {t.how!r}")
            acc = x if acc is None else b.node("Add", [acc, x], f"mask{i}_sum")
        return acc

    def _causal_mask(self, b: _Block, r: Recipe, dtype: np.dtype) -> str:
        sq, skv = self.sq, self.skv
        if not (isinstance(sq, int) and isinstance(skv, int)):
            raise _Skip("causal with symbolic, unequal query and key lengths")
        off = skv - sq if r.causal_alignment == "bottom_right" else 0
        allowed = np.arange(skv)[None, :] <= np.arange(sq)[:, None] + off
        m = np.where(allowed, 0.0, -np.inf).astype(dtype)
        m = m.reshape((1,) * r.batch_rank + m.shape)
        return b.const(m, "causal_mask")

    def _mask4(self, b: _Block, r: Recipe, m: str) -> str:
        """Score-canonical mask -> [B|1, H|1, Sq, Skv], with Sq and Skv in full (both ops
        reject a mask broadcast over queries)."""
        rb = r.batch_rank
        if r.split_heads:
            pass  # the terms are [B, H, Sq, Skv] already (_mask)
        elif rb == 1:
            m = b.unsqueeze(m, [1], "mask_4d")
        elif rb == 0:
            m = b.unsqueeze(m, [0, 1], "mask_4d")
        elif rb == 3:
            b1, b2 = r.batch_sizes[1:3]
            m = b.node("Expand", [m, b.ints([1, b1, b2, 1, 1], "mask_heads")], "mask_5d")
            m = b.node("Reshape", [m, b.node("Concat", [
                b.ints([0, b1 * b2], "mask_lead"),
                b.dim(r.q.node, r.q.perm[rb], self.sq, "mask_sq"),
                b.dim(r.k.node, r.k.perm[rb], self.skv, "mask_skv")], "mask_4d_shape", axis=0)],
                "mask_4d")
        full = b.node("Concat", [b.ints([1, 1], "mask_one"),
                                 b.dim(r.q.node, r.q.perm[rb], self.sq, "sq"),
                                 b.dim(r.k.node, r.k.perm[rb], self.skv, "skv")],
                      "mask_full_shape", axis=0)
        return b.node("Expand", [m, full], "attn_mask")


def _follow(renames: dict[str, str], x: str) -> str:
    seen = set()
    while x in renames and x not in seen:
        seen.add(x)
        x = renames[x]
    return x


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The fused attention nodes of a model (either target)."""
    ops = set(FUSED_OPS.values())
    return [n for n in model.graph.node if ((n.domain or ""), n.op_type) in ops
            or (n.domain == "ai.onnx" and ("", n.op_type) in ops)]


__all__ = ["splice", "splice_report", "SpliceResult", "fused_nodes", "STANDARD_OPSET"]
