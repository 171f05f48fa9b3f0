"""The `attnopt` app: `inspect` and `optimize` here, `plan` (cli/plan.py) and `simulate`
(cli/simulate.py) registered from their modules; shared error handling in cli/common.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from attnopt.cli.common import (UNSAFE_PICKLE_OPTION, err, ignore_late_interrupts, out, pickle_policy,
                                run_as_process, shown, user_errors)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="attnopt: find, plan and fuse every attention in a model.")


@app.callback()
def _root() -> None:
    """attnopt: find, plan and fuse every attention in a model."""


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def sites_table(report) -> Table:
    t = Table(title=f"attention sites in {report.source}", show_lines=False)
    for col in ("site", "pattern", "norm", "heads", "q x kv", "head dim", "scale", "mask",
                "mods", "grid"):
        t.add_column(col, overflow="fold")
    for s in report.sites:
        sp = s.spec
        heads = _fmt(sp.num_heads) if sp.num_heads == sp.num_kv_heads else \
            f"{_fmt(sp.num_heads)}/{_fmt(sp.num_kv_heads)}"
        hd = _fmt(sp.head_dim) if sp.head_dim == sp.v_head_dim else \
            f"{_fmt(sp.head_dim)}/{_fmt(sp.v_head_dim)}"
        t.add_row(s.name, s.pattern, sp.normalizer, heads, f"{_fmt(sp.q_len)} x {_fmt(sp.kv_len)}",
                  hd, _fmt(sp.scale), sp.mask.describe(), ",".join(sp.score_mods) or "-",
                  sp.token_grid.describe() if sp.token_grid else "-")
    return t


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="an .onnx or .pt2 file", readable=False),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    explain: bool = typer.Option(False, "--explain", help="also list near misses and why"),
    allow_unsafe_pickle: bool = UNSAFE_PICKLE_OPTION,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Find every attention site in MODEL and describe it exactly."""
    import attnopt

    with user_errors(debug), pickle_policy(allow_unsafe_pickle):
        with err.status(f"inspecting {model} ..."):
            report = attnopt.inspect(model)
        if as_json:
            sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
            return
        if report.sites:
            out.print(sites_table(report))
        else:
            out.print(f"no attention found in {model}")
        if explain and report.rejected:
            t = Table(title="near misses (not attention, or not provably)")
            t.add_column("node", overflow="fold")
            t.add_column("reason", overflow="fold")
            for r in report.rejected:
                t.add_row(r.node, r.reason)
            out.print(t)
        elif report.rejected:
            out.print(f"{len(report.rejected)} near miss(es); --explain lists them")


def _check_output(model: Path, output: Path, *, reads: tuple = ()) -> None:
    """The output must be writable and must not be anything this run reads (outputs.py)."""
    from attnopt.errors import OutputError
    from attnopt.pipeline.outputs import check_output, onnx_external_files

    if output.suffix not in (".onnx", ".pt2"):
        raise OutputError(f"output {output} must end in .onnx or .pt2")
    if model.suffix in (".onnx", ".pt2") and output.suffix != model.suffix:
        raise OutputError(f"output {output} must have the input's format ({model.suffix})")
    side = [output.name + ".data"] if output.suffix == ".onnx" else []
    inputs = [("input model", model)] + list(reads)
    if any(_exists(output.parent / n) for n in [output.name, *side]):
        # only a file that exists can be one the model reads: the model is parsed a second time
        # (for its external-data names) only then, not on every run
        inputs += [("input model's external data", p) for p in onnx_external_files(model)]
    check_output(output, inputs, extra_names=side)


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long to exist: check_output reports it
        return False


def results_table(result) -> Table:
    t = Table(title="attnopt optimize")
    for col in ("site", "pattern", "variant", "status", "error", "reason"):
        t.add_column(col, overflow="fold")
    for s in result.sites:
        style = {"rewritten": "green", "reverted": "red"}.get(s.status, "yellow")
        t.add_row(s.name, s.pattern, s.variant or "-", f"[{style}]{s.status}[/{style}]",
                  "-" if s.error is None else f"{s.error:.2g}", s.reason or "")
    return t


@app.command()
def optimize(
    model: Path = typer.Argument(..., help="an .onnx or .pt2 file", readable=False),
    output: Path = typer.Option(..., "-o", "--output", help="where to write the optimized model"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
    onnx_op: str = typer.Option("ort", "--onnx-op",
                                help="fused ONNX node: 'ort' (com.microsoft.MultiHeadAttention, "
                                     "fastest in ONNX Runtime) or 'standard' (opset-23 Attention)"),
    policy: str = typer.Option(None, "--policy",
                               help="exact (never changes results; refuses a plan with approximate "
                                    "choices) | approx (needs --plan); default: exact, or the plan's"),
    plan_file: Path = typer.Option(None, "--plan", help="apply a plan written by `attnopt plan` "
                                                        "(re-validated; .pt2 models)"),
    allow_unsafe_pickle: bool = UNSAFE_PICKLE_OPTION,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Replace every attention site of MODEL by one fused, validated kernel; write OUTPUT."""
    import attnopt

    with user_errors(debug), pickle_policy(allow_unsafe_pickle):
        from attnopt.api import check_optimize_args, check_options
        from attnopt.errors import InputNotFound
        from attnopt.frontends import check_input

        check_options(policy, onnx_op)  # option values first: exit 2
        check_input(model)
        _check_output(model, output, reads=(("plan", plan_file),))
        plan = None
        if plan_file is not None:
            if not plan_file.exists():
                raise InputNotFound(f"no such file: {plan_file}")
            plan = attnopt.Plan.load(plan_file)
        policy, plan = check_optimize_args(policy, onnx_op, plan)
        with err.status(f"optimizing {model} ..."):
            result = attnopt.optimize(model, policy=policy, onnx_op=onnx_op, plan=plan)
            write_model(result, output)
        # The output is written: the command has succeeded, and a ^C now (while the report is
        # printed) must not turn that into "interrupted" with the file in place.
        ignore_late_interrupts()
        result.output = str(output)
        if plan is not None and plan.approximate_sites:
            n = sum(1 for s in result.sites if s.status == "rewritten" and
                    (s.variant or "").startswith("approx:"))
            err.print(f"applied an approximate plan: {n} of its {len(plan.approximate_sites)} "
                      f"approximate site(s) kept, results may differ by up to max_error "
                      f"{plan.max_error:g} (end-to-end relative L2)", highlight=False)
        if as_json:
            data = result.to_json()
            sys.stdout.write(json.dumps({k: data[k] for k in (
                "sites_found", "sites_rewritten", "max_abs_error", "rel_error", "error_metric",
                "output")}, indent=2) + "\n")
            return
        out.print(results_table(result))
        rel = (f"end-to-end relative L2 {result.rel_error:.3g}, the plan's metric"
               if result.error_metric == "rel_l2" else f"relative {result.rel_error:.3g}")
        out.print(f"{result.sites_rewritten}/{result.sites_found} sites rewritten, max abs error "
                  f"{result.max_abs_error:.3g} ({rel}); wrote {shown(output)}")


def write_model(result, output: Path) -> None:
    """Write atomically: temporary file, check, reload, rename (outputs.py)."""
    from attnopt.pipeline.outputs import write_onnx, write_pt2

    if output.suffix == ".onnx":
        write_onnx(result.model, output, getattr(result, "base_dir", None))
    else:
        write_pt2(result.model, output)


def _register_subcommands() -> None:
    from attnopt.cli.plan import register as register_plan
    from attnopt.cli.simulate import register

    register(app)
    register_plan(app)


_register_subcommands()


def main() -> None:
    run_as_process(app)


if __name__ == "__main__":
    main()
