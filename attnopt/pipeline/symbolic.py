"""What a rewrite of a dynamo graph with symbolic sizes must pin, and the guards that say so.

torch.compile with dynamic=True (and automatic dynamic, after its one recompile) hands the backend
a graph whose sizes are symbols (SymInt placeholders, FakeTensor shapes `[s0, s1, ...]`), and with
dynamic=True also one whose Python float attributes (an attention module's `scaling`, a global
`SCALE`) arrive as 0-d tensor inputs read back with `.item()` (dynamo's unspecialized floats).
Batch and sequence lengths stay symbolic through a rewrite; two things cannot:

- a site's head size and head counts (`head_dim`, `v_head_dim`, `num_heads`, `num_kv_heads`):
  SDPA's default scale 1/sqrt(head_dim) is folded into one constant and the GQA group size is
  fixed when the rewrite is built. Where they are symbols they are pinned to the example's values
  (`pin_head_sizes`). They are architecture constants: dynamo makes them symbolic only because
  dynamic=True marks every dimension dynamic.
- a float input the rewrite folds into the kernel (the scale, a softcap): the graph is rewritten
  with the float as a literal (`float_literals`), and afterwards only the floats whose uses the
  rewrite consumed are pinned (`keep_consumed`); every other use reads the input again, so a float
  the rewrite did not fold never costs a recompile.

A rewrite is validated at the example sizes only, so what it added is then run on dynamo's
symbolic fake values (`check_rewritten`): any size it assumes there becomes a guard too, logged
with the node that assumes it (none does today: the emitted ops follow the graph's own sizes).
With inductor, a guard on a float makes inductor ask dynamo to retrace with that float
specialized (TensorifyScalarRestartAnalysis, passed through by the backend); the retraced graph
has the float as a constant and needs no pinning.

Pinning is a guard in dynamo's ShapeEnv, added during the backend call; dynamo turns it into a
guard of the compiled frame (as it does for inductor's own specializations), so a later call that
breaks it recompiles instead of running a rewrite that no longer holds. Each guard is logged once,
with the site and the reason. Nothing here runs per call: a compiled graph is rewritten and
validated once, at its compile, and serves every size its guards admit.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("attnopt")

HEAD_FIELDS = ("head_dim", "v_head_dim", "num_heads", "num_kv_heads")


class Literal(float):
    """A float input's example value written into the graph in place of its `.item()` read;
    `name` is the item node it replaced (so what the rewrite left of it can be put back)."""

    def __new__(cls, value: float, name: str = ""):
        self = super().__new__(cls, value)
        self.name = name
        return self


@dataclass
class SymbolicFloat:
    """One `.item()` read of a dynamo-wrapped Python float."""

    item: str                  # the call_method node reading it
    placeholder: str           # the 0-d tensor input it reads
    value: torch.SymFloat      # its symbol (with the example value as hint)


def concrete(x: Any) -> Any:
    """A symbolic size or float at its example value (validation runs on real inputs)."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    if isinstance(x, torch.SymFloat):
        return float(x.node.hint)
    if isinstance(x, torch.SymBool):
        return bool(x.node.hint)
    return x


def is_symbolic(example_inputs: Sequence[Any]) -> bool:
    return any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in example_inputs)


def symbolic_floats(gm: fx.GraphModule) -> list[SymbolicFloat]:
    """The `.item()` reads of placeholders whose value dynamo traced as a backed SymFloat (a Python
    float it chose not to specialize). Data-dependent reads of real tensors have no hint and are
    left alone."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_method" or n.target != "item" or len(n.args) != 1:
            continue
        src = n.args[0]
        v = n.meta.get("example_value")
        if not (isinstance(src, fx.Node) and src.op == "placeholder" and isinstance(v, torch.SymFloat)):
            continue
        if getattr(v.node, "hint", None) is None:
            continue
        found.append(SymbolicFloat(n.name, src.name, v))
    return found


def float_literals(gm: fx.GraphModule, floats: Sequence[SymbolicFloat]) -> fx.GraphModule:
    """A copy of `gm` (sharing its parameters) in which every use of each float's `.item()` reads
    a `Literal` of its example value instead, so the front end sees the constant it is."""
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    for f in floats:
        item = by_name[f.item]
        lit = Literal(float(f.value.node.hint), f.item)
        for user in list(item.users):
            swap = lambda a, item=item, lit=lit: lit if a is item else a  # noqa: E731
            user.args = fx.node.map_aggregate(user.args, swap)
            user.kwargs = fx.node.map_aggregate(user.kwargs, swap)
        graph.erase_node(item)
    out = fx.GraphModule(gm, graph)
    out.meta.update(getattr(gm, "meta", {}))
    return out


def _literal_uses(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}

    def see(a):
        if isinstance(a, Literal):
            counts[a.name] = counts.get(a.name, 0) + 1
        return a

    for n in gm.graph.nodes:
        fx.node.map_aggregate(n.args, see)
        fx.node.map_aggregate(n.kwargs, see)
    return counts


def keep_consumed(literal_gm: fx.GraphModule, new_gm: fx.GraphModule,
                  floats: Sequence[SymbolicFloat]) -> list[SymbolicFloat]:
    """After a rewrite of `literal_gm` into `new_gm` (modified in place): every literal the rewrite
    left is put back to a read of its input, and the floats some of whose uses the rewrite
    consumed (folded into a kernel) are returned: those must be pinned."""
    before, after = _literal_uses(literal_gm), _literal_uses(new_gm)
    consumed = [f for f in floats if after.get(f.item, 0) < before.get(f.item, 0)]
    if not after:
        return consumed
    graph = new_gm.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    reads: dict[str, fx.Node] = {}
    for f in floats:
        if after.get(f.item, 0) == 0:
            continue
        with graph.inserting_after(last_ph):
            node = graph.call_method("item", (placeholders[f.placeholder],))
        node.meta["example_value"] = f.value
        reads[f.item] = node
    for n in list(graph.nodes):
        back = lambda a: reads[a.name] if isinstance(a, Literal) and a.name in reads else a  # noqa: E731
        if n.op != "placeholder" and n not in reads.values():
            n.args = fx.node.map_aggregate(n.args, back)
            n.kwargs = fx.node.map_aggregate(n.kwargs, back)
    graph.lint()
    new_gm.recompile()
    return consumed


def pin_floats(floats: Sequence[SymbolicFloat]) -> None:
    for f in floats:
        symbol = str(f.value.node.expr)
        value = torch.fx.experimental.symbolic_shapes.guard_float(f.value)
        log.info("attnopt: guard %s == %r (float input %s): the rewrite folded it into an "
                 "attention kernel; another value recompiles", symbol, value, f.placeholder)


def _symbols_by_name(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, torch.SymInt]:
    """Every SymInt the graph's example values mention, by its printed expression."""
    found: dict[str, torch.SymInt] = {}

    def add(d):
        if isinstance(d, torch.SymInt):
            found.setdefault(str(d.node.expr), d)

    for x in example_inputs:
        add(x)
    for n in gm.graph.nodes:
        v = n.meta.get("example_value", n.meta.get("val"))
        for t in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(t, torch.Tensor):
                for d in t.shape:
                    add(d)
            else:
                add(t)
    return found


def pin_head_sizes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[str]:
    """Pin the symbolic head sizes and head counts of the attention sites in `gm` to their example
    values (see the module docstring); returns what was pinned, as 'symbol=value (why)'. A graph
    the front end cannot read pins nothing (optimize_graph_module leaves it alone and says why)."""
    from attnopt.frontends import fx as fx_front
    from attnopt.passes.detect import detect

    try:
        graph = fx_front.from_graph_module(gm, [concrete(x) for x in example_inputs], source="fx")
        sites, _ = detect(graph)
    except Exception:  # noqa: BLE001 - reported by optimize_graph_module on the same graph
        return []
    symbols = _symbols_by_name(gm, example_inputs)
    pinned: list[str] = []
    for s in sites:
        for field in HEAD_FIELDS:
            dim = getattr(s.spec, field, None)
            if not isinstance(dim, str) or dim not in symbols:
                continue
            value = torch.fx.experimental.symbolic_shapes.guard_int(symbols.pop(dim))
            why = (f"{field} of {s.name}: the rewrite fixes the folded scale, the kernel's head "
                   f"size and the query/key head grouping")
            log.info("attnopt: guard %s == %d (%s); batch and sequence lengths stay dynamic",
                     dim, value, why)
            pinned.append(f"{dim}={value} ({why})")
    return pinned


def _input_names(n: fx.Node) -> tuple[str, ...]:
    return tuple(a.name for a in n.all_input_nodes)


class _RewrittenPart(fx.Interpreter):
    """Runs, on dynamo's fake values, only what a rewrite added or rewired: every node the
    original graph had (same name, same inputs) answers with the fake value dynamo recorded for
    it. The ShapeEnv guards each node adds are kept with the node's name."""

    def __init__(self, gm: fx.GraphModule, recorded: dict[str, Any], shape_env):
        super().__init__(gm)
        self.recorded = recorded
        self.shape_env = shape_env
        self.fresh: set[str] = set()
        self.guards: list[tuple[str, str]] = []

    def run_node(self, n: fx.Node) -> Any:
        old = self.recorded.get(n.name)
        if (old is not None and old[0] == (n.op, n.target, _input_names(n))
                and not any(a.name in self.fresh for a in n.all_input_nodes)):
            return old[1]
        if n.op != "output":
            self.fresh.add(n.name)
        k = len(self.shape_env.guards)
        out = super().run_node(n)
        self.guards += [(n.name, str(g.expr)) for g in self.shape_env.guards[k:]]
        return out


def check_rewritten(original: fx.GraphModule, new_gm: fx.GraphModule) -> list[str]:
    """Run what the rewrite added to `new_gm` on dynamo's symbolic fake values, so that every size
    it assumes becomes a dynamo guard (the rewrite of a symbolic graph is validated at one size
    only; a size it baked in must recompile, not run wrong). Returns the guards added, as
    'expr (node)', each logged. Raises when the rewritten part cannot run on symbolic sizes (the
    caller then keeps the graph as it came)."""
    recorded = {n.name: ((n.op, n.target, _input_names(n)), n.meta["example_value"])
                for n in original.graph.nodes if "example_value" in n.meta}
    fakes = [v for _, v in recorded.values() if isinstance(v, torch._subclasses.FakeTensor)]
    if not fakes or fakes[0].fake_mode.shape_env is None:
        return []
    mode = fakes[0].fake_mode
    placeholders = [n for n in new_gm.graph.nodes if n.op == "placeholder"]
    if any(n.name not in recorded for n in placeholders):
        return []
    interp = _RewrittenPart(new_gm, recorded, mode.shape_env)
    with mode, torch.no_grad():
        interp.run(*[recorded[n.name][1] for n in placeholders])
    added = []
    for node, expr in interp.guards:
        log.info("attnopt: guard %s: the rewritten graph's %s assumes it (validated at the example "
                 "sizes only); other sizes recompile", expr, node)
        added.append(f"{expr} ({node})")
    return added
