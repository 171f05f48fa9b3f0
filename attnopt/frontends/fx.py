"""torch.fx front end: dynamo torch-level graphs and torch.export aten graphs -> neutral IR.

Both levels are handled by one translation table keyed by an op's *base name*
(`torch.matmul`, `operator.matmul`, `Tensor.matmul` and `aten::matmul` are all "matmul"), so
the pattern library sees one vocabulary whichever way the graph was captured.

IR node ids are fx node names; literal arguments (python scalars) become const nodes named
`<node>__arg<i>`. ExportedPrograms are translated from `ep.module()` (parameters unlifted to
get_attr), which keeps the node metadata and lets the evaluator run any node directly.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from attnopt.errors import AttnoptError, UnsupportedModel
from attnopt.ir import Graph
from attnopt.ir.vocab import SMALL_CONST_ELEMENTS as SMALL_CONST
from attnopt.frontends.fx_dynamic import auto_dynamic_shapes
from attnopt.frontends.fx_eval import GraphEvaluator, to_numpy
from attnopt.frontends.fx_nodes import (ASSERT_OPS, SDPA_NAMES, arg, base_name, dead_nodes, dtype_name,
                                        meta_val, module_scope, overload_name, sdpa_args, sdpa_qkv, shape_dtype)

log = logging.getLogger("attnopt")


# ---- translation ---------------------------------------------------------------------------

class _Translator:
    def __init__(self, gm: fx.GraphModule, graph: Graph):
        self.gm = gm
        self.g = graph
        self.skipped: set[str] = set()
        self.dead: set[fx.Node] = set()

    def lit(self, node: fx.Node, i: int, value: Any) -> str:
        """IR id for an argument: an fx node, or a literal turned into a const node."""
        if isinstance(value, fx.Node):
            if value.name in self.skipped:
                raise KeyError(value.name)
            return value.name
        nid = f"{node.name}__arg{i}"
        if nid not in self.g:
            self.g.add_const(nid, np.asarray(value, dtype=np.float64 if isinstance(value, float) else None))
        return nid

    def add(self, node: fx.Node, op: str, inputs: Sequence[str], **attrs: Any) -> None:
        shape, dtype = shape_dtype(node)
        attrs.setdefault("native", base_name(node) + (f".{overload_name(node)}" if overload_name(node) else ""))
        attrs.setdefault("scope", module_scope(node))
        self.g.add(node.name, op, inputs, shape=shape, dtype=dtype, ref=node, **attrs)

    def node_inputs(self, node: fx.Node) -> list[str]:
        out: list[str] = []
        for a in node.all_input_nodes:
            if a.name not in self.skipped and a.name in self.g and a.name not in out:
                out.append(a.name)
        return out

    def other(self, node: fx.Node, **attrs: Any) -> None:
        self.add(node, "other", self.node_inputs(node), **attrs)

    def run(self) -> None:
        dead = self.dead = dead_nodes(self.gm.graph)  # not in the IR: their uses are not uses
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.outputs(node)
                continue
            if node in dead:
                self.skipped.add(node.name)
                continue
            name = base_name(node) if node.op not in ("placeholder", "get_attr") else node.op
            if name in ASSERT_OPS or name.removeprefix("module:") in ASSERT_OPS:
                self.skipped.add(node.name)
                continue
            try:
                self.translate(node, name)
            except KeyError:
                # An input was skipped (assert-only) or unknown: keep the node opaque.
                if node.name not in self.g:
                    self.other(node)

    def outputs(self, node: fx.Node) -> None:
        flat, _ = torch.utils._pytree.tree_flatten(node.args[0])
        for i, v in enumerate(flat):
            if isinstance(v, fx.Node) and v.name in self.g:
                self.g.add(f"output:{i}:{v.name}", "output", [v.name], ref=None)

    def translate(self, node: fx.Node, name: str) -> None:
        if node.op == "placeholder":
            shape, dtype = shape_dtype(node)
            role = "param" if re.search(r"_(parameters|buffers)_", node.name) else "user"
            self.g.add(node.name, "input", [], shape=shape, dtype=dtype, ref=node, role=role,
                       scope="")
            return
        if node.op == "get_attr":
            t = _fetch_attr(self.gm, node.target)
            value = None
            if isinstance(t, torch.Tensor) and t.numel() <= SMALL_CONST:
                value = to_numpy(t)
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else None
            dtype = dtype_name(t.dtype) if isinstance(t, torch.Tensor) else None
            self.g.add(node.name, "const", [], shape=shape, dtype=dtype, value=value, ref=node,
                       role="param", scope="")
            return
        if node.op == "call_module" and _is_eval_dropout(self.gm, node):
            # a symbolic_trace leaf; identity in eval mode like F.dropout(training=False)
            self.add(node, "identity", [self.lit(node, 0, node.args[0])])
            return
        handler = _HANDLERS.get(name)
        if handler is None:
            self.other(node)
            return
        handler(self, node)


def _is_eval_dropout(gm: torch.nn.Module, node: fx.Node) -> bool:
    try:
        mod = _fetch_attr(gm, node.target)
    except AttributeError:
        return False
    drop = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
            torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
    return isinstance(mod, drop) and (not mod.training or mod.p == 0) and len(node.args) == 1 \
        and isinstance(node.args[0], fx.Node)


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# Each handler translates one family of native ops. `t` is the translator.
_HANDLERS: dict[str, Callable[[_Translator, fx.Node], None]] = {}


def _handles(*names: str):
    def register(fn):
        for n in names:
            _HANDLERS[n] = fn
        return fn
    return register


@_handles("matmul", "bmm", "mm", "__matmul__")
def _matmul(t: _Translator, n: fx.Node) -> None:
    a, b = arg(n, 0, "input"), arg(n, 1, "other")
    if a is None or b is None:
        t.other(n)
        return
    t.add(n, "matmul", [t.lit(n, 0, a), t.lit(n, 1, b)])


@_handles("einsum")
def _einsum(t: _Translator, n: fx.Node) -> None:
    eq = n.args[0]
    ops = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
    if len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
        t.other(n)
        return
    t.add(n, "einsum", [ops[0].name, ops[1].name], equation=eq.replace(" ", ""))


@_handles("baddbmm")
def _baddbmm(t: _Translator, n: fx.Node) -> None:
    # alpha * (b1 @ b2) + beta * input: kept as one node; the pattern library reads
    # attrs alpha/beta and treats input as an additive bias on the scores.
    beta = arg(n, 3, "beta", 1)
    alpha = arg(n, 4, "alpha", 1)
    # (BLOOM calls alibi.baddbmm(batch1=q, batch2=k, ...): the operands may be keywords)
    ins = [t.lit(n, 1, arg(n, 1, "batch1")), t.lit(n, 2, arg(n, 2, "batch2")), t.lit(n, 0, arg(n, 0, "input"))]
    t.add(n, "baddbmm", ins, alpha=float(alpha), beta=float(beta))


def _rank_of(n: Any) -> int | None:
    v = meta_val(n) if isinstance(n, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else None


@_handles("transpose", "swapaxes", "transpose_")
def _transpose(t: _Translator, n: fx.Node) -> None:
    src = arg(n, 0, "input")
    r = _rank_of(src)
    d0, d1 = arg(n, 1, "dim0"), arg(n, 2, "dim1")
    if r is None or d0 is None or d1 is None:
        t.other(n)
        return
    perm = list(range(r))
    d0, d1 = d0 % r, d1 % r
    perm[d0], perm[d1] = perm[d1], perm[d0]
    t.add(n, "transpose", [src.name], perm=tuple(perm))


@_handles("t")
def _t(t: _Translator, n: fx.Node) -> None:
    src = arg(n, 0, "input")
    r = _rank_of(src)
    if r is None:
        t.other(n)
        return
    perm = (1, 0) if r == 2 else tuple(range(r))
    t.add(n, "transpose", [src.name], perm=perm)


@_handles("permute")
def _permute(t: _Translator, n: fx.Node) -> None:
    dims = n.args[1:] if n.op == "call_method" and len(n.args) > 2 else arg(n, 1, "dims")
    if isinstance(dims, int):
        dims = [dims]
    src = n.args[0] if n.args else arg(n, 0, "input")
    r = _rank_of(src)
    if r is None or dims is None:
        t.other(n)
        return
    t.add(n, "transpose", [src.name], perm=tuple(int(d) % r for d in dims))


@_handles("view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze",
          "view_as", "reshape_as")
def _reshape(t: _Translator, n: fx.Node) -> None:
    src = n.args[0] if n.args else arg(n, 0, "input")
    if not isinstance(src, fx.Node):
        t.other(n)
        return
    # A view with a dtype argument reinterprets bits: not a layout op.
    if (len(n.args) == 2 and isinstance(n.args[1], torch.dtype)) or "dtype" in n.kwargs:
        t.other(n)
        return
    t.add(n, "reshape", [src.name])


@_handles("expand", "expand_as", "broadcast_to")
def _expand(t: _Translator, n: fx.Node) -> None:
    src = n.args[0] if n.args else arg(n, 0, "input")
    if not isinstance(src, fx.Node):
        t.other(n)
        return
    t.add(n, "expand", [src.name])


@_handles("repeat_interleave")
def _repeat_interleave(t: _Translator, n: fx.Node) -> None:
    src, reps, dim = arg(n, 0, "input"), arg(n, 1, "repeats"), arg(n, 2, "dim")
    if not isinstance(reps, int) or dim is None or not isinstance(src, fx.Node):
        t.other(n)
        return
    r = _rank_of(src)
    t.add(n, "repeat", [src.name], dim=dim % r if r else dim, repeats=reps, interleave=True)


@_handles("contiguous", "clone", "alias", "detach", "lift_fresh_copy", "identity")
def _identity(t: _Translator, n: fx.Node) -> None:
    src = arg(n, 0, "input")
    if isinstance(src, fx.Node):
        t.add(n, "identity", [src.name])
    else:
        t.other(n)


@_handles("slice")
def _slice(t: _Translator, n: fx.Node) -> None:
    # A full slice (aten.slice with start 0 and end past the size) is a no-op.
    src = arg(n, 0, "input")
    s_in, _ = shape_dtype(src) if isinstance(src, fx.Node) else (None, None)
    s_out, _ = shape_dtype(n)
    if s_in is not None and s_in == s_out and arg(n, 4, "step", 1) in (1, None):
        t.add(n, "identity", [src.name])
    else:
        t.other(n)


@_handles("to", "_to_copy", "type", "type_as", "float", "half", "bfloat16", "double")
def _cast(t: _Translator, n: fx.Node) -> None:
    src = n.args[0] if n.args else arg(n, 0, "input")
    if not isinstance(src, fx.Node):
        t.other(n)
        return
    _, dt_out = shape_dtype(n)
    _, dt_in = shape_dtype(src)
    if dt_out is None:
        t.other(n)
    elif dt_out == dt_in:
        t.add(n, "identity", [src.name])
    else:
        t.add(n, "cast", [src.name], to=dt_out)


@_handles("softmax", "_softmax", "_safe_softmax")
def _softmax(t: _Translator, n: fx.Node) -> None:
    src, dim = arg(n, 0, "input"), arg(n, 1, "dim")
    r = _rank_of(src)
    if dim is None or r is None:
        t.other(n)
        return
    t.add(n, "softmax", [src.name], axis=int(dim) % r)


def _binary(op: str):
    def handler(t: _Translator, n: fx.Node) -> None:
        a, b = arg(n, 0, "input"), arg(n, 1, "other")
        alpha = arg(n, None, "alpha", 1)
        if a is None or b is None or (alpha != 1 and op in ("add", "sub")):
            t.other(n)
            return
        t.add(n, op, [t.lit(n, 0, a), t.lit(n, 1, b)])
    return handler


for _name, _op in (("mul", "mul"), ("div", "div"), ("add", "add"), ("sub", "sub"),
                   ("__mul__", "mul"), ("__truediv__", "div"), ("__add__", "add"),
                   ("__sub__", "sub"), ("mul_", "mul"), ("div_", "div"), ("add_", "add"),
                   ("true_divide", "div"), ("multiply", "mul"), ("divide", "div"),
                   # Python's augmented assignment in dynamo graphs (Falcon, MPNet: scores /= sqrt(d))
                   ("itruediv", "div"), ("imul", "mul"), ("iadd", "add"), ("isub", "sub"), ("sub_", "sub")):
    _HANDLERS[_name] = _binary(_op)


@_handles("rsub")
def _rsub(t: _Translator, n: fx.Node) -> None:
    # rsub(x, y) = y - x
    a, b = arg(n, 0, "input"), arg(n, 1, "other")
    if arg(n, None, "alpha", 1) != 1 or a is None or b is None:
        t.other(n)
        return
    t.add(n, "sub", [t.lit(n, 1, b), t.lit(n, 0, a)])


@_handles("__rtruediv__", "__rmul__", "__radd__", "__rsub__")
def _reflected(t: _Translator, n: fx.Node) -> None:
    op = {"__rtruediv__": "div", "__rmul__": "mul", "__radd__": "add", "__rsub__": "sub"}[base_name(n)]
    a, b = arg(n, 0, "input"), arg(n, 1, "other")
    if a is None or b is None:
        t.other(n)
        return
    t.add(n, op, [t.lit(n, 1, b), t.lit(n, 0, a)])


def _select(t: _Translator, n: fx.Node, cond: tuple[int, str], then: tuple[int, str],
            other: tuple[int, str]) -> None:
    """where(cond, then, other) from the call's (position, name) slots."""
    slots = (cond, then, other)
    vals = [arg(n, i, name) for i, name in slots]
    if any(v is None for v in vals):
        t.other(n)
        return
    t.add(n, "where", [t.lit(n, i, v) for (i, _), v in zip(slots, vals)])


@_handles("where")
def _where(t: _Translator, n: fx.Node) -> None:
    _select(t, n, (0, "condition"), (1, "input"), (2, "other"))


@_handles("masked_fill", "masked_fill_")
def _masked_fill(t: _Translator, n: fx.Node) -> None:  # masked_fill(x, m, v) is where(m, v, x)
    _select(t, n, (1, "mask"), (2, "value"), (0, "input"))


def _unary(op: str):
    def handler(t: _Translator, n: fx.Node) -> None:
        src = arg(n, 0, "input")
        if isinstance(src, fx.Node):
            t.add(n, op, [src.name])
        else:
            t.other(n)
    return handler


for _name, _op in (("sigmoid", "sigmoid"), ("tanh", "tanh"), ("exp", "exp"), ("sqrt", "sqrt"),
                   ("isnan", "isnan"), ("logical_not", "logical_not"), ("bitwise_not", "logical_not")):
    _HANDLERS[_name] = _unary(_op)


@_handles("dropout", "native_dropout", "feature_dropout", "alpha_dropout")
def _dropout(t: _Translator, n: fx.Node) -> None:
    src = arg(n, 0, "input")
    train = arg(n, 2, "train", arg(n, None, "training", False))
    p = arg(n, 1, "p", 0.0)
    if not isinstance(src, fx.Node):
        t.other(n)
    elif base_name(n) == "native_dropout" or (train and p):
        t.add(n, "dropout", [src.name], p=float(p), train=bool(train))
    else:
        t.add(n, "identity", [src.name])


@_handles("getitem")
def _getitem(t: _Translator, n: fx.Node) -> None:
    src, idx = n.args
    if isinstance(src, fx.Node) and src.name in t.g and t.g.op(src.name) == "sdpa" and idx == 0:
        t.add(n, "identity", [src.name])
    else:
        t.other(n)


@_handles("sym_size", "size", "dim", "numel")
def _shape(t: _Translator, n: fx.Node) -> None:
    t.add(n, "shape", t.node_inputs(n))


@_handles(*SDPA_NAMES)
def _sdpa(t: _Translator, n: fx.Node) -> None:
    q, k, v = sdpa_qkv(n)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        t.other(n)
        return
    mask, dropout_p, is_causal, scale = sdpa_args(n)
    enable_gqa = bool(arg(n, None, "enable_gqa", False))
    inputs = [q.name, k.name, v.name]
    slots = {"q": q.name, "k": k.name, "v": v.name, "mask": None}
    if isinstance(mask, fx.Node):
        inputs.append(mask.name)
        slots["mask"] = mask.name
    qs, _ = shape_dtype(q)
    ks, _ = shape_dtype(k)
    t.add(n, "sdpa", inputs, flavor="torch_sdpa", layout="BHSD", slots=slots,
          is_causal=bool(is_causal), scale=None if scale is None else float(scale),
          dropout_p=dropout_p, enable_gqa=enable_gqa, softcap=None,
          num_heads=qs[-3] if qs and len(qs) >= 3 else 1,
          num_kv_heads=ks[-3] if ks and len(ks) >= 3 else 1)


@_handles("attention")
def _attnopt_op(t: _Translator, n: fx.Node) -> None:
    """An attnopt::attention call left by an earlier optimize (so inspect still sees it)."""
    if not (isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "attnopt"):
        t.other(n)
        return
    q, k, v, mask = arg(n, 0, "q"), arg(n, 1, "k"), arg(n, 2, "v"), arg(n, 3, "attn_mask")
    slots = {"q": q.name, "k": k.name, "v": v.name,
             "mask": mask.name if isinstance(mask, fx.Node) else None}
    qs, _ = shape_dtype(q)
    ks, _ = shape_dtype(k)
    t.add(n, "sdpa", t.node_inputs(n), flavor="attnopt", layout="BHSD", slots=slots,
          is_causal=bool(arg(n, 5, "causal")), scale=float(arg(n, 4, "scale")), dropout_p=0.0,
          enable_gqa=True, softcap=(float(arg(n, 9, "softcap")) or None), num_heads=qs[1] if qs else None,
          num_kv_heads=ks[1] if ks else None)


# F.multi_head_attention_forward's tensor parameters (by name) beside q, k, v and the masks
_MHA_TENSORS = ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj_weight", "out_proj_bias",
                "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k", "static_v")


@_handles("multi_head_attention_forward")
def _mha_forward(t: _Translator, n: fx.Node) -> None:
    """F.multi_head_attention_forward as dynamo keeps it (nn.MultiheadAttention, WavLM): q/k/v are
    its [S, B, E] inputs before the in-projection, which patterns/fused.py decomposes. The attrs
    say what torch computes: is_causal only where torch honours it (no key_padding_mask and no
    weights; the attn_mask is then ignored, so the slot is empty), dropout only in training, and
    whether the weights (output 1) are read by anything that reaches an output."""
    q, k, v = sdpa_qkv(n)
    heads = arg(n, 4, "num_heads")
    kpm, mask = arg(n, 14, "key_padding_mask"), arg(n, 16, "attn_mask")
    need_weights = bool(arg(n, 15, "need_weights", True))
    causal = bool(arg(n, 24, "is_causal", False)) and kpm is None and not need_weights
    slots = {"q": q.name, "k": k.name, "v": v.name,
             "mask": mask.name if isinstance(mask, fx.Node) and not causal else None,
             "key_padding_mask": kpm.name if isinstance(kpm, fx.Node) else None}
    for name in _MHA_TENSORS:
        x = arg(n, None, name)
        slots[name] = x.name if isinstance(x, fx.Node) else None
    live = [u for u in n.users if u not in t.dead]
    out0 = [u for u in live if base_name(u) == "getitem" and u.args[1:] == (0,)]
    t.add(n, "sdpa", t.node_inputs(n), flavor="torch_mha_forward", layout="SBD", slots=slots,
          is_causal=causal, scale=None,
          dropout_p=float(arg(n, 10, "dropout_p", 0.0)) if arg(n, 13, "training", True) else 0.0,
          enable_gqa=False, softcap=None, num_heads=heads, num_kv_heads=heads,
          embed_dim=arg(n, 3, "embed_dim_to_check"), add_zero_attn=bool(arg(n, 9, "add_zero_attn", False)),
          separate_proj=bool(arg(n, 17, "use_separate_proj_weight", False)), need_weights=need_weights,
          attn_output=out0[0].name if len(out0) == 1 else None, weights_used=len(live) > len(out0))


@_handles("_native_multi_head_attention")
def _native_mha(t: _Translator, n: fx.Node) -> None:
    q, k, v = sdpa_qkv(n)
    embed, heads = arg(n, 3, "embed_dim"), arg(n, 4, "num_head")
    mask = arg(n, 9, "mask")
    slots = {"q": q.name, "k": k.name, "v": v.name,
             "mask": mask.name if isinstance(mask, fx.Node) else None}
    t.add(n, "sdpa", t.node_inputs(n), flavor="torch_native_mha", layout="BSD", slots=slots,
          is_causal=False, scale=None, dropout_p=0.0, enable_gqa=False, softcap=None,
          num_heads=heads, num_kv_heads=heads, embed_dim=embed,
          need_weights=bool(arg(n, 10, "need_weights", True)))


# ---- entry points --------------------------------------------------------------------------

def from_graph_module(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None,
                      source: str = "fx", name: str = "graph") -> Graph:
    graph = Graph(name=name, source=source)
    _Translator(gm, graph).run()
    graph.evaluator = GraphEvaluator(gm, example_inputs, graph)
    graph.native_model = gm
    return graph


def from_exported_program(ep: "torch.export.ExportedProgram", name: str = "exported") -> Graph:
    gm = ep.module()
    example = None
    ex = getattr(ep, "example_inputs", None)
    if ex is not None:
        args, kwargs = ex
        flat_args = list(args)
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        # kwargs placeholders follow the positional ones, in the order export recorded them.
        flat_args += [kwargs[k] for k in placeholders[len(flat_args):] if k in kwargs]
        if len(flat_args) == len(placeholders):
            example = flat_args
    graph = from_graph_module(gm, example, source="aten", name=name)
    graph.native_program = ep
    return graph


def export_module(module: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True,
                  static: Mapping[int, Collection[int]] | None = None) -> "torch.export.ExportedProgram":
    """`module` exported on `example_inputs`. dynamic: every input dimension the model leaves free
    is kept symbolic (fx_dynamic.py) except those in `static` (dimension indices by the id of the
    example tensor), so the optimized module runs at other batch sizes and lengths; if that export
    fails, or with dynamic=False, it is exported at the example shapes."""
    if example_inputs is None:
        raise UnsupportedModel("an nn.Module needs example_inputs (a tuple of args or a dict of kwargs)")
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (
        tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,), {})
    # each submodule's own flag: module.train(flag) would reset a train-mode model's eval-mode parts
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            if dynamic:
                try:
                    with _unmarked((args, kwargs)):
                        return _export(module, args, kwargs,
                                       lambda: auto_dynamic_shapes(module, args, kwargs, static))
                except Exception as e:  # noqa: BLE001 - the static export below is the fallback
                    log.debug("attnopt: %s exported at the example input shapes only (the export "
                              "with dynamic dimensions failed: %s: %s)", type(module).__name__,
                              type(e).__name__, _first_line(e))
            try:
                with _unmarked((args, kwargs)):
                    return _export(module, args, kwargs, lambda: None)
            except (AttnoptError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - one line naming what torch.export said
                raise UnsupportedModel(f"torch.export cannot trace {type(module).__name__}: "
                                       f"{type(e).__name__}: {_first_line(e)}") from e
    finally:
        for m, training in modes:
            m.training = training


def _export(module: torch.nn.Module, args: tuple, kwargs: dict, shapes: Callable[[], Any]):
    # `shapes` is called per attempt: a cache registered as a pytree node changes its structure
    try:
        return torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=shapes())
    except Exception as e:  # noqa: BLE001 - retried once below, else re-raised
        # HF decoders return a cache by default (use_cache=True: DynamicCache,
        # EncoderDecoderCache, ...), which torch.export cannot flatten until it is a pytree node.
        if "Cache" not in str(e) or not _register_hf_cache_pytree():
            raise
    return torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=shapes())


@contextlib.contextmanager
def _unmarked(tree: Any):
    """Take off the caller's tensors whatever dimension marks an export puts on them (a failed
    dynamic export left `_dynamo_weak_dynamic_indices` behind, which failed the static fallback
    too, and the caller's inputs stayed marked)."""
    from torch.utils._pytree import tree_leaves

    tensors = [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
    before = [set(t.__dict__) for t in tensors]
    try:
        yield
    finally:
        for t, keys in zip(tensors, before):
            for key in set(t.__dict__) - keys:
                if key.startswith(("_dynamo", "_has_dynamo")):
                    delattr(t, key)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _register_hf_cache_pytree() -> bool:
    from attnopt.frontends.hf_cache import register_cache_pytrees

    return register_cache_pytrees()
