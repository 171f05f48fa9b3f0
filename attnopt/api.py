"""Public entry points: inspect() (and later optimize(), simulate())."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnopt.ir import Graph, Rejection, Site


@dataclass
class InspectReport:
    """What `inspect` found: the attention sites and the near misses with reasons."""

    sites: list[Site]
    rejected: list[Rejection] = field(default_factory=list)
    source: str = ""
    graph: Graph | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": [s.to_json() for s in self.sites],
            "rejected": [r.to_json() for r in self.rejected],
        }


def load_graph(model: Any, example_inputs: Any = None) -> Graph:
    """Translate any supported model object or path into the neutral IR."""
    from attnopt.frontends import load

    return load(model, example_inputs)


def inspect(model: Any, example_inputs: Any = None) -> InspectReport:
    """Find every attention site of `model`.

    model: an nn.Module (with example_inputs: a tuple of positional args or a dict of kwargs),
    a torch.fx.GraphModule (with example_inputs, as a torch.compile backend receives them),
    a torch.export.ExportedProgram, an onnx.ModelProto, or a path to a `.pt2`/`.onnx` file.
    """
    from attnopt.passes.detect import detect

    graph = load_graph(model, example_inputs)
    sites, rejected = detect(graph)
    src = os.fspath(model) if isinstance(model, (str, Path)) else type(model).__name__
    return InspectReport(sites=sites, rejected=rejected, source=src, graph=graph)


def _is_pt2(path: Path) -> bool:
    import zipfile

    return path.exists() and zipfile.is_zipfile(path)


ONNX_OPS = ("ort", "standard")


def check_options(policy: str | None, onnx_op: str) -> None:
    """BadArgument (exit 2) for a policy or ONNX op outside its set."""
    from attnopt.errors import BadArgument
    from attnopt.planner.schema import POLICIES

    if policy is not None and policy not in POLICIES:
        raise BadArgument(f"policy (--policy) must be one of {', '.join(POLICIES)}, got {policy!r}")
    if onnx_op not in ONNX_OPS:
        raise BadArgument(f"onnx_op (--onnx-op) must be one of {', '.join(ONNX_OPS)}, got {onnx_op!r}")


def check_optimize_args(policy: str | None, onnx_op: str, plan: Any) -> tuple[str, Any]:
    """(effective policy, checked Plan or None) for optimize(); BadArgument (exit 2) for an
    unknown policy or ONNX op, a plan that is not valid (its bad field named), policy "approx"
    without a plan, or policy "exact" with a plan that holds approximate choices."""
    from attnopt.errors import BadArgument
    from attnopt.planner.plan import Plan

    check_options(policy, onnx_op)
    if plan is None:
        if policy == "approx":
            raise BadArgument("policy 'approx' needs a plan: run attnopt.plan(model, ..., "
                              "policy='approx') (`attnopt plan`) and pass it (plan= / --plan)")
        return "exact", None
    plan = Plan.coerce(plan)
    approx = plan.approximate_sites
    if policy == "exact" and approx:
        raise BadArgument(f"policy 'exact', but the plan holds {len(approx)} approximate "
                          f"choice(s) (site {approx[0]!r}, max_error {plan.max_error:g}): "
                          "apply it without policy 'exact', or plan with policy 'exact'")
    return policy or plan.policy, plan


def optimize(model: Any, example_inputs: Any = None, policy: str | None = None, *,
             validate: bool = True, onnx_op: str = "ort", plan: Any = None):
    """Replace every provable attention site by one fused exact kernel call.

    `plan` (an attnopt.Plan, e.g. from attnopt.plan(..., policy="approx"), its JSON dict or a
    plan file path; checked field by field, BadArgument naming a bad one) chooses each site's
    variant, approximate ones included; approximate sites are validated against the plan's
    max_error instead of floating-point noise. `policy`: None (exact, or the plan's), "exact"
    (a plan with approximate choices is refused: BadArgument) or "approx" (needs a plan).

    Returns an `OptimizeResult` whose `.model` is a GraphModule (for an nn.Module or a dynamo
    GraphModule), an ExportedProgram (for an ExportedProgram or a `.pt2` path) or a ModelProto
    (for ONNX). Every kept site was validated against the original on generated inputs.
    """
    from attnopt.errors import UnsupportedModel

    policy, plan = check_optimize_args(policy, onnx_op, plan)
    if (isinstance(model, (str, Path)) and not _is_pt2(Path(model))) \
            or type(model).__module__.startswith("onnx"):
        if plan is not None:
            raise UnsupportedModel("plans apply to torch models (.pt2, nn.Module) only so far")
        from attnopt.pipeline.optimize_onnx import optimize_onnx_model

        return optimize_onnx_model(model, op=onnx_op, validate=validate)
    from attnopt.pipeline.optimize_torch import optimize_torch

    if isinstance(model, (str, Path)):  # a .pt2 path
        import torch

        from attnopt.frontends import load_pt2_program

        model = load_pt2_program(Path(model))
        if not isinstance(model, torch.export.ExportedProgram):
            raise UnsupportedModel("not a torch.export program")
    return optimize_torch(model, example_inputs, validate=validate, plan=plan)
