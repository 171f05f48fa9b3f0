"""Execute rewrite recipes on an ONNX model: each site becomes ONE fused attention node.

Each recipe is lowered into neutral steps (passes/lower.py), realized as ONNX nodes
(emit/onnx_nodes.py) around one of two fused ops:
  op="ort"       com.microsoft.MultiHeadAttention: emit/ort.py (BSD layout, no GQA, key-bias
                 folding and live-key trimming).
  op="standard"  ONNX Attention (opset 23) with 4-D q/k/v (native GQA). attn_mask needs the full
                 Sq in its second-to-last dim (a [B,1,1,Skv] mask is rejected) and is_causal
                 aligns top-left, so bottom-right causal with Sq != Skv becomes an explicit mask.
                 Models below opset 23 are upgraded first (emit/onnx_opset.py).
Rows where every key is masked: MultiHeadAttention reproduces the model bit for bit (NaN for all
-inf, the mean of v for all finfo.min); the standard op writes zeros for a row whose max score is
the lowest float, so its mask is floored at lowest/2 (finite values only); rows of only -inf
still give 0 there where the model gives NaN.

The input ModelProto is never modified; untouched nodes, initializers and metadata are copied
as they are, and only nodes that the rewrite left without consumers are removed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from attnopt.emit import ort, ort_gqa
from attnopt.emit.onnx_axes import AxisFacts
from attnopt.emit.onnx_nodes import (Block, SiteFacts, Skip, additive_mask, causal_mask, load, mask4,
                                     mean_v_on_dead_rows, np_dtype, view, zero_nan_rows)
from attnopt.emit.onnx_opset import default_opset, ensure_opset
from attnopt.frontends.onnx_proto import all_nodes, subgraph_refs as _subgraph_refs
from attnopt.ir import Graph
from attnopt.passes.lower import (Attend, CombineMasks, LoadOperand, Lowered, MeanVOnDeadRows,
                                  Permute, Squeeze, StoreOutput, Unflatten, ZeroNaNRows, lower)
from attnopt.passes.rewrite import Recipe

STANDARD_OPSET = 23
MS_DOMAIN = ort.MS_DOMAIN
FUSED_OPS = {"ort": (MS_DOMAIN, "MultiHeadAttention"), "standard": ("", "Attention")}


@dataclass
class SpliceResult:
    model: onnx.ModelProto
    fused: dict[str, str] = field(default_factory=dict)  # site -> fused node name
    skipped: dict[str, str] = field(default_factory=dict)  # site -> reason
    upgraded_from: int | None = None  # the default-domain opset before an upgrade
    upgrade: str = ""  # "" | "relabel" (same nodes) | "version_converter"


def splice(graph: Graph, recipes: Sequence[Recipe | str], *, op: str = "ort",
           gqa_sites: frozenset[str] | None = None) -> onnx.ModelProto:
    """A new ModelProto with each recipe's site replaced by one fused attention node (or, op
    "ort", an If between GroupQueryAttention and it: emit/ort_gqa.py; `gqa_sites` limits which
    sites may take that form, None: all that qualify)."""
    return splice_report(graph, recipes, op=op, gqa_sites=gqa_sites).model


def splice_report(graph: Graph, recipes: Sequence[Recipe | str], *, op: str = "ort",
                  gqa_sites: frozenset[str] | None = None) -> SpliceResult:
    """Like `splice`, also saying which sites were fused and why others were left alone."""
    if op not in FUSED_OPS:
        raise ValueError(f"op must be one of {sorted(FUSED_OPS)}, got {op!r}")
    src = getattr(graph, "native_model", None)
    if src is None:
        raise ValueError("splice needs a graph loaded from ONNX (graph.native_model)")
    model = onnx.ModelProto()
    model.CopyFrom(src)
    result = SpliceResult(model)
    todo = [lower(r) for r in recipes if isinstance(r, Recipe)]
    if op == "standard" and todo:
        result.upgraded_from, result.upgrade = ensure_opset(model, STANDARD_OPSET, _names_read(todo))
    _Splicer(graph, model, op, result, gqa_sites).run(todo)
    if result.fused and op == "ort" and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return result


def _names_read(lowered: Sequence[Lowered]) -> set[str]:
    """The model values the rewrite reads or replaces (an opset conversion must keep them)."""
    out: set[str] = set()
    for low in lowered:
        for s in low.steps:
            if isinstance(s, (LoadOperand, StoreOutput)):
                out.add(s.node)
            elif isinstance(s, CombineMasks):
                out.update(i.term.node for i in s.inputs)
        out.update(p for _, p in low.bypass)
    return out


class _Splicer:
    def __init__(self, graph: Graph, model: onnx.ModelProto, op: str, result: SpliceResult,
                 gqa_sites: frozenset[str] | None = None):
        self.g = graph
        self.gqa_sites = gqa_sites
        self.m = model
        self.op = op
        self.result = result
        gp = model.graph
        self.taken: set[str] = {n.name for n in gp.node} | {o for n in gp.node for o in n.output} \
            | {t.name for t in gp.initializer} | {i.name for i in gp.input}
        self._axes: AxisFacts | None = None  # built when a key-bias fold is first considered
        # mask key -> (run-time GroupQueryAttention check, index of the node it is placed before)
        self._guards: dict[tuple, tuple[ort_gqa.Guard, int]] = {}
        self._at = 0  # the node index of the site being built

    def run(self, lowered: Sequence[Lowered]) -> None:
        gp = self.m.graph
        nodes = list(gp.node)
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        blocks: dict[int, list[onnx.NodeProto]] = {}
        dead: set[int] = set()
        renames: dict[str, str] = {}
        seeds: set[int] = set()
        for low in lowered:
            output = low.step(StoreOutput).node
            idx = producer.get(output)
            if idx is None or idx in dead:
                self.result.skipped[low.site] = f"output {output!r} is not produced by a node"
                continue
            self._at = idx
            try:
                block, fused_name = self.build(low)
            except Skip as e:
                self.result.skipped[low.site] = str(e)
                # a check built in the dropped block is not in the model
                self._guards = {k: v for k, v in self._guards.items() if v[1] != idx}
                continue
            # The block's last node takes over the site output's name, so consumers stay as they are.
            last = block.nodes[-1]
            old_out = last.output[0]
            last.output[0] = output
            for n in block.nodes:  # (the last value is read by nobody inside the block)
                assert old_out not in n.input
            blocks[idx] = block.nodes
            dead.add(idx)
            for name, path in low.bypass:
                renames[name] = path
                if name in producer:
                    seeds.add(producer[name])
            seeds.update(producer[n] for n in low.remove if n in producer)
            self.result.fused[low.site] = fused_name
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
            for n in all_nodes(block):
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
                for x in uses(n):
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

    def axes(self) -> AxisFacts:
        """Which axes each model value varies along (built once, when first asked)."""
        if self._axes is None:
            self._axes = AxisFacts.of_graph(self.g)
        return self._axes

    # -- one site --------------------------------------------------------------------------
    def build(self, low: Lowered) -> tuple[Block, str]:
        """The nodes replacing one site (the last one computes its output) and the fused node."""
        att: Attend = low.step(Attend)
        if att.normalizer != "softmax":
            raise Skip(f"{att.normalizer} attention has no fused ONNX op")
        opset = default_opset(self.m)
        # MultiHeadAttention has no softcap: such sites take the standard Attention op where the
        # model's opset already has it (Gemma-2 exported at opset 23), so nothing else changes.
        standard = self.op == "standard" or (att.softcap is not None and opset >= STANDARD_OPSET)
        if att.softcap is not None and not standard:
            raise Skip(f"MultiHeadAttention has no softcap, and the model's opset "
                       f"{opset} has no Attention op (--onnx-op standard upgrades it)")
        if att.window is not None and any(w is not None for w in att.window):
            raise Skip("sliding-window recipes are not spliced into ONNX yet")
        b = Block(f"attnopt/{low.site or low.step(StoreOutput).node}", self.taken, opset)
        f = SiteFacts.of(self.g, low)
        masks: CombineMasks = low.step(CombineMasks)
        bias = None if standard else ort.key_bias(b, masks, att, f, self.axes)
        mask = None if bias is not None else additive_mask(b, masks, f)
        causal_flag = False
        if att.causal:
            # The flags align causal masks differently (MHA: only Sq == Skv; Attention: top-left):
            # otherwise the pattern is an explicit mask.
            if (f.sq == f.skv and f.sq is not None) or (standard and att.causal_alignment == "top_left"):
                causal_flag = True
            else:
                cm = causal_mask(b, att, f)
                mask = cm if mask is None else b.node("Add", [mask, cm], "mask_causal")
        # [B|1, H|1, Sq, Skv], made by the target once it has the operands
        m4 = (lambda: mask4(b, masks, mask, f)) if mask is not None else None
        if standard:
            out, fused, to_bhsd = self._standard(b, f, att, m4, causal_flag)
        else:
            # boolean -inf masks: a row with no key is 0 for the op (a mean-of-V model has its step)
            zero_dead = masks is not None and masks.boolean and low.step(MeanVOnDeadRows) is None
            guard = None
            if (low.step(MeanVOnDeadRows) is None and self.spec_causal_padding(low)
                    and ort_gqa.applies(att, f) is None):
                if m4 is not None and bias is None and not causal_flag:  # the dense mask (symbolic lengths)
                    guard, m4 = self.guard(b, masks, f, m4)
                elif m4 is None and bias is not None and causal_flag:  # the folded key mask (static lengths)
                    guard = self.key_guard(b, masks, f, bias, att.scale, zero_dead)
            start = len(b.nodes)
            out, fused, to_bhsd = ort.attend(b, f, att, m4, causal_flag, bias, zero_dead)
            if guard is not None:  # (module header of emit/ort_gqa.py)
                mha = (b.nodes[start:], out)
                del b.nodes[start:]
                gqa_out = ort_gqa.attend(b, f, att, guard)
                gqa = (b.nodes[start:], gqa_out)
                del b.nodes[start:]
                out = ort_gqa.guarded(b, guard, gqa, mha)
        for step in low.steps:
            if isinstance(step, ZeroNaNRows):  # elementwise: in whatever layout the output is
                out = zero_nan_rows(b, out, f)
            elif isinstance(step, MeanVOnDeadRows):
                out, to_bhsd = b.transpose(out, to_bhsd, "out_bhsd"), tuple(range(4))
                out = mean_v_on_dead_rows(b, step, out, load(b, f.v, f), f)
            elif isinstance(step, StoreOutput):
                out = self._store(b, step, out, to_bhsd, f)
        assert b.nodes and b.nodes[-1].output[0] == out, "the block's last node computes the site"
        return b, fused

    def spec_causal_padding(self, low: Lowered) -> bool:
        """A site the guarded GroupQueryAttention form may serve: every one unless the caller
        named them (optimize passes detection's causal-with-padding sites; the check decides)."""
        return self.gqa_sites is None or low.site in self.gqa_sites

    def guard(self, b: Block, masks: CombineMasks, f: SiteFacts, m4: Callable[[], str]
              ) -> tuple[ort_gqa.Guard, Callable[[], str]]:
        """The run-time check for this mask, and the maker of the [B|1, H|1, S, S] mask for the
        MultiHeadAttention branch. Built in this site's block (the mask then made once, before
        the If, for both), or reused from an earlier site's block that reads the same mask terms
        and precedes this one (the mask is then made inside the branch that reads it)."""
        key = ("dense", repr(masks), f.low.batch_rank, str(f.sq))
        hit = self._reused(key)
        if hit is not None:
            return hit, m4
        m = m4()
        return self._kept(key, ort_gqa.check(b, m)), (lambda: m)

    def key_guard(self, b: Block, masks: CombineMasks, f: SiteFacts, bias: str, scale: float,
                  zero_dead: bool) -> ort_gqa.Guard:
        """Like `guard`, on the folded key bias [B|1, Skv] (ort_gqa.check_keys)."""
        key = ("keys", repr(masks), f.low.batch_rank, str(f.sq), float(scale), zero_dead)
        hit = self._reused(key)
        return hit if hit is not None else self._kept(key, ort_gqa.check_keys(b, bias, scale, zero_dead))

    def _reused(self, key: tuple) -> ort_gqa.Guard | None:
        """The check under `key` built in an earlier site's block that precedes this one."""
        hit = self._guards.get(key)
        return hit[0] if hit is not None and hit[1] < self._at else None

    def _kept(self, key: tuple, g: ort_gqa.Guard) -> ort_gqa.Guard:
        """g, built in this site's block, for later sites reading the same mask."""
        self._guards[key] = (g, self._at)
        return g

    @staticmethod
    def _store(b: Block, step: StoreOutput, out: str, to_bhsd: tuple[int, ...], f: SiteFacts) -> str:
        """The op's output (BHSD after `to_bhsd`) in the site's layout: a pending permutation
        and a final one compose into a single transpose."""
        if all(isinstance(op, Permute) for op in step.views):
            perm = tuple(range(4))
            for op in step.views:
                perm = tuple(perm[i] for i in op.perm)
            return b.transpose(out, tuple(to_bhsd[i] for i in perm), "out")
        out = b.transpose(out, to_bhsd, "out_bhsd")
        for op in step.views:
            out = view(b, out, op, f, _out_hint(op))
        return out

    # -- op="standard": ONNX Attention -----------------------------------------------------
    def _standard(self, b: Block, f: SiteFacts, att: Attend, m4: Callable[[], str] | None,
                  causal_flag: bool) -> tuple[str, str, tuple[int, ...]]:
        h, kh = f.heads
        q4, k4, v4 = (load(b, x, f) for x in (f.q, f.k, f.v))
        if isinstance(h, int) and isinstance(kh, int) and (kh != h) and h % kh:
            raise Skip(f"{h} query heads are not a multiple of {kh} kv heads")
        ins = [q4, k4, v4]
        if m4 is not None:
            # ORT's Attention writes zeros for a query row whose largest score is the dtype's
            # lowest value (a row of HF finfo.min masks), where the model's own softmax gives
            # the mean of v; finite mask values are clamped to lowest/2 to keep the model's
            # answer (exp underflows to 0 either way). -inf stays -inf.
            dt = np_dtype(self.g.dtype(f.q.node))
            m = m4()
            low = b.const(np.asarray(np.finfo(dt).min / 2, dt), "mask_floor")
            ins.append(b.node("Where", [b.node("IsInf", [m], "mask_isinf"), m,
                                        b.node("Max", [m, low], "mask_clamped")], "attn_mask_floored"))
        attrs = dict(scale=float(att.scale))
        if causal_flag:
            attrs["is_causal"] = 1
        if att.softcap is not None:
            attrs["softcap"] = float(att.softcap)
        out = b.node("Attention", ins, "attention", **attrs)
        return out, b.nodes[-1].name, tuple(range(4))


def _out_hint(op) -> str:
    """Names of the output's views: out_3d ([B*H or B, Sq, Dv]), out_2d, out_5d; out (the site's)."""
    if isinstance(op, Permute):
        return "out"
    if isinstance(op, Squeeze):
        return f"out_{4 - len(op.axes)}d"
    return "out_5d" if isinstance(op, Unflatten) else "out_3d"


def _follow(renames: dict[str, str], x: str) -> str:
    seen = set()
    while x in renames and x not in seen:
        seen.add(x)
        x = renames[x]
    return x


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The fused attention nodes of a model (either target)."""
    ops = set(FUSED_OPS.values())
    return [n for n in all_nodes(model.graph.node) if ((n.domain or ""), n.op_type) in ops
            or (n.domain == "ai.onnx" and ("", n.op_type) in ops)]


def attention_ops(model: onnx.ModelProto) -> dict[str, str]:
    """node name -> "domain.op" of every attention node the splice emits, If branches included
    (a guarded site has a GroupQueryAttention and a MultiHeadAttention node)."""
    ops = set(FUSED_OPS.values()) | {(MS_DOMAIN, "GroupQueryAttention")}
    return {n.name: (f"{n.domain}." if n.domain and n.domain != "ai.onnx" else "") + n.op_type
            for n in all_nodes(model.graph.node)
            if ((n.domain or "").replace("ai.onnx", ""), n.op_type) in ops}


__all__ = ["splice", "splice_report", "SpliceResult", "fused_nodes", "attention_ops", "STANDARD_OPSET"]
