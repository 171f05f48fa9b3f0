"""An nn.Module exported for optimize: symbolic where the model allows and the rewrite holds.

`frontends.fx.export_module` keeps every input dimension the model leaves free symbolic, so the
optimized module runs at other batch sizes and lengths. Two things a rewrite builds in cannot stay
symbolic, and are checked here on the exported graph (detection and recipes, as optimize runs them):

- a site's head size and head counts (`head_dim`, `v_head_dim`, `num_heads`, `num_kv_heads`): SDPA's
  default scale 1/sqrt(head_dim) is folded into one constant and the GQA group size is fixed when
  the rewrite is built. They are symbolic only where q, k and v are model inputs (real models fix
  them with their weights): the input dimensions they come from are exported again at their
  example sizes, so the optimized module's input check names the dimension ("Guard failed:
  q.size()[3] == 8") and the log at debug level says which site's rewrite needs it.
- anything else the symbolic graph proves worse: when detection on it rejects or keeps a site, the
  module is also exported at the example shapes, and that program is used if more of its sites can
  be rewritten (said at debug level), so dynamic dimensions never cost a rewrite.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from attnopt.frontends import fx as fx_front
from attnopt.passes.detect import detect
from attnopt.passes.rewrite import plan_all
from attnopt.patterns.recipe import is_constant
from attnopt.pipeline.symbolic import HEAD_FIELDS  # what the compile backend pins, for the same reason

log = logging.getLogger("attnopt")


@dataclass
class _Probe:
    rewritable: int = -1  # sites with a recipe; -1: the front end failed on the graph
    complete: bool = False  # no rejection and no site without a recipe
    head_symbols: dict[str, str] = field(default_factory=dict)  # symbol -> "site field"


def export_for_optimize(model: torch.nn.Module, example_inputs: Any) -> "torch.export.ExportedProgram":
    """`model` exported on `example_inputs` for optimize: dynamic dimensions where the model and
    every rewrite allow them (module header)."""
    ep = fx_front.export_module(model, example_inputs)
    if not ep.range_constraints:
        return ep  # nothing symbolic: the static export
    probe = _probe(ep)
    if probe.head_symbols:
        static = _static_dims(ep, set(probe.head_symbols))
        if static:
            for sym, why in probe.head_symbols.items():
                log.debug("attnopt: %s: the input dimension of size %s stays at its example size "
                          "(the rewrite of %s builds it in)", type(model).__name__, sym, why)
            ep = fx_front.export_module(model, example_inputs, static=static)
            if not ep.range_constraints:
                return ep
            probe = _probe(ep)
    if probe.complete and not probe.head_symbols:
        return ep
    fixed = fx_front.export_module(model, example_inputs, dynamic=False)
    fixed_probe = _probe(fixed)
    if fixed_probe.rewritable > probe.rewritable or probe.head_symbols:
        log.debug("attnopt: %s exported at the example input shapes only: %d site(s) rewritable "
                  "there, %d with dynamic dimensions", type(model).__name__, fixed_probe.rewritable,
                  max(probe.rewritable, 0))
        return fixed
    return ep


def _probe(ep: "torch.export.ExportedProgram") -> _Probe:
    try:
        graph = fx_front.from_exported_program(ep)
        sites, rejected = detect(graph)
        heads: dict[str, str] = {}
        for s in sites:
            for f in HEAD_FIELDS:
                value = getattr(s.spec, f, None)
                if isinstance(value, str):
                    for sym in re.findall(r"[A-Za-z_]\w*", value):
                        heads.setdefault(sym, f"{s.name} ({f} {value})")
        recipes, reasons = plan_all(graph, sites) if not heads else ([], {"": ""})
        by_name = {s.name: s for s in sites}
        for r in recipes:
            # a constant mask (causal, sliding window, built from arange(S)) becomes the op's own
            # flag only at static lengths: pin the lengths it was proven at (the batch stays free)
            s = by_name.get(r.site)
            if s is None or not r.masks or r.causal or r.window is not None \
                    or not all(is_constant(graph, t.node) for t in r.masks):
                continue
            for f in ("q_len", "kv_len"):
                value = getattr(s.spec, f, None)
                if isinstance(value, str):
                    for sym in re.findall(r"[A-Za-z_]\w*", value):
                        heads.setdefault(sym, f"{s.name} ({f} {value}: its constant mask is proven "
                                              "structural at this length)")
    except Exception as e:  # noqa: BLE001 - counts as nothing rewritable
        log.debug("attnopt: detection failed on the exported graph (%s: %s)", type(e).__name__, e)
        return _Probe()
    return _Probe(len(recipes), not rejected and not reasons, heads)


def _static_dims(ep: "torch.export.ExportedProgram", symbols: set[str]) -> dict[int, set[int]]:
    """The input dimensions (by the id of the example tensor) whose size involves `symbols`."""
    args, kwargs = ep.example_inputs
    flat, _ = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
    user = list(ep.graph_signature.user_inputs)
    if len(flat) != len(user):
        return {}
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    static: dict[int, set[int]] = {}
    for name, value in zip(user, flat):
        val = vals.get(name)
        if not isinstance(value, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        for i, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and \
                    {str(x) for x in size.node.expr.free_symbols} & symbols:
                static.setdefault(id(value), set()).add(i)
    return static
