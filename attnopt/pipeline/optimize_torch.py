"""optimize() for torch models: nn.Module, dynamo GraphModule, ExportedProgram.

detect -> plan a recipe per site -> splice into a copy of the graph -> validate against the
original on the example inputs (and padded variants) -> revert any site whose output moved
beyond floating-point noise, re-validating until what is kept is proven.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.fx as fx

from attnopt.errors import AttnoptError
from attnopt.frontends import fx as fx_front
from attnopt.emit.fx import splice
from attnopt.ir import Site
from attnopt.passes.detect import detect
from attnopt.passes.rewrite import key_padding_flags, plan_all, structural_windows
from attnopt.pipeline.validate import (Error, outputs_error, padded_variants, padding_positions, run_captured,
                                     tensor_error, tolerance_for, low_precision_tolerance)
from attnopt.pipeline.result import OptimizeResult, SiteResult
from attnopt.pipeline.symbolic import concrete

log = logging.getLogger("attnopt")


class PlanApplication(Protocol):
    """What this layer needs of a plan (the planner's Plan implements it; the pipeline never
    imports the planner, which sits above it)."""

    max_error: float

    def split(self, graph: Any, sites: Sequence[Site], recipes: Sequence[Any]
              ) -> tuple[list[Any], list[Any], dict[str, str]]:
        """(exact recipes, approximate recipes in walk order, variant label per site)."""

    def add_approximate(self, gm: fx.GraphModule, exact: list[Any], approx: list[Any],
                        variants: Sequence[Sequence[Any]], padding_positions: Sequence[int]
                        ) -> tuple[fx.GraphModule, list[Any], float, list[tuple[str, float]]]:
        """(module, kept approximate recipes, end-to-end rel L2, reverted [(site, rel L2)])."""


def _label(plan_label: str | None, r) -> str:
    """The variant a rewritten site runs: the plan's, unless the mask proved a window the plan
    called dense (structural_windows)."""
    if plan_label and not (r.window is not None and plan_label in ("exact:dense", "exact:causal")):
        return plan_label
    if r.window is not None:
        left, right = ("" if w is None else w for w in r.window)
        return f"exact:sliding_window({left},{right})"
    return "exact:" + ("causal" if r.causal else "dense")


def flat_example_inputs(ep: "torch.export.ExportedProgram", gm: fx.GraphModule) -> list[Any]:
    ex = getattr(ep, "example_inputs", None)
    if ex is None:
        raise ValueError("the exported program carries no example inputs; pass example_inputs")
    args, kwargs = ex
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(flat) != n_ph:
        raise ValueError(f"example inputs flatten to {len(flat)} values, the program takes {n_ph}")
    return flat


def optimize_graph_module(gm: fx.GraphModule, inputs: Sequence[Any], *, source: str = "fx",
                          validate: bool = True, plan: PlanApplication | None = None
                          ) -> tuple[fx.GraphModule, OptimizeResult]:
    """plan: an attnopt.Plan (PlanApplication); its exact variants are validated like any rewrite, its
    approximate ones afterwards against the plan's max_error (end-to-end relative L2)."""
    inputs = [concrete(x) for x in inputs]  # dynamo's SymInts: validate at their example values
    try:
        graph = fx_front.from_graph_module(gm, list(inputs), source=source)
        sites, rejected = detect(graph)
        recipes, reasons = plan_all(graph, sites)
    except AttnoptError:
        raise
    except Exception as e:  # noqa: BLE001 - a front-end bug leaves this graph as it is
        return gm, _left_alone(gm, "reading it", e)
    approx, labels = [], {}
    if plan is not None:
        recipes, approx, labels = plan.split(graph, sites, recipes)
    # after the plan's choices: a site the plan gave a layout or window keeps it
    recipes = key_padding_flags(graph, sites, structural_windows(graph, sites, recipes))
    results: dict[str, SiteResult] = {
        s.name: SiteResult(s.name, s.pattern, "kept", None, reasons[s.name], s.spec)
        for s in sites if s.name in reasons}
    positions = padding_positions(graph, sites)
    variants = padded_variants(list(inputs), positions) if validate else []
    kept = list(recipes)
    new_gm = gm
    site_err: dict[str, Error] = {}
    total = Error(0.0, 0.0)
    if validate and kept:
        ref0 = _run(gm, variants[0])
        tol = low_precision_tolerance(gm, variants[0], ref0, tolerance_for(ref0))
    while kept:
        try:
            new_gm, result_nodes = splice(gm, kept)
        except Exception as e:  # noqa: BLE001 - a splice bug leaves this graph as it is
            return gm, _left_alone(gm, "splicing it", e)
        if not validate:
            break
        total, site_err = _measure(gm, new_gm, variants, kept, result_nodes)
        if total.rel <= tol:
            break
        # Revert the earliest site that moved beyond tolerance (later ones see its error).
        bad = next((r for r in kept if site_err[r.site].rel > tol), kept[-1])
        results[bad.site] = SiteResult(bad.site, _pattern(sites, bad.site), "reverted",
                                       site_err[bad.site].rel,
                                       f"validation failed: relative error "
                                       f"{site_err[bad.site].rel:.3g} > {tol:g}", _spec(sites, bad.site))
        kept.remove(bad)
    if not kept:
        new_gm = gm
        total = Error(0.0, 0.0)
    for r in kept:
        e = site_err.get(r.site)
        results[r.site] = SiteResult(r.site, _pattern(sites, r.site), "rewritten",
                                     e.rel if e else None, "", _spec(sites, r.site),
                                     variant=_label(labels.get(r.site), r))
    plan_l2 = None
    if approx:
        new_gm, kept_approx, l2, reverted = plan.add_approximate(gm, kept, approx,
                                                                 variants or [list(inputs)], positions)
        for r in kept_approx:
            results[r.site] = SiteResult(r.site, _pattern(sites, r.site), "rewritten", l2,
                                         "approximate: end-to-end relative L2", _spec(sites, r.site),
                                         variant=labels[r.site])
        for name, err in reverted:
            results[name] = SiteResult(name, _pattern(sites, name), "reverted", err,
                                       f"validation failed: end-to-end relative L2 {err:.3g} > "
                                       f"max_error {plan.max_error:g}", _spec(sites, name),
                                       variant=labels[name])
        if kept_approx:
            total = Error.worst([outputs_error(_run(gm, b), _run(new_gm, b))
                                 for b in (variants or [list(inputs)])])
            plan_l2 = l2  # the plan's own metric, as it was checked against max_error
    ordered = [results[s.name] for s in sites if s.name in results]
    return new_gm, OptimizeResult(model=new_gm, sites=ordered, rejected=rejected,
                                  max_abs_error=total.max_abs,
                                  rel_error=total.rel if plan_l2 is None else plan_l2,
                                  max_abs_rel_error=total.rel,
                                  error_metric="max_abs/max_ref" if plan_l2 is None else "rel_l2")


def _left_alone(gm: fx.GraphModule, stage: str, e: Exception) -> OptimizeResult:
    """The result for a graph left as it is because the front end failed on it: one warning
    with the reason, nothing rewritten (the graph still runs, unoptimized)."""
    log.warning("attnopt: graph left unoptimized: %s failed (%s: %s)", stage, type(e).__name__, e)
    return OptimizeResult(model=gm, sites=[])


def _spec(sites: list[Site], name: str):
    return next(s.spec for s in sites if s.name == name)


def _pattern(sites: list[Site], name: str) -> str:
    return next(s.pattern for s in sites if s.name == name)


def _run(gm: fx.GraphModule, inputs: Sequence[Any]) -> Any:
    out, _ = run_captured(gm, inputs, set())
    return out


def _measure(gm, new_gm, variants, recipes, result_nodes) -> tuple[Error, dict[str, Error]]:
    per_site: dict[str, list[Error]] = {r.site: [] for r in recipes}
    totals = []
    for inputs in variants:
        ref, ref_vals = run_captured(gm, inputs, {r.output for r in recipes})
        new, new_vals = run_captured(new_gm, inputs, set(result_nodes.values()))
        totals.append(outputs_error(ref, new))
        for r in recipes:
            a, b = ref_vals.get(r.output), new_vals.get(result_nodes[r.site])
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                per_site[r.site].append(tensor_error(a, b))
            else:
                per_site[r.site].append(Error(float("inf"), float("inf")))
    return Error.worst(totals), {k: Error.worst(v) for k, v in per_site.items()}


def optimize_torch(model: Any, example_inputs: Any = None, *, validate: bool = True,
                   plan: PlanApplication | None = None) -> OptimizeResult:
    if isinstance(model, fx.GraphModule) and example_inputs is not None \
            and not isinstance(example_inputs, Mapping):
        new_gm, res = optimize_graph_module(model, list(example_inputs), validate=validate, plan=plan)
        return res
    if isinstance(model, torch.export.ExportedProgram):
        ep = model
    else:
        from attnopt.pipeline.module_export import export_for_optimize

        # dynamic sizes where the model and the rewrites allow; a plan is chosen for the example's
        ep = export_for_optimize(model, example_inputs) if plan is None else \
            fx_front.export_module(model, example_inputs, dynamic=False)
    gm = ep.module()
    inputs = flat_example_inputs(ep, gm)
    new_gm, res = optimize_graph_module(gm, inputs, source="aten", validate=validate, plan=plan)
    if isinstance(model, torch.export.ExportedProgram):
        from attnopt.pipeline.export_shapes import reexport  # keeps the input's dynamic dimensions

        res.model = reexport(ep, new_gm)
    return res
