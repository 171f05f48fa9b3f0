"""Console entry point for `attnopt`, outside the package on purpose.

Importing `attnopt` imports torch, which takes seconds; a ^C in that window must still end
with the one-line "interrupted" error and exit code 130, so the import itself happens here,
under the same handling as the commands (attnopt.cli.user_errors).
"""
from __future__ import annotations

import sys


def main() -> None:
    try:
        from attnopt.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
