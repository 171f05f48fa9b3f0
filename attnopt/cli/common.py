"""What every `attnopt` command shares: the consoles, one-line errors with exit codes
(attnopt.errors), ^C handling, the quiet-libraries rule, and running the app as the process.

A user error is one line on stderr and a distinct exit code; a traceback only with --debug. A ^C
is "interrupted", exit 130, however it surfaces.
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console

from attnopt.errors import AttnoptError, Interrupted

# Shared by every command that opens a model file (pickle_policy below says what it allows).
UNSAFE_PICKLE_OPTION = typer.Option(
    False, "--allow-unsafe-pickle",
    help="DANGEROUS: load .pt2 files that store pickled objects, which runs code from the file; "
         "only for files you made yourself")

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


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
        report_interrupt()
        raise typer.Exit(Interrupted.exit_code) from None
    except MemoryError:
        # a file can declare shapes no machine holds; that is the model's size, not a bug
        if debug:
            raise
        err.print("[red]error:[/red] the model needs more memory than this machine has to run "
                  "and validate it", highlight=False)
        raise typer.Exit(5) from None
    except Exception as e:  # noqa: BLE001 - a bug: still one line unless --debug
        if interrupted(e):
            # a ^C inside a native extension's import surfaces as that import failing
            # (seen: "ImportError: initialization failed"); the user stopped the command
            report_interrupt()
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
def pickle_policy(allow: bool) -> Iterator[None]:
    """--allow-unsafe-pickle: the user vouches for the file (frontends/pt2.py)."""
    if not allow:
        yield
        return
    from attnopt.frontends.pt2 import trust_pickled_files

    err.print("[yellow]warning:[/yellow] --allow-unsafe-pickle: pickled objects in the model file "
              "will be unpickled, which runs any code they hold", highlight=False)
    with trust_pickled_files():
        yield


def run_as_process(app: typer.Typer) -> None:
    """Run `app` as the whole process: exit code from the command, ^C as exit 130, no
    interpreter teardown (see below)."""
    import warnings

    global _PROCESS_ENTRY
    _PROCESS_ENTRY = True
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        if "--debug" not in sys.argv:
            warnings.filterwarnings("ignore")  # library deprecation chatter is not for our users
            # inside the try: it imports ONNX Runtime (a second or more on a loaded machine), and a
            # ^C landing there escaped as a traceback and death by signal (exit -2)
            quiet_libraries()
        app()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # between typer's own steps, outside a command's handling
        code = Interrupted.exit_code
    else:
        code = 0
    if code == Interrupted.exit_code:  # typer also maps a ^C it sees itself to exit 130, silently
        report_interrupt()
    # The command has finished (its output is written, or it failed cleanly). Interpreter
    # teardown (torch, ONNX Runtime) takes about a second, and CPython restores ^C's default
    # action for it: a ^C then killed the process by signal (exit -2, no message). The outcome is
    # decided, so leave without the teardown.
    ignore_late_interrupts()
    if isinstance(code, str):
        err.print(code, highlight=False)
        code = 1
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or redirected stream: nothing left to flush
            pass
    os._exit(int(code or 0))


def quiet_libraries() -> None:
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


def on_sigint(signum, frame) -> None:
    """^C as Python's default handler treats it, remembered (see user_errors)."""
    global _SIGINT_SEEN
    _SIGINT_SEEN = True
    raise KeyboardInterrupt


def interrupted(e: BaseException) -> bool:
    """Whether a failure comes from a ^C: one was received, or a KeyboardInterrupt is in its chain."""
    seen, x = 0, e
    while x is not None and seen < 20:
        if isinstance(x, KeyboardInterrupt):
            return True
        x, seen = x.__cause__ or x.__context__, seen + 1
    return _SIGINT_SEEN


def report_interrupt() -> None:
    """The one-line ^C message, once, straight to the real stderr: a ^C can land while rich's
    live status display has sys.stderr redirected, and the message was then lost."""
    global _INTERRUPT_REPORTED
    if not _INTERRUPT_REPORTED:
        _INTERRUPT_REPORTED = True
        sys.__stderr__.write("error: interrupted\n")
        sys.__stderr__.flush()


def ignore_late_interrupts() -> None:
    """Ignore ^C from here on, but only when attnopt is the process: an in-process caller (a test
    runner, CliRunner) keeps its handler, and its child processes do not inherit SIG_IGN."""
    if _PROCESS_ENTRY:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


