"""Evaluating IR values of an fx graph on probe inputs (the front end's `Evaluator`): the graph is
run by torch.fx's interpreter up to the requested nodes."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from attnopt.ir import Evaluator, Graph
from attnopt.frontends.fx_nodes import meta_val
from attnopt.frontends.fx_state import preserved


# ---- evaluation ----------------------------------------------------------------------------

def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _probe_tensor(name: str, val: Any, gen: torch.Generator) -> Any:
    if not isinstance(val, torch.Tensor):
        return val
    shape = [d if isinstance(d, int) else int(d.node.hint) for d in val.shape]
    dt = val.dtype
    dev = val.device if val.device.type != "meta" else "cpu"
    if dt.is_floating_point:
        return torch.randn(shape, generator=gen).to(dev, dt)
    if dt == torch.bool:
        return torch.ones(shape, dtype=dt, device=dev)
    return (torch.ones if "mask" in name.lower() else torch.zeros)(shape, dtype=dt, device=dev)


class FxEvaluator(Evaluator):
    """Runs the ancestors of requested nodes of a GraphModule on probe inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any] | None):
        self.gm = gm
        self.nodes = {n.name: n for n in gm.graph.nodes}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.placeholders = placeholders
        gen = torch.Generator().manual_seed(0)
        self.defaults: dict[str, Any] = {}
        for i, p in enumerate(placeholders):
            if example_inputs is not None and i < len(example_inputs):
                self.defaults[p.name] = example_inputs[i]
            else:
                self.defaults[p.name] = _probe_tensor(p.name, meta_val(p), gen)

    def _run(self, targets: Sequence[fx.Node], feeds: Mapping[str, Any]) -> dict[fx.Node, Any]:
        needed: set[fx.Node] = set()
        stack = list(targets)
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        interp = fx.Interpreter(self.gm)
        env = interp.env
        # a probe run must not write the caller's inputs or buffers (a static KV cache)
        values = [feeds[p.name] if p.name in feeds else self.defaults[p.name] for p in self.placeholders]
        with torch.no_grad(), preserved(self.gm, values, needed):
            for n in self.gm.graph.nodes:
                if n not in needed:
                    continue
                if n.op == "placeholder":
                    env[n] = feeds[n.name] if n.name in feeds else self.defaults[n.name]
                else:
                    env[n] = interp.run_node(n)
        return {n: env[n] for n in targets}

    def evaluate(self, nids, feeds=None):
        tfeeds = {k: torch.as_tensor(v) for k, v in (feeds or {}).items()}
        for k, v in list(tfeeds.items()):
            d = self.defaults.get(k)
            if isinstance(d, torch.Tensor):  # probes arrive as numpy: back to the graph's device
                tfeeds[k] = v.to(d.device, d.dtype)
        targets, consts = [], {}
        for nid in nids:
            if nid in self.nodes:
                targets.append(self.nodes[nid])
            else:  # a literal const synthesized by the translator
                consts[nid] = None
        out = self._run(targets, tfeeds)
        result = {n.name: to_numpy(v) for n, v in out.items()}
        return {**{k: v for k, v in consts.items() if v is not None}, **result}

    def probe_shape(self, nid):
        v = meta_val(self.nodes[nid]) if nid in self.nodes else None
        if isinstance(v, torch.Tensor):
            try:
                return tuple(int(d) if isinstance(d, int) else int(d.node.hint) for d in v.shape)
            except Exception:  # noqa: BLE001 - unhinted symbol: evaluate instead
                pass
        return tuple(self.evaluate([nid])[nid].shape)


class GraphEvaluator(FxEvaluator):
    """FxEvaluator that also answers for literal consts (their value lives in the IR)."""

    def __init__(self, gm, example_inputs, graph: Graph):
        super().__init__(gm, example_inputs)
        self.graph = graph

    def evaluate(self, nids, feeds=None):
        out = super().evaluate([n for n in nids if n in self.nodes], feeds)
        for nid in nids:
            if nid not in out and nid in self.graph and self.graph.value(nid) is not None:
                out[nid] = self.graph.value(nid)
        return out

