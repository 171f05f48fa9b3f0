"""Console entry point for `attnopt`, outside the package on purpose.

Importing `attnopt` imports torch (and the CLI, ONNX Runtime), which takes seconds. A
KeyboardInterrupt raised inside a native extension's initialization can abort the process (seen:
SIGABRT) or lose the message, so during the import a ^C is only recorded; once the import is done
the process ends with the one-line "interrupted" error and exit code 130, as the commands do
(attnopt.cli.user_errors).
"""
from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    if "--debug" not in sys.argv:
        # torch's C++ warnings are printed at import and during loads; errors still show
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    hit: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(1))
    try:
        from attnopt.cli import main as cli_main
        from attnopt.cli.common import quiet_libraries

        if "--debug" not in sys.argv:
            quiet_libraries()  # imports ONNX Runtime: a native import too, so inside this window
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
        os._exit(130)  # no teardown of torch (see attnopt.cli.main)
    cli_main()


if __name__ == "__main__":
    main()
