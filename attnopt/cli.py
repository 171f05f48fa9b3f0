"""The `attnopt` command line: inspect (and, as they land, optimize, plan, simulate, bench).

Every command turns a user error into one line on stderr and a distinct exit code
(attnopt.errors); a traceback only with --debug.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.table import Table

from attnopt.errors import AttnoptError, Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="attnopt: find, plan and fuse every attention in a model.")
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root() -> None:
    """attnopt: find, plan and fuse every attention in a model."""


@contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Map failures to one-line messages and exit codes."""
    try:
        yield
    except typer.Exit:
        raise
    except AttnoptError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {shown(e)}", highlight=False)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        # Straight to the real stderr: a ^C can land while rich's live status display has
        # sys.stderr redirected, and the message was then lost (exit 130, nothing printed).
        _report_interrupt()
        raise typer.Exit(Interrupted.exit_code) from None
    except MemoryError:
        # a file can declare shapes no machine holds; that is the model's size, not a bug
        if debug:
            raise
        err.print("[red]error:[/red] the model needs more memory than this machine has to run "
                  "and validate it", highlight=False)
        raise typer.Exit(5) from None
    except Exception as e:  # noqa: BLE001 - a bug: still one line unless --debug
        if _interrupted(e):
            # a ^C inside a native extension's import surfaces as that import failing
            # (seen: "ImportError: initialization failed"); the user stopped the command
            _report_interrupt()
            raise typer.Exit(Interrupted.exit_code) from None
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        err.print(f"[red]error:[/red] internal error ({type(e).__name__}): {first} "
                  "(run with --debug for the traceback)", highlight=False)
        raise typer.Exit(1) from None


def shown(x: object) -> str:
    """Text for the terminal: a file name that is not UTF-8 (bytes the file system allows) is
    shown with replacement characters instead of failing the print."""
    return str(x).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@contextmanager
def _pickle_policy(allow: bool) -> Iterator[None]:
    """--allow-unsafe-pickle: the user vouches for the file (frontends/pt2.py)."""
    if not allow:
        yield
        return
    from attnopt.frontends.pt2 import trust_pickled_files

    err.print("[yellow]warning:[/yellow] --allow-unsafe-pickle: pickled objects in the model file "
              "will be unpickled, which runs any code they hold", highlight=False)
    with trust_pickled_files():
        yield


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
    allow_unsafe_pickle: bool = typer.Option(
        False, "--allow-unsafe-pickle",
        help="DANGEROUS: load .pt2 files that store pickled objects, which runs code from the file; "
             "only for files you made yourself"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Find every attention site in MODEL and describe it exactly."""
    import attnopt

    with user_errors(debug), _pickle_policy(allow_unsafe_pickle):
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
    from attnopt.outputs import check_output, onnx_external_files

    if output.suffix not in (".onnx", ".pt2"):
        raise OutputError(f"output {output} must end in .onnx or .pt2")
    if model.suffix in (".onnx", ".pt2") and output.suffix != model.suffix:
        raise OutputError(f"output {output} must have the input's format ({model.suffix})")
    inputs = [("input model", model)] + [("input model's external data", p)
                                         for p in onnx_external_files(model)] + list(reads)
    check_output(output, inputs, extra_names=[output.name + ".data"] if output.suffix == ".onnx" else ())


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
    allow_unsafe_pickle: bool = typer.Option(
        False, "--allow-unsafe-pickle",
        help="DANGEROUS: load .pt2 files that store pickled objects, which runs code from the file; "
             "only for files you made yourself"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Replace every attention site of MODEL by one fused, validated kernel; write OUTPUT."""
    import attnopt

    with user_errors(debug), _pickle_policy(allow_unsafe_pickle):
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
        _ignore_late_interrupts()
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
                "sites_found", "sites_rewritten", "max_abs_error", "output")}, indent=2) + "\n")
            return
        out.print(results_table(result))
        out.print(f"{result.sites_rewritten}/{result.sites_found} sites rewritten, max abs error "
                  f"{result.max_abs_error:.3g} (relative {result.rel_error:.3g}); wrote {shown(output)}")


def write_model(result, output: Path) -> None:
    """Write atomically: temporary file, check, reload, rename (outputs.py)."""
    from attnopt.outputs import write_onnx, write_pt2

    if output.suffix == ".onnx":
        write_onnx(result.model, output, getattr(result, "base_dir", None))
    else:
        write_pt2(result.model, output)


def main() -> None:
    import warnings

    if "--debug" not in sys.argv:
        warnings.filterwarnings("ignore")  # library deprecation chatter is not for our users
        _quiet_libraries()
    global _PROCESS_ENTRY
    _PROCESS_ENTRY = True
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # between typer's own steps, outside a command's handling
        code = Interrupted.exit_code
    else:
        code = 0
    if code == Interrupted.exit_code:  # typer also maps a ^C it sees itself to exit 130, silently
        _report_interrupt()
    # The command has finished (its output is written, or it failed cleanly). Interpreter
    # teardown (torch, ONNX Runtime) takes about a second, and CPython restores ^C's default
    # action for it: a ^C then killed the process by signal (exit -2, no message). The outcome is
    # decided, so leave without the teardown.
    _ignore_late_interrupts()
    if isinstance(code, str):
        err.print(code, highlight=False)
        code = 1
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or redirected stream: nothing left to flush
            pass
    os._exit(int(code or 0))


def _quiet_libraries() -> None:
    """torch's and ONNX Runtime's own log lines break the one-line promise; --debug keeps them."""
    import logging

    logging.getLogger("torch").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except Exception:  # noqa: BLE001 - without ORT there is nothing of it to quiet
        pass


_PROCESS_ENTRY = False  # True when main() runs as the process (console script / -m)
_INTERRUPT_REPORTED = False
_SIGINT_SEEN = False


def _on_sigint(signum, frame) -> None:
    """^C as Python's default handler treats it, remembered (see user_errors)."""
    global _SIGINT_SEEN
    _SIGINT_SEEN = True
    raise KeyboardInterrupt


def _interrupted(e: BaseException) -> bool:
    """Whether a failure comes from a ^C: one was received, or a KeyboardInterrupt is in its chain."""
    seen, x = 0, e
    while x is not None and seen < 20:
        if isinstance(x, KeyboardInterrupt):
            return True
        x, seen = x.__cause__ or x.__context__, seen + 1
    return _SIGINT_SEEN


def _report_interrupt() -> None:
    """The one-line ^C message, once, straight to the real stderr: a ^C can land while rich's
    live status display has sys.stderr redirected, and the message was then lost."""
    global _INTERRUPT_REPORTED
    if not _INTERRUPT_REPORTED:
        _INTERRUPT_REPORTED = True
        sys.__stderr__.write("error: interrupted\n")
        sys.__stderr__.flush()


def _ignore_late_interrupts() -> None:
    """Ignore ^C from here on, but only when attnopt is the process: an in-process caller (a test
    runner, CliRunner) keeps its handler, and its child processes do not inherit SIG_IGN."""
    if _PROCESS_ENTRY:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _register_subcommands() -> None:
    from attnopt.plan_cli import register as register_plan
    from attnopt.simulate_cli import register

    register(app)
    register_plan(app)


_register_subcommands()


if __name__ == "__main__":
    main()
